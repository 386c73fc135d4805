"""--int8: what gets quantized, what must not be, and that both CPU runtimes run the result.

Every parity assertion here is against the fp32 PyTorch reference (`TorchReference`, the
model's own `trace`), with the tolerances validation applies (`validation.tolerances.TOLERANCES`):
an int8 file agreeing with another int8 run proves nothing about the model it came from."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import force_dispatcher, image_batch, small_config
from dyt_export import build_model, load_checkpoint, write_public_checkpoint
from dyt_export.calibrate import image_like
from dyt_export.cli import main as cli_main
from dyt_export.config import INT8_ACTIVATIONS
from dyt_export.errors import UserError
from dyt_export.export import export_onnx
from dyt_export.quantize import dispatcher_nodes, quantize_int8
from runtimes import open_backend
from runtimes.torch_ref import TorchReference
from validation.compare import compare, compare_masks
from validation.tolerances import TOLERANCES


@pytest.fixture(scope="module")
def small_fp32(tmp_path_factory):
    """(fp32 path, model) of a small model with a block that activates no patch token."""
    model = build_model(small_config(), seed=0)
    force_dispatcher(model, 1, active=False)
    fp32 = tmp_path_factory.mktemp("int8") / "fp32.onnx"
    export_onnx(model, fp32, with_masks=True)
    return fp32, model


@pytest.fixture(scope="module", params=INT8_ACTIVATIONS)
def int8_pair(request, small_fp32):
    """(fp32 path, int8 path, model), the int8 file with static or dynamic activations."""
    fp32, model = small_fp32
    int8 = fp32.with_name(f"int8-{request.param}.onnx")
    calibration = image_like(16, size=32, seed=0).numpy() if request.param == "static" else None
    quantize_int8(fp32, int8, calibration, request.param)
    return fp32, int8, model


# What feeds an int8 GEMM: QDQ's DequantizeLinear of a weight, or dynamic quantization's MatMulInteger.
INT8_WEIGHT_READERS = {"DequantizeLinear": 0, "MatMulInteger": 1}


def test_weight_gemms_are_quantized_and_dispatchers_stay_float(int8_pair):
    fp32, int8, _ = int8_pair
    original = onnx.load(str(fp32))
    dispatchers = dispatcher_nodes(original)
    assert sum(n.op_type == "Greater" for n in original.graph.node if n.name in dispatchers) == 3
    model = onnx.load(str(int8))
    producer = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name: i for i in model.graph.initializer}
    int8_weights = {n.input[INT8_WEIGHT_READERS[n.op_type]] for n in model.graph.node if n.op_type in INT8_WEIGHT_READERS}
    int8_weights = [w for w in int8_weights if w in initializers and initializers[w].data_type == onnx.TensorProto.INT8
                    and len(initializers[w].dims) == 2]
    assert len(int8_weights) == 3 * 6 + 1  # qkv, proj, fc1, fc2, adapter down/up per block; the head
    for node in model.graph.node:
        if node.name in dispatchers:  # every dispatcher node reads float tensors, never a quantized copy
            assert all(producer.get(i) is None or producer[i].op_type not in ("DequantizeLinear", "DynamicQuantizeLinear")
                       for i in node.input), node.name
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert initializers[conv.input[1]].data_type == onnx.TensorProto.FLOAT  # patch embedding stays float
    props = {p.key: p.value for p in model.metadata_props}
    activations = props["dyt.int8_activations"]
    assert props["dyt.precision"] == "int8" and "dispatchers float" in props["dyt.int8"] and activations in int8.name
    assert ("scaled on every call" in props["dyt.int8"]) == (activations == "dynamic")


def test_gemms_as_matmuls_keeps_the_fp32_answers(small_fp32, tmp_path):
    """Dynamic quantization first writes the gathered MLP's Gemms as MatMul + Add (ORT's dynamic
    quantizer has no Gemm); a transposed weight or a lost bias would change the fp32 logits."""
    from dyt_export.quantize import _gemms_as_matmuls

    fp32, _ = small_fp32
    model = onnx.load(str(fp32))
    gemms = sum(n.op_type == "Gemm" for n in model.graph.node)
    assert _gemms_as_matmuls(model, keep=dispatcher_nodes(model)) == gemms >= 2 * 3  # fc1, fc2 per block
    assert not any(n.op_type == "Gemm" for n in model.graph.node)
    onnx.save(model, str(tmp_path / "matmuls.onnx"))
    x = image_batch(3, seed=5)
    reference = TorchReference.from_module(small_fp32[1]).run({"pixel_values": x})
    layers = small_fp32[1].dyt_config.dispatcher_names
    for path in (fp32, tmp_path / "matmuls.onnx"):
        got = open_backend("ort-cpu", path).run({"pixel_values": x})
        parity = compare(reference, got["logits"], got["token_masks"], layers, TOLERANCES["fp32"])
        assert parity.passed and parity.max_rel < 1e-5 and parity.mask_agreement == 1, (path.name, parity.failures)


def test_int8_runs_on_both_cpu_runtimes_against_the_fp32_reference(int8_pair):
    """Both runtimes, at batch 3 and 1, against the fp32 PyTorch model with the int8 tolerances.
    Masks, in both forms: every difference from the reference is a flip within the int8
    window (the dispatchers stay float), and the silenced block stays silent. Logits: the
    dynamic form passes every int8 tolerance here. Statically quantized, a seeded random
    model's logits cannot: measured on 16 images, cosine 0.66-0.90 and top-1 0.50-0.94 over
    five seeded models, 0.92 and 0.88 even when calibrated on those very images. So
    static logits are judged on the trained demo model (the slow test below)."""
    _, int8, model = int8_pair
    activations = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}["dyt.int8_activations"]
    x = image_batch(3, seed=5)
    layers = model.dyt_config.dispatcher_names
    tolerances = TOLERANCES["int8"]
    for runtime in ("ort-cpu", "openvino"):
        for batch in (x, x[:1]):
            reference = TorchReference.from_module(model).run({"pixel_values": batch})
            out = open_backend(runtime, int8).run({"pixel_values": batch})
            assert not out["token_masks"][:, 1, 1:].any() and out["token_masks"][:, :, 0].all()
            _, _, _, mask_failures = compare_masks(reference["token_masks"], reference["dispatch_logits"],
                                                   out["token_masks"], layers, tolerances.flip_logit)
            assert mask_failures == [], (runtime, mask_failures)
            if activations == "dynamic":
                parity = compare(reference, out["logits"], out["token_masks"], layers, tolerances)
                assert parity.passed, (runtime, parity.failures)
                assert parity.images_compared_on_logits + parity.images_compared_on_top1_cosine == len(batch)


def test_cli_int8_writes_an_int8_model_and_checks_its_flags(tmp_path, capsys):
    model = build_model(small_config(), seed=0)
    ckpt = write_public_checkpoint(model, tmp_path / "m.pth", shape="training")
    calib = tmp_path / "calib.npy"
    np.save(calib, image_batch(8))
    out = tmp_path / "m.onnx"
    assert cli_main([str(ckpt), "-o", str(out), "--int8", "--calibration-images", str(calib)]) == 0
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert props["dyt.precision"] == "int8" and "on 8 images" in props["dyt.int8"]
    assert "int8" in capsys.readouterr().out
    dynamic = tmp_path / "dynamic.onnx"
    assert cli_main([str(ckpt), "-o", str(dynamic), "--int8", "--int8-activations", "dynamic"]) == 0
    props = {p.key: p.value for p in onnx.load(str(dynamic), load_external_data=False).metadata_props}
    assert props["dyt.int8_activations"] == "dynamic" and "scaled on every call" in props["dyt.int8"]
    assert "int8 (dynamic activations)" in capsys.readouterr().out
    np.save(tmp_path / "bad.npy", image_batch(2, size=16))
    refusals = {("--calibration-images", str(calib)): "needs --int8",
                ("--int8", "--fp16"): "drop --fp16",
                ("--int8", "--calibration-images", str(tmp_path / "bad.npy")): "the model takes",
                ("--int8-activations", "dynamic"): "--int8-activations needs --int8",
                ("--int8", "--int8-activations", "dynamic", "--calibration-images", str(calib)): "has no use with"}
    for args, message in refusals.items():
        assert cli_main([str(ckpt), "-o", str(tmp_path / "x.onnx"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.onnx").exists()


def test_int8_refuses_weights_in_external_data_before_exporting(int8_pair, tmp_path, monkeypatch, capsys):
    """ORT's quantizer reads single files: a model past the external-data limit is refused at
    once (not after its fp32 export), and so is an fp32 file whose weights sit beside it."""
    from dyt_export import export as export_pkg
    from dyt_export.export import onnx_export

    fp32, _, model = int8_pair
    ckpt = write_public_checkpoint(model, tmp_path / "m.pth", shape="training")
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    monkeypatch.setattr(export_pkg, "export_onnx", lambda *a, **k: pytest.fail("exported before refusing"))
    capsys.readouterr()
    assert cli_main([str(ckpt), "-o", str(tmp_path / "x.onnx"), "--int8"]) == 2
    err = capsys.readouterr().err
    assert "fp32 weights fit in the ONNX file" in err and len(err.splitlines()) == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]
    monkeypatch.undo()
    external = tmp_path / "ext.onnx"
    export_onnx(model, external, external_data=True)
    with pytest.raises(UserError, match="not ones kept in external data"):
        quantize_int8(external, tmp_path / "q.onnx", image_like(4, size=32, seed=0).numpy())
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("activations", INT8_ACTIVATIONS)
def test_demo_model_int8_keeps_top1_on_the_digits_test_set(tmp_path, activations):
    """Issue 5 target: top-1 agreement >= 99 % with the fp32 PyTorch model on the demo model's
    test set, on both CPU runtimes, and every int8 tolerance of validation passed; static
    activations calibrated on its training split (the user's images)."""
    from validation.data import digits
    from validation.demo import ensure_demo_model
    from validation.demo.train import Recipe

    demo = ensure_demo_model()
    recipe = Recipe()
    model = load_checkpoint(demo.checkpoint, num_heads=recipe.num_heads)
    calib = digits(recipe.img_size, split="train").pixel_values[::4] if activations == "static" else None
    int8 = tmp_path / "int8.onnx"
    export_onnx(model, int8, with_masks=True)  # masks too, so flips are told from failures
    quantize_int8(int8, int8, calib, activations)
    test = digits(recipe.img_size, split="test").pixel_values
    reference = TorchReference.from_module(model).run({"pixel_values": test})
    for runtime in ("ort-cpu", "openvino"):
        got = open_backend(runtime, int8).run({"pixel_values": test})
        parity = compare(reference, got["logits"], got["token_masks"], model.dyt_config.dispatcher_names,
                         TOLERANCES["int8"])
        assert parity.passed, (runtime, parity.failures)
        assert parity.top1_agreement >= 0.99, runtime


def test_quantize_int8_refuses_a_mode_without_its_inputs(small_fp32, tmp_path):
    fp32, _ = small_fp32
    images = image_like(2, size=32, seed=0).numpy()
    for calibration, activations, message in ((images, "dynamic", "takes no calibration"),
                                              (None, "static", "needs calibration images"),
                                              (images, "weekly", "must be one of static, dynamic")):
        with pytest.raises(UserError, match=message):
            quantize_int8(fp32, tmp_path / "q.onnx", calibration, activations)
    assert not (tmp_path / "q.onnx").exists()
