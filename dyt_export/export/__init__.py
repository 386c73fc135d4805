"""ONNX export of DyT models and facts about exported graphs.

Owns the ONNX graph: the export (`onnx_export`), its exact rewrites (`rewrites`), what a
file records about itself (`metadata`) and what its graph holds (`graph`). May import
`dyt_export.config`, `.model`, `.files`, `.atomic`, `.progress`, torch, onnx and onnxscript;
never the checkpoint readers' command line, `runtimes` or `validation`.
"""
from .graph import DISPATCH_OPS, GraphSummary, summarize
from .metadata import config_from_metadata, current_graph_form, read_metadata
from .onnx_export import (ExportResult, export_onnx, external_data_path, parameter_bytes, save_onnx,
                          weights_need_external_data)

__all__ = ["DISPATCH_OPS", "GraphSummary", "summarize", "config_from_metadata", "current_graph_form", "read_metadata",
           "ExportResult", "export_onnx", "external_data_path", "parameter_bytes", "save_onnx",
           "weights_need_external_data"]
