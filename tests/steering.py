"""Dispatcher biases that make some image of a batch activate exactly 0, 1 or all patch tokens.

A zero-activation layer and an all-active one are normal in trained DyT models (reference,
Figure 5), and a batch then mixes them with partial images, so tests steer each dispatcher
to such a count instead of hoping random weights produce one.
"""
from __future__ import annotations

import torch

from dyt_export.calibrate import set_dispatcher_biases

ALL = -1
"""A target count meaning every patch token."""


def _farthest_point(values: torch.Tensor, low: float, high: float) -> float:
    """The point of (low, high) farthest from every value: float noise cannot flip a token."""
    inside = values[(values > low) & (values < high)].sort().values
    edges = torch.cat([torch.tensor([low], dtype=values.dtype), inside, torch.tensor([high], dtype=values.dtype)])
    gaps = edges[1:] - edges[:-1]
    i = int(gaps.argmax())
    return float(edges[i] + gaps[i] / 2)


def _threshold(raw: torch.Tensor, count: int) -> float:
    """A threshold giving one image of `raw` [B, P] exactly `count` tokens above it while the
    others stay different: 0 goes to the image with the lowest maximum, ALL to the one with
    the highest minimum, 1 to the image with the widest gap below its top token."""
    ordered = raw.sort(dim=1, descending=True).values
    if count == 0:
        image = int(ordered[:, 0].argmin())
        low, high = float(ordered[image, 0]), float(ordered[:, 0].max())
    elif count == ALL:
        image = int(ordered[:, -1].argmax())
        low, high = float(ordered[:, -1].min()), float(ordered[image, -1])
    else:
        image = int((ordered[:, count - 1] - ordered[:, count]).argmax())
        low, high = float(ordered[image, count]), float(ordered[image, count - 1])
    if high <= low:  # every image ties at the extreme: widen past it
        high = low + 1.0
    return _farthest_point(raw.flatten(), low, high)


def steer(model, images: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Set dispatcher d's bias so that some image activates exactly `counts[d]` patch tokens
    (ALL: every one), the threshold as far as possible from every logit of the batch. Counts
    cycle when there are more dispatchers than counts. Returns the masks [B, D, N]."""
    return set_dispatcher_biases(model, images, lambda d, raw: -_threshold(raw.double(), counts[d % len(counts)]))
