"""DyT model code on timm ViT blocks.

Owns the PyTorch model: blocks, adapters, token dispatchers, the gather/scatter forms the
exporter turns into data-dependent ONNX (`gather`), token merging (`merge`) and fp16
casting (`precision`). May import `dyt_export.config`, torch and timm only: checkpoints,
the exporter and the command build on it, never the other way.
"""
from .vit import DyTVisionTransformer, Trace, build_model
from .precision import to_fp16

__all__ = ["DyTVisionTransformer", "Trace", "build_model", "to_fp16"]
