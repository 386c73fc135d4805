"""Exported graphs give PyTorch's numbers on ONNX Runtime CPU and keep the dispatch real."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dyt_export import build_model, export_onnx, save, write_public_checkpoint
from dyt_export.cli import main
from dyt_export.export import read_metadata, summarize

from conftest import force_dispatcher, image_batch, small_config
from validation.compare import compare_masks

FP32_TOLERANCE = 1e-4  # max |diff| <= this x max |logit|


def _edge_model(experts: int = 0):
    """Block 0 activates no patch token, block 2 every token, block 1 about half."""
    model = build_model(small_config(experts=experts), seed=0)
    force_dispatcher(model, 0, active=False)
    force_dispatcher(model, 2, active=True)
    return model


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_parity(model, path, batches=(1, 7), mode: str = "dynamic", tolerance: float = FP32_TOLERANCE,
                  mask_noise: float = 1e-5):
    session = _session(path)
    outputs = [o.name for o in session.get_outputs()]
    for batch in batches:
        x = image_batch(batch, seed=batch)
        ref = model.trace(torch.from_numpy(x), mode)
        got = dict(zip(outputs, session.run(None, {"pixel_values": x})))
        ref_logits = ref.logits.numpy()
        err = np.abs(got["logits"] - ref_logits).max() / np.abs(ref_logits).max()
        assert err <= tolerance, f"batch {batch}: max|diff|/max|logit| = {err:.2e}"
        if "token_masks" in got:
            assert got["token_masks"].dtype == np.bool_
            layers = model.dyt_config.dispatcher_names
            _, _, _, failures = compare_masks(ref.masks.numpy(), ref.dispatch_logits.numpy(), got["token_masks"],
                                              layers, mask_noise)
            assert not failures, f"batch {batch}: {failures}"


@pytest.fixture(scope="module")
def edge_checkpoints(tmp_path_factory):
    model = _edge_model()
    root = tmp_path_factory.mktemp("ckpt")
    return model, {shape: write_public_checkpoint(model, root / f"{shape}.pt", shape=shape)
                   for shape in ("bare", "model", "training")}


@pytest.mark.parametrize("mode", ["dynamic", "masked", "dense"])
@pytest.mark.parametrize("shape", ["bare", "model", "training"])
def test_each_layout_and_mode_matches_pytorch(edge_checkpoints, tmp_path, shape, mode):
    model, paths = edge_checkpoints
    out = tmp_path / "m.onnx"
    args = [str(paths[shape]), "-o", str(out), "--dispatch", mode, "--with-masks"]
    if shape != "training":
        args += ["--adapter-scale", "0.1"]
    assert main(args) == 0
    ref_masks = model.trace(torch.from_numpy(image_batch(4)), mode).masks
    if mode == "dynamic":  # the forced layers really are the edge cases they claim to be
        assert not ref_masks[:, 0, 1:].any() and ref_masks[:, 2].all() and 0 < ref_masks[:, 1].float().mean() < 1
    assert_parity(model, out, mode=mode)


def test_dynamic_graph_has_one_nonzero_and_one_scatter_per_dispatcher(tmp_path):
    model = build_model(small_config(depth=4, dispatch_blocks=(1, 2, 3)), seed=0)
    summary = summarize(export_onnx(model, tmp_path / "m.onnx").path)
    assert summary.op_counts.get("NonZero") == 3
    assert summary.scatter_count == 3
    for mode in ("masked", "dense"):
        other = summarize(export_onnx(model, tmp_path / f"{mode}.onnx", dispatch=mode).path)
        assert "NonZero" not in other.op_counts and other.scatter_count == 0


def test_batch_axis_is_dynamic(tmp_path):
    model = _edge_model()
    path = export_onnx(model, tmp_path / "m.onnx", example_batch=3).path
    summary = summarize(path)
    assert summary.inputs["pixel_values"][0] == summary.outputs["logits"][0] == "batch"
    assert_parity(model, path, batches=(1, 7, 64))


@pytest.mark.parametrize("opset,experts", [(17, 0), (17, 2), (19, 0), (20, 0), (21, 2)])
def test_opsets(tmp_path, capfd, opset, experts):
    """MLP dispatch at every opset besides the default 18 (which every other test exports),
    through the command. The file imports exactly the opset asked for, its metadata says the
    same, it matches PyTorch, and a successful export prints nothing on stderr. Below 18 torch
    converts down; the MoE router's ReduceMean is what defeated that conversion (the attention
    variants, which add a ReduceMax, are tested at 17 and 21 in test_variants)."""
    model = _edge_model(experts)
    ckpt = save(model, tmp_path / "m.safetensors")
    capfd.readouterr()
    assert main([str(ckpt), "-o", str(tmp_path / "m.onnx"), "--opset", str(opset), "--with-masks"]) == 0
    assert capfd.readouterr().err == ""
    summary = summarize(tmp_path / "m.onnx")
    assert summary.opset == opset and summary.metadata["dyt.opset"] == str(opset)
    assert_parity(model, tmp_path / "m.onnx", batches=(1, 5))


def test_an_opset_the_converter_did_not_reach_is_an_error(tmp_path, monkeypatch):
    """If the down-conversion leaves the graph at torch's opset, nothing is written: never a
    file whose metadata says one opset while it imports another."""
    import dyt_export.export.onnx_export as onnx_export
    monkeypatch.setattr(onnx_export, "_convert_down", lambda model, opset: None)
    model = build_model(small_config(depth=1), seed=0)
    with pytest.raises(RuntimeError, match="opset 17 was asked for but the exported graph imports opset 18"):
        export_onnx(model, tmp_path / "m.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_fp16_export_tolerance(tmp_path):
    """fp16 weights and GEMMs; LayerNorm, softmax and dispatcher logits in fp32, fp32 I/O.
    The documented tolerance (README) is 5e-3 x max|logit| (measured ~1e-3); masks may flip
    only where the fp32 logit is within fp16 noise of 0 (|logit| <= 1e-2)."""
    model = _edge_model()
    path = export_onnx(model, tmp_path / "m.onnx", fp16=True, with_masks=True).path
    session = _session(path)
    assert session.get_inputs()[0].type == "tensor(float)"
    assert_parity(model, path, batches=(1, 7), tolerance=5e-3, mask_noise=1e-2)


def test_fp16_io_asks_for_fp16_inputs(tmp_path):
    model = _edge_model()
    path = export_onnx(model, tmp_path / "m.onnx", fp16=True, fp16_io=True).path
    session = _session(path)
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float16)"
    x = image_batch(2)
    got = session.run(None, {"pixel_values": x.astype(np.float16)})[0].astype(np.float32)
    ref = model.trace(torch.from_numpy(x)).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_metadata_records_what_and_where_from(edge_checkpoints, tmp_path):
    _, paths = edge_checkpoints
    out = tmp_path / "m.onnx"
    assert main([str(paths["training"]), "-o", str(out), "--opset", "19"]) == 0
    meta = read_metadata(out)
    assert read_metadata(str(out)) == meta  # the Python API takes a str path too
    config = json.loads(meta["dyt.config"])
    assert config["embed_dim"] == 192 and config["variant"] == "mlp" and config["bottleneck"] == 8
    assert meta["dyt.dispatch"] == "dynamic" and meta["dyt.opset"] == "19" and meta["dyt.threshold_logit"] == "0.0"
    assert meta["dyt.source_path"] == str(paths["training"].resolve())
    import hashlib
    assert meta["dyt.source_sha256"] == hashlib.sha256(paths["training"].read_bytes()).hexdigest()
    assert meta["dyt.toolkit_version"] and json.loads(meta["dyt.dispatchers"]) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    adapters_and_dispatchers = 3 * (2 * 192 * 8 + 8 + 192 + 192 + 1)
    assert json.loads(meta["dyt.parameters"]) == {"total": sum(p.numel() for p in _edge_model().parameters()),
                                                  "trainable": adapters_and_dispatchers, "head": 192 * 10 + 10}
    assert json.loads(meta["dyt.rewrites"]) == {"gelu_affine": 3}  # one GELU per block


def test_graph_source_digest_follows_the_code_that_writes_the_graph(tmp_path):
    """Caches (the demo's export, validation twins) trust a file only while this digest matches,
    so an edit to the model or exporter code must change it and an edit to the command must not."""
    import shutil

    import dyt_export
    from dyt_export.export.metadata import graph_source_digest, installed_graph_source

    package = tmp_path / "dyt_export"
    shutil.copytree(Path(dyt_export.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = graph_source_digest(package)
    assert before == installed_graph_source()
    with (package / "cli" / "export_cmd.py").open("a") as f:
        f.write("\n# not graph code\n")
    assert graph_source_digest(package) == before
    with (package / "model" / "dispatcher.py").open("a") as f:
        f.write("\n# graph code\n")
    assert graph_source_digest(package) != before


def test_export_leaves_the_model_untouched(tmp_path):
    model = _edge_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", fp16=True, dispatch="dense", with_masks=True)
    assert model.dispatch_mode == "dynamic" and not model.return_masks
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
