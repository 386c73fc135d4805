"""The comparator: is a runtime's answer PyTorch's answer? (Polygraphy's split: runners
produce outputs, this judges them.)

Rules, in order:

1. Masks. Each token decision of the runtime is compared with the reference's. A
   difference is a *flip* only when the reference dispatcher logit of that token is within
   the runtime's logit noise of the threshold, |logit| <= `flip_logit`: two correct
   implementations may then legitimately disagree. Every flip is reported (image,
   dispatcher, token, logit). A difference at a later dispatcher of an image that already
   flipped follows from that flip (the token took the other path, so everything after it
   legitimately differs): it is counted in `after_flip`, not judged. Any other difference,
   including CLS not being active, is a failure. Flips are never absorbed by loosening a
   tolerance.
1b. Merge ties (ToMe). Which tokens merge is a ranking of similarities, and the reference
   gives each block's `merge_margins` (how far its matching was from another decision). An
   image whose margin at a block is within float noise, <= `merge_tie`, may merge otherwise
   on a runtime. When the runtime shows it did, the image is reported as a *merge tie*
   (image, block, margin): its masks differ at that block's dispatcher or a later one (every
   such difference is a consequence, `after_merge_tie`), or its logits differ by more than
   `max_rel` of its own max |reference| (the masks need not show every merge). Differences
   before the tie are judged; an image near a tie that shows neither merged as the reference.
2. Logits. An image without a flip or merge tie is *compared on logits*: max |diff| / max |reference|
   <= `max_rel` and per-image cosine similarity >= `cosine_min`. An image with a flip runs
   a different computation after that token, so `max_rel` cannot hold it; it is compared
   on top-1 and cosine only, cosine >= `flip_cosine_min` (or `cosine_min` when lower): a
   single forced flip moved a demo image's cosine to 0.983, below the fp32/fp16 bound
   0.9999, never below 0.95 (docs/validation.md). The same top-1 class is required on a
   `top1_min` share of ALL images (1.0: every one), in every precision: a flip does not
   excuse a changed class.
3. Coverage. At least a `logit_share_min` share of the images (default half) must be
   compared on logits; a run where flips leave fewer fails with that reason, so no verdict
   rests on top-1 alone unless the caller lowers the share (`--logit-share-min`). The
   record states how many images were compared on logits and how many on top-1 and cosine.
4. Non-finite outputs are failures (the runtime's, and the reference's: a reference that
   produces NaN cannot vouch for anything); such images are in neither count.

Default tolerances per precision, and how they were measured: `validation.tolerances`.

`max_abs`, `max_rel` and `cosine_min` are over the images compared on logits,
`flip_cosine_min` over those with a flip, `top1_agreement` and `mask_agreement` over all.
A figure that could not be measured is None, never a stand-in 0 or 1 (no image of its
kind, shapes that differ, a runtime that failed), so a record never holds NaN or infinity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .parity import Flip, MergeTie, Parity, unmeasured
from .tolerances import Tolerances

_SHOW = 3  # failures named per kind


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: how far apart two runs' logits are, on the scale the
    parity rules use, for experiments that compare contenders rather than judge a runtime."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b` (float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots = (a64 * b64).sum(axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one is not.
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where((a64 == b64).all(axis=1), 1.0, 0.0))


Extreme = tuple[float, int]
"""(value, image): a minimum and the first image that has it, merged by the lower pair."""


def first_ties(merge_margins: np.ndarray | None, merge_tie: float, images: int) -> np.ndarray:
    """[B] the first block whose matching margin is <= `merge_tie`, -1 where none is (or the
    reference ran no merges)."""
    if merge_margins is None or not merge_margins.size:
        return np.full(images, -1)
    tied = merge_margins <= merge_tie
    return np.where(tied.any(axis=1), tied.argmax(axis=1), -1)


def _lower(a: Extreme | None, b: Extreme | None) -> Extreme | None:
    return b if a is None else a if b is None else min(a, b)


def _higher(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass
class ParityTally:
    """What the parity rules need to know about a set of images, as counts, extremes and
    lists that merge exactly: `add` one chunk of images at a time, `merge` tallies of
    disjoint chunks in any order, then `verdict`. A whole run in one pass, in chunks, or
    sharded over workers gives the same `Parity`, so a dataset of any size is judged by the
    rules a small one is, with memory that does not grow with it. Image numbers are the
    caller's (`ids`: the images' places in the whole input), so flips and failures name the
    same image however the run was cut. JSON-ready through `to_dict` / `from_dict`, for
    partial results saved to resume a run."""

    images: int = 0
    unmeasured: str | None = None
    """Why nothing could be compared (logits of another shape): every figure is then null."""
    masks_compared: bool = False
    mask_shape: str | None = None
    """The failure when the masks had another shape than the reference's (agreement null)."""
    mask_differ: int = 0
    mask_decisions: int = 0
    flips: list[Flip] = field(default_factory=list)
    after_flip: int = 0
    merge_ties: list[MergeTie] = field(default_factory=list)
    after_merge_tie: int = 0
    bad_masks: int = 0
    bad_examples: list[tuple[int, int, int, str]] = field(default_factory=list)
    """The first _SHOW mask differences that are not flips, as (image, dispatcher, token, text)."""
    nonfinite: list[int] = field(default_factory=lambda: [0, -1])
    """[images with NaN/inf runtime logits, the first of them]."""
    ref_nonfinite: list[int] = field(default_factory=lambda: [0, -1])
    on_logits: int = 0
    on_flips: int = 0
    max_abs: float | None = None
    scale: float | None = None
    """max |reference logit| over the images compared on logits: max_rel = max_abs / scale."""
    cosine_min: Extreme | None = None
    flip_cosine_min: Extreme | None = None
    top1_same: int = 0
    top1_wrong_first: int | None = None
    top1_wrong_flipped: int = 0

    def add(self, reference: dict[str, np.ndarray], logits: np.ndarray, masks: np.ndarray | None,
            layers: Sequence[str], flip_logit: float, tokens: Sequence[int] | None = None,
            ids: np.ndarray | None = None, *, blocks: Sequence[int] | None = None,
            merge_tie: float = Tolerances.merge_tie, max_rel: float = Tolerances.max_rel) -> "ParityTally":
        """Tally one chunk (arguments as for `compare`; `ids`: the images' numbers, default 0..B-1;
        `max_rel`: the bound past which a near-tie image's logits show another merge)."""
        ref = reference["logits"].astype(np.float32)
        ids = np.arange(len(ref)) if ids is None else np.asarray(ids, np.int64)
        self.images += len(ref)
        if logits.shape != ref.shape:  # per image in the message: the same whatever the chunk
            self.unmeasured = f"logits shape {list(logits.shape[1:])} per image differs from the reference's {list(ref.shape[1:])}"
            return self
        finite, ref_finite = np.isfinite(logits).all(axis=1), np.isfinite(ref).all(axis=1)
        for counter, ok in ((self.nonfinite, finite), (self.ref_nonfinite, ref_finite)):
            if not ok.all():
                counter[1] = int(ids[np.argmin(ok)]) if counter[0] == 0 else min(counter[1], int(ids[np.argmin(ok)]))
                counter[0] += int((~ok).sum())
        margins = reference.get("merge_margins")
        flips_before, ties_before = len(self.flips), len(self.merge_ties)
        if masks is not None:
            self.add_masks(reference["token_masks"], reference["dispatch_logits"], masks, layers, flip_logit, tokens,
                           ids, merge_margins=margins, blocks=blocks, merge_tie=merge_tie)
        both = finite & ref_finite
        ties = np.where(both, first_ties(margins, merge_tie, len(ref)), -1)
        self._add_ties_in_logits(ref, logits, ties, margins, ids, max_rel, ties_before)
        apart = [f.image for f in self.flips[flips_before:]] + [t.image for t in self.merge_ties[ties_before:]]
        flipped = np.isin(ids, apart)
        on_logits, on_flips = both & ~flipped, both & flipped
        cosine = np.full(len(ref), np.nan)
        cosine[both] = row_cosines(logits[both], ref[both])
        if on_logits.any():
            self.max_abs = _higher(self.max_abs, float(np.abs(logits[on_logits].astype(np.float64) - ref[on_logits]).max()))
            self.scale = _higher(self.scale, float(np.abs(ref[on_logits]).max()))
        for name, rows in (("cosine_min", on_logits), ("flip_cosine_min", on_flips)):
            if rows.any():
                low = int(np.nanargmin(np.where(rows, cosine, np.nan)))
                setattr(self, name, _lower(getattr(self, name), (float(cosine[low]), int(ids[low]))))
        self.on_logits += int(on_logits.sum())
        self.on_flips += int(on_flips.sum())
        same = logits.argmax(axis=1) == ref.argmax(axis=1)
        self.top1_same += int(same.sum())
        if not same.all():
            first = int(ids[np.argmin(same)])
            self.top1_wrong_first = first if self.top1_wrong_first is None else min(self.top1_wrong_first, first)
            self.top1_wrong_flipped += int(flipped[~same].sum())
        return self

    def _add_ties_in_logits(self, ref: np.ndarray, logits: np.ndarray, ties: np.ndarray, margins: np.ndarray | None,
                            ids: np.ndarray, max_rel: float, ties_before: int) -> None:
        """Report the near-tie images (`ties` >= 0) whose logits differ by more than `max_rel`
        of their own max |reference| and whose masks did not already show the tie; then order
        the chunk's ties by image, as a merge of chunks does."""
        shown = {t.image for t in self.merge_ties[ties_before:]}
        for b in np.flatnonzero(ties >= 0):
            beyond = np.abs(logits[b].astype(np.float64) - ref[b]).max() > max_rel * np.abs(ref[b]).max()
            if beyond and int(ids[b]) not in shown:
                self.merge_ties.append(MergeTie(int(ids[b]), int(ties[b]), float(margins[b, ties[b]])))
        self.merge_ties[ties_before:] = sorted(self.merge_ties[ties_before:], key=lambda t: t.image)

    def add_masks(self, reference_masks: np.ndarray, reference_logits: np.ndarray, masks: np.ndarray,
                  layers: Sequence[str], flip_logit: float, tokens: Sequence[int] | None, ids: np.ndarray, *,
                  merge_margins: np.ndarray | None = None, blocks: Sequence[int] | None = None,
                  merge_tie: float = Tolerances.merge_tie) -> None:
        """Tally the token masks of one chunk (rules 1 and 1b); `add` calls it, `compare_masks`
        alone. `blocks` [D]: each dispatcher's block (`cfg.dispatcher_blocks`), needed with
        `merge_margins` [B, depth]."""
        self.masks_compared = True
        ties = first_ties(merge_margins, merge_tie, len(masks))
        if (ties >= 0).any() and blocks is None:
            raise ValueError("merge_margins need the block of each dispatcher (blocks)")
        if masks.shape != reference_masks.shape:
            self.mask_shape = (f"token_masks shape {list(masks.shape[1:])} per image differs from the reference's "
                               f"{list(reference_masks.shape[1:])}")
            return
        differ = masks.astype(bool) != reference_masks.astype(bool)
        seen = np.full(masks.shape[1], masks.shape[2]) if tokens is None else np.asarray(tokens)
        real = np.arange(masks.shape[2]) < seen[:, None]  # [D, N]
        self.mask_differ += int(differ[:, real].sum())
        self.mask_decisions += int(differ[:, real].size)
        first_flip: dict[int, int] = {}  # image -> dispatcher index of its first flip
        tied: set[int] = set()
        bad: list[tuple[int, int, int, str]] = []
        for b, d, n in zip(*np.nonzero(differ)):  # ordered by image, then dispatcher
            image = int(ids[b])
            where = f"image {image}, {layers[d]} token {n}"
            if not real[d, n]:
                bad.append((image, int(d), int(n), f"{where}: padding (the dispatcher sees {int(seen[d])} tokens) must be False"))
                continue
            if b in first_flip and d > first_flip[b]:
                self.after_flip += 1
                continue
            if n == 0:
                bad.append((image, int(d), int(n), f"{where}: CLS must always be active"))
                continue
            if ties[b] >= 0 and blocks[d] >= ties[b]:
                self.after_merge_tie += 1
                tied.add(int(b))
                continue
            logit = float(reference_logits[b, d, n - 1])
            if np.isfinite(logit) and abs(logit) <= flip_logit:
                self.flips.append(Flip(image, layers[d], int(n), logit, bool(reference_masks[b, d, n])))
                first_flip.setdefault(int(b), int(d))
            else:
                bad.append((image, int(d), int(n), f"{where}: reference logit {logit:.3g} is not within {flip_logit:g} of 0"))
        self.merge_ties += [MergeTie(int(ids[b]), int(ties[b]), float(merge_margins[b, ties[b]])) for b in sorted(tied)]
        self.bad_masks += len(bad)
        self.bad_examples = sorted(self.bad_examples + bad[:_SHOW])[:_SHOW]

    def merge(self, other: "ParityTally") -> "ParityTally":
        """This tally and `other`'s (disjoint images) as one, whatever order they were made in."""
        counts = ("images", "mask_differ", "mask_decisions", "after_flip", "after_merge_tie", "bad_masks", "on_logits",
                  "on_flips", "top1_same", "top1_wrong_flipped")
        merged = ParityTally(**{name: getattr(self, name) + getattr(other, name) for name in counts})
        merged.unmeasured, merged.mask_shape = self.unmeasured or other.unmeasured, self.mask_shape or other.mask_shape
        merged.masks_compared = self.masks_compared or other.masks_compared
        merged.flips = sorted(self.flips + other.flips, key=lambda f: f.image)  # stable: an image's own order stays
        merged.merge_ties = sorted(self.merge_ties + other.merge_ties, key=lambda t: t.image)
        merged.bad_examples = sorted(self.bad_examples + other.bad_examples)[:_SHOW]
        for name in ("nonfinite", "ref_nonfinite"):
            a, b = getattr(self, name), getattr(other, name)
            firsts = [c[1] for c in (a, b) if c[0]]
            setattr(merged, name, [a[0] + b[0], min(firsts) if firsts else -1])
        merged.max_abs, merged.scale = _higher(self.max_abs, other.max_abs), _higher(self.scale, other.scale)
        merged.cosine_min = _lower(self.cosine_min, other.cosine_min)
        merged.flip_cosine_min = _lower(self.flip_cosine_min, other.flip_cosine_min)
        wrong = [w for w in (self.top1_wrong_first, other.top1_wrong_first) if w is not None]
        merged.top1_wrong_first = min(wrong) if wrong else None
        return merged

    @property
    def mask_agreement(self) -> float | None:
        if not self.masks_compared or self.mask_shape:
            return None
        return float(1.0 - self.mask_differ / self.mask_decisions) if self.mask_decisions else 1.0

    def mask_failures(self) -> list[str]:
        if self.mask_shape:
            return [self.mask_shape]
        if self.bad_masks:
            examples = "; ".join(text for *_, text in self.bad_examples)
            return [f"{self.bad_masks} token mask difference(s) that are not near-threshold flips, e.g. {examples}"]
        return []

    def verdict(self, tolerances: Tolerances = Tolerances()) -> Parity:
        """The `Parity` of every image tallied, judged by `tolerances`."""
        if self.unmeasured:
            return unmeasured(self.images, self.unmeasured)
        failures: list[str] = []
        if self.nonfinite[0]:
            failures.append(f"{self.nonfinite[0]} image(s) with NaN/inf logits, first: image {self.nonfinite[1]}")
        if self.ref_nonfinite[0]:
            failures.append(f"the reference gives NaN/inf logits for {self.ref_nonfinite[0]} image(s), "
                            f"first: image {self.ref_nonfinite[1]}")
        failures += self.mask_failures()
        max_abs, cosine_min = self.max_abs, self.cosine_min
        max_rel = None
        if max_abs is not None and self.scale is not None and cosine_min is not None:
            max_rel = max_abs / self.scale if self.scale > 0 else (0.0 if max_abs == 0 else None)
            if max_rel is None:
                failures.append(f"the reference logits are all 0 and the runtime's differ by up to {max_abs:.3g}")
            elif max_rel > tolerances.max_rel:
                failures.append(f"logits max |diff| / max |reference| = {max_rel:.3g} > {tolerances.max_rel:g}")
            if cosine_min[0] < tolerances.cosine_min:
                failures.append(f"logits cosine similarity {cosine_min[0]:.6f} < {tolerances.cosine_min} "
                                f"(image {cosine_min[1]})")
        if self.flip_cosine_min is not None:
            bound = min(tolerances.cosine_min, tolerances.flip_cosine_min)  # a flip never tightens the bound
            if self.flip_cosine_min[0] < bound:
                failures.append(f"logits cosine similarity {self.flip_cosine_min[0]:.6f} < {bound:g} on image "
                                f"{self.flip_cosine_min[1]}, which has a flip")
        agreement = self.top1_same / self.images if self.images else None
        wrong = self.images - self.top1_same
        if wrong and agreement is not None and agreement < tolerances.top1_min:
            with_flips = self.top1_wrong_flipped
            failures.append(f"top-1 class differs on {wrong} of {self.images} image(s)"
                            f"{f' ({with_flips} of them with a flip)' if with_flips else ''} "
                            f"(agreement {agreement:.4f} < {tolerances.top1_min:g}), e.g. image {self.top1_wrong_first}")
        compared, unfinite = self.on_logits, self.images - self.on_logits - self.on_flips
        if compared < tolerances.logit_share_min * self.images:
            failures.append(f"only {compared} of {self.images} image(s) ({compared / self.images:.0%}) were compared on "
                            f"logits, fewer than the {tolerances.logit_share_min:.0%} required: {self.on_flips} carry a "
                            f"flip{f' and {unfinite} NaN/inf logits' if unfinite else ''} (--logit-share-min lowers the share)")
        return Parity(images=self.images, max_abs=max_abs, max_rel=max_rel,
                      cosine_min=None if cosine_min is None else cosine_min[0], top1_agreement=agreement,
                      mask_agreement=self.mask_agreement,
                      flip_cosine_min=None if self.flip_cosine_min is None else self.flip_cosine_min[0],
                      images_compared_on_logits=compared, images_compared_on_top1_cosine=self.on_flips,
                      flips=list(self.flips), after_flip=self.after_flip, merge_ties=list(self.merge_ties),
                      after_merge_tie=self.after_merge_tie, failures=failures)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParityTally":
        tally = cls(**{**data, "flips": [Flip(**f) for f in data["flips"]],
                       "merge_ties": [MergeTie(**t) for t in data["merge_ties"]],
                       "bad_examples": [tuple(e) for e in data["bad_examples"]]})
        for name in ("cosine_min", "flip_cosine_min"):
            value = getattr(tally, name)
            setattr(tally, name, None if value is None else (float(value[0]), int(value[1])))
        return tally


