"""Read a DyT (or plain timm) ViT's configuration off its state-dict tensor shapes.

Nothing in a state dict records the number of heads or the adapter scalar; the first
follows the ViT convention unless overridden, the second must come from `args.scale` or
the user (reference, "Checkpoints that exist in the wild"): never a silent guess.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import HEADS_BY_DIM, UNITS_OF_VARIANT, DyTConfig, unit_module_names
from ..errors import CheckpointError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Overrides:
    """What the user may tell us that a checkpoint cannot (command-line flags)."""

    num_heads: int | None = None
    adapter_scale: float | None = None
    img_size: int | None = None
    dispatch: str | None = None
    trust_checkpoint: bool = False


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a `module.` prefix that DistributedDataParallel leaves on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"missing key {key}: not a timm ViT state dict")
    return state[key]


def _units_present(state: Mapping[str, torch.Tensor]) -> tuple[set[str], set[str]]:
    """(units with adapters, units with dispatchers) found anywhere in the state dict."""
    adapters, dispatchers = set(), set()
    for unit in ("mlp", "attn", "layer"):
        adapter, dispatcher = unit_module_names(unit)
        if any(f".{adapter}." in k for k in state):
            adapters.add(unit)
        if any(f".{dispatcher}." in k for k in state):
            dispatchers.add(unit)
    return adapters, dispatchers


def _variant_of(units: set[str]) -> str:
    for variant, variant_units in UNITS_OF_VARIANT.items():
        if set(variant_units) == units:
            return variant
    raise CheckpointError(f"adapters/dispatchers on units {sorted(units)} match no DyT variant")


def is_dyt_state(state: Mapping[str, torch.Tensor]) -> bool:
    adapters, dispatchers = _units_present(state)
    return bool(adapters or dispatchers)


def infer_config(state: Mapping[str, torch.Tensor], args: Any, overrides: Overrides) -> DyTConfig:
    """DyTConfig from tensor shapes, `args` (public training code's Namespace, or None) and flags."""
    cls = _require(state, "cls_token")
    pos = _require(state, "pos_embed")
    proj = _require(state, "patch_embed.proj.weight")
    head = _require(state, "head.weight")
    embed_dim = int(cls.shape[-1])
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}; expected a square conv kernel")
    patch = int(proj.shape[-1])
    grid = math.isqrt(int(pos.shape[1]) - 1)
    if grid * grid != pos.shape[1] - 1:
        raise CheckpointError(f"pos_embed has {pos.shape[1]} tokens: not 1 CLS + a square grid of patches")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError("no blocks.* keys: not a ViT state dict")

    num_heads = overrides.num_heads or HEADS_BY_DIM.get(embed_dim)
    if num_heads is None:
        raise CheckpointError(f"embed dim {embed_dim} has no conventional head count; pass --num-heads")

    adapter_units, dispatcher_units = _units_present(state)
    dense_only = not adapter_units and not dispatcher_units
    if dense_only and overrides.dispatch != "dense":
        raise CheckpointError("not a DyT model (no adapters or token dispatchers); "
                              "pass --dispatch dense to export it as a plain ViT")
    variant = "mlp" if dense_only else _variant_of(adapter_units | dispatcher_units)
    first_unit = UNITS_OF_VARIANT[variant][0]
    adapter_name, dispatcher_name = unit_module_names(first_unit)
    bottleneck, experts = 0, 0
    if not dense_only:
        router = state.get(f"blocks.0.{adapter_name}.router.weight")
        if router is not None:
            experts = int(router.shape[0])
            bottleneck = int(_require(state, f"blocks.0.{adapter_name}.down_weight").shape[1])
        else:
            bottleneck = int(_require(state, f"blocks.0.{adapter_name}.down_proj.weight").shape[0])
    dispatch_blocks = tuple(i for i in range(depth) if f"blocks.{i}.{dispatcher_name}.mlp_head.weight" in state)

    scale = _adapter_scale(args, overrides, needed=not dense_only)
    _cross_check(args, "ffn_num", bottleneck, "adapter bottleneck", needed=not dense_only)
    _cross_check(args, "nb_classes", int(head.shape[0]), "head classes", needed=True)

    img_size = grid * patch
    return DyTConfig(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_hidden_dim=int(_require(state, "blocks.0.mlp.fc1.weight").shape[0]),
        patch_size=patch, img_size=img_size, in_chans=int(proj.shape[1]),
        num_classes=int(head.shape[0]), variant=variant, bottleneck=bottleneck,
        adapter_scale=scale, experts=experts, dispatch_blocks=dispatch_blocks,
    )


def _adapter_scale(args: Any, overrides: Overrides, *, needed: bool) -> float:
    if overrides.adapter_scale is not None:
        return float(overrides.adapter_scale)
    if not needed:
        return 1.0
    scale = getattr(args, "scale", None) if args is not None else None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    raise CheckpointError("the adapter scale is not recorded in this checkpoint (no args.scale); pass "
                          "--adapter-scale S (1.0 in the DyT VTAB recipe, 0.1 in others)")


def _cross_check(args: Any, name: str, actual: int, what: str, *, needed: bool) -> None:
    value = getattr(args, name, None) if args is not None else None
    if needed and isinstance(value, int) and not isinstance(value, bool) and value != actual:
        raise CheckpointError(f"args.{name}={value} disagrees with the tensors' {what} ({actual})")
