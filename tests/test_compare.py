"""The comparator's parity rules: near-threshold flips against real mask differences, logit
tolerances, top-1 agreement, precision-dependent defaults, and figures that cannot be measured."""
from __future__ import annotations

import numpy as np
import pytest

from dyt_export.errors import UserError
from validation.compare import TOLERANCES, Tolerances, accuracy, compare, tolerances_for

LAYERS = ["blocks.0.mlp", "blocks.1.mlp"]


def _reference(batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dispatch_logits = rng.normal(0, 1, (batch, 2, 8)).astype(np.float32)
    masks = np.concatenate([np.ones((batch, 2, 1), bool), dispatch_logits > 0], axis=2)
    return {"logits": rng.normal(0, 3, (batch, 5)).astype(np.float32), "token_masks": masks,
            "dispatch_logits": dispatch_logits}


def test_identical_outputs_pass():
    ref = _reference()
    parity = compare(ref, ref["logits"].copy(), ref["token_masks"].copy(), LAYERS)
    assert parity.passed and parity.max_abs == 0 and parity.top1_agreement == 1 and parity.mask_agreement == 1


def test_near_threshold_mask_difference_is_a_reported_flip_not_a_failure():
    ref = _reference()
    ref["dispatch_logits"][2, 1, 5] = 3e-6  # reference: active, barely
    ref["token_masks"][2, 1, 6] = True
    masks = ref["token_masks"].copy()
    masks[2, 1, 6] = False
    logits = ref["logits"].copy()
    logits[2] = logits[2][::-1]  # the flipped image may even change class
    parity = compare(ref, logits, masks, LAYERS)
    assert parity.passed, parity.failures
    assert [(f.image, f.layer, f.token, f.reference_active) for f in parity.flips] == [(2, "blocks.1.mlp", 6, True)]
    assert parity.flips[0].logit == pytest.approx(3e-6)
    assert parity.images_with_flips == 1 and parity.mask_agreement < 1


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
    assert failures == ["top-1 class differs on 1 of 200 image(s) without flips (agreement 0.9950 < 1), e.g. image 7"]


def test_default_tolerances_follow_the_precision_and_nan_is_refused():
    assert tolerances_for("fp32") == Tolerances(max_rel=1e-4, cosine_min=0.9999, flip_logit=1e-5, top1_min=1.0)
    assert tolerances_for("fp16") == Tolerances(max_rel=5e-3, cosine_min=0.9999, flip_logit=1e-2, top1_min=1.0)
    assert tolerances_for("int8") == Tolerances(max_rel=0.5, cosine_min=0.95, flip_logit=0.3, top1_min=0.99)
    assert tolerances_for("int8", max_rel=0.1).max_rel == 0.1
    assert tolerances_for("bf16") == TOLERANCES["fp32"]  # no measured defaults: the strictest
    for bad in ({"max_rel": float("nan")}, {"cosine_min": float("nan")}, {"flip_logit": float("inf")},
                {"cosine_min": 1.5}, {"top1_min": -0.1}, {"max_rel": -1e-3}):
        with pytest.raises(UserError, match="must be a finite number"):
            Tolerances(**bad)


def test_figures_that_cannot_be_measured_are_none_never_nan():
    ref = _reference()
    parity = compare(ref, ref["logits"][:, :3], ref["token_masks"], LAYERS)
    assert not parity.passed and (parity.max_abs, parity.max_rel, parity.cosine_min) == (None, None, None)
    assert parity.summary().startswith("max_rel n/a")
    broken = {**ref, "logits": ref["logits"].copy()}
    broken["logits"][1, 2] = np.nan
    parity = compare(broken, ref["logits"], ref["token_masks"], LAYERS)
    assert any("the reference gives NaN/inf logits for 1 image(s)" in f for f in parity.failures)
    assert np.isfinite([parity.max_abs, parity.max_rel, parity.cosine_min]).all()


def test_accuracy_counts_labeled_images_only():
    logits = np.eye(4, dtype=np.float32)
    assert accuracy(logits, np.array([0, 1, 3, -1])) == pytest.approx(2 / 3)
    assert accuracy(logits, None) is None and accuracy(logits, np.full(4, -1)) is None
