"""What a server needs to know about a model, read from the ONNX file's `dyt.*` metadata: its
geometry (`dyt.config`), outputs, dispatchers (the order of `token_masks`' axis 1), how
images become its input (`dyt.preprocess`) and its class names (`dyt.labels`, or a labels
file given to the server). The command reads these before it deploys anything, so a bad
file is refused in one line; each replica reads them again beside its backend.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dyt_export.config import DyTConfig
from dyt_export.errors import UserError
from dyt_export.export.metadata import config_from_metadata, read_metadata
from dyt_export.preprocess import PreprocessSpec, check_labels, labels_from_metadata, spec_from_metadata

from .. import Backend, open_backend
from .protocol import tensor_metadata

VERSION = "1"
"""Every model is served as version 1: a server serves the file it was given."""
OUTPUTS = ("logits", "token_masks")


@dataclass(frozen=True)
class ModelSource:
    """A model to serve: the name clients use, the file, and class names given to the server."""

    name: str
    path: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ServeConfig:
    """What the command line asks for; every replica gets a copy."""

    models: tuple[ModelSource, ...]
    runtime: str
    replicas: int = 1
    threads: int = 1
    """Runtime threads per replica, and the CPUs Ray reserves for each."""
    max_batch: int = 8
    """Images per batch."""
    batch_wait_s: float = 0.005
    max_body_bytes: int = 64 << 20


@dataclass(frozen=True)
class ModelFacts:
    name: str
    path: Path
    cfg: DyTConfig
    outputs: tuple[str, ...]
    preprocess: PreprocessSpec
    labels: tuple[str, ...] | None

    @property
    def dispatchers(self) -> list[str]:
        return self.cfg.dispatcher_names

    @property
    def has_masks(self) -> bool:
        return "token_masks" in self.outputs

    def describe(self) -> str:
        c = self.cfg
        masks = f"token_masks [B,{len(self.dispatchers)},{c.num_tokens}]" if self.has_masks else "no token_masks"
        names = f"{len(self.labels)} class names" if self.labels else "no class names"
        return (f"{self.name}: {self.path.name}, pixel_values [B,{c.in_chans},{c.img_size},{c.img_size}] -> "
                f"logits [B,{c.num_classes}], {masks}; {names}")


def read_facts(source: ModelSource) -> ModelFacts:
    """The facts of `source`'s file, or UserError naming what is wrong with it."""
    path = Path(source.path)
    props = read_metadata(path)
    cfg = config_from_metadata(props, path)
    try:
        outputs = tuple(json.loads(props.get("dyt.outputs", '["logits"]')))
    except (ValueError, TypeError):
        raise UserError(f"{path} has malformed dyt.outputs metadata") from None
    if not outputs or outputs[0] != "logits" or not set(outputs) <= set(OUTPUTS):
        raise UserError(f"{path}: dyt.outputs {list(outputs)} are not the exporter's (logits[, token_masks])")
    labels = (check_labels(source.labels, cfg.num_classes, "--labels") if source.labels is not None
              else labels_from_metadata(props, cfg, path))
    return ModelFacts(source.name, path, cfg, outputs, spec_from_metadata(props, cfg, path),
                      tuple(labels) if labels else None)


class ServedModel:
    """One model on one backend in one replica: its facts, its runtime, its protocol metadata."""

    def __init__(self, source: ModelSource, runtime: str, threads: int) -> None:
        self.facts = read_facts(source)
        self.backend: Backend = open_backend(runtime, self.facts.path, threads=threads)
        declared = self.backend.output_names
        if list(declared) != list(self.facts.outputs):
            raise UserError(f"{self.facts.path}: the graph's outputs {declared} differ from its dyt.outputs metadata")
        self.runtime = runtime

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def input(self) -> Any:
        """The one input's TensorSpec (pixel_values)."""
        return self.backend.input_specs[0]

    def output_specs(self) -> list[tuple[str, np.dtype, tuple[int | None, ...]]]:
        """(name, dtype, shape) of each output: logits come in the input's float type (fp16 for
        an --fp16-io export), masks as booleans."""
        cfg = self.facts.cfg
        specs = [("logits", self.input.dtype, (None, cfg.num_classes))]
        if self.facts.has_masks:
            specs.append(("token_masks", np.dtype(np.bool_), (None, len(self.facts.dispatchers), cfg.num_tokens)))
        return specs

    def metadata(self) -> dict[str, Any]:
        """`GET /v2/models/{name}`."""
        spec = self.input
        return {"name": self.name, "versions": [VERSION], "platform": self.runtime,
                "inputs": [tensor_metadata(spec.name, spec.dtype, spec.shape)],
                "outputs": [tensor_metadata(*entry) for entry in self.output_specs()]}
