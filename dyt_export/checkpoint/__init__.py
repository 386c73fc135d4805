"""Checkpoint readers (public DyT layout, toolkit safetensors, plain timm) and writers.

Owns what a checkpoint file may hold and how a model is rebuilt from it, pickles opened
safely (`safe_pickle`). May import `dyt_export.config`, `.model`, `.files`, `.atomic`,
`.errors`, torch, timm and safetensors; never the exporter, the command or `runtimes`.
"""
from .layout import Overrides, infer_config
from .native import save
from .public import SHAPES, write_public_checkpoint
from .reader import file_sha256, load_checkpoint

__all__ = ["Overrides", "infer_config", "save", "SHAPES", "write_public_checkpoint", "file_sha256", "load_checkpoint"]
