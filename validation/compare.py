"""The comparator: is a runtime's answer PyTorch's answer? (Polygraphy's split: runners
produce outputs, this judges them.)

Rules, in order:

1. Masks. Each token decision of the runtime is compared with the reference's. A
   difference is a *flip* only when the reference dispatcher logit of that token is within
   float noise of the threshold, |logit| <= `flip_logit` (default 1e-5): two correct fp32
   implementations may then legitimately disagree. Every flip is reported (image,
   dispatcher, token, logit). A difference at a later dispatcher of an image that already
   flipped follows from that flip (the token took the other path, so everything after it
   legitimately differs): it is counted in `after_flip`, not judged. Any other difference,
   including CLS not being active, is a failure. Flips are never absorbed by loosening a
   tolerance.
2. Logits, on the images without flips: max |diff| / max |reference| <= `max_rel`
   (default 1e-4, the export issue's criterion; fp32 runtimes measure ~1e-7 here),
   per-image cosine similarity >= `cosine_min` (default 0.9999), identical top-1 class.
   An image with a flip runs a different computation after that token, so its logits are
   judged by its flips instead and reported in `top1_agreement` like all others.
3. Non-finite runtime outputs are failures.

All figures except `top1_agreement` and `mask_agreement` are over the images without flips.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

FLIP_LOGIT = 1e-5
MAX_REL = 1e-4
COSINE_MIN = 0.9999
_SHOW = 3  # failures named per kind


@dataclass(frozen=True)
class Tolerances:
    max_rel: float = MAX_REL
    cosine_min: float = COSINE_MIN
    flip_logit: float = FLIP_LOGIT


@dataclass(frozen=True)
class Flip:
    image: int
    layer: str
    token: int
    logit: float
    reference_active: bool


@dataclass
class Parity:
    images: int
    max_abs: float
    max_rel: float
    cosine_min: float
    top1_agreement: float
    mask_agreement: float | None
    flips: list[Flip] = field(default_factory=list)
    after_flip: int = 0
    """Mask differences at dispatchers after an image's first flip: consequences, not judged."""
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def images_with_flips(self) -> int:
        return len({f.image for f in self.flips})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["images_with_flips"] = self.images_with_flips
        return d


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots = (a64 * b64).sum(axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one is not.
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where((a64 == b64).all(axis=1), 1.0, 0.0))


def compare_masks(reference_masks: np.ndarray, reference_logits: np.ndarray, masks: np.ndarray,
                  layers: Sequence[str], flip_logit: float) -> tuple[float, list[Flip], int, list[str]]:
    """(agreement 0..1, flips, differences after a flip, failures) of runtime token masks
    against the reference's.

    reference_masks, masks: [B, D, N] bool, CLS first, dispatchers in execution order;
    reference_logits: [B, D, N-1]."""
    if masks.shape != reference_masks.shape:
        return 0.0, [], 0, [f"token_masks shape {list(masks.shape)} differs from the reference's {list(reference_masks.shape)}"]
    differ = masks.astype(bool) != reference_masks.astype(bool)
    agreement = float(1.0 - differ.mean()) if differ.size else 1.0
    flips: list[Flip] = []
    first_flip: dict[int, int] = {}  # image -> dispatcher index of its first flip
    after_flip = 0
    bad: list[str] = []
    for b, d, n in zip(*np.nonzero(differ)):  # ordered by image, then dispatcher
        if b in first_flip and d > first_flip[b]:
            after_flip += 1
            continue
        where = f"image {b}, {layers[d]} token {n}"
        if n == 0:
            bad.append(f"{where}: CLS must always be active")
            continue
        logit = float(reference_logits[b, d, n - 1])
        if np.isfinite(logit) and abs(logit) <= flip_logit:
            flips.append(Flip(int(b), layers[d], int(n), logit, bool(reference_masks[b, d, n])))
            first_flip.setdefault(int(b), int(d))
        else:
            bad.append(f"{where}: reference logit {logit:.3g} is not within {flip_logit:g} of 0")
    failures = []
    if bad:
        failures.append(f"{len(bad)} token mask difference(s) that are not near-threshold flips, e.g. {'; '.join(bad[:_SHOW])}")
    return agreement, flips, after_flip, failures


def compare(reference: dict[str, np.ndarray], logits: np.ndarray, masks: np.ndarray | None,
            layers: Sequence[str], tolerances: Tolerances = Tolerances()) -> Parity:
    """Judge runtime `logits` [B, K] (and token `masks` [B, D, N] when the runtime produced
    them) against the reference outputs `logits`, `token_masks`, `dispatch_logits`."""
    ref = reference["logits"].astype(np.float32)
    failures: list[str] = []
    if logits.shape != ref.shape:
        return Parity(len(ref), float("inf"), float("inf"), 0.0, 0.0, None,
                      failures=[f"logits shape {list(logits.shape)} differs from the reference's {list(ref.shape)}"])
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():
        failures.append(f"{int((~finite).sum())} image(s) with NaN/inf logits, first: image {int(np.argmin(finite))}")

    mask_agreement, flips, after_flip = None, [], 0
    if masks is not None:
        mask_agreement, flips, after_flip, mask_failures = compare_masks(
            reference["token_masks"], reference["dispatch_logits"], masks, layers, tolerances.flip_logit)
        failures += mask_failures

    top1_same = logits.argmax(axis=1) == ref.argmax(axis=1)
    judged = finite.copy()
    judged[[f.image for f in flips]] = False
    if judged.any():
        diff = np.abs(logits[judged].astype(np.float64) - ref[judged])
        max_abs = float(diff.max())
        scale = float(np.abs(ref[judged]).max())
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        cosine_min = float(_cosine(logits[judged], ref[judged]).min())
    else:
        max_abs, max_rel, cosine_min = 0.0, 0.0, 1.0
    if max_rel > tolerances.max_rel:
        failures.append(f"logits max |diff| / max |reference| = {max_rel:.3g} > {tolerances.max_rel:g}")
    if cosine_min < tolerances.cosine_min:
        failures.append(f"logits cosine similarity {cosine_min:.6f} < {tolerances.cosine_min}")
    wrong_top1 = np.nonzero(judged & ~top1_same)[0]
    if len(wrong_top1):
        failures.append(f"top-1 class differs on {len(wrong_top1)} image(s) without flips, e.g. image {int(wrong_top1[0])}")
    return Parity(images=len(ref), max_abs=max_abs, max_rel=max_rel, cosine_min=cosine_min,
                  top1_agreement=float(top1_same.mean()), mask_agreement=mask_agreement,
                  flips=flips, after_flip=after_flip, failures=failures)


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy over the labeled images (label >= 0), None when there are none."""
    if labels is None or not (labels >= 0).any():
        return None
    known = labels >= 0
    return float((logits[known].argmax(axis=1) == labels[known]).mean())
