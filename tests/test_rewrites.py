"""The exporter's exact rewrites: they fire where they should, nowhere else, and change no bit."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript import ir

import dyt_export.export.onnx_export as exporter
from dyt_export import build_model, export_onnx
from dyt_export.export.rewrites import apply_exact_rewrites

from conftest import image_batch, small_config


def _gelu_model(half: float) -> ir.Model:
    """y = x * (half * (1 + erf(x / sqrt2))), as torchlib writes exact GELU when half = 0.5."""
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("sqrt2", 2 ** 0.5), ("one", 1.0), ("half", half))]
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], consts)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _affine_gelus(model: onnx.ModelProto) -> int:
    """Erf nodes feeding Mul(erf, 0.5) -> Add(0.5, .), the rewritten form."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    count = 0
    for node in model.graph.node:
        if node.op_type == "Erf":
            (mul,) = consumers[node.output[0]]
            (add,) = consumers[mul.output[0]]
            count += mul.op_type == "Mul" and add.op_type == "Add"
    return count


def test_the_rule_fires_on_exact_gelu_only():
    exact, other = _gelu_model(0.5), _gelu_model(0.6)
    assert apply_exact_rewrites(exact) == {"gelu_affine": 1}
    assert apply_exact_rewrites(other) == {"gelu_affine": 0}
    proto = ir.serde.serialize_model(exact)
    assert [n.op_type for n in proto.graph.node] == ["Div", "Erf", "Mul", "Add", "Mul"]
    assert sorted(i.name for i in proto.graph.initializer) == ["half", "sqrt2"]  # the unused 1.0 is gone
    x = np.linspace(-6, 6, 32, dtype=np.float32).reshape(4, 8)
    before = ort.InferenceSession(ir.serde.serialize_model(_gelu_model(0.5)).SerializeToString()).run(None, {"x": x})[0]
    after = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("fp16", [False, True])
def test_exported_gelus_are_rewritten_and_bitwise_unchanged(tmp_path, monkeypatch, fp16):
    """Every GELU of an export is in the affine form, and ONNX Runtime (which fuses neither form)
    gives bit-identical logits with and without the rewrite."""
    cfg = small_config(depth=3)
    model = build_model(cfg, seed=0)
    rewritten = export_onnx(model, tmp_path / "rewritten.onnx", fp16=fp16).path
    monkeypatch.setattr(exporter, "apply_exact_rewrites", lambda m: {})
    plain = export_onnx(model, tmp_path / "plain.onnx", fp16=fp16).path
    assert _affine_gelus(onnx.load(str(rewritten))) == cfg.depth
    assert _affine_gelus(onnx.load(str(plain))) == 0
    x = image_batch(3, seed=1)
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
            for p in (rewritten, plain)]
    np.testing.assert_array_equal(runs[0], runs[1])
