"""Read a DyT (or plain timm) ViT's configuration off its state-dict tensor shapes.

Nothing in a state dict records the number of heads or the adapter scalar; the first
follows the ViT convention unless overridden, the second must come from `args.scale` or
the user (reference, "Checkpoints that exist in the wild"): never a silent guess.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import HEADS_BY_DIM, UNITS_OF_VARIANT, DyTConfig, unit_module_names
from ..errors import CheckpointError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class AdapterScaleMissing(CheckpointError):
    """Nothing says the adapter scalar: `inspect` can still describe the rest of the file."""


@dataclass(frozen=True)
class Overrides:
    """What the user may tell us that a checkpoint cannot (command-line flags)."""

    num_heads: int | None = None
    adapter_scale: float | None = None
    img_size: int | None = None
    dispatch: str | None = None
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        """Refuse values no checkpoint could use, before the file is read. The adapter scale is
        checked where every scale is, in DyTConfig."""
        for name in ("num_heads", "img_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CheckpointError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.dispatch not in (None, "dense"):
            raise CheckpointError(f"dispatch={self.dispatch!r}: a checkpoint is read as DyT (None) or, with "
                                  "'dense', as a plain timm ViT without DyT parts; the export mode is chosen at export")


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


def _consensus(state: Mapping[str, torch.Tensor], sources: list[tuple[str, int]], what: str) -> int:
    """The size most of `sources` (key, dimension) agree on. One mis-shaped tensor is outvoted,
    so the key check that follows names that tensor, not the ones that fit the model (a
    single source would define the geometry and blame every tensor consistent with the rest)."""
    votes = Counter(int(state[key].shape[dim]) for key, dim in sources
                    if key in state and isinstance(state[key], torch.Tensor) and -state[key].ndim <= dim < state[key].ndim)
    if not votes:
        raise CheckpointError(f"missing key {sources[0][0]}: cannot read the {what} of a timm ViT state dict")
    return votes.most_common(1)[0][0]  # ties: the first source listed that has the tied size


def _block_sources(depth: int, names: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(key, dimension) of each (name, dimension) in every block."""
    return [(f"blocks.{i}.{name}", dim) for i in range(depth) for name, dim in names]


