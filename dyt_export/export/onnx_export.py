"""Export a DyT model to ONNX with its token dispatch kept data-dependent.

The dynamo exporter traces the gathered inference path: NonZero (or TopK for attention
units) -> Gather -> the unit on the active tokens only -> Scatter. The graph is optimized
by the onnxscript optimizer during export, checked with `onnx.checker` (full check, which
includes strict shape inference), stamped with metadata, and only then moved into place.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import check_output_path, staged_outputs
from ..config import DEFAULT_OPSET, DISPATCH_MODES, OPSETS
from ..errors import UserError
from ..model import DyTVisionTransformer, to_fp16
from ..progress import Steps
from .metadata import build_metadata

EXTERNAL_DATA_BYTES = 1_800_000_000
"""Weights above this go to `<name>.data` beside the model: protobuf caps a file at 2 GB."""


@dataclass
class ExportResult:
    path: Path
    external_data: Path | None
    timings: dict[str, float]
    exporter_log: str


def _prepare(model: DyTVisionTransformer, dispatch: str, with_masks: bool, fp16: bool,
             fp16_io: bool) -> DyTVisionTransformer:
    prepared = to_fp16(model, fp16_io=fp16_io) if fp16 else copy.deepcopy(model)
    prepared.dispatch_mode = dispatch
    prepared.return_masks = with_masks
    return prepared.eval()


def export_onnx(model: DyTVisionTransformer, path: str | Path, *, opset: int = DEFAULT_OPSET,
                dispatch: str = "dynamic", with_masks: bool = False, fp16: bool = False,
                fp16_io: bool = False, example_batch: int = 2, steps: Steps | None = None) -> ExportResult:
    """Write `model` to `path` as ONNX: input `pixel_values` [batch, 3, H, W], output `logits`
    [batch, classes] and, with masks, `token_masks` [batch, dispatchers, tokens] (bool).

    The batch axis is dynamic. The example batch must be >= 2: the exporter specialises
    sizes 0 and 1. The model itself is not modified.
    """
    if not isinstance(model, DyTVisionTransformer):
        raise UserError(f"expected a DyT model from dyt_export, got {type(model).__name__}")
    if opset not in OPSETS:
        raise UserError(f"opset {opset} is not supported; choose one of {', '.join(map(str, OPSETS))}")
    if dispatch not in DISPATCH_MODES:
        raise UserError(f"unknown dispatch mode {dispatch!r}; choose one of {', '.join(DISPATCH_MODES)}")
    if fp16_io and not fp16:
        raise UserError("--fp16-io needs --fp16")
    if with_masks and not model.dyt_config.dispatcher_names:
        raise UserError("--with-masks: this model has no token dispatchers")
    if example_batch < 2:
        raise UserError("example_batch must be >= 2 (the exporter specialises batch 0 and 1)")
    path = Path(path)
    provenance = getattr(model, "provenance", None) or {}
    source = Path(provenance["path"]) if provenance.get("path") else None
    check_output_path(path, *([source] if source else []))
    steps = steps or Steps()
    cfg = model.dyt_config

    with steps.step("prepare model"):
        prepared = _prepare(model, dispatch, with_masks, fp16, fp16_io)
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(example_batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
        if fp16_io:
            example = example.half()

    log = io.StringIO()
    with steps.step("torch.onnx.export (dynamo)"):
        batch = torch.export.Dim("batch", min=1)
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                prepared, (example,), dynamo=True, optimize=True, verbose=False,
                input_names=["pixel_values"],
                output_names=["logits", "token_masks"] if with_masks else ["logits"],
                dynamic_shapes={"pixel_values": {0: batch}}, opset_version=opset,
            )
        program.model.metadata_props.update(build_metadata(
            cfg, dispatch=dispatch, precision="fp16" if fp16 else "fp32", opset=opset,
            with_masks=with_masks, provenance=provenance))

    weight_bytes = sum(p.numel() * p.element_size() for p in prepared.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    import onnx  # heavy import, only needed here

    with staged_outputs(path) as stage:
        staged = stage / path.name
        with steps.step("save"):
            program.save(staged, external_data=external)
        with steps.step("onnx.checker (full check)"):
            try:
                onnx.checker.check_model(str(staged), full_check=True)
            except onnx.checker.ValidationError as e:
                raise RuntimeError(f"exported graph failed onnx.checker: {e}") from e
    data = path.with_name(path.name + ".data")
    return ExportResult(path=path, external_data=data if external else None,
                        timings=dict(steps.timings), exporter_log=log.getvalue())
