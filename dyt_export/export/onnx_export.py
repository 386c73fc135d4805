"""Export a DyT model to ONNX with its token dispatch kept data-dependent.

The dynamo exporter traces the gathered inference path: NonZero (or TopK for attention
units) -> Gather -> the unit on the active tokens only -> Scatter. The graph is optimized
by the onnxscript optimizer during export, rewritten exactly where a runtime runs the
optimized form slowly (`rewrites`), converted down when an opset below torch's own
is asked for, checked with `onnx.checker` (full check, which includes strict shape
inference) and for the opset it really imports, stamped with metadata, and only then moved
into place.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic import check_output_path, staged_outputs
from ..config import DEFAULT_OPSET, OPSETS, check_dispatch_mode, check_tome_precision
from ..errors import UserError
from ..model import DyTVisionTransformer, to_fp16
from ..preprocess import PreprocessSpec, check_labels, metadata_props, resolve_spec
from ..progress import Steps, quiet_logs
from .graph import summarize
from .metadata import build_metadata
from .rewrites import apply_exact_rewrites

EXTERNAL_DATA_BYTES = 1_800_000_000
"""Weights above this go to `<name>.data` beside the model whether asked or not: protobuf caps
a file at 2 GB."""

TORCH_OPSET = 18
"""The lowest opset torch's exporter (torchlib) writes. Lower ones are converted from it."""

