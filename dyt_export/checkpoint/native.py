"""The toolkit's own checkpoint: safetensors with the full DyTConfig in its metadata.

No pickle is involved (safetensors holds raw tensors and a JSON header), and the config
travels with the weights, so loading needs no flags.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from ..atomic import check_output_path, staged_outputs
from ..config import DyTConfig
from ..errors import CheckpointError, UserError
from ..files import file_kind

FORMAT = "dyt-export/1"


def save(model: torch.nn.Module, path: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (a DyT model from this toolkit) in the self-describing format."""
    cfg = getattr(model, "dyt_config", None)
    if not isinstance(cfg, DyTConfig):
        raise UserError(f"save() needs a DyT model from dyt_export, got {type(model).__name__}")
    path = Path(path)
    check_output_path(path)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "dyt.config": cfg.to_json(), "dyt.toolkit_version": __version__}
    if extra:
        metadata["dyt.extra"] = json.dumps(extra, sort_keys=True)
    with staged_outputs(path) as stage:
        save_file(tensors, str(stage / path.name), metadata=metadata)
    return path


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is a truncated or corrupt safetensors file ({error})")


def read_header(path: Path) -> dict[str, str] | None:
    """The safetensors metadata; None when the file does not start like safetensors at all.
    A file that does but cannot be opened (truncated, damaged) is refused as such."""
    if file_kind(path) != "safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file whose header `read_header` accepted; data that
    does not match that header is reported as corruption."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def config_of(header: dict[str, str], path: Path) -> DyTConfig | None:
    """The DyTConfig of a toolkit file; None for other safetensors (e.g. timm weights)."""
    if header.get("format") != FORMAT:
        return None
    if "dyt.config" not in header:
        raise CheckpointError(f"{path} says it is {FORMAT} but has no dyt.config metadata")
    return DyTConfig.from_json(header["dyt.config"], source=path)
