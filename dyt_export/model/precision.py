"""fp16 copies of a DyT model that keep the numerically fragile parts in float32.

LayerNorm parameters and the dispatchers stay float32 (the forward casts around them);
softmax runs in float32 inside attention and the MoE router. Everything else, the
GEMMs that dominate the cost, runs in fp16.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .dispatcher import TokenDispatcher
from .vit import DyTVisionTransformer


def to_fp16(model: DyTVisionTransformer, *, fp16_io: bool = False) -> DyTVisionTransformer:
    """A half-precision copy; the original is untouched. I/O stays float32 unless fp16_io."""
    half = copy.deepcopy(model).to(torch.float16)
    for module in half.modules():
        if isinstance(module, (nn.LayerNorm, TokenDispatcher)):
            module.float()
    half.io_dtype = torch.float16 if fp16_io else torch.float32
    return half
