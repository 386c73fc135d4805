"""Accuracy of the reference and the runtime on labeled images, tallied chunk by chunk.

Counts only, so tallies of disjoint chunks merge exactly (`AccuracyTally.merge`) and a
sharded run reports the numbers a single pass does. Top-1 is the arg-max class (the rule
parity's top-1 agreement uses); top-5 counts an image when fewer than five classes score
strictly higher than its label, so a tie never depends on how a sort breaks it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

TOP_K = 5


def _hits(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of `logits` [B, K] on `labels` [B] (all >= 0)."""
    top1 = int((logits.argmax(axis=1) == labels).sum())
    above = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    return top1, int((above < TOP_K).sum())


@dataclass
class AccuracyTally:
    """Hits of both sides on the labeled images (label >= 0; -1 is unlabeled, skipped), and
    per class (the image's label) how many images the runtime's top-1 differs from the
    reference's: where a runtime's disagreements concentrate is what a deployer checks."""

    images: int = 0
    reference_top1: int = 0
    reference_top5: int = 0
    runtime_top1: int = 0
    runtime_top5: int = 0
    runtime_measured: bool = True
    """False when the runtime gave no logits (it failed while running)."""
    disagreement: dict[int, int] = field(default_factory=dict)

    def add(self, reference_logits: np.ndarray, logits: np.ndarray | None, labels: np.ndarray | None) -> "AccuracyTally":
        if labels is None or not (labels >= 0).any():
            return self
        known = labels >= 0
        ref, truth = reference_logits[known], labels[known]
        self.images += int(known.sum())
        top1, top5 = _hits(ref, truth)
        self.reference_top1 += top1
        self.reference_top5 += top5
        if logits is None:
            self.runtime_measured = False
            return self
        got = logits[known]
        top1, top5 = _hits(got, truth)
        self.runtime_top1 += top1
        self.runtime_top5 += top5
        differ = got.argmax(axis=1) != ref.argmax(axis=1)
        for label, count in zip(*np.unique(truth[differ], return_counts=True)):
            self.disagreement[int(label)] = self.disagreement.get(int(label), 0) + int(count)
        return self

    def merge(self, other: "AccuracyTally") -> "AccuracyTally":
        counts = ("images", "reference_top1", "reference_top5", "runtime_top1", "runtime_top5")
        disagreement = dict(self.disagreement)
        for label, count in other.disagreement.items():
            disagreement[label] = disagreement.get(label, 0) + count
        return AccuracyTally(**{n: getattr(self, n) + getattr(other, n) for n in counts},
                             runtime_measured=self.runtime_measured and other.runtime_measured,
                             disagreement=dict(sorted(disagreement.items())))

    def summary(self, num_classes: int, class_names: Mapping[int, str] | None = None) -> dict[str, Any] | None:
        """The record's `accuracy` (None without labeled images). Top-5 is null for a model
        with at most five classes, where every image would count."""
        if not self.images:
            return None
        runtime = self.runtime_measured
        top5 = num_classes > TOP_K
        names = class_names or {}
        return {"images": self.images, "reference": self.reference_top1 / self.images,
                "runtime": self.runtime_top1 / self.images if runtime else None,
                "reference_top5": self.reference_top5 / self.images if top5 else None,
                "runtime_top5": self.runtime_top5 / self.images if top5 and runtime else None,
                "disagreement_by_class": {names.get(label, str(label)): count
                                          for label, count in sorted(self.disagreement.items())} if runtime else None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AccuracyTally":
        return cls(**{**data, "disagreement": {int(k): v for k, v in data["disagreement"].items()}})
