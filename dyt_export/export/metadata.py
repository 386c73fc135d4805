"""ONNX `metadata_props` of an exported DyT model: what it is and where it came from.

Keys are prefixed `dyt.` so they never collide with other tools' props. `dyt.config` holds
the full DyTConfig as JSON; the flat keys repeat the few facts people grep for.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import THRESHOLD_LOGIT, DyTConfig
from ..errors import UserError
from .graph import load_onnx

PREFIX = "dyt."


def build_metadata(cfg: DyTConfig, *, dispatch: str, precision: str, opset: int, with_masks: bool,
                   provenance: dict[str, Any] | None, parameters: dict[str, int],
                   rewrites: dict[str, int]) -> dict[str, str]:
    """The props, JSON-encoded where not strings. `parameters` is the model's
    `parameter_counts()`: an ONNX graph no longer tells adapters from backbone weights.
    `rewrites`: how often each exact rewrite fired, which also dates the graph's form."""
    provenance = provenance or {}
    props: dict[str, Any] = {
        "toolkit_version": __version__,
        "variant": cfg.variant,
        "dispatch": dispatch,
        "threshold_logit": THRESHOLD_LOGIT,
        "precision": precision,
        "opset": opset,
        "outputs": ["logits", "token_masks"] if with_masks else ["logits"],
        "dispatchers": cfg.dispatcher_names,
        "geometry": f"dim={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} mlp={cfg.mlp_hidden_dim} "
                    f"patch={cfg.patch_size} img={cfg.img_size} classes={cfg.num_classes}",
        "adapter": f"bottleneck={cfg.bottleneck} scale={cfg.adapter_scale} experts={cfg.experts}",
        "config": cfg.to_dict(),
        "parameters": parameters,
        "rewrites": rewrites,
        "source_path": provenance.get("path", ""),
        "source_sha256": provenance.get("sha256", ""),
        "source_format": provenance.get("format", ""),
    }
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}


def current_graph_form(props: dict[str, str]) -> bool:
    """Whether a file's metadata says this toolkit version wrote it with every exact rewrite it
    has now: only then may a cached export stand in for a fresh one (an older form can run at
    another speed, e.g. GELU fused into a GEMM by OpenVINO)."""
    from .rewrites import RULES

    try:
        recorded = json.loads(props.get(PREFIX + "rewrites", "{}"))
    except ValueError:
        return False
    return props.get(PREFIX + "toolkit_version") == __version__ and isinstance(recorded, dict) and set(recorded) == set(RULES)


def read_metadata(path: Path) -> dict[str, str]:
    """All metadata_props of an ONNX file (weights not loaded)."""
    return {p.key: p.value for p in load_onnx(path).metadata_props}


def config_from_metadata(props: dict[str, str], path: Path | str = "model") -> DyTConfig:
    """The DyTConfig an ONNX file was exported from."""
    if PREFIX + "config" not in props:
        raise UserError(f"{path} has no dyt.config metadata: it was not exported by dyt-export")
    return DyTConfig.from_json(props[PREFIX + "config"], source=path)
