"""dyt-export: ship Dynamic Tuning ViTs with their token dispatch kept data-dependent.

The Python API mirrors the command line: `load_checkpoint` reads any checkpoint the
toolkit recognises, `export_onnx` writes the ONNX graph, `save` writes the toolkit's
self-describing safetensors format.
"""
__version__ = "0.1.0"

from .checkpoint import load_checkpoint, save, write_public_checkpoint  # noqa: E402
from .config import DyTConfig, vit_config  # noqa: E402
from .errors import CheckpointError, UserError  # noqa: E402
from .export import export_onnx  # noqa: E402
from .model import DyTVisionTransformer, build_model  # noqa: E402

__all__ = ["__version__", "load_checkpoint", "save", "write_public_checkpoint", "DyTConfig", "vit_config",
           "CheckpointError", "UserError", "export_onnx", "DyTVisionTransformer", "build_model"]
