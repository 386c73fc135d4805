"""ONNX export of DyT models and facts about exported graphs.

Owns the ONNX graph: the export (`onnx_export`), its exact rewrites (`rewrites`), what a
file records about itself (`metadata`) and what its graph holds (`graph`). May import
`dyt_export.config`, `.model`, `.files`, `.atomic`, `.progress`, torch, onnx and onnxscript;
never the checkpoint readers' command line, `runtimes` or `validation`.

Names resolve on first use, as in the top-level package: reading an exported file's metadata
(`metadata`, `graph`: onnx only) must not import torch, which only the exporter needs; a
server replica reads the metadata of the model it runs and never exports.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DISPATCH_OPS": "graph", "GraphSummary": "graph", "summarize": "graph",
    "config_from_metadata": "metadata", "current_graph_form": "metadata", "read_metadata": "metadata",
    "ExportResult": "onnx_export", "export_onnx": "onnx_export", "external_data_path": "onnx_export",
    "parameter_bytes": "onnx_export", "save_onnx": "onnx_export", "weights_need_external_data": "onnx_export",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dyt_export.export' has no attribute {name!r}")
