"""`load_checkpoint`: recognise a checkpoint file, read it safely, build the DyT model.

Recognised, in this order: the toolkit's safetensors format (config in metadata); other
safetensors files and `torch.save` pickles holding the public DyT training code's layout
(bare state dict, {'model': ...}, or a full training checkpoint with `args`) or a plain
timm ViT. Anything else gets one line saying what the file is and why it was refused.
"""
from __future__ import annotations

import hashlib
import types
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from timm.layers import resample_abs_pos_embed

from ..config import DyTConfig
from ..errors import CheckpointError
from ..files import check_input_file, file_kind
from ..model import DyTVisionTransformer, build_model
from ..preprocess import training_preprocess
from . import native
from .layout import Overrides, infer_config, strip_prefix
from .safe_pickle import load_pickle

_SHOW = 5  # how many offending keys a message names


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], Any, str]:
    """(state dict, args or None, shape name) of an unpickled object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            args = obj.get("args")
            if isinstance(args, Mapping):
                args = types.SimpleNamespace(**args)
            shape = "training" if len(obj) > 1 else key
            return dict(obj[key]), args, shape
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None, "bare"
    raise CheckpointError(f"{path} has no 'model' state dict; top-level keys: {', '.join(map(str, list(obj)[:_SHOW]))}")


def _check_keys(model: DyTVisionTransformer, state: Mapping[str, Any]) -> None:
    expected = model.state_dict()
    bad_values = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise CheckpointError(f"state dict values that are not tensors: {', '.join(bad_values[:_SHOW])}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{_count(missing, 'missing key')}: {', '.join(missing[:_SHOW])}")
    if unexpected:
        raise CheckpointError(f"{_count(unexpected, 'unexpected key')}: {', '.join(unexpected[:_SHOW])}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{_count(wrong, 'mis-shaped tensor')}: {'; '.join(wrong[:3])}")


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _resize(cfg: DyTConfig, state: dict[str, torch.Tensor], img_size: int | None) -> DyTConfig:
    """Serve another resolution: resample the position embedding like timm does."""
    if img_size is None or img_size == cfg.img_size:
        return cfg
    if img_size <= 0 or img_size % cfg.patch_size:
        raise CheckpointError(f"--img-size {img_size} is not a positive multiple of the patch size {cfg.patch_size}")
    grid = img_size // cfg.patch_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), new_size=[grid, grid], num_prefix_tokens=1)
    return cfg.replace(img_size=img_size)


def build_from_state(state: dict[str, torch.Tensor], cfg: DyTConfig) -> DyTVisionTransformer:
    model = build_model(cfg, init_weights=False)
    _check_keys(model, state)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def _native_config(cfg: DyTConfig, overrides: Overrides, path: Path) -> DyTConfig:
    """A toolkit file's own config with the flags applied. Its head count is recorded, so a
    different --num-heads can only be a mistake and is refused; --adapter-scale replaces the
    recorded scalar (a recipe constant the user may mean to change)."""
    if overrides.num_heads is not None and overrides.num_heads != cfg.num_heads:
        raise CheckpointError(f"--num-heads {overrides.num_heads}: {path} records num_heads {cfg.num_heads}; "
                              "the flag is only for checkpoints that do not say")
    return cfg if overrides.adapter_scale is None else cfg.replace(adapter_scale=overrides.adapter_scale)


def load_checkpoint(path: str | Path, *, num_heads: int | None = None, adapter_scale: float | None = None,
                    img_size: int | None = None, dispatch: str | None = None,
                    trust_checkpoint: bool = False,
                    tome_r: int | tuple[int, ...] | None = None) -> DyTVisionTransformer:
    """A DyT model (eval mode, returns logits) from any checkpoint the toolkit recognises.

    Keyword overrides say what a checkpoint cannot: `num_heads` (default: ViT convention;
    a toolkit file records it, and a different value is refused), `adapter_scale` (default:
    `args.scale` or the toolkit file's; required for public checkpoints without `args`),
    `img_size` (resample the position embedding), `dispatch='dense'` (accept a plain timm ViT
    without DyT parts; no other value), `trust_checkpoint` (load foreign pickle globals as
    inert placeholders). `tome_r` adds token merging (ToMe, no training needed): tokens merged
    per block, an int or one per block; 0 turns off a toolkit file's recorded setting, None
    keeps it (docs/tome.md).
    """
    path = Path(path)
    check_input_file(path)
    overrides = Overrides(num_heads, adapter_scale, img_size, dispatch, trust_checkpoint)
    kind = file_kind(path)
    args = None

    if kind == "safetensors":
        header = native.read_header(path)
        state = strip_prefix(native.load_tensors(path))
        cfg = native.config_of(header, path)
        fmt = "dyt-export" if cfg is not None else "safetensors"
        cfg = infer_config(state, None, overrides) if cfg is None else _native_config(cfg, overrides, path)
    elif kind in ("torch-zip", "torch-legacy"):
        if kind == "torch-zip" and not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is a truncated or corrupt checkpoint (damaged zip archive)")
        state, args, shape = _unwrap(load_pickle(path, trust=trust_checkpoint), path)
        state = strip_prefix(state)
        cfg = infer_config(state, args, overrides)
        fmt = f"torch/{shape}"
    elif kind == "onnx":
        raise CheckpointError(f"{path} is an ONNX model, not a checkpoint; pass the checkpoint it was exported from")
    else:
        raise CheckpointError(f"{path} is not a checkpoint (neither a torch.save file nor safetensors)")

    cfg = _resize(cfg, state, img_size)
    if tome_r is not None:
        cfg = cfg.replace(tome_r=tome_r)
    model = build_from_state(state, cfg)
    model.provenance = {"path": str(path.resolve()), "sha256": file_sha256(path), "format": fmt}
    said = training_preprocess(args)  # what the training args say about evaluation images, for dyt.preprocess
    if said:
        model.provenance["preprocess"] = said
    return model
