"""Activation statistics and compute cost (MACs) of a batch of token masks.

The one place validation calls `dyt_export.flops.macs_per_image`, which counts
multiply-adds per image (the DyT paper's "FLOPs" convention: dense ViT-B/16 = 17.58 G).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dyt_export.config import DyTConfig


def active_counts(masks: np.ndarray) -> np.ndarray:
    """[B, D] active tokens per image and dispatcher, CLS included, from [B, D, N] masks."""
    return masks.astype(bool).sum(axis=2)


def _patches(masks: np.ndarray, tokens: Sequence[int] | None) -> np.ndarray:
    """[D] patch tokens (CLS left out) each dispatcher sees: its row's length, or fewer after
    ToMe merges (`tokens` = `cfg.dispatcher_tokens`; the row is padded with False)."""
    return (np.full(masks.shape[1], masks.shape[2]) if tokens is None else np.asarray(tokens)) - 1


def active_patches(masks: np.ndarray) -> np.ndarray:
    """[D] active patch tokens (CLS left out) per dispatcher, summed over the images: counts,
    so those of disjoint chunks add up to the whole run's exactly."""
    return masks[:, :, 1:].astype(bool).sum(axis=(0, 2))


def rates_from_counts(active: np.ndarray, images: int, tokens: Sequence[int]) -> np.ndarray:
    """[D] activation rates from `active_patches` summed over `images` images; `tokens` as
    for `activation_rates`."""
    return np.asarray(active, dtype=np.int64) / ((np.asarray(tokens) - 1) * images)


def activation_rates(masks: np.ndarray, tokens: Sequence[int] | None = None) -> np.ndarray:
    """[D] fraction of patch tokens active per dispatcher, over all images. CLS is left out:
    it is always active and would inflate the rate by 1/N. With `tokens` the rate is over the
    tokens the dispatcher really sees, so ToMe's padding never counts."""
    if masks.shape[2] <= 1:
        return np.ones(masks.shape[1])
    return active_patches(masks) / (_patches(masks, tokens) * masks.shape[0])


def pooled_rate(masks: np.ndarray, tokens: Sequence[int] | None = None) -> float:
    """Fraction of all patch tokens active, over every dispatcher and image (1.0 without
    dispatchers); `tokens` as for `activation_rates`."""
    if masks.shape[1] == 0:
        return 1.0
    return float(masks[:, :, 1:].astype(bool).sum() / (_patches(masks, tokens).sum() * masks.shape[0]))


def total_macs(cfg: DyTConfig, masks: np.ndarray) -> int:
    """Multiply-adds of all images at their masks, as a whole number (per-image counts are
    whole, so sums of chunks add up exactly, where a mean of floats would not)."""
    from dyt_export.flops import macs_per_image

    return int(np.asarray(macs_per_image(cfg, active_counts(masks)), dtype=np.float64).sum())


def gmacs(cfg: DyTConfig, masks: np.ndarray | None) -> np.ndarray:
    """G multiply-adds per image: dense when `masks` is None, else at the masks' activation."""
    from dyt_export.flops import macs_per_image

    counts = None if masks is None else active_counts(masks)
    return np.asarray(macs_per_image(cfg, counts), dtype=np.float64) / 1e9
