"""`dyt-export init` and its library: timm names to DyT checkpoints, calibrated activation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from dyt_export import load_checkpoint
from dyt_export.calibrate import image_like
from dyt_export.errors import UserError
from dyt_export.export import read_metadata
from dyt_export.init_model import backbone_config, init_model

from conftest import assert_refused

BACKBONE = "vit_tiny_patch16_224"  # the smallest plain timm ViT: 12 blocks of width 192


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    """A local timm safetensors file (seeded random weights, 10 classes): no download."""
    torch.manual_seed(1)
    vit = timm.create_model(BACKBONE, pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def test_geometry_comes_from_timm():
    cfg = backbone_config("vit_small_patch16_384", variant="layer", experts=4, bottleneck=16, num_classes=100)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim) == (384, 12, 6, 1536)
    assert (cfg.patch_size, cfg.img_size, cfg.num_classes) == (16, 384, 100)
    assert (cfg.variant, cfg.experts, cfg.bottleneck) == ("layer", 4, 16)


@pytest.mark.parametrize("name,reason", [
    ("resnet50", "not a VisionTransformer"),
    ("vit_base_patch14_reg4_dinov2", "register tokens"),
    ("vit_base_patch16_clip_224", "pre-norm"),
    ("vit_bse_patch16_224", "did you mean vit_base_patch16_224"),
])
def test_backbones_dyt_cannot_adapt_are_refused(name, reason):
    with pytest.raises(UserError, match=reason):
        backbone_config(name)


@pytest.mark.parametrize("variant", ["attn_mlp", "layer"])
def test_calibration_reaches_the_target_activation(variant):
    model = init_model(BACKBONE, variant=variant, activation=0.3, calibration_images=4, seed=0)
    record = model.dyt_config.extra["init"]
    patch_tokens = 4 * model.dyt_config.num_patches
    assert len(record["calibration"]["rates"]) == len(model.dyt_config.dispatcher_names)
    assert all(abs(r - 0.3) <= 1 / patch_tokens for r in record["calibration"]["rates"])
    calibration = model.trace(image_like(4, size=224, seed=0)).masks[:, :, 1:].float().mean(dim=(0, 2))
    assert torch.allclose(calibration, torch.tensor(record["calibration"]["rates"]), atol=1e-4)
    fresh = model.trace(image_like(8, size=224, seed=5)).masks[:, :, 1:].float().mean(dim=(0, 2))
    assert (fresh - 0.3).abs().max() < 0.1  # "about R" on images it was not calibrated on


@pytest.mark.parametrize("activation", [0.0, 1.0])
def test_calibration_to_none_or_all(activation):
    model = init_model(BACKBONE, activation=activation, calibration_images=2, seed=0)
    masks = model.trace(image_like(2, size=224, seed=0)).masks[:, :, 1:]
    assert bool((masks == bool(activation)).all())


def test_seed_makes_the_model():
    a, b = (init_model(BACKBONE, experts=2, seed=s).state_dict() for s in (3, 3))
    c = init_model(BACKBONE, experts=2, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.adaptmlp.down_weight"], c["blocks.0.adaptmlp.down_weight"])


def test_weights_fill_the_backbone_and_a_fitting_head(timm_weights):
    weights = load_file(str(timm_weights))
    same = init_model(BACKBONE, num_classes=10, weights=timm_weights)
    other = init_model(BACKBONE, num_classes=5, weights=timm_weights)
    for key, value in weights.items():
        if key.startswith("head."):
            assert torch.equal(same.state_dict()[key], value)
            assert other.state_dict()[key].shape[0] == 5
        else:
            assert torch.equal(same.state_dict()[key], value) and torch.equal(other.state_dict()[key], value), key
    assert same.dyt_config.extra["init"]["head"] == "from weights"
    assert "another class count" in other.dyt_config.extra["init"]["head"]


def test_weights_of_another_architecture_are_refused(timm_weights):
    with pytest.raises(UserError, match="does not fit this architecture"):
        init_model("vit_tiny_patch16_384", weights=timm_weights)


def test_cli_init_then_inspect_says_it_was_calibrated(tmp_path, run_cli):
    out = tmp_path / "model.safetensors"
    result = run_cli("init", "--backbone", BACKBONE, "--variant", "attn_mlp", "--experts", "4", "--bottleneck", "16",
                     "--adapter-scale", "1.0", "--num-classes", "100", "--seed", "0", "--activation", "0.5", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "calibrated to activation 0.5" in result.stdout
    model = load_checkpoint(out)
    cfg = model.dyt_config
    assert (cfg.variant, cfg.experts, cfg.bottleneck, cfg.num_classes) == ("attn_mlp", 4, 16, 100)
    assert cfg.extra["init"]["trained"] is False
    assert "not trained" in cfg.extra["init"]["dispatchers"]

    described = run_cli("inspect", out, "--json")
    assert described.returncode == 0, described.stderr
    facts = json.loads(described.stdout)
    assert facts["variant"] == "attn_mlp" and facts["adapter"]["experts"] == 4
    assert [d["name"] for d in facts["dispatchers"]] == cfg.dispatcher_names
    assert [d["calibrated_rate"] for d in facts["dispatchers"]] == cfg.extra["init"]["calibration"]["rates"]
    assert facts["dispatchers"][1]["bias"] == pytest.approx(float(model.blocks[0].mlp_token_select.mlp_head.bias.detach()), abs=1e-6)
    assert facts["origin"]["trained"] is False
    text = run_cli("inspect", out).stdout
    assert "MoE-adapter, 4 experts" in text and "name=blocks.11.mlp" in text and "calibrated_rate=" in text

    # A real export (dense: the smallest graph) carries the same words and facts in its metadata.
    onnx_path = tmp_path / "model.onnx"
    exported = run_cli(out, "--dispatch", "dense", "-o", onnx_path)
    assert exported.returncode == 0, exported.stderr
    init = json.loads(read_metadata(onnx_path)["dyt.config"])["extra"]["init"]
    assert init["trained"] is False and "not trained" in init["dispatchers"]
    onnx_facts = json.loads(run_cli("inspect", onnx_path, "--json").stdout)
    assert onnx_facts["origin"] == facts["origin"]
    unbiased = [{k: v for k, v in d.items() if k != "bias"} for d in facts["dispatchers"]]
    assert onnx_facts["dispatchers"] == unbiased  # a dense graph has no dispatchers, so no biases
    assert {k: v for k, v in onnx_facts["parameters"].items() if k != "graph_initializer_values"} == facts["parameters"]
    routers = 12 * 2 * (192 * 4 + 4)  # MoE routers count as adapter parameters
    assert facts["parameters"]["trainable"] == 12 * 2 * (4 * (2 * 192 * 16 + 16 + 192) + 192 + 1) + routers


@pytest.mark.parametrize("args,message", [
    (["--backbone", "resnet50"], "not a VisionTransformer"),
    (["--backbone", "vit_nope"], "unknown timm architecture"),
    (["--backbone", "vit_large_patch32_224"], "has no classifier in timm (num_classes 0); pass --num-classes K"),
    (["--activation", "1.5"], "activation must lie in [0, 1]"),
    (["--experts", "-1"], "experts must be an integer in 0..64"),
    (["--experts", "100000"], "experts must be an integer in 0..64"),
    (["--bottleneck", "0"], "bottleneck must be >= 1"),
    (["--bottleneck", "100000"], "bottleneck must be an integer in 0..embed_dim 192"),
    (["--num-classes", "0"], "num-classes must lie in 1..100000"),
    (["--num-classes", "1000000000"], "num-classes must lie in 1..100000"),
    (["--adapter-scale", "nan"], "adapter scale must be a finite number"),
    (["--seed", "-1"], "--seed must lie in 0.."),
    (["--variant", "token"], "invalid choice"),
    (["--weights", "missing.safetensors"], "no such file"),
    (["--weights", "."], "--weights . is a directory"),
    (["--seed", "x"], "invalid int value"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, run_cli, args, message):
    backbone = [] if "--backbone" in args else ["--backbone", BACKBONE]
    assert_refused(run_cli("init", *backbone, *args, "-o", tmp_path / "m.safetensors"), message)
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_needs_an_output_and_a_writable_place_for_it(tmp_path, run_cli):
    assert_refused(run_cli("init", "--backbone", BACKBONE), "-o/--output")
    assert_refused(run_cli("init", "--backbone", BACKBONE, "-o", tmp_path / "missing" / "m.safetensors"), "does not exist")
