"""Facts about an ONNX graph that tell whether the dispatch stayed data-dependent."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import UserError
from ..files import check_input_file

DISPATCH_OPS: tuple[str, ...] = ("NonZero", "TopK", "Gather", "GatherElements", "GatherND",
                                 "ScatterND", "ScatterElements", "Compress")


@dataclass
class GraphSummary:
    opset: int
    inputs: dict[str, list[str | int]]
    outputs: dict[str, list[str | int]]
    op_counts: dict[str, int]
    initializer_params: int
    metadata: dict[str, str]

    @property
    def dispatch_op_counts(self) -> dict[str, int]:
        return {op: self.op_counts[op] for op in DISPATCH_OPS if self.op_counts.get(op)}

    @property
    def scatter_count(self) -> int:
        return sum(self.op_counts.get(op, 0) for op in ("ScatterND", "ScatterElements"))


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_param if d.dim_param else d.dim_value for d in shape.dim]


def onnx_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ONNX domain the model imports (None: imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers no node reads any more, and their value_info entries, after a
    rewrite replaced their readers: a stale weight would stay in the file, and a stale shape
    entry would contradict a tensor that later takes its name."""
    used = {name for node in graph.node for name in node.input}
    dropped = {init.name for init in graph.initializer if init.name not in used}
    for field in (graph.initializer, graph.value_info):
        kept = [entry for entry in field if entry.name not in dropped]
        del field[:]
        field.extend(kept)


def load_onnx(path: Path | str) -> onnx.ModelProto:
    """An ONNX file's model without its external weights. Anything that is not a model with a
    graph and an ONNX opset (missing, empty, damaged, another protobuf) gets one message."""
    path = Path(path)
    check_input_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ...: all mean "not a readable ONNX file"
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node or onnx_opset(model) is None:
        raise UserError(f"{path} is not a readable ONNX model (no graph nodes or no ONNX opset import)")
    return model


def summarize(source: Path | str | onnx.ModelProto) -> GraphSummary:
    """Op counts, I/O shapes (symbolic names for dynamic axes), parameter count, metadata of an
    ONNX file, or of a model already loaded with `load_onnx`."""
    model = source if isinstance(source, onnx.ModelProto) else load_onnx(source)
    graph = model.graph
    counts: Counter[str] = Counter(node.op_type for node in graph.node)
    for fn in model.functions:  # ops inside model-local functions count too
        counts.update(node.op_type for node in fn.node)
    params = 0
    for init in graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        params += n
    return GraphSummary(
        opset=onnx_opset(model),
        inputs={i.name: _dims(i) for i in graph.input},
        outputs={o.name: _dims(o) for o in graph.output},
        op_counts=dict(sorted(counts.items())),
        initializer_params=params,
        metadata={p.key: p.value for p in model.metadata_props},
    )
