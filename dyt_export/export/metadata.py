"""ONNX `metadata_props` of an exported DyT model: what it is and where it came from.

Keys are prefixed `dyt.` so they never collide with other tools' props. `dyt.config` holds
the full DyTConfig as JSON; the flat keys repeat the few facts people grep for.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import THRESHOLD_LOGIT, DyTConfig
from ..errors import UserError
from .graph import load_onnx

PREFIX = "dyt."

GRAPH_SOURCES = ("model", "export", "config.py", "quantize.py")
"""The parts of the package (relative to it) whose code decides what graph an export holds."""


def graph_source_digest(package: Path) -> str:
    """A digest of the code that writes the graph. A cached export is only as current as the
    code that wrote it, and a graph change (e.g. the dispatcher's logit moving to all tokens)
    need not change the toolkit version or the rewrites; hashing the sources catches every one."""
    files: list[Path] = []
    for part in map(package.joinpath, GRAPH_SOURCES):
        files += part.rglob("*.py") if part.is_dir() else [part]
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def installed_graph_source() -> str:
    """`graph_source_digest` of the package running now (recorded as `dyt.graph_source`)."""
    return graph_source_digest(Path(__file__).resolve().parents[1])


def build_metadata(cfg: DyTConfig, *, dispatch: str, precision: str, opset: int, with_masks: bool,
                   provenance: dict[str, Any] | None, parameters: dict[str, int],
                   rewrites: dict[str, int]) -> dict[str, str]:
    """The props, JSON-encoded where not strings. `parameters` is the model's
    `parameter_counts()`: an ONNX graph no longer tells adapters from backbone weights.
    `rewrites`: how often each exact rewrite fired (zero is news too: a pattern the export no
    longer matches)."""
    provenance = provenance or {}
    props: dict[str, Any] = {
        "toolkit_version": __version__,
        "graph_source": installed_graph_source(),
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
    """Whether a file's metadata says the code installed now wrote it: only then may a cached
    export stand in for a fresh one (an older form can run at another speed, e.g. GELU fused
    into a GEMM by OpenVINO, or hold another memory peak)."""
    return props.get(PREFIX + "toolkit_version") == __version__ and props.get(PREFIX + "graph_source") == installed_graph_source()


def read_metadata(path: Path | str) -> dict[str, str]:
    """All metadata_props of an ONNX file (weights not loaded)."""
    return {p.key: p.value for p in load_onnx(path).metadata_props}


def config_from_metadata(props: dict[str, str], path: Path | str = "model") -> DyTConfig:
    """The DyTConfig an ONNX file was exported from."""
    if PREFIX + "config" not in props:
        raise UserError(f"{path} has no dyt.config metadata: it was not exported by dyt-export")
    return DyTConfig.from_json(props[PREFIX + "config"], source=path)
