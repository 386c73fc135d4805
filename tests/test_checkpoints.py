"""Checkpoint readers: every layout in the wild loads to the same model; nothing else does."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import dyt_export
from dyt_export import CheckpointError, build_model, load_checkpoint, save, write_public_checkpoint
from dyt_export.checkpoint import Overrides, infer_config
from dyt_export.checkpoint.reader import build_from_state

from conftest import image_batch, small_config


def _same_outputs(a, b) -> None:
    x = torch.from_numpy(image_batch(3))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", ["bare", "model", "training"])
def test_public_layouts_load_to_the_same_model(tmp_path, small_model, shape):
    path = write_public_checkpoint(small_model, tmp_path / f"{shape}.pt", shape=shape)
    overrides = {} if shape == "training" else {"adapter_scale": 0.1}
    loaded = load_checkpoint(path, **overrides)
    assert loaded.dyt_config == small_model.dyt_config
    assert loaded.provenance["format"] == f"torch/{shape}"
    _same_outputs(small_model, loaded)


@pytest.mark.parametrize("shape", ["bare", "model"])
def test_missing_adapter_scale_is_asked_for_not_guessed(tmp_path, small_model, shape):
    path = write_public_checkpoint(small_model, tmp_path / "m.pt", shape=shape)
    with pytest.raises(CheckpointError, match="--adapter-scale"):
        load_checkpoint(path)


def test_adapter_scale_comes_from_args_and_flag_overrides_it(tmp_path, small_model):
    path = write_public_checkpoint(small_model, tmp_path / "t.pt", args={"scale": 0.1})
    assert load_checkpoint(path).dyt_config.adapter_scale == 0.1
    assert load_checkpoint(path, adapter_scale=1.0).dyt_config.adapter_scale == 1.0


def test_args_that_disagree_with_tensors_are_refused(tmp_path, small_model):
    path = write_public_checkpoint(small_model, tmp_path / "t.pt", args={"ffn_num": 64})
    with pytest.raises(CheckpointError, match="ffn_num=64 disagrees"):
        load_checkpoint(path)


def test_native_format_round_trip_needs_no_flags(tmp_path):
    cfg = small_config(variant="attn_mlp", experts=3, dispatch_blocks=(1, 2), adapter_scale=0.7)
    model = build_model(cfg, seed=1)
    loaded = load_checkpoint(save(model, tmp_path / "m.safetensors"))
    assert loaded.dyt_config == cfg and loaded.provenance["format"] == "dyt-export"
    _same_outputs(model, loaded)


def test_heads_follow_vit_convention_and_can_be_overridden(tmp_path):
    model = build_model(small_config(embed_dim=192, num_heads=6, mlp_hidden_dim=384), seed=0)
    path = write_public_checkpoint(model, tmp_path / "m.pt")
    assert load_checkpoint(path).dyt_config.num_heads == 3  # convention for 192
    loaded = load_checkpoint(path, num_heads=6)
    _same_outputs(model, loaded)


def test_unconventional_width_needs_num_heads(tmp_path):
    model = build_model(small_config(embed_dim=96, num_heads=4, mlp_hidden_dim=384), seed=0)
    path = write_public_checkpoint(model, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="--num-heads"):
        load_checkpoint(path)
    assert load_checkpoint(path, num_heads=4).dyt_config.num_heads == 4


def test_blocks_without_dispatcher_keep_layers(tmp_path):
    """The public code's keep_layers leaves the first blocks without a dispatcher."""
    model = build_model(small_config(dispatch_blocks=(1, 2)), seed=0)
    loaded = load_checkpoint(write_public_checkpoint(model, tmp_path / "m.pt"))
    assert loaded.dyt_config.dispatch_blocks == (1, 2)
    assert loaded.dyt_config.dispatcher_names == ["blocks.1.mlp", "blocks.2.mlp"]
    _same_outputs(model, loaded)


def test_ddp_prefix_is_stripped(tmp_path, small_model):
    state = {f"module.{k}": v for k, v in small_model.state_dict().items()}
    torch.save({"model": state, "args": argparse.Namespace(scale=0.1)}, tmp_path / "ddp.pt")
    _same_outputs(small_model, load_checkpoint(tmp_path / "ddp.pt"))


