"""Checkpoint readers (public DyT layout, toolkit safetensors, plain timm) and writers."""
from .layout import Overrides, infer_config
from .native import save
from .public import SHAPES, write_public_checkpoint
from .reader import file_sha256, load_checkpoint

__all__ = ["Overrides", "infer_config", "save", "SHAPES", "write_public_checkpoint", "file_sha256", "load_checkpoint"]
