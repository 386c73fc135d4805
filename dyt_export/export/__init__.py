"""ONNX export of DyT models and facts about exported graphs."""
from .graph import DISPATCH_OPS, GraphSummary, summarize
from .metadata import config_from_metadata, current_graph_form, read_metadata
from .onnx_export import (ExportResult, export_onnx, external_data_path, parameter_bytes, save_onnx,
                          weights_need_external_data)

__all__ = ["DISPATCH_OPS", "GraphSummary", "summarize", "config_from_metadata", "current_graph_form", "read_metadata",
           "ExportResult", "export_onnx", "external_data_path", "parameter_bytes", "save_onnx",
           "weights_need_external_data"]
