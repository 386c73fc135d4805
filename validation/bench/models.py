"""The models `make bench` times: ViT-B/16 DyT in the public checkpoint layout, calibrated
to several activation rates, and its dense and masked exports.

Weights are seeded, never downloaded. A freshly initialised timm ViT has every bias at zero
and every LayerNorm at (1, 0); the exporter's optimizer folds those away (a bias `Add` of
zeros disappears), so its graph would be cheaper than any trained checkpoint's. The
benchmark therefore gives every bias and LayerNorm parameter small seeded values
(`trained_like`) before calibrating the dispatchers, so the graphs carry what real ones do.

Each calibrated model goes through the public DyT training code's checkpoint layout
(`write_public_checkpoint`, then `load_checkpoint`), so the benchmark exports what a user of
the public code would hand to `dyt-export`.
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from dyt_export import load_checkpoint, write_public_checkpoint
from dyt_export.calibrate import calibrate_dispatchers, image_like
from dyt_export.config import DyTConfig
from dyt_export.errors import UserError
from dyt_export.export import export_onnx, parameter_bytes
from dyt_export.init_model import CALIBRATION_IMAGES, init_model
from dyt_export.model import DyTVisionTransformer

BACKBONE = "vit_base_patch16_224"
BOTTLENECK = 64
"""The public code's default `ffn_num` (full datasets)."""
ADAPTER_SCALE = 0.1
"""The public speed script's `ffn_adapter_scalar`."""
NUM_CLASSES = 1000


def meta_model(config: DyTConfig) -> DyTVisionTransformer:
    """The model `config` describes, without memory: what a check needs of its size, at once."""
    with torch.device("meta"):
        return DyTVisionTransformer(config)


def require_work_space(work: Path, model: DyTVisionTransformer, rates: int, sections: Iterable[str]) -> None:
    """Refuse, before any work, a disk that cannot hold the benchmark's models: a ViT-B/16 run
    writes 6 GB, and a disk that fills at the last export loses half an hour of measuring.

    Every file is about the size of the fp32 weights: per rate a checkpoint and an export,
    the dense export, one more while an export is staged; with `sections` (`--only`) `memory`
    per rate and for dense an external-data copy, `masked` its export, `int8` one a quarter
    the size, `tome` per rate a ToMe export and the dense ToMe export (`eager` writes none).
    Files of an earlier run are replaced, so their space counts as free."""
    extra = {"memory": rates + 1, "masked": 1, "int8": 0.25, "eager": 0, "tome": rates + 1}
    needed = parameter_bytes(model) * (2 * rates + 2 + sum(extra[s] for s in sections))
    existing = next(p for p in [work, *work.parents] if p.exists())
    replaced = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) if work.is_dir() else 0
    free = shutil.disk_usage(existing).free + replaced
    if free < needed:
        raise UserError(f"make bench needs about {needed / 1e9:.1f} GB for its models in {work}, and {free / 1e9:.1f} GB "
                        "are free there: free some space or pass --out on another disk")


@dataclass
class CalibratedModel:
    rate: float
    """Target activation the dispatchers were calibrated to."""
    checkpoint: Path
    model: DyTVisionTransformer
    """Loaded back from `checkpoint`."""
    dynamic: Path
    masks: np.ndarray
    """[images, dispatchers, tokens] reference token masks on the benchmark's image pool."""


def trained_like(model: DyTVisionTransformer, seed: int) -> DyTVisionTransformer:
    """Give every bias and LayerNorm parameter small seeded non-trivial values, in place."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "token_select" in name:
                continue  # dispatcher biases are set by calibration
            if name.endswith(".bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=generator))
    return model


def base_model(seed: int, backbone: str = BACKBONE) -> DyTVisionTransformer:
    """Seeded DyT of a timm ViT (MLP Dispatch, adapters in every block), dispatchers uncalibrated."""
    model = init_model(backbone, bottleneck=BOTTLENECK, adapter_scale=ADAPTER_SCALE, num_classes=NUM_CLASSES, seed=seed)
    return trained_like(model, seed)


def calibrated(base: DyTVisionTransformer, rate: float, workdir: Path, pool: torch.Tensor,
               seed: int, *, with_masks: bool = False) -> CalibratedModel:
    """`base` calibrated to `rate`, saved in the public layout, loaded back and exported
    (`with_masks`: with the token_masks output, so a validation needs no mask twin)."""
    model = copy.deepcopy(base)
    images = image_like(CALIBRATION_IMAGES, size=model.dyt_config.img_size, seed=seed)
    calibrate_dispatchers(model, rate, images)
    checkpoint = write_public_checkpoint(model, workdir / f"dyt-r{rate:g}.pth", shape="training",
                                         args={"token_target_ratio": rate})
    loaded = load_checkpoint(checkpoint)
    dynamic = workdir / f"dyt-r{rate:g}.onnx"
    export_onnx(loaded, dynamic, dispatch="dynamic", with_masks=with_masks)
    return CalibratedModel(rate, checkpoint, loaded, dynamic, loaded.trace(pool).masks.numpy())


def export_twin(model: DyTVisionTransformer, dispatch: str, workdir: Path) -> Path:
    """The `dense` or `masked` export of `model` (dense ignores the dispatchers entirely)."""
    path = workdir / f"{Path(model.provenance['path']).stem}-{dispatch}.onnx"
    export_onnx(model, path, dispatch=dispatch)
    return path
