"""Which nodes of an ONNX Runtime session run on the CPU although the session asked for
another execution provider, and whether they compute or only handle shapes.

ORT assigns every node to one provider when the session starts. Nodes the provider has no
kernel for fall back to the CPU; so, on purpose, do small shape computations fed by host
memory (the CUDA provider keeps `Shape`'s output on the host, and ORT's
`GetCpuPreferredNodes` moves the int64 arithmetic after it to the CPU rather than copy a
few values to the GPU and back). ORT's own report of the assignment
(`InferenceSession.get_provider_graph_assignment_info()`, recorded when the session config
`session.record_ep_graph_assignment_info` is "1") names each node's provider, not why it
went there.

So each node off the provider is classified from the tensors it reads and writes, with the
types the model declares or ONNX shape inference finds:

* shape: every such tensor is int64 or bool (shapes, indices, counts, token masks) or has
  a static size of at most SMALL elements. `Shape` and `Size` read only their input's
  shape, so only their outputs count.
* compute: any other node, i.e. one that reads or writes data of another type (activations,
  weights, logits: float, or int8/int32 in quantized graphs), or whose tensors cannot be
  seen (a node ORT created itself and the file does not hold).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

RECORD_KEY = "session.record_ep_graph_assignment_info"
CPU = "CPUExecutionProvider"
SMALL = 100
"""Elements a tensor may have and still count as shape data: ORT's bound for a 'small'
initializer in `GetCpuPreferredNodes`."""
METADATA_READERS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Placement:
    provider: str
    nodes: int
    """Nodes in the session's graph."""
    cpu_compute: dict[str, int]
    """Op type -> nodes off the provider that compute (see the module docstring)."""
    cpu_shape: dict[str, int]
    """Op type -> nodes off the provider that only handle shapes, indices or masks."""

    @property
    def off_provider(self) -> int:
        return sum(self.cpu_compute.values()) + sum(self.cpu_shape.values())

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "nodes": self.nodes, "on_provider": self.nodes - self.off_provider,
                "cpu_compute": self.cpu_compute, "cpu_shape": self.cpu_shape}

    def summary(self) -> str:
        """One line: how many nodes run where, op types of those on the CPU."""
        def ops(counts: dict[str, int]) -> str:
            return ", ".join(f"{op} x{n}" for op, n in counts.items()) or "none"
        return (f"{self.nodes - self.off_provider} of {self.nodes} nodes on {self.provider}; on the CPU: "
                f"compute {ops(self.cpu_compute)}; shape/index {ops(self.cpu_shape)}")


def tensor_is_shape_data(model: Any) -> dict[str, bool]:
    """Tensor name -> whether it counts as shape data (int64/bool, or statically <= SMALL
    elements), for every tensor whose type the model states or shape inference finds."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    kinds: dict[str, bool] = {}
    for init in graph.initializer:
        size = 1
        for d in init.dims:
            size *= d
        kinds[init.name] = init.data_type in (TensorProto.INT64, TensorProto.BOOL) or size <= SMALL
    for value in (*graph.input, *graph.value_info, *graph.output):
        t = value.type.tensor_type
        if not t.HasField("elem_type") or t.elem_type == 0:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else [None]
        size = 1
        for d in dims:
            size = None if d is None or size is None else size * d
        kinds[value.name] = t.elem_type in (TensorProto.INT64, TensorProto.BOOL) or (size is not None and size <= SMALL)
    return kinds


def load_structure(path: Path) -> Any:
    """The model's graph without its weights' bytes: types and dims are all placement needs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        init.ClearField("raw_data")
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
    return model


def classify(assigned: Iterable[tuple[str, str, str]], model: Any, provider: str) -> Placement:
    """`assigned`: (provider, node name, op type) of every node of the session's graph."""
    nodes = {n.name: n for n in model.graph.node}
    kinds = tensor_is_shape_data(model)
    compute: Counter[str] = Counter()
    shape: Counter[str] = Counter()
    total = 0
    for ep, name, op_type in assigned:
        total += 1
        if ep == provider:
            continue
        node = nodes.get(name)
        if node is None or node.op_type != op_type:
            compute[op_type] += 1
            continue
        tensors = [t for t in (*([] if op_type in METADATA_READERS else node.input), *node.output) if t]
        (shape if all(kinds.get(t, False) for t in tensors) else compute)[op_type] += 1
    return Placement(provider, total, dict(compute.most_common()), dict(shape.most_common()))


def session_assignment(session: Any) -> list[tuple[str, str, str]] | None:
    """(provider, node name, op type) per node from ORT, or None when this onnxruntime cannot
    report it (the API arrived in 1.24) or the session did not record it."""
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return None
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # not recorded: ORT raises when RECORD_KEY was not set
        return None
    assigned = [(sg.ep_name, n.name, n.op_type) for sg in subgraphs for n in sg.get_nodes()]
    return assigned or None


def read_placement(session: Any, path: Path, provider: str) -> Placement | None:
    """Where `session` (created with RECORD_KEY set) placed the nodes of the model at `path`;
    None when ORT cannot say."""
    assigned = session_assignment(session)
    if assigned is None:
        return None
    return classify(assigned, load_structure(path), provider)