def _embed_dim(state: Mapping[str, torch.Tensor], depth: int) -> int:
    top = [("cls_token", -1), ("pos_embed", -1), ("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0),
           ("norm.weight", 0), ("norm.bias", 0), ("head.weight", 1)]
    per_block = [("norm1.weight", 0), ("norm1.bias", 0), ("attn.qkv.weight", 1), ("attn.proj.weight", 0),
                 ("attn.proj.weight", 1), ("attn.proj.bias", 0), ("norm2.weight", 0), ("norm2.bias", 0),
                 ("mlp.fc1.weight", 1), ("mlp.fc2.weight", 0), ("mlp.fc2.bias", 0)]
    return _consensus(state, top + _block_sources(depth, per_block), "embedding width")


def _adapter_geometry(state: Mapping[str, torch.Tensor], depth: int, units: tuple[str, ...]) -> tuple[int, int]:
    """(bottleneck, experts) agreed on by every adapter of every block and unit."""
    adapters = [unit_module_names(unit)[0] for unit in units]

    def sources(names: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return _block_sources(depth, [(f"{a}.{name}", dim) for a in adapters for name, dim in names])

    if any(f".{a}.router.weight" in k for k in state for a in adapters):
        experts = _consensus(state, sources([("router.weight", 0), ("router.bias", 0), ("down_weight", 0),
                                             ("down_bias", 0), ("up_weight", 0), ("up_bias", 0)]), "expert count")
        sizes = [("down_weight", 1), ("down_bias", 1), ("up_weight", 2)]
    else:
        experts, sizes = 0, [("down_proj.weight", 0), ("down_proj.bias", 0), ("up_proj.weight", 1)]
    return _consensus(state, sources(sizes), "adapter bottleneck"), experts


def infer_config(state: Mapping[str, torch.Tensor], args: Any, overrides: Overrides) -> DyTConfig:
    """DyTConfig from tensor shapes, `args` (public training code's Namespace, or None) and flags.

    Each size is read from every tensor that carries it and the majority wins, so a single
    mis-shaped tensor is reported by name when the state dict is checked against the model.
    """
    pos = _require(state, "pos_embed")
    proj = _require(state, "patch_embed.proj.weight")
    _require(state, "cls_token")
    _require(state, "head.weight")
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}; expected a square conv kernel")
    patch = int(proj.shape[-1])
    tokens = int(pos.shape[1]) if pos.ndim == 3 else 0
    grid = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or grid * grid != tokens - 1:
        raise CheckpointError(f"pos_embed has shape {tuple(pos.shape)}: not [1, 1 CLS + a square grid of patches, dim]")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError("no blocks.* keys: not a ViT state dict")
    embed_dim = _embed_dim(state, depth)

    num_heads = overrides.num_heads if overrides.num_heads is not None else HEADS_BY_DIM.get(embed_dim)
    if num_heads is None:
        raise CheckpointError(f"embed dim {embed_dim} has no conventional head count; pass --num-heads")

    adapter_units, dispatcher_units = _units_present(state)
    dense_only = not adapter_units and not dispatcher_units
    if dense_only and overrides.dispatch != "dense":
        raise CheckpointError("not a DyT model (no adapters or token dispatchers); "
                              "pass --dispatch dense to export it as a plain ViT")
    variant = "mlp" if dense_only else _variant_of(adapter_units | dispatcher_units)
    bottleneck, experts = (0, 0) if dense_only else _adapter_geometry(state, depth, UNITS_OF_VARIANT[variant])
    dispatcher_name = unit_module_names(UNITS_OF_VARIANT[variant][0])[1]
    dispatch_blocks = tuple(i for i in range(depth) if f"blocks.{i}.{dispatcher_name}.mlp_head.weight" in state)
    num_classes = _consensus(state, [("head.weight", 0), ("head.bias", 0)], "class count")
    mlp_hidden = _consensus(state, _block_sources(depth, [("mlp.fc1.weight", 0), ("mlp.fc1.bias", 0), ("mlp.fc2.weight", 1)]),
                            "MLP width")

    scale = _adapter_scale(args, overrides, needed=not dense_only)
    _cross_check(args, "ffn_num", bottleneck, "adapter bottleneck", needed=not dense_only)
    _cross_check(args, "nb_classes", num_classes, "head classes", needed=True)

    return DyTConfig(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_hidden_dim=mlp_hidden,
        patch_size=patch, img_size=grid * patch, in_chans=int(proj.shape[1]),
        num_classes=num_classes, variant=variant, bottleneck=bottleneck,
        adapter_scale=scale, experts=experts, dispatch_blocks=dispatch_blocks,
    )


def _adapter_scale(args: Any, overrides: Overrides, *, needed: bool) -> Any:
    """The flag, else `args.scale`; DyTConfig checks that it is a finite number."""
    if overrides.adapter_scale is not None:
        return overrides.adapter_scale
    if not needed:
        return 1.0
    if getattr(args, "scale", None) is None:
        raise AdapterScaleMissing("the adapter scale is not recorded in this checkpoint (no args.scale); pass "
                                  "--adapter-scale S (1.0 in the DyT VTAB recipe, 0.1 in others)")
    scale = args.scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise CheckpointError(f"args.scale in this checkpoint is {scale!r} ({type(scale).__name__}), not a number; "
                              "pass --adapter-scale S")
    return scale


def _cross_check(args: Any, name: str, actual: int, what: str, *, needed: bool) -> None:
    value = getattr(args, name, None) if args is not None else None
    if needed and isinstance(value, int) and not isinstance(value, bool) and value != actual:
        raise CheckpointError(f"args.{name}={value} disagrees with the tensors' {what} ({actual})")
