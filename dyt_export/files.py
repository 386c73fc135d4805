"""What an input file is, judged from its size and first bytes, before any heavy import.

The command line checks its inputs with these before importing torch (seconds), so a
missing, empty or foreign file is refused at once; the checkpoint reader and `inspect`
use the same sniffing, so a file is recognised by its content, never by its suffix.
Also here, for `inspect` and every backend: whether the external-data files an ONNX model
names travelled with it whole (onnx is imported only for that).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import UserError

if TYPE_CHECKING:
    import onnx

Kind = Literal["safetensors", "torch-zip", "torch-legacy", "onnx"]

HEAD_BYTES = 16
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
"""After the pickle protocol byte, a legacy (non-zip) torch.save file pickles torch's magic
number as LONG1: pickle protocol bytes alone (a lone 0x80) prove nothing."""
_SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_ONNX_MODEL_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2}
"""Protobuf tags of ModelProto fields that can follow `ir_version` (field 1): producer name
and version, domain, model version, doc string, graph, opset import, metadata, training
info, functions, configuration."""


def check_input_file(path: Path, label: str = "") -> None:
    """Refuse a path that is missing, a directory or empty, naming it (prefixed by `label`,
    e.g. the flag it came from)."""
    name = f"{label} {path}" if label else str(path)
    if not path.exists():
        raise UserError(f"{name}: no such file")
    if path.is_dir():
        raise UserError(f"{name} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{name} is not a regular file")
    if path.stat().st_size == 0:
        raise UserError(f"{name} is empty")


def file_kind(path: Path) -> Kind | None:
    """The format `path`'s first bytes announce, or None for anything else. A damaged file of a
    known format still reports that format, so its reader can say it is truncated or corrupt."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _SAFETENSORS_MAX_HEADER:
        return "safetensors"  # u64 little-endian header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and head[2:2 + len(_TORCH_LEGACY_MAGIC)] == _TORCH_LEGACY_MAGIC:
        return "torch-legacy"
    if len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] < 0x80 and head[2] in _ONNX_MODEL_TAGS:
        return "onnx"  # ModelProto: ir_version (small varint), then another top-level field
    return None


def external_data(model: onnx.ModelProto, path: Path) -> dict[Path, int]:
    """The external-data files the initializers of `model` (loaded from `path` without its
    weights) name, each with the bytes its tensors need (0 where no length is stated)."""
    import onnx

    ends: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        location = path.parent / entry.get("location", "")
        stated = entry.get("length", "").isdigit() and entry.get("offset", "0").isdigit()
        end = int(entry.get("offset", "0")) + int(entry["length"]) if stated else 0
        ends[location] = max(ends.get(location, 0), end)
    return ends


def external_data_problem(path: Path, model: onnx.ModelProto | None = None) -> str | None:
    """What is wrong with the external-data files of the ONNX model at `path` (`model`: that
    file already loaded without its weights, not read again): the first one that does not
    exist, else the first one shorter than the tensors it must hold (a copy cut short); None
    when they are whole, the model has none, or it is not a readable model."""
    import onnx

    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # not a readable ONNX file: the caller's own message says more
            return None
    ends = external_data(model, path)
    for location in ends:
        if not location.is_file():
            return f"its weights are kept in {location}, which is missing (copy the model and that file together)"
    for location, end in ends.items():
        size = location.stat().st_size
        if size < end:
            return f"its weights file {location} is cut short ({size} bytes where the model needs {end}; copy it again)"
    return None