def test_plain_timm_vit_is_refused_unless_dense(tmp_path):
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8).eval()
    torch.save(vit.state_dict(), tmp_path / "timm.pt")
    save_file(vit.state_dict(), str(tmp_path / "timm.safetensors"))
    for path in (tmp_path / "timm.pt", tmp_path / "timm.safetensors"):
        with pytest.raises(CheckpointError, match="not a DyT model"):
            load_checkpoint(path)
        dense = load_checkpoint(path, dispatch="dense")
        assert dense.dyt_config.dispatcher_names == [] and dense.dyt_config.bottleneck == 0
        x = torch.from_numpy(image_batch(2))
        torch.testing.assert_close(dense(x), vit(x), rtol=1e-5, atol=1e-5)


def test_img_size_resamples_position_embedding(tmp_path, small_model):
    path = write_public_checkpoint(small_model, tmp_path / "m.pt")
    bigger = load_checkpoint(path, img_size=64)
    assert bigger.dyt_config.img_size == 64 and bigger.pos_embed.shape[1] == 1 + 64
    assert bigger(torch.from_numpy(image_batch(1, size=64))).shape == (1, 10)
    with pytest.raises(CheckpointError, match="multiple of the patch size"):
        load_checkpoint(path, img_size=30)


def test_geometry_is_read_from_shapes():
    cfg = small_config(embed_dim=384, num_heads=6, mlp_hidden_dim=1536, depth=2, patch_size=16, img_size=64)
    state = build_model(cfg, seed=0).state_dict()
    inferred = infer_config(state, argparse.Namespace(scale=0.1), Overrides())
    assert inferred == cfg


class Recipe:
    """A training-code class the toolkit cannot know: foreign, but harmless."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


class RemoveTree:
    """Unpickling this calls shutil.rmtree (a module torch does not block): code from the file."""

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def __reduce__(self):
        return (shutil.rmtree, (self.victim,))


class MakeDir:
    """Unpickling this calls os.mkdir: torch blocks the module outright."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_foreign_globals_are_refused_by_name_and_never_run(tmp_path, small_model, zip_format):
    victim = tmp_path / "precious"
    victim.mkdir()
    payload = {"model": small_model.state_dict(), "args": argparse.Namespace(scale=0.1),
               "recipe": Recipe(0.1), "hook": RemoveTree(str(victim))}
    path = tmp_path / "foreign.pt"
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"(Recipe|rmtree).*--trust-checkpoint"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, trust_checkpoint=True)
    assert victim.is_dir()  # the file's rmtree call became an inert placeholder
    _same_outputs(small_model, loaded)


def test_blocked_modules_are_refused_even_when_trusted(tmp_path, small_model):
    marker = tmp_path / "code-ran"
    payload = {"model": small_model.state_dict(), "args": argparse.Namespace(scale=0.1), "hook": MakeDir(str(marker))}
    torch.save(payload, tmp_path / "hostile.pt")
    for trust in (False, True):
        with pytest.raises(CheckpointError, match=r"posix\.mkdir"):
            load_checkpoint(tmp_path / "hostile.pt", trust_checkpoint=trust)
    assert not marker.exists()


