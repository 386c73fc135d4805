"""The files a validation needs beside the user's ONNX model, and where they come from.

The user's file is timed and compared as given. Two twins are exported from the source
checkpoint (the reference) when the user's file cannot serve as them:
* a *mask twin*: same dispatch mode and precision, with the `token_masks` output, for the
  mask comparison (skipped when the user's file already outputs masks);
* a *dense twin*: `dispatch='dense'`, for the dense baseline timing (skipped when the
  user's file is itself dense).
Twins are cached in `OUT/twins/`, named by the checkpoint's sha256, and reused only while
their recorded config, source hash, opset and precision still match.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyt_export.config import DyTConfig
from dyt_export.errors import UserError
from dyt_export.export import config_from_metadata, read_metadata
from dyt_export.progress import Steps


@dataclass
class ModelUnderTest:
    path: Path
    props: dict[str, str]
    cfg: DyTConfig
    dispatch: str
    precision: str
    opset: int
    outputs: list[str]

    @property
    def has_masks(self) -> bool:
        return "token_masks" in self.outputs

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
    props = read_metadata(path)
    cfg = config_from_metadata(props, path)
    try:
        outputs = json.loads(props.get("dyt.outputs", '["logits"]'))
        opset = int(props.get("dyt.opset", "18"))
    except (ValueError, TypeError):
        raise UserError(f"{path} has malformed dyt metadata (outputs/opset)") from None
    return ModelUnderTest(path=path, props=props, cfg=cfg, dispatch=props.get("dyt.dispatch", "dynamic"),
                          precision=props.get("dyt.precision", "fp32"), opset=opset, outputs=outputs)


def _twin_matches(path: Path, model: ModelUnderTest, sha256: str, dispatch: str, with_masks: bool) -> bool:
    try:
        props = read_metadata(path)
        cfg = config_from_metadata(props, path)
    except UserError:
        return False
    outputs = json.loads(props.get("dyt.outputs", "[]"))
    return (cfg == model.cfg and props.get("dyt.source_sha256") == sha256 and props.get("dyt.dispatch") == dispatch
            and props.get("dyt.precision") == model.precision and props.get("dyt.opset") == str(model.opset)
            and ("token_masks" in outputs) == with_masks)


def twin(reference: Any, model: ModelUnderTest, directory: Path, *, dispatch: str, with_masks: bool,
         steps: Steps | None = None) -> tuple[Path, bool]:
    """(path, reused) of a twin of `model` exported from the reference module."""
    from dyt_export.export import export_onnx

    sha256 = getattr(reference, "provenance", {}).get("sha256", "")
    if not sha256:
        raise UserError("the reference model has no source hash; load it from a checkpoint file")
    kind = f"{dispatch}{'-masks' if with_masks else ''}"
    path = directory / f"{model.path.stem}.{sha256[:12]}.{kind}.onnx"
    if path.exists() and _twin_matches(path, model, sha256, dispatch, with_masks):
        return path, True
    directory.mkdir(parents=True, exist_ok=True)
    export_onnx(reference, path, opset=model.opset, dispatch=dispatch, with_masks=with_masks,
                fp16=model.precision == "fp16", steps=steps)
    return path, False
