"""The DyT Vision Transformer: a timm `VisionTransformer` whose blocks carry DyT units.

Subclassing timm keeps the parameter layout of every timm ViT (patch embedding, CLS token,
learned position embedding, pre-norm blocks, final LayerNorm, linear head on CLS; eps 1e-6,
erf GELU, qkv bias), so timm weights and the public DyT checkpoints load without renaming.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer

from ..config import DyTConfig, check_dispatch_mode
from .adapter import Adapter, MoEAdapter
from .block import DispatchRecord, DyTBlock, norm32
from .dispatcher import TokenDispatcher


class Trace(NamedTuple):
    """A forward pass with everything the dispatchers decided, for parity checks.

    masks: [B, D, N] bool, one row per dispatcher (`cfg.dispatcher_names`), CLS first.
    dispatch_logits: [B, D, N-1] float32; NaN where dispatchers were bypassed (dense mode).
    With ToMe a dispatcher sees fewer tokens (`cfg.dispatcher_tokens`): its row holds them in
    merged order, then False (masks) and NaN (logits) up to N.
    merge_margins: [B, depth] float32, each block's `matching_margin` (inf: no merge).
    """

    logits: torch.Tensor
    masks: torch.Tensor
    dispatch_logits: torch.Tensor
    merge_margins: torch.Tensor


class DyTVisionTransformer(VisionTransformer):
    """DyT ViT in eval semantics: no dropout, no Gumbel noise, mask = logit > 0.

    `dispatch_mode` and `return_masks` shape what `forward` returns and what gets exported;
    `trace` returns masks and dispatcher logits for any mode without changing them.
    """

    def __init__(self, cfg: DyTConfig, *, init_weights: bool = True) -> None:
        ratio = cfg.mlp_hidden_dim / cfg.embed_dim
        if int(cfg.embed_dim * ratio) != cfg.mlp_hidden_dim:  # float rounding in timm's int(dim * ratio)
            ratio = (cfg.mlp_hidden_dim + 0.5) / cfg.embed_dim
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
            num_classes=cfg.num_classes, global_pool="token", embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=ratio, qkv_bias=True,
            class_token=True, block_fn=DyTBlock, weight_init="" if init_weights else "skip",
        )
        self.dyt_config = cfg
        for index, block in enumerate(self.blocks):
            block.attach_units(cfg, index)
        self._dispatch_mode = "dynamic"
        self.return_masks = False
        self.io_dtype = torch.float32
        self.eval()

    @property
    def dispatch_mode(self) -> str:
        return self._dispatch_mode

    @dispatch_mode.setter
    def dispatch_mode(self, mode: str) -> None:
        check_dispatch_mode(mode)
        self._dispatch_mode = mode

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in all, trained by DyT, and in the classifier head.

        `trainable` counts what the paper counts as DyT's trainable parameters (0.16 M on
        VTAB-1K): the adapters (MoE experts and routers included) and the token dispatchers.
        The head is trained too but is reported apart, as PEFT papers do; the backbone is frozen.
        Checkpoint `inspect`, ONNX metadata and ONNX `inspect` all use these numbers.
        """
        trained = (Adapter, MoEAdapter, TokenDispatcher)
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for m in self.modules() if isinstance(m, trained) for p in m.parameters()),
            "head": sum(p.numel() for p in self.head.parameters()),
        }

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def _run(self, pixel_values: torch.Tensor, mode: str, records: list[DispatchRecord] | None,
             margins: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.compute_dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.dyt_config.tome_r is None:
            for block in self.blocks:
                x = block(x, mode, records)
        else:
            size = None
            for block, (_, merged) in zip(self.blocks, self.dyt_config.merge_schedule):
                x, size = block.forward_merging(x, size, merged, mode, records, margins)
        x = norm32(self.norm, x)
        return self.head(x[:, 0]).to(self.io_dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.return_masks:
            return self._run(pixel_values, self._dispatch_mode, None)
        records: list[DispatchRecord] = []
        logits = self._run(pixel_values, self._dispatch_mode, records)
        return logits, torch.stack([padded(r.mask, self.dyt_config.num_tokens, False) for r in records], dim=1)

    @torch.no_grad()
    def trace(self, pixel_values: torch.Tensor, mode: str | None = None) -> Trace:
        mode = mode or self._dispatch_mode
        check_dispatch_mode(mode)
        records: list[DispatchRecord] = []
        margins: list[torch.Tensor] = []
        logits = self._run(pixel_values, mode, records, margins)
        b, n = pixel_values.shape[0], self.dyt_config.num_tokens
        merge_margins = torch.stack(margins, dim=1) if margins else torch.full((b, len(self.blocks)), float("inf"))
        if not records:  # a model without dispatchers
            empty = torch.zeros(b, 0, n, dtype=torch.bool)
            return Trace(logits, empty, torch.zeros(b, 0, n - 1), merge_margins)
        nan = torch.full((b, n - 1), float("nan"))
        return Trace(
            logits,
            torch.stack([padded(r.mask, n, False) for r in records], dim=1),
            torch.stack([nan if r.logits is None else padded(r.logits, n - 1, float("nan")) for r in records], dim=1),
            merge_margins,
        )


def padded(rows: torch.Tensor, length: int, fill: bool | float) -> torch.Tensor:
    """[B, T] rows extended with `fill` to [B, length]: a dispatcher after ToMe merges sees
    fewer tokens than N, and every dispatcher's row of the mask output has length N."""
    missing = length - rows.shape[1]
    if not missing:
        return rows
    return torch.cat([rows, torch.full((rows.shape[0], missing), fill, dtype=rows.dtype, device=rows.device)], dim=1)


def build_model(cfg: DyTConfig, *, seed: int | None = None, init_weights: bool = True) -> DyTVisionTransformer:
    """A DyT model in eval mode. `seed` makes the random initialisation reproducible;
    `init_weights=False` skips it when a state dict will overwrite every tensor anyway."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DyTVisionTransformer(cfg, init_weights=init_weights)
    return DyTVisionTransformer(cfg, init_weights=init_weights)
