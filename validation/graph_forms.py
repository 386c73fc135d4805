"""Alternative ONNX forms of the same DyT graph, made by rewriting an exported file.

Used by `validation.levers` to measure how the dispatch and the dense parts are expressed,
without a model-code change per form. Every rewrite keeps the graph's semantics (the
levers experiment checks outputs against the unrewritten file). The forms:

* `gather_nd`: row selection `Gather(data, idx, axis=0)` as `GatherND(data, idx[:, None])`;
* `compress`: row selection as `Compress(data, mask, axis=0)` straight from the flattened
  boolean mask that feeds NonZero (the scatter still needs NonZero's indices);
* `scatter_elements`: `ScatterND(data, idx[:, None], rows)` as `ScatterElements` (same reduction) with the
  index expanded to the rows' shape (what a per-element scatter needs);
* `linear_as_gemm`: `MatMul(X[B, N, C], W) + b` with a static N as
  `Reshape(X, [-1, C]) -> Gemm(W, b) -> Reshape([-1, N, C'])`, which lets ORT fold the bias
  into the GEMM without a fixed batch;
* `attention_op`: `Softmax((q * s) @ Transpose(k)) @ v` as one ONNX `Attention` (opset 23,
  scale s), the fused attention both runtimes implement; the model's opset goes to 23;
* `split_qkv`: timm's fused `qkv` linear, split into heads by a 5-D Transpose and unbound by
  Slice + Squeeze, as three linears (the weight's column blocks) each with a 4-D Transpose
  to [B, H, N, D]: no 5-D transpose and no split copy of the [B, N, 3C] product;
* `qkv_heads_first`: the fused product kept, put into [B, 3H, N, D] by one 4-D Transpose and
  split into q, k, v along the head axis: no 5-D transpose, no Squeeze;
* `gelu_op`: the exporter's GELU as one ONNX `Gelu` (opset 20), which ONNX Runtime fuses with
  the bias Add into one `BiasGelu` kernel (and OpenVINO into the GEMM: the form the exporter's
  GELU rewrite avoids); the model's opset goes to 20.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dyt_export.export.graph import drop_unused_initializers


class _Graph:
    """Producer/consumer maps and constant lookup over a GraphProto."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {init.name: init for init in self.graph.initializer}
        # each node's index (by identity) in graph order: the keys `_replace_nodes` takes
        self.position = {id(node): i for i, node in enumerate(self.graph.node)}
        self._count = 0

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def is_const(self, name: str, value: float) -> bool:
        array = self.const(name)
        return array is not None and array.size == 1 and np.isclose(float(array.reshape(-1)[0]), value, rtol=1e-6)

    def new_name(self, stem: str) -> str:
        self._count += 1
        return f"_form_{stem}_{self._count}"

    def add_initializer(self, array: np.ndarray, stem: str) -> str:
        name = self.new_name(stem)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def _replace_nodes(graph: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Swap node i for the nodes given (an empty list deletes it), keeping topological order."""
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)


def _require_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default domain's opset to `version` (the op a form brings in needs it)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, version)


def gather_nd(model: onnx.ModelProto) -> onnx.ModelProto:
    g = _Graph(model)
    swaps = {}
    for i, node in enumerate(g.graph.node):
        if node.op_type == "Gather" and g.producer.get(node.input[1]) is not None and _fed_by_nonzero(g, node.input[1]):
            axes = g.add_initializer(np.array([-1], np.int64), "axes")
            column = g.new_name("idx")
            swaps[i] = [helper.make_node("Unsqueeze", [node.input[1], axes], [column]),
                        helper.make_node("GatherND", [node.input[0], column], list(node.output))]
    _replace_nodes(g.graph, swaps)
    return model


def _fed_by_nonzero(g: _Graph, name: str, depth: int = 4) -> bool:
    node = g.producer.get(name)
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type == "NonZero":
            return True
        node = g.producer.get(node.input[0])
    return False


def _nonzero_input(g: _Graph, name: str) -> str:
    node = g.producer[name]
    while node.op_type != "NonZero":
        node = g.producer[node.input[0]]
    return node.input[0]


def compress(model: onnx.ModelProto) -> onnx.ModelProto:
    g = _Graph(model)
    swaps = {}
    for i, node in enumerate(g.graph.node):
        if node.op_type == "Gather" and _fed_by_nonzero(g, node.input[1]):
            swaps[i] = [helper.make_node("Compress", [node.input[0], _nonzero_input(g, node.input[1])],
                                         list(node.output), axis=0)]
    _replace_nodes(g.graph, swaps)
    return model


def scatter_elements(model: onnx.ModelProto) -> onnx.ModelProto:
    g = _Graph(model)
    swaps = {}
    for i, node in enumerate(g.graph.node):
        if node.op_type == "ScatterND":
            shape, index = g.new_name("shape"), g.new_name("index")
            reduction = [a for a in node.attribute if a.name == "reduction"]
            attrs = {"reduction": reduction[0].s.decode()} if reduction else {}
            swaps[i] = [helper.make_node("Shape", [node.input[2]], [shape]),
                        helper.make_node("Expand", [node.input[1], shape], [index]),
                        helper.make_node("ScatterElements", [node.input[0], index, node.input[2]], list(node.output),
                                         axis=0, **attrs)]
    _replace_nodes(g.graph, swaps)
    return model


def linear_as_gemm(model: onnx.ModelProto) -> onnx.ModelProto:
    """MatMul(X[?, N, C], W[C, D]) + b[D] with static N -> Reshape, Gemm with bias, Reshape."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    g = _Graph(model)
    swaps = {}
    for node in g.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in g.initializers:
            continue
        shape = shapes.get(node.input[0])
        users = g.consumers.get(node.output[0], [])
        if shape is None or len(shape) != 3 or shape[1] is None or shape[2] is None or len(users) != 1:
            continue
        add = users[0]
        bias = next((n for n in add.input if n != node.output[0]), None)
        if add.op_type != "Add" or bias not in g.initializers or g.const(bias).ndim != 1:
            continue
        weight = g.const(node.input[1])
        flat_in, flat_out = g.new_name("flat_in"), g.new_name("flat_out")
        to_2d = g.add_initializer(np.array([-1, shape[2]], np.int64), "shape2d")
        to_3d = g.add_initializer(np.array([-1, shape[1], weight.shape[1]], np.int64), "shape3d")
        swaps[g.position[id(node)]] = [helper.make_node("Reshape", [node.input[0], to_2d], [flat_in]),
                                     helper.make_node("Gemm", [flat_in, node.input[1], bias], [flat_out])]
        swaps[g.position[id(add)]] = [helper.make_node("Reshape", [flat_out, to_3d], list(add.output))]
    _replace_nodes(g.graph, swaps)
    return model


def attention_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """MatMul(Softmax(MatMul(Mul(q, s), Transpose(k, [0, 1, 3, 2]))), v) -> Attention(q, k, v, scale=s)."""
    g = _Graph(model)
    swaps: dict[int, list[onnx.NodeProto]] = {}
    for soft in g.graph.node:
        if soft.op_type != "Softmax":
            continue
        scores, users = g.producer.get(soft.input[0]), g.consumers.get(soft.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(users) != 1:
            continue
        mix, scaled, key_t = users[0], g.producer.get(scores.input[0]), g.producer.get(scores.input[1])
        if mix.op_type != "MatMul" or mix.input[0] != soft.output[0] or scaled is None or scaled.op_type != "Mul":
            continue
        if key_t is None or key_t.op_type != "Transpose" or list(key_t.attribute[0].ints) != [0, 1, 3, 2]:
            continue
        q, s = (scaled.input[0], scaled.input[1]) if g.const(scaled.input[1]) is not None else scaled.input[::-1]
        scale = g.const(s)
        if scale is None or scale.size != 1 or any(len(g.consumers[n.output[0]]) != 1 for n in (scaled, key_t, scores)):
            continue
        for dead in (scaled, key_t, scores, soft):
            swaps[g.position[id(dead)]] = []
        swaps[g.position[id(mix)]] = [helper.make_node("Attention", [q, key_t.input[0], mix.input[1]], list(mix.output),
                                                     scale=float(scale.reshape(-1)[0]))]
    _replace_nodes(g.graph, swaps)
    _require_opset(model, 23)
    model.ir_version = max(model.ir_version, 10)
    return model


class _QkvUnbind(NamedTuple):
    """timm's head split of the fused qkv product: MatMul(x, W[C, 3C]) + b ->
    Reshape([-1, N, 3, H, D]) -> Transpose([2, 0, 3, 1, 4]) -> (Slice(i, i + 1) + Squeeze(0))
    for q, k, v (in that order)."""
    matmul: onnx.NodeProto
    add: onnx.NodeProto
    reshape: onnx.NodeProto
    perm: onnx.NodeProto
    picks: list[tuple[onnx.NodeProto, onnx.NodeProto]]


def _qkv_unbinds(g: _Graph) -> list[_QkvUnbind]:
    found = []
    for perm in g.graph.node:
        if perm.op_type != "Transpose" or list(perm.attribute[0].ints) != [2, 0, 3, 1, 4]:
            continue
        reshape = g.producer.get(perm.input[0])
        add = g.producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        matmul = g.producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in g.initializers:
            continue
        if g.const(add.input[1]) is None or g.const(reshape.input[1]) is None:
            continue
        picks = [(s, g.consumers.get(s.output[0], [])) for s in g.consumers[perm.output[0]]]
        if len(picks) != 3 or any(s.op_type != "Slice" or len(users) != 1 or users[0].op_type != "Squeeze"
                                  for s, users in picks):
            continue
        if any(len(g.consumers[n.output[0]]) != 1 for n in (matmul, add, reshape)):
            continue
        ordered = sorted(((s, users[0]) for s, users in picks), key=lambda p: int(g.const(p[0].input[1]).reshape(-1)[0]))
        found.append(_QkvUnbind(matmul, add, reshape, perm, ordered))
    return found


def split_qkv(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each of q, k, v as its own MatMul(x, W[:, iC:(i+1)C]) + b_i -> Reshape([-1, N, H, D]) ->
    Transpose([0, 2, 1, 3])."""
    g = _Graph(model)
    swaps: dict[int, list[onnx.NodeProto]] = {}
    for unbind in _qkv_unbinds(g):
        weight, bias = g.const(unbind.matmul.input[1]), g.const(unbind.add.input[1])
        width = weight.shape[1] // 3
        head_shape = g.add_initializer(np.delete(g.const(unbind.reshape.input[1]), 2), "head_shape")
        new_nodes = []
        for i, (_, squeeze) in enumerate(unbind.picks):
            w = g.add_initializer(np.ascontiguousarray(weight[:, i * width:(i + 1) * width]), "w")
            b = g.add_initializer(bias[i * width:(i + 1) * width], "b")
            prod, biased, heads = g.new_name("prod"), g.new_name("biased"), g.new_name("heads")
            new_nodes += [helper.make_node("MatMul", [unbind.matmul.input[0], w], [prod]),
                          helper.make_node("Add", [prod, b], [biased]),
                          helper.make_node("Reshape", [biased, head_shape], [heads]),
                          helper.make_node("Transpose", [heads], list(squeeze.output), perm=[0, 2, 1, 3])]
        for dead in (unbind.add, unbind.reshape, unbind.perm, *(n for pick in unbind.picks for n in pick)):
            swaps[g.position[id(dead)]] = []
        swaps[g.position[id(unbind.matmul)]] = new_nodes
    _replace_nodes(g.graph, swaps)
    drop_unused_initializers(g.graph)
    return model


def qkv_heads_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fused product kept, split into heads as Reshape([-1, N, 3H, D]) -> Transpose([0, 2, 1, 3])
    -> Split(axis 1) into q, k, v."""
    g = _Graph(model)
    swaps: dict[int, list[onnx.NodeProto]] = {}
    for unbind in _qkv_unbinds(g):
        _, tokens, three, heads, dim = g.const(unbind.reshape.input[1])
        shape = g.add_initializer(np.array([-1, tokens, three * heads, dim], np.int64), "heads_shape")
        sizes = g.add_initializer(np.array([heads] * 3, np.int64), "split")
        flat, first = g.new_name("flat"), g.new_name("heads_first")
        swaps[g.position[id(unbind.reshape)]] = [helper.make_node("Reshape", [unbind.reshape.input[0], shape], [flat])]
        swaps[g.position[id(unbind.perm)]] = [
            helper.make_node("Transpose", [flat], [first], perm=[0, 2, 1, 3]),
            helper.make_node("Split", [first, sizes], [squeeze.output[0] for _, squeeze in unbind.picks], axis=1)]
        for dead in (n for pick in unbind.picks for n in pick):
            swaps[g.position[id(dead)]] = []
    _replace_nodes(g.graph, swaps)
    drop_unused_initializers(g.graph)
    return model


def gelu_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter's GELU, x * (0.5 + 0.5 * Erf(x / sqrt(2))), as one ONNX `Gelu` (opset 20)."""
    g = _Graph(model)
    swaps: dict[int, list[onnx.NodeProto]] = {}
    for div in g.graph.node:
        if div.op_type != "Div" or not g.is_const(div.input[1], 2 ** 0.5):
            continue
        chain, name = [div], div.output[0]
        for op in ("Erf", "Mul", "Add", "Mul"):
            users = g.consumers.get(name, [])
            if len(users) != 1 or users[0].op_type != op:
                break
            chain.append(users[0])
            name = users[0].output[0]
        if len(chain) != 5 or div.input[0] not in chain[-1].input:
            continue
        for dead in chain[:-1]:
            swaps[g.position[id(dead)]] = []
        swaps[g.position[id(chain[-1])]] = [helper.make_node("Gelu", [div.input[0]], list(chain[-1].output))]
    _replace_nodes(g.graph, swaps)
    _require_opset(model, 20)
    return model


FORMS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "gather_nd": gather_nd, "compress": compress, "scatter_elements": scatter_elements,
    "linear_as_gemm": linear_as_gemm, "attention_op": attention_op, "split_qkv": split_qkv,
    "qkv_heads_first": qkv_heads_first, "gelu_op": gelu_op,
}