_REDUCE_WITH_AXES_ATTRIBUTE = {"ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
                               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
"""Reductions that took `axes` as an attribute before opset 18 and had no `noop_with_empty_axes`
(ReduceSum moved to an axes input, with that attribute, at 13 already)."""


@dataclass
class ExportResult:
    path: Path
    external_data: Path | None


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters as stored: what its exported weights weigh. Works on a
    model built on the meta device, so sizes are known before any weight exists."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def weights_need_external_data(module: torch.nn.Module) -> bool:
    """Whether `module`'s parameters pass EXTERNAL_DATA_BYTES: known before any export, so
    commands that take single files only (int8) refuse such models up front."""
    return parameter_bytes(module) > EXTERNAL_DATA_BYTES


def external_data_path(path: Path) -> Path:
    """Where the weights of `path` live when they are kept outside the model file."""
    return path.with_name(path.name + ".data")


def save_onnx(model: Any, path: Path, *, external_data: bool) -> None:
    """Write an ONNX IR model, its weights inside the file or in `external_data_path(path)`.

    The exporter and the benchmark's memory measurement both save through here, so what is
    measured is the layout `dyt-export --external-data` writes. ONNX Runtime maps external
    weights from the file and unmaps each once it has packed it, instead of parsing them into
    heap blocks it then frees (docs/performance.md, peak memory)."""
    from onnxscript import ir

    ir.save(model, path, external_data=external_data_path(path).name if external_data else None)


def _prepare(model: DyTVisionTransformer, dispatch: str, with_masks: bool, fp16: bool,
             fp16_io: bool) -> DyTVisionTransformer:
    prepared = to_fp16(model, fp16_io=fp16_io) if fp16 else copy.deepcopy(model)
    prepared.dispatch_mode = dispatch
    prepared.return_masks = with_masks
    return prepared.eval()


def _convert_down(model: Any, opset: int) -> None:
    """Convert the optimized ONNX IR model in place from TORCH_OPSET to `opset`.

    Not left to torch.onnx.export(opset_version=17): torch converts the unoptimized graph,
    where the MoE router's ReduceMean takes its axes from a node the ONNX converter cannot
    read, so it gives up and keeps opset 18 with a warning. After optimization the axes are
    constants. The ONNX converter then moves them to the attribute but leaves the opset-18
    attribute `noop_with_empty_axes` on ReduceMax/ReduceMean, which opset 17 rejects; with
    value 0 it only restates opset 17's meaning of absent axes (reduce all), so it is dropped.
    """
    from onnxscript.version_converter import ConvertVersionPass

    ConvertVersionPass(target_version=opset, fallback=True)(model)
    for node in model.graph.all_nodes():
        if node.op_type in _REDUCE_WITH_AXES_ATTRIBUTE and node.domain in ("", "ai.onnx"):
            noop = node.attributes.pop("noop_with_empty_axes", None)
            if noop is not None and noop.as_int() != 0:
                raise RuntimeError(f"{node.op_type} with noop_with_empty_axes=1 has no opset-{opset} form")


def export_onnx(model: DyTVisionTransformer, path: str | Path, *, opset: int = DEFAULT_OPSET,
                dispatch: str = "dynamic", with_masks: bool = False, fp16: bool = False,
                fp16_io: bool = False, example_batch: int = 2, external_data: bool = False,
                preprocess: PreprocessSpec | None = None, labels: Sequence[str] | None = None,
                steps: Steps | None = None) -> ExportResult:
    """Write `model` to `path` as ONNX: input `pixel_values` [batch, 3, H, W], output `logits`
    [batch, classes] and, with masks, `token_masks` [batch, dispatchers, tokens] (bool).

    The batch axis is dynamic. The example batch must be >= 2: the exporter specialises
    sizes 0 and 1. The model itself is not modified. The file imports exactly `opset`, or
    nothing is written. With `external_data` (forced above EXTERNAL_DATA_BYTES) the weights go
    to `<name>.data` beside the model; a single-file export removes a `.data` file an earlier
    export to the same path left, so no stale weights sit beside the model. `preprocess`
    (default: what the checkpoint's training args say, else the default spec) and `labels`
    (class names) are recorded for the serving side (`dyt.preprocess`, `dyt.labels`).
    """
    if not isinstance(model, DyTVisionTransformer):
        raise UserError(f"expected a DyT model from dyt_export, got {type(model).__name__}")
    if opset not in OPSETS:
        raise UserError(f"opset {opset} is not supported; choose one of {', '.join(map(str, OPSETS))}")
    check_dispatch_mode(dispatch)
    if fp16_io and not fp16:
        raise UserError("--fp16-io needs --fp16")
    check_tome_precision(model.dyt_config, "fp16" if fp16 else "fp32")
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
    preprocess = preprocess or resolve_spec(cfg, provenance.get("preprocess"))
    if preprocess.img_size != cfg.img_size:
        raise UserError(f"the preprocess spec crops {preprocess.img_size}px; the model takes {cfg.img_size}px")
    if labels is not None:
        labels = check_labels(labels, cfg.num_classes, "labels")

    with steps.step("prepare model"):
        prepared = _prepare(model, dispatch, with_masks, fp16, fp16_io)
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(example_batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
        if fp16_io:
            example = example.half()

    with steps.step("torch.onnx.export (dynamo)"):
        batch = torch.export.Dim("batch", min=1)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
                quiet_logs("torch.onnx", "torch.export", "onnxscript", "onnx_ir"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                prepared, (example,), dynamo=True, optimize=True, verbose=False,
                input_names=["pixel_values"],
                output_names=["logits", "token_masks"] if with_masks else ["logits"],
                dynamic_shapes={"pixel_values": {0: batch}}, opset_version=max(opset, TORCH_OPSET),
            )
            rewrites = apply_exact_rewrites(program.model)
            if opset < TORCH_OPSET:
                _convert_down(program.model, opset)
        program.model.metadata_props.update(build_metadata(
            cfg, dispatch=dispatch, precision="fp16" if fp16 else "fp32", opset=opset,
            with_masks=with_masks, provenance=provenance, parameters=model.parameter_counts(), rewrites=rewrites))
        program.model.metadata_props.update(metadata_props(preprocess, labels))

    external = external_data or weights_need_external_data(prepared)
    import onnx  # heavy import, only needed here

    with staged_outputs(path) as stage:
        staged = stage / path.name
        with steps.step("save"):
            save_onnx(program.model, staged, external_data=external)
        with steps.step("onnx.checker (full check)"):
            try:
                onnx.checker.check_model(str(staged), full_check=True)
            except onnx.checker.ValidationError as e:
                raise RuntimeError(f"exported graph failed onnx.checker: {str(e).splitlines()[0]}") from e
            written = summarize(staged).opset
            if written != opset:  # a converter that gave up must not leave a mislabelled file
                raise RuntimeError(f"opset {opset} was asked for but the exported graph imports opset {written}")
    data = external_data_path(path)
    if not external:
        data.unlink(missing_ok=True)
    return ExportResult(path=path, external_data=data if external else None)
