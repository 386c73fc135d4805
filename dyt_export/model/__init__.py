"""DyT model code on timm ViT blocks."""
from .vit import DyTVisionTransformer, Trace, build_model
from .precision import to_fp16

__all__ = ["DyTVisionTransformer", "Trace", "build_model", "to_fp16"]
