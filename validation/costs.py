"""Activation statistics and compute cost (MACs) of a batch of token masks.

The one place validation calls `dyt_export.flops.macs_per_image`, which counts
multiply-adds per image (the DyT paper's "FLOPs" convention: dense ViT-B/16 = 17.58 G).
"""
from __future__ import annotations

import numpy as np

from dyt_export.config import DyTConfig


def active_counts(masks: np.ndarray) -> np.ndarray:
    """[B, D] active tokens per image and dispatcher, CLS included, from [B, D, N] masks."""
    return masks.astype(bool).sum(axis=2)


def activation_rates(masks: np.ndarray) -> np.ndarray:
    """[D] fraction of patch tokens active per dispatcher, over all images. CLS is left out:
    it is always active and would inflate the rate by 1/N."""
    if masks.shape[2] <= 1:
        return np.ones(masks.shape[1])
    return masks[:, :, 1:].astype(bool).mean(axis=(0, 2))


def gmacs(cfg: DyTConfig, masks: np.ndarray | None) -> np.ndarray:
    """G multiply-adds per image: dense when `masks` is None, else at the masks' activation."""
    from dyt_export.flops import macs_per_image

    counts = None if masks is None else active_counts(masks)
    return np.asarray(macs_per_image(cfg, counts), dtype=np.float64) / 1e9
