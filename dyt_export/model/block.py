"""A timm ViT block with DyT's dispatched units.

Subclassing timm's `Block` keeps its parameter names (`norm1`, `attn.qkv`, `mlp.fc1`, ...),
so state dicts of timm and of the public DyT code load key for key; only the forward pass
is DyT's. One block holds one or two dispatched units (`cfg.units`); each unit has an
adapter on all tokens and, unless the block was left without one, a dispatcher.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ..config import DyTConfig, unit_module_names
from .adapter import build_adapter
from .attention import attention, attention_and_keys
from .dispatcher import TokenDispatcher
from .gather import rowwise_added, sequence_added, sequence_masked
from .merge import merge_tokens


class DispatchRecord(NamedTuple):
    """What one dispatcher decided: mask [B, N] (CLS first) and logits [B, N-1] (None when
    the dispatcher was bypassed in dense mode)."""

    mask: torch.Tensor
    logits: torch.Tensor | None


def norm32(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32 whatever x's dtype: fp16 LayerNorm overflows on ViT activations.
    In an fp32 model the casts vanish from the exported graph."""
    out = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    return out.to(x.dtype)


class DyTBlock(Block):
    """timm `Block` + DyT units. Call `attach_units` once after construction."""

    units: tuple[str, ...] = ()
    dispatched: bool = False

    def attach_units(self, cfg: DyTConfig, index: int) -> None:
        self.units = cfg.units
        self.dispatched = cfg.has_dispatcher(index)
        for unit in cfg.units:
            adapter_name, dispatcher_name = unit_module_names(unit)
            if cfg.bottleneck:
                self.add_module(adapter_name, build_adapter(cfg.embed_dim, cfg.bottleneck, cfg.adapter_scale, cfg.experts))
            if self.dispatched:
                self.add_module(dispatcher_name, TokenDispatcher(cfg.embed_dim))

    # Residual branches. Sequence branches take an additive key bias (or None).
    def _attn_branch(self, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        return attention(self.attn, norm32(self.norm1, x), key_bias)

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(norm32(self.norm2, x))

    def _layer_branch(self, x: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        a = self._attn_branch(x, key_bias)
        return a + self._mlp_branch(x + a)

    def _unit(self, unit: str, x: torch.Tensor, mode: str, records: list[DispatchRecord] | None) -> torch.Tensor:
        adapter_name, dispatcher_name = unit_module_names(unit)
        adapter = getattr(self, adapter_name, None)
        sequence = unit != "mlp"
        branch = {"mlp": self._mlp_branch, "attn": self._attn_branch, "layer": self._layer_branch}[unit]
        if not self.dispatched or mode == "dense":
            out = x + (branch(x, None) if sequence else branch(x))
            if self.dispatched and records is not None:
                records.append(DispatchRecord(torch.ones_like(x[:, :, 0], dtype=torch.bool), None))
        else:
            mask, logits = getattr(self, dispatcher_name)(x)
            if records is not None:
                records.append(DispatchRecord(mask, logits))
            if mode == "masked":
                out = x + (sequence_masked(x, mask, branch) if sequence else branch(x) * mask.unsqueeze(-1).to(x.dtype))
            else:
                out = sequence_added(x, mask, branch) if sequence else rowwise_added(x, mask, branch)
        return out + adapter(x) if adapter is not None else out

    def forward(self, x: torch.Tensor, mode: str = "dynamic", records: list[DispatchRecord] | None = None) -> torch.Tensor:
        if self.units == ("layer",):
            return self._unit("layer", x, mode, records)
        x = self._unit("attn", x, mode, records) if "attn" in self.units else x + self._attn_branch(x, None)
        x = self._unit("mlp", x, mode, records) if "mlp" in self.units else x + self._mlp_branch(x)
        return x

    def forward_merging(self, x: torch.Tensor, size: torch.Tensor | None, r: int, mode: str = "dynamic",
                        records: list[DispatchRecord] | None = None,
                        margins: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block with ToMe between attention and the MLP unit (the paper's placement, MLP
        dispatch only): attention with proportional attention (`+ log(size)` on each key's
        logits), its residual, `r` tokens merged on the keys averaged over heads, then the MLP
        unit (dispatcher, adapter, MLP) on the merged tokens. Returns (x, sizes [B, T, 1] or
        None while nothing has merged); `margins` collects the matching's margin [B]."""
        key_bias = None if size is None else size.log().transpose(1, 2).unsqueeze(1)  # [B, 1, 1, T]
        out, keys = attention_and_keys(self.attn, norm32(self.norm1, x), key_bias)
        x = x + out
        if r:
            x, size = merge_tokens(x, size, keys, r, margins)
        elif margins is not None:
            margins.append(torch.full(x.shape[:1], float("inf")))
        x = self._unit("mlp", x, mode, records) if "mlp" in self.units else x + self._mlp_branch(x)
        return x, size
