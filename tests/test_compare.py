"""The comparator's parity rules: near-threshold flips against real mask differences, logit
tolerances, top-1 agreement, precision-dependent defaults, and figures that cannot be measured."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dyt_export.errors import UserError
from validation.accuracy import AccuracyTally
from validation.compare import compare
from validation.tolerances import TOLERANCES, Tolerances, tolerances_for

LAYERS = ["blocks.0.mlp", "blocks.1.mlp"]


def _reference(batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dispatch_logits = rng.normal(0, 1, (batch, 2, 8)).astype(np.float32)
    masks = np.concatenate([np.ones((batch, 2, 1), bool), dispatch_logits > 0], axis=2)
    return {"logits": rng.normal(0, 3, (batch, 5)).astype(np.float32), "token_masks": masks,
            "dispatch_logits": dispatch_logits}


def _flip(ref: dict[str, np.ndarray], masks: np.ndarray, image: int, logit: float) -> None:
    """Give `image` a near-threshold token (reference logit `logit`) at the first dispatcher,
    decided the other way in the runtime's `masks`."""
    ref["dispatch_logits"][image, 0, 0] = logit
    ref["token_masks"][image, 0, 1] = logit > 0
    masks[image, 0, 1] = not logit > 0


def test_identical_outputs_pass():
    ref = _reference()
    parity = compare(ref, ref["logits"].copy(), ref["token_masks"].copy(), LAYERS)
    assert parity.passed and parity.max_abs == 0 and parity.top1_agreement == 1 and parity.mask_agreement == 1
    assert (parity.images_compared_on_logits, parity.images_compared_on_top1_cosine, parity.flip_cosine_min) == (4, 0, None)


def test_near_threshold_mask_difference_is_a_reported_flip_not_a_failure():
    ref = _reference()
    ref["dispatch_logits"][2, 1, 5] = 3e-6  # reference: active, barely
    ref["token_masks"][2, 1, 6] = True
    masks = ref["token_masks"].copy()
    masks[2, 1, 6] = False
    logits = ref["logits"].copy()
    logits[2] += 0.02 * np.abs(logits).max()  # the flipped image ran another computation: far beyond max_rel
    parity = compare(ref, logits, masks, LAYERS)
    assert parity.passed, parity.failures
    assert [(f.image, f.layer, f.token, f.reference_active) for f in parity.flips] == [(2, "blocks.1.mlp", 6, True)]
    assert parity.flips[0].logit == pytest.approx(3e-6)
    assert parity.images_with_flips == 1 and parity.mask_agreement < 1
    assert (parity.images_compared_on_logits, parity.images_compared_on_top1_cosine) == (3, 1)
    assert parity.max_rel == 0 and 0.95 < parity.flip_cosine_min < 0.9999  # held to the flip bound, not cosine_min
    assert "on 3/4 images (1 with a flip: top-1 and cosine only), top-1 agreement 1.0000 on all" in parity.summary()


def test_a_flip_does_not_excuse_a_changed_class_or_a_wrong_direction():
    ref = _reference()
    masks = ref["token_masks"].copy()
    _flip(ref, masks, 2, 3e-6)
    swapped = ref["logits"].copy()
    swapped[2] = swapped[2][::-1]  # another class on the flipped image
    parity = compare(ref, swapped, masks, LAYERS)
    assert parity.top1_agreement == 0.75 and any(
        f.startswith("top-1 class differs on 1 of 4 image(s) (1 of them with a flip) (agreement 0.7500 < 1), e.g. image 2")
        for f in parity.failures), parity.failures
    assert any("which has a flip" in f for f in parity.failures)  # reversed logits point elsewhere too
    loose = Tolerances(flip_cosine_min=-1.0, top1_min=0.75)
    assert compare(ref, swapped, masks, LAYERS, loose).passed  # only when the caller allows both


def test_mask_difference_away_from_threshold_fails_whatever_the_tolerances():
    ref = _reference()
    ref["dispatch_logits"][1, 0, 3] = 0.02
    ref["token_masks"][1, 0, 4] = True
    masks = ref["token_masks"].copy()
    masks[1, 0, 4] = False
    parity = compare(ref, ref["logits"], masks, LAYERS, Tolerances(max_rel=1.0, cosine_min=0.0))
    assert not parity.passed and not parity.flips
    assert "image 1, blocks.0.mlp token 4: reference logit 0.02" in parity.failures[0]


