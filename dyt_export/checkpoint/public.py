"""Write checkpoints the way the public DyT training code does.

Tests, the demo and the benchmarks need files in that layout without the training code;
this writes the three shapes found in the wild (bare state dict, {'model': ...}, and the
full training checkpoint with optimizer, scaler, epoch and `args`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..atomic import check_output_path, staged_outputs
from ..errors import UserError

SHAPES = ("bare", "model", "training")


def _training_args(model: Any, extra: dict[str, Any]) -> argparse.Namespace:
    cfg = model.dyt_config
    fields = dict(model="vit_base_patch16", ffn_adapt=True, ffn_num=cfg.bottleneck, scale=cfg.adapter_scale,
                  token_target_ratio=0.5, nb_classes=cfg.num_classes, drop_path=0.0, lr=1e-3, epochs=100)
    fields.update(extra)
    return argparse.Namespace(**fields)


def write_public_checkpoint(model: torch.nn.Module, path: str | Path, *, shape: str = "training",
                            args: dict[str, Any] | None = None, epoch: int = 99) -> Path:
    """Save `model` in the public training code's layout. Only MLP Dispatch with plain
    adapters exists there, so other variants are refused."""
    cfg = getattr(model, "dyt_config", None)
    if cfg is None:
        raise UserError("write_public_checkpoint needs a DyT model from dyt_export")
    if cfg.variant != "mlp" or cfg.experts or not cfg.bottleneck:
        raise UserError("the public DyT layout only holds MLP Dispatch with plain adapters")
    if shape not in SHAPES:
        raise UserError(f"unknown checkpoint shape {shape!r}; choose one of {', '.join(SHAPES)}")
    path = Path(path)
    check_output_path(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if shape == "bare":
        payload: Any = state
    elif shape == "model":
        payload = {"model": state}
    else:
        trainable = [p for n, p in model.named_parameters() if "adapt" in n or "token_select" in n or n.startswith("head.")]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-4)
        scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                  "_growth_tracker": 0}
        payload = {"model": state, "optimizer": optimizer.state_dict(), "epoch": epoch, "scaler": scaler,
                   "args": _training_args(model, args or {})}
    with staged_outputs(path) as stage:
        torch.save(payload, stage / path.name)
    return path
