"""The demo model: really trained, saved in the public layout, same accuracy on every runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dyt_export import load_checkpoint
from validation.demo import ensure_demo_model
from validation.harness import Options, validate
from validation.train import Recipe, activation_loss, gumbel_sigmoid_hard


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