def test_differences_after_a_flip_follow_from_it_but_not_before_or_in_other_images():
    ref = _reference()
    ref["dispatch_logits"][1, 0, 2] = -4e-6  # image 1 flips at the first dispatcher
    ref["token_masks"][1, 0, 3] = False
    ref["dispatch_logits"][1, 0, 4] = 0.5  # a clear decision in the same layer
    ref["token_masks"][1, 0, 5] = True
    masks = ref["token_masks"].copy()
    masks[1, 0, 3] = True
    masks[1, 1, 1:] = ~masks[1, 1, 1:]  # so its whole next layer may legitimately differ
    parity = compare(ref, ref["logits"], masks, LAYERS)
    assert parity.passed, parity.failures
    assert len(parity.flips) == 1 and parity.after_flip == 8
    masks[2, 1, 4] = ~masks[2, 1, 4]  # ...but another image gets no such pass
    assert not compare(ref, ref["logits"], masks, LAYERS).passed
    masks[2, 1, 4] = ~masks[2, 1, 4]
    masks[1, 0, 5] = ~masks[1, 0, 5]  # nor does a clear token of the flip's own layer
    assert not compare(ref, ref["logits"], masks, LAYERS).passed


def _with_margins(ref: dict[str, np.ndarray], image: int, block: int, margin: float) -> dict[str, np.ndarray]:
    """`ref` as a ToMe model's reference (3 blocks, dispatchers in blocks 1 and 2) whose
    matching at `block` of `image` was `margin` from another decision (elsewhere 0.01)."""
    ref["merge_margins"] = np.full((len(ref["logits"]), 3), 0.01, np.float32)
    ref["merge_margins"][image, block] = margin
    return ref


TOME_BLOCKS = (1, 2)


def test_a_merge_near_a_tie_excuses_the_differences_from_its_block_on_and_is_reported():
    ref = _with_margins(_reference(), image=3, block=2, margin=6e-8)
    masks = ref["token_masks"].copy()
    masks[3, 1, 2:5] = ~masks[3, 1, 2:5]  # clear decisions at the dispatcher after the tied merge
    logits = ref["logits"].copy()
    logits[3] += 0.02 * np.abs(logits).max()  # another merge: far beyond max_rel
    parity = compare(ref, logits, masks, LAYERS, blocks=TOME_BLOCKS)
    assert parity.passed, parity.failures
    assert [(t.image, t.block) for t in parity.merge_ties] == [(3, 2)] and parity.merge_ties[0].margin == pytest.approx(6e-8)
    assert parity.after_merge_tie == 3 and not parity.flips and parity.mask_agreement < 1
    assert (parity.images_compared_on_logits, parity.images_compared_on_top1_cosine) == (3, 1)
    assert parity.max_rel == 0 and "merge ties 1" in parity.summary()
    assert not compare(ref, logits, masks, LAYERS, Tolerances(merge_tie=1e-8), blocks=TOME_BLOCKS).passed
    masks[3, 0, 3] = ~masks[3, 0, 3]  # a dispatcher before the tie gets no such pass
    failures = compare(ref, logits, masks, LAYERS, blocks=TOME_BLOCKS).failures
    assert len(failures) == 1 and "image 3, blocks.0.mlp token 3: reference logit" in failures[0], failures


def test_a_merge_away_from_a_tie_excuses_nothing_and_a_tie_that_shows_nowhere_stays_on_logits():
    ref = _with_margins(_reference(), image=1, block=1, margin=2e-5)
    masks = ref["token_masks"].copy()
    masks[1, 1, 2] = ~masks[1, 1, 2]
    assert "1 token mask difference(s) that are not near-threshold flips" in \
        compare(ref, ref["logits"], masks, LAYERS, blocks=TOME_BLOCKS).failures[0]
    logits = ref["logits"].copy()
    logits[1] *= 1.01
    assert not compare(ref, logits, ref["token_masks"], LAYERS, blocks=TOME_BLOCKS).passed  # beyond max_rel
    ref["merge_margins"][1, 1] = 1e-6  # a tie whose masks and logits agree: merged as the reference did
    parity = compare(ref, ref["logits"], ref["token_masks"], LAYERS, blocks=TOME_BLOCKS)
    assert parity.passed and not parity.merge_ties and parity.images_compared_on_logits == 4


