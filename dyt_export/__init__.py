"""dyt-export: ship Dynamic Tuning ViTs with their token dispatch kept data-dependent.

The Python API mirrors the command line: `load_checkpoint` reads any checkpoint the
toolkit recognises, `export_onnx` writes the ONNX graph, `save` writes the toolkit's
self-describing safetensors format. Names resolve on first use, so `dyt-export --help`
does not pay for importing torch.

Owns the first half of the one-way flow, checkpoint -> model -> ONNX: the configuration
(`config`), the model on timm blocks (`model`), checkpoint readers and writers
(`checkpoint`), the exporter and facts about exported graphs (`export`), int8
(`quantize`), analytic MACs (`flops`), calibration and `init` (`calibrate`, `init_model`)
and the `dyt-export` command (`cli`). May import torch, timm, onnx, onnxscript, safetensors,
numpy, and ONNX Runtime's quantization tools (`quantize` only); never `runtimes` or
`validation`: the exporter knows nothing about the runtimes that run its graphs
(`dyt-export serve` is the server's own command line, `runtimes.serving.command`, reached
through an entry point).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_checkpoint": "checkpoint", "save": "checkpoint", "write_public_checkpoint": "checkpoint",
    "DyTConfig": "config", "vit_config": "config",
    "CheckpointError": "errors", "UserError": "errors",
    "export_onnx": "export",
    "DyTVisionTransformer": "model", "build_model": "model",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dyt_export' has no attribute {name!r}")
