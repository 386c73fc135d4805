"""What a parity verdict says: the `Parity` of a run, the flips and merge ties it reports,
and the formatting of figures that may not have been measured. The rules that produce it are
`validation.compare`'s; records and reports only read this."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Flip:
    image: int
    layer: str
    token: int
    logit: float
    reference_active: bool


@dataclass(frozen=True)
class MergeTie:
    image: int
    block: int
    margin: float
    """The reference's matching margin at `block` (cosine similarity units)."""


@dataclass
class Parity:
    images: int
    max_abs: float | None
    max_rel: float | None
    cosine_min: float | None
    top1_agreement: float | None
    mask_agreement: float | None
    flip_cosine_min: float | None = None
    """The lowest cosine over the images with a flip or merge tie (None: no such image)."""
    images_compared_on_logits: int = 0
    """Images held to max_rel, cosine_min and top-1: finite on both sides, no flip or merge tie."""
    images_compared_on_top1_cosine: int = 0
    """Images with a flip or merge tie (finite on both sides), held to top-1 and flip_cosine_min only."""
    flips: list[Flip] = field(default_factory=list)
    after_flip: int = 0
    """Mask differences at dispatchers after an image's first flip: consequences, not judged."""
    merge_ties: list[MergeTie] = field(default_factory=list)
    after_merge_tie: int = 0
    """Mask differences from a merge tie's block on: consequences, not judged."""
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

    def summary(self) -> str:
        """One line of the figures people read first."""
        flipped = self.images_compared_on_top1_cosine
        ties = f", merge ties {len(self.merge_ties)}" if self.merge_ties else ""
        kind = "a flip or merge tie" if self.merge_ties else "a flip"
        return (f"max_rel {fmt(self.max_rel, '.2e')} on {self.images_compared_on_logits}/{self.images} images"
                f"{f' ({flipped} with {kind}: top-1 and cosine only)' if flipped else ''}, "
                f"top-1 agreement {fmt(self.top1_agreement, '.4f')} on all, "
                f"mask agreement {fmt(self.mask_agreement, '.6f')}, flips {len(self.flips)}{ties}")


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or 'n/a' for a figure that could not be measured."""
    return "n/a" if value is None else format(value, spec)


def unmeasured(images: int, failure: str) -> Parity:
    """The verdict on `images` when the runtime's answer could not be compared at all (its
    logits have another shape, or the runtime failed while running): every figure null."""
    return Parity(images, None, None, None, None, None, failures=[failure])