@pytest.mark.parametrize("with_masks", [True, False])
def test_logits_beyond_max_rel_show_a_merge_tie_the_masks_do_not(with_masks):
    ref = _with_margins(_reference(), image=0, block=0, margin=0.0)
    ref["merge_margins"][2, 2] = 9e-6
    logits = ref["logits"].copy()
    logits[2] *= 1.01  # image 2 merged otherwise, with the same masks; image 0 merged as the reference
    parity = compare(ref, logits, ref["token_masks"].copy() if with_masks else None, LAYERS, blocks=TOME_BLOCKS)
    assert parity.passed, parity.failures
    assert [(t.image, t.block, t.margin) for t in parity.merge_ties] == [(2, 2, pytest.approx(9e-6))]
    assert (parity.images_compared_on_logits, parity.images_compared_on_top1_cosine) == (3, 1)
    assert parity.after_merge_tie == 0 and parity.max_rel == 0
    strict = Tolerances(max_rel=0.02)  # within max_rel of its own logits: nothing shows the tie
    assert not compare(ref, logits, None, LAYERS, strict).merge_ties
    with pytest.raises(ValueError, match="need the block of each dispatcher"):
        compare(ref, logits, ref["token_masks"], LAYERS)


def test_cls_must_stay_active():
    ref = _reference()
    masks = ref["token_masks"].copy()
    masks[0, 1, 0] = False
    assert "CLS must always be active" in compare(ref, ref["logits"], masks, LAYERS).failures[0]


def test_logit_tolerances_and_top1_are_enforced():
    ref = _reference()
    close = ref["logits"] * (1 + 1e-6)
    assert compare(ref, close, ref["token_masks"], LAYERS).passed
    off = ref["logits"].copy()
    off[3] += 0.01 * np.abs(ref["logits"]).max()
    parity = compare(ref, off, ref["token_masks"], LAYERS)
    assert not parity.passed and "max |diff| / max |reference|" in parity.failures[0]
    assert compare(ref, off, ref["token_masks"], LAYERS, Tolerances(max_rel=0.02, cosine_min=0.99)).passed
    swapped = ref["logits"].copy()
    swapped[0] = np.roll(swapped[0], 1)
    assert any("top-1 class differs" in f for f in compare(ref, swapped, ref["token_masks"], LAYERS).failures)
    nan = ref["logits"].copy()
    nan[1, 0] = np.nan
    assert any("NaN/inf logits" in f for f in compare(ref, nan, ref["token_masks"], LAYERS).failures)


def test_top1_min_lets_a_share_of_images_change_class():
    ref = _reference(batch=200)
    logits = ref["logits"].copy()
    logits[7] = np.roll(logits[7], 1)
    loose = dict(max_rel=10.0, cosine_min=-1.0)
    assert compare(ref, logits, ref["token_masks"], LAYERS, Tolerances(**loose, top1_min=0.99)).passed
    failures = compare(ref, logits, ref["token_masks"], LAYERS, Tolerances(**loose)).failures
    assert failures == ["top-1 class differs on 1 of 200 image(s) (agreement 0.9950 < 1), e.g. image 7"]


