"""Eager PyTorch DyT the way users run it today: the public DyT code's inference path.

The public repository (NUS-HPC-AI-Lab/Dynamic-Tuning) times its models with
`models/model_speed_test.py`; its block has two forward paths, chosen by batch size:

* batch 1 (`single_forward`): indices of the active tokens from `mask.nonzero()`,
  `x[:, idx, :]`, the MLP on those tokens, written back into a zeros tensor with
  `mlp_x[:, idx, :] = ...`, then `x + adapter + mlp_x`;
* batch > 1 (`batch_forward`): the batch flattened to `[B*N, C]`, rows selected with
  `nonzero()`, MLP, written back into zeros, then `adapter + (residual + mlp_x)`.

The dispatcher is `Linear(C, 1)` on the patch tokens, `sigmoid > 0.5` filled into a float
mask, CLS prepended as 1. Attention is timm's `Attention.forward` (PyTorch's fused
`scaled_dot_product_attention` when timm enables it, as the public code does). Everything
runs under `torch.no_grad()` in float32, as its speed script does on a CPU.

This module re-implements that path on a `DyTVisionTransformer`'s own submodules (same
weights, same keys as the public checkpoints) instead of vendoring the public code, whose
imports (einops, old timm helpers) are not part of this project. The benchmark checks its
logits against the toolkit's PyTorch model before timing it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dyt_export.model import DyTVisionTransformer


def _select(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, N, 1] float mask: 1 for CLS and for tokens whose sigmoid(logit) > 0.5."""
    logits = block.mlp_token_select.mlp_head(x[:, 1:, :])
    hard = torch.zeros_like(logits).masked_fill(logits.sigmoid() > 0.5, 1.0)
    return torch.cat([hard.new_ones(x.shape[0], 1, 1), hard], dim=1)


def _mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.mlp(block.norm2(x))


def single_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The public block at batch 1."""
    x = x + block.attn(block.norm1(x))
    select = _select(block, x)
    adapt_x = block.adaptmlp(x)
    index = select.nonzero()[:, 1]
    gathered = x[:, index, :]
    mlp_x = torch.zeros(x.shape, device=x.device, dtype=select.dtype)
    mlp_x[:, index, :] = _mlp(block, gathered)
    return x + adapt_x + mlp_x


def batch_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The public block at batch > 1."""
    x = x + block.attn(block.norm1(x))
    select = _select(block, x)
    adapt_x = block.adaptmlp(x)
    residual = x
    b, n, c = x.shape
    flat = x.reshape(b * n, c)
    index = select.reshape(-1).nonzero()[:, 0]
    gathered = flat[index, :]
    mlp_x = torch.zeros(flat.shape, device=x.device, dtype=select.dtype)
    mlp_x[index, :] = _mlp(block, gathered)
    return adapt_x + (residual + mlp_x.reshape(b, n, c))


class PublicEagerDyT:
    """Callable on numpy pixel values [B, 3, H, W] -> logits [B, classes] (numpy)."""

    def __init__(self, model: DyTVisionTransformer) -> None:
        cfg = model.dyt_config
        if cfg.variant != "mlp" or cfg.experts or not cfg.bottleneck or cfg.dispatch_blocks is not None:
            raise ValueError("the public DyT code has MLP Dispatch with plain adapters in every block only")
        self.model = model.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(pixel_values)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + m.pos_embed
        step = single_forward if x.shape[0] == 1 else batch_forward
        for block in m.blocks:
            x = step(block, x)
        return m.head(m.norm(x)[:, 0])

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.forward(torch.from_numpy(pixel_values)).numpy()
