"""The demo model: really trained, saved in the public layout, same accuracy on every runtime."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import validation.demo.cli
import validation.demo.model
from dyt_export import export_onnx, load_checkpoint
from dyt_export.quantize import calibration_images, quantize_int8
from runtimes import get_backend
from validation.tolerances import TOLERANCES
from validation.demo import ensure_demo_model
from validation.harness import Options, validate
from validation.demo.train import Recipe, activation_loss, gumbel_sigmoid_hard


@pytest.mark.slow
def test_demo_accuracy_is_the_same_in_pytorch_and_every_cpu_runtime(tmp_path):
    demo = ensure_demo_model()  # trains once (about 2 minutes on 2 cores), then cached in .cache/demo
    model = load_checkpoint(demo.checkpoint, num_heads=Recipe().num_heads)
    assert model.provenance["format"] == "torch/training"  # the public training code's full checkpoint
    records = {runtime: validate(Options(runtime=runtime, model=demo.onnx, out=tmp_path, throughput=False,
                                         threads=(1,))).record
               for runtime in ("ort-cpu", "openvino")}
    reference = records["ort-cpu"]["accuracy"]["reference"]
    assert reference >= 0.9  # learned digits, not a random model
    for runtime, record in records.items():
        assert record["passed"], (runtime, record["parity"]["failures"])
        accuracy = record["accuracy"]
        assert accuracy["images"] == 450 and accuracy["reference"] == reference
        # equal, or different only on images whose masks flipped at the threshold
        allowed = record["parity"]["images_with_flips"] / accuracy["images"]
        assert abs(accuracy["runtime"] - reference) <= allowed
    rates = np.array(list(records["ort-cpu"]["activation_rate"].values()))
    assert rates.min() < 0.5 and 0.2 < rates.mean() < 0.9  # the dispatchers learned to skip tokens


@pytest.mark.slow
def test_demo_int8_export_passes_the_documented_int8_tolerances(tmp_path):
    """The int8 defaults in validation/tolerances.py were measured on this model; an int8 export
    made as `dyt-export --int8` makes it must pass them on both CPU runtimes, its quantization
    noise showing as reported flips within the window, not as failures."""
    demo = ensure_demo_model()
    model = load_checkpoint(demo.checkpoint, num_heads=Recipe().num_heads)
    path = tmp_path / "dyt_digits_int8.onnx"
    export_onnx(model, path, with_masks=True)
    quantize_int8(path, path, calibration_images(model.dyt_config))
    int8 = TOLERANCES["int8"]
    for runtime in ("ort-cpu", "openvino"):
        record = validate(Options(runtime=runtime, model=path, out=tmp_path, throughput=False, threads=(1,))).record
        parity = record["parity"]
        assert record["passed"], (runtime, parity["failures"])
        assert record["tolerances"] == dataclasses.asdict(int8) and record["model"]["twins"]["masks"] is None
        assert parity["top1_agreement"] >= int8.top1_min and parity["cosine_min"] >= int8.cosine_min
        assert parity["flips"] and all(abs(f["logit"]) <= int8.flip_logit for f in parity["flips"])


@pytest.mark.parametrize("runtimes, message", [
    ("ort-cuda", "error: ort-cuda is not available: "),
    ("bogus,ort-cpu", "error: argument --runtimes: unknown runtime(s) bogus; choose from ort-cpu, ort-cuda, openvino"),
])
def test_demo_refuses_unknown_or_unavailable_runtimes_before_training(runtimes, message, monkeypatch, capsys):
    if runtimes == "ort-cuda" and get_backend("ort-cuda").availability():
        pytest.skip("CUDA is available here")
    monkeypatch.setattr(validation.demo.model, "ensure_demo_model", lambda **_: pytest.fail("training started"))
    assert validation.demo.cli.main(["--runtimes", runtimes]) == 2  # bad input, like `python -m validation`; 3 is parity
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_gumbel_mask_is_hard_forward_and_soft_backward():
    logits = torch.linspace(-3, 3, 50, requires_grad=True)
    mask = gumbel_sigmoid_hard(logits, tau=5.0, generator=torch.Generator().manual_seed(0))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    assert (logits.grad > 0).all()  # the straight-through gradient of the soft sample


def test_activation_loss_pulls_toward_the_target_and_away_from_empty_layers():
    recipe = Recipe(target_rate=0.5)
    at_target = torch.full((2, 3, 8), 0.5)
    assert activation_loss(at_target, recipe) == 0
    too_many = torch.ones(2, 3, 8)
    empty_layer = at_target.clone()
    empty_layer[:, 1] = 0.0
    assert activation_loss(too_many, recipe) > 0
    assert activation_loss(empty_layer, recipe) > activation_loss(at_target, recipe)
