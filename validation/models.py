"""The files a validation needs beside the user's ONNX model, and where they come from.

The user's file is timed and compared as given. Two twins are exported from the source
checkpoint (the reference) when the user's file cannot serve as them:
* a *mask twin*: same dispatch mode and precision, with the `token_masks` output, for the
  mask comparison (skipped when the user's file already outputs masks, and when the
  reference is not the checkpoint the model records as its source: its twin's masks would
  then be the reference's, not the model's, and masks are reported as not compared);
* a *dense twin*: `dispatch='dense'`, for the dense baseline timing (skipped when the
  user's file is itself dense).
Twins follow the model's precision, so that masks and the dense baseline are those of the
arithmetic the user ships: fp16 twins are exported with `--fp16` (and `--fp16-io` when the
model takes float16 pixels); int8 twins are the fp32 export quantized the way `dyt-export
--int8` does it (static or dynamic activations, as the file records), static ones calibrated
on the same default inputs (64 seeded image-like images), since the images the user
calibrated on are not recorded in the file. An int8 model calibrated on
other images has slightly different activation ranges than its twins; give the model
`--with-masks` to compare its own masks.
Twins are cached in `OUT/twins/`, named by the checkpoint's sha256 and precision, and
reused only while their recorded config, source hash, opset and precision still match and
the current exporter wrote them (`current_graph_form`: same toolkit version and graph code).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from dyt_export.config import DyTConfig, int8_label
from dyt_export.errors import UserError
from dyt_export.export import config_from_metadata, current_graph_form
from dyt_export.export.graph import load_onnx
from dyt_export.progress import Steps


@dataclass
class ModelUnderTest:
    path: Path
    props: dict[str, str]
    cfg: DyTConfig
    dispatch: str
    precision: str
    fp16_io: bool
    """The model takes float16 pixels (exported with --fp16-io)."""
    opset: int
    outputs: list[str]

    @property
    def has_masks(self) -> bool:
        return "token_masks" in self.outputs

    @property
    def int8_activations(self) -> str:
        """`static` or `dynamic` (dyt-export --int8-activations); files from before it are static."""
        return self.props.get("dyt.int8_activations", "static")

    @property
    def precision_label(self) -> str:
        if self.precision == "int8":
            return int8_label(self.int8_activations)
        return f"{self.precision}-io" if self.fp16_io else self.precision

    @property
    def source(self) -> str:
        return self.props.get("dyt.source_path", "")

    @property
    def source_sha256(self) -> str:
        return self.props.get("dyt.source_sha256", "")


def read_model(path: Path) -> ModelUnderTest:
    """What a dyt-export ONNX file says about itself (UserError for anything else)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist or is not a file")
    graph = load_onnx(path)  # once: metadata and input type come from the same load
    props = {p.key: p.value for p in graph.metadata_props}
    cfg = config_from_metadata(props, path)
    try:
        outputs = json.loads(props.get("dyt.outputs", '["logits"]'))
        opset = int(props.get("dyt.opset", "18"))
    except (ValueError, TypeError):
        raise UserError(f"{path} has malformed dyt metadata (outputs/opset)") from None
    # `dyt.precision` says fp16 for --fp16 with and without --fp16-io; the input type tells them apart.
    inputs = graph.graph.input
    fp16_io = bool(inputs) and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    return ModelUnderTest(path=path, props=props, cfg=cfg, dispatch=props.get("dyt.dispatch", "dynamic"),
                          precision=props.get("dyt.precision", "fp32"), fp16_io=fp16_io, opset=opset,
                          outputs=outputs)


def _twin_matches(path: Path, model: ModelUnderTest, sha256: str, dispatch: str, with_masks: bool) -> bool:
    try:
        cached = read_model(path)
    except UserError:
        return False
    return (cached.cfg == model.cfg and cached.source_sha256 == sha256 and cached.dispatch == dispatch
            and cached.precision_label == model.precision_label and cached.opset == model.opset
            and cached.has_masks == with_masks and current_graph_form(cached.props))


def twin(reference: Any, model: ModelUnderTest, directory: Path, *, dispatch: str, with_masks: bool,
         steps: Steps | None = None) -> tuple[Path, bool]:
    """(path, reused) of a twin of `model` exported from the reference module, in the model's precision."""
    from dyt_export.export import export_onnx

    sha256 = getattr(reference, "provenance", {}).get("sha256", "")
    if not sha256:
        raise UserError("the reference model has no source hash; load it from a checkpoint file")
    if model.precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"cannot build {model.precision} twins of {model.path.name}; export it with --with-masks "
                        f"and validate with --no-throughput")
    kind = f"{dispatch}{'-masks' if with_masks else ''}"
    path = directory / f"{model.path.stem}.{sha256[:12]}.{model.precision_label}.{kind}.onnx"
    if path.exists() and _twin_matches(path, model, sha256, dispatch, with_masks):
        return path, True
    directory.mkdir(parents=True, exist_ok=True)
    if model.precision != "int8":
        export_onnx(reference, path, opset=model.opset, dispatch=dispatch, with_masks=with_masks,
                    fp16=model.precision == "fp16", fp16_io=model.fp16_io, steps=steps)
        return path, False
    from dyt_export.quantize import calibration_images, export_int8

    calibration = calibration_images(model.cfg) if model.int8_activations == "static" else None
    export_int8(reference, path, calibration, activations=model.int8_activations, opset=model.opset,
                dispatch=dispatch, with_masks=with_masks, steps=steps)
    return path, False