def _int8_like(batch: int, flipped: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(reference, runtime logits, runtime masks): int8-like noise on every logit (0.1 of
    max |logit|), and a near-threshold flip in the first `flipped` images."""
    ref = _reference(batch=batch, seed=1)
    ref["logits"] /= 3
    ref["logits"][np.arange(batch), np.arange(batch) % 5] += 10.0  # clear classes, which the noise cannot change
    logits = ref["logits"] + 0.1 * np.abs(ref["logits"]).max() * np.random.default_rng(2).uniform(-1, 1, ref["logits"].shape)
    masks = ref["token_masks"].copy()
    for image in range(flipped):
        _flip(ref, masks, image, 0.1 * (-1) ** image)
    return ref, logits.astype(np.float32), masks


def test_all_flipped_run_fails_on_the_share_and_passes_only_when_told_on_top1_and_cosine_of_all():
    """int8-like tolerances where every image has a flip: no logit was held to max_rel, so
    the run fails with that reason, never with a vacuous max_rel 0 and cosine 1."""
    ref, logits, masks = _int8_like(batch=8, flipped=8)
    int8 = TOLERANCES["int8"]
    parity = compare(ref, logits, masks, LAYERS, int8)
    assert parity.images_with_flips == 8 and not parity.passed
    assert parity.failures == ["only 0 of 8 image(s) (0%) were compared on logits, fewer than the 50% required: "
                               "8 carry a flip (--logit-share-min lowers the share)"]
    assert (parity.max_abs, parity.max_rel, parity.cosine_min) == (None, None, None)  # not 0 / 0 / 1
    assert (parity.images_compared_on_logits, parity.images_compared_on_top1_cosine) == (0, 8)
    assert parity.top1_agreement == 1.0 and 0.95 < parity.flip_cosine_min < 1
    allowed = compare(ref, logits, masks, LAYERS, replace(int8, logit_share_min=0.0))
    assert allowed.passed, allowed.failures
    assert allowed.summary().startswith("max_rel n/a on 0/8 images (8 with a flip: top-1 and cosine only), "
                                        "top-1 agreement 1.0000 on all")
    logits[5] = np.roll(logits[5], 1)  # and with the share lowered, a changed class still fails
    failures = compare(ref, logits, masks, LAYERS, replace(int8, logit_share_min=0.0)).failures
    assert any("top-1 class differs on 1 of 8 image(s) (1 of them with a flip)" in f for f in failures), failures


@pytest.mark.parametrize("flipped, passed", [(0, True), (3, True), (4, True), (5, False)])
def test_partly_flipped_runs_pass_while_half_the_images_are_compared_on_logits(flipped, passed):
    ref, logits, masks = _int8_like(batch=8, flipped=flipped)
    parity = compare(ref, logits, masks, LAYERS, TOLERANCES["int8"])
    assert parity.passed == passed, parity.failures
    assert (parity.images_compared_on_logits, parity.images_compared_on_top1_cosine) == (8 - flipped, flipped)
    assert 0.05 < parity.max_rel < 0.5 and parity.cosine_min > 0.95
    assert (parity.flip_cosine_min is None) == (flipped == 0)
    if not passed:
        assert parity.failures == ["only 3 of 8 image(s) (38%) were compared on logits, fewer than the 50% required: "
                                   "5 carry a flip (--logit-share-min lowers the share)"]


def test_default_tolerances_follow_the_precision_and_nan_is_refused():
    assert tolerances_for("fp32") == Tolerances(max_rel=1e-4, cosine_min=0.9999, flip_logit=1e-5, top1_min=1.0)
    assert tolerances_for("fp16") == Tolerances(max_rel=5e-3, cosine_min=0.9999, flip_logit=1e-2, top1_min=1.0)
    assert tolerances_for("int8") == Tolerances(max_rel=0.5, cosine_min=0.95, flip_logit=0.3, top1_min=0.99)
    assert tolerances_for("int8", max_rel=0.1).max_rel == 0.1
    assert tolerances_for("bf16") == TOLERANCES["fp32"]  # no measured defaults: the strictest
    assert tolerances_for("fp16").logit_share_min == tolerances_for("int8").logit_share_min == 0.5
    assert tolerances_for("int8").flip_cosine_min == tolerances_for("fp32").flip_cosine_min == 0.95
    for bad in ({"max_rel": float("nan")}, {"cosine_min": float("nan")}, {"flip_logit": float("inf")},
                {"cosine_min": 1.5}, {"top1_min": -0.1}, {"max_rel": -1e-3}, {"logit_share_min": 1.01},
                {"logit_share_min": float("nan")}, {"flip_cosine_min": -2.0}, {"merge_tie": float("nan")},
                {"merge_tie": -1e-6}):
        with pytest.raises(UserError, match="must be a finite number"):
            Tolerances(**bad)


def test_figures_that_cannot_be_measured_are_none_never_nan():
    ref = _reference()
    parity = compare(ref, ref["logits"][:, :3], ref["token_masks"], LAYERS)
    assert not parity.passed and (parity.max_abs, parity.max_rel, parity.cosine_min) == (None, None, None)
    assert (parity.top1_agreement, parity.mask_agreement, parity.flip_cosine_min) == (None, None, None)
    assert parity.summary().startswith("max_rel n/a on 0/4 images, top-1 agreement n/a on all")
    parity = compare(ref, ref["logits"], ref["token_masks"][:, :, :5], LAYERS)
    assert parity.mask_agreement is None and "token_masks shape" in parity.failures[0]
    broken = {**ref, "logits": ref["logits"].copy()}
    broken["logits"][1, 2] = np.nan
    parity = compare(broken, ref["logits"], ref["token_masks"], LAYERS)
    assert any("the reference gives NaN/inf logits for 1 image(s)" in f for f in parity.failures)
    assert np.isfinite([parity.max_abs, parity.max_rel, parity.cosine_min]).all()


def test_accuracy_counts_labeled_images_only():
    logits = np.eye(4, dtype=np.float32)
    summary = AccuracyTally().add(logits, logits, np.array([0, 1, 3, -1])).summary(4)
    assert summary["images"] == 3 and summary["reference"] == summary["runtime"] == pytest.approx(2 / 3)
    assert summary["reference_top5"] is None  # 4 classes: every image would be in the top 5
    assert AccuracyTally().add(logits, logits, None).summary(4) is None
    assert AccuracyTally().add(logits, logits, np.full(4, -1)).summary(4) is None
    failed = AccuracyTally().add(logits, None, np.array([0, 1, 3, -1])).summary(10)
    assert failed["reference"] == pytest.approx(2 / 3) and failed["runtime"] is failed["runtime_top5"] is None