def test_numpy_scalars_in_args_are_allowed(tmp_path, small_model):
    import numpy as np
    args = argparse.Namespace(scale=0.1, best_acc=np.float64(0.93))
    torch.save({"model": small_model.state_dict(), "args": args, "epoch": 3}, tmp_path / "np.pt")
    _same_outputs(small_model, load_checkpoint(tmp_path / "np.pt"))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "^1 missing key: blocks.1.mlp.fc2.bias$"),
    (lambda s: s.__setitem__("fc_norm.weight", torch.ones(192)), "^1 unexpected key: fc_norm.weight$"),
    (lambda s: s.__setitem__("blocks.0.mlp.fc2.bias", torch.ones(5)), r"^1 mis-shaped tensor: blocks.0.mlp.fc2.bias \(5,\)"),
    (lambda s: s.pop("cls_token"), "missing key cls_token"),
    # tensors the geometry is read from: the wrong one is named, not the ones that fit the model
    (lambda s: s.__setitem__("blocks.0.adaptmlp.down_proj.weight", torch.ones(4, 192)),
     r"^1 mis-shaped tensor: blocks.0.adaptmlp.down_proj.weight \(4, 192\) \(expected \(8, 192\)\)$"),
    (lambda s: s.__setitem__("blocks.0.mlp.fc1.weight", torch.ones(100, 192)),
     r"^1 mis-shaped tensor: blocks.0.mlp.fc1.weight \(100, 192\) \(expected \(768, 192\)\)$"),
    (lambda s: s.__setitem__("cls_token", torch.ones(1, 1, 100)),
     r"^1 mis-shaped tensor: cls_token \(1, 1, 100\) \(expected \(1, 1, 192\)\)$"),
    (lambda s: s.__setitem__("head.weight", torch.ones(10)), r"^1 mis-shaped tensor: head.weight \(10,\)"),
])
def test_key_problems_are_named(tmp_path, small_model, edit, message):
    state = dict(small_model.state_dict())
    edit(state)
    torch.save({"model": state, "args": argparse.Namespace(scale=0.1)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.pt")


def test_moe_geometry_is_agreed_on_by_all_experts():
    model = build_model(small_config(variant="attn_mlp", experts=3), seed=0)
    state = dict(model.state_dict())
    assert infer_config(state, argparse.Namespace(scale=0.1), Overrides()) == model.dyt_config
    state["blocks.1.adaptattn.router.weight"] = torch.ones(5, 192)  # one wrong expert count
    cfg = infer_config(state, argparse.Namespace(scale=0.1), Overrides())
    assert cfg == model.dyt_config
    with pytest.raises(CheckpointError, match=r"^1 mis-shaped tensor: blocks.1.adaptattn.router.weight \(5, 192\)"):
        build_from_state(state, cfg)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", None])
def test_adapter_scale_in_args_must_be_a_finite_number(tmp_path, small_model, scale):
    torch.save({"model": small_model.state_dict(), "args": argparse.Namespace(scale=scale)}, tmp_path / "m.pt")
    message = {str: "args.scale in this checkpoint is '0.1' \\(str\\), not a number",
               type(None): "not recorded"}.get(type(scale), "adapter scale must be a finite number")
    with pytest.raises(dyt_export.UserError, match=message):
        load_checkpoint(tmp_path / "m.pt")
    assert load_checkpoint(tmp_path / "m.pt", adapter_scale=0.1).dyt_config.adapter_scale == 0.1


def test_bad_overrides_are_refused_before_reading(tmp_path, small_model):
    path = write_public_checkpoint(small_model, tmp_path / "m.pt")
    for overrides, message in [({"num_heads": 0}, "--num-heads must be a positive integer, got 0"),
                               ({"num_heads": -3}, "--num-heads must be a positive integer"),
                               ({"img_size": 0}, "--img-size must be a positive integer"),
                               ({"dispatch": "dynamic"}, "dispatch='dynamic'"),
                               ({"adapter_scale": float("inf")}, "adapter scale must be a finite number"),
                               ({"adapter_scale": float("nan")}, "adapter scale must be a finite number")]:
        with pytest.raises(dyt_export.UserError, match=message):
            load_checkpoint(path, **overrides)
    assert load_checkpoint(path, dispatch="dense").dyt_config == small_model.dyt_config


def _rewrite_config(path, **changes) -> None:
    """Edit the JSON config in a toolkit file's header, as a damaged or hand-made file would."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    config = json.loads(metadata["dyt.config"])
    config.update(changes)
    metadata["dyt.config"] = json.dumps(config)
    save_file(load_file(str(path)), str(path), metadata=metadata)


@pytest.mark.parametrize("changes, message", [
    ({"experts": "2"}, "experts must be an integer"),
    ({"dispatch_blocks": "ab"}, "dispatch_blocks must be a list of block indices"),
    ({"adapter_scale": "x"}, "adapter scale must be a finite number, got 'x'"),
    ({"adapter_scale": float("nan")}, "adapter scale must be a finite number, got nan"),
    ({"depth": True}, "depth must be a positive integer"),
    ({"extra": [1]}, "extra must be a mapping"),
])
def test_malformed_toolkit_config_is_refused_in_one_line(tmp_path, changes, message):
    path = save(build_model(small_config(depth=2), seed=0), tmp_path / "m.safetensors")
    _rewrite_config(path, **changes)
    with pytest.raises(dyt_export.UserError, match=f"m.safetensors has an invalid dyt.config: {message}"):
        load_checkpoint(path)


def test_truncated_toolkit_file_is_called_truncated(tmp_path):
    path = save(build_model(small_config(depth=1), seed=0), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is a truncated or corrupt safetensors file"):
        load_checkpoint(path)


def test_num_heads_override_of_a_toolkit_file(tmp_path):
    """The file records its head count: the same value is accepted, another refused."""
    path = save(build_model(small_config(depth=1), seed=0), tmp_path / "m.safetensors")
    assert load_checkpoint(path, num_heads=3).dyt_config.num_heads == 3
    with pytest.raises(CheckpointError, match="--num-heads 6: .* records num_heads 3"):
        load_checkpoint(path, num_heads=6)


def test_public_api_is_exposed():
    for name in ("load_checkpoint", "export_onnx", "save"):
        assert callable(getattr(dyt_export, name))
