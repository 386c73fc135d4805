"""Facts about an ONNX graph that tell whether the dispatch stayed data-dependent."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import UserError

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


def summarize(path: Path) -> GraphSummary:
    """Op counts, I/O shapes (symbolic names for dynamic axes), parameter count, metadata."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # any decode failure means the same thing to the user
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    counts: Counter[str] = Counter(node.op_type for node in graph.node)
    for fn in model.functions:  # ops inside model-local functions count too
        counts.update(node.op_type for node in fn.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    params = 0
    for init in graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        params += n
    return GraphSummary(
        opset=opset,
        inputs={i.name: _dims(i) for i in graph.input},
        outputs={o.name: _dims(o) for o in graph.output},
        op_counts=dict(sorted(counts.items())),
        initializer_params=params,
        metadata={p.key: p.value for p in model.metadata_props},
    )