def compare_masks(reference_masks: np.ndarray, reference_logits: np.ndarray, masks: np.ndarray,
                  layers: Sequence[str], flip_logit: float,
                  tokens: Sequence[int] | None = None) -> tuple[float | None, list[Flip], int, list[str]]:
    """(agreement 0..1, None when the shapes differ; flips; differences after a flip;
    failures) of runtime token masks against the reference's.

    reference_masks, masks: [B, D, N] bool, CLS first, dispatchers in execution order;
    reference_logits: [B, D, N-1]. `tokens` [D]: the tokens each dispatcher sees
    (`cfg.dispatcher_tokens`; fewer than N after ToMe merges, the rest of its row is padding
    that must be False): agreement counts real tokens only, and an active padding slot fails."""
    tally = ParityTally()
    tally.add_masks(reference_masks, reference_logits, masks, layers, flip_logit, tokens, np.arange(len(masks)))
    return tally.mask_agreement, tally.flips, tally.after_flip, tally.mask_failures()


def compare(reference: dict[str, np.ndarray], logits: np.ndarray, masks: np.ndarray | None,
            layers: Sequence[str], tolerances: Tolerances = Tolerances(),
            tokens: Sequence[int] | None = None, blocks: Sequence[int] | None = None) -> Parity:
    """Judge runtime `logits` [B, K] (and token `masks` [B, D, N] when the runtime produced
    them) against the reference outputs `logits`, `token_masks`, `dispatch_logits` and, with
    ToMe, `merge_margins` ([B, depth]; `blocks` [D]: each dispatcher's block); `tokens` as for
    `compare_masks`. One pass of `ParityTally`."""
    tally = ParityTally().add(reference, logits, masks, layers, tolerances.flip_logit, tokens, blocks=blocks,
                              merge_tie=tolerances.merge_tie, max_rel=tolerances.max_rel)
    return tally.verdict(tolerances)
