"""Image preprocessing recorded with the model (dyt.preprocess, dyt.labels) and the one function
that applies it, for the server's image route and validation's image folders alike."""
from __future__ import annotations

import io
import json
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dyt_export import build_model, write_public_checkpoint
from dyt_export.errors import UserError
from dyt_export.export import read_metadata
from dyt_export.preprocess import (PreprocessSpec, labels_from_metadata, preprocess, read_image, resolve_spec,
                                   spec_from_metadata, training_preprocess)
from validation.data import folder

from conftest import assert_refused, small_config


def _picture(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _by_hand(image: Image.Image, size: int, short_side: int, filter_: int, mean, std) -> np.ndarray:
    """Resize the short side, crop the centre, normalise: written out with PIL and numpy alone."""
    rgb = image.convert("RGB")
    scale = short_side / min(rgb.size)
    rgb = rgb.resize((max(short_side, round(rgb.width * scale)), max(short_side, round(rgb.height * scale))), filter_)
    left, top = (rgb.width - size) // 2, (rgb.height - size) // 2
    x = np.asarray(rgb.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


def test_a_folder_decodes_as_before_with_the_default_spec(tmp_path):
    """validation's image folders now go through `preprocess`; with the default spec an image
    becomes exactly the tensor it was (bicubic short side, centre crop, mean/std 0.5), for
    every mode a folder may hold (RGB, RGBA, grey, JPEG)."""
    pictures = {"a.png": _picture(53, 37), "b.png": _picture(41, 90, 1, "RGBA"), "c.jpg": _picture(64, 64, 2, "L"),
                "d.webp": _picture(300, 20, 3)}
    for name, picture in pictures.items():
        picture.save(tmp_path / name)
    got = folder(tmp_path, 32).pixel_values
    for i, name in enumerate(sorted(pictures)):
        with Image.open(tmp_path / name) as image:
            expected = _by_hand(image, 32, 32, Image.Resampling.BICUBIC, 0.5, 0.5)
        assert np.array_equal(got[i], expected), name


def test_crop_pct_and_squash_resize_as_timm_does():
    image = _picture(120, 80, 4)
    spec = PreprocessSpec(32, crop_pct=0.875, interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.5, 0.4, 0.2))
    expected = _by_hand(image, 32, 36, Image.Resampling.BILINEAR, [0.1, 0.2, 0.3], [0.5, 0.4, 0.2])  # floor(32/0.875)
    assert np.array_equal(preprocess(image, spec), expected)
    squash = preprocess(image, PreprocessSpec(32, crop_mode="squash"))
    resized = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255.0
    assert np.array_equal(squash, ((resized - 0.5) / 0.5).transpose(2, 0, 1))
    grey = preprocess(image, PreprocessSpec(32, mean=(0.5,), std=(0.5,)))
    assert grey.shape == (1, 32, 32)


def test_the_public_training_args_decide_what_they_say():
    """The public DyT code normalises its IN-21K ViT-B with the inception mean/std and evaluates
    VTAB by resizing straight to 224, its other datasets at resize 256 + centre crop 224."""
    vtab = training_preprocess(types.SimpleNamespace(finetune="VIT_BASE_IN21K", dataset="eurosat"))
    assert vtab["mean"] == vtab["std"] == (0.5, 0.5, 0.5) and vtab["crop_mode"] == "squash" and vtab["crop_pct"] == 1
    full = training_preprocess(types.SimpleNamespace(inception=True, dataset="cifar100_full"))
    assert full["crop_pct"] == 0.875 and full["crop_mode"] == "center" and "cifar100_full" in full["source"]
    assert training_preprocess(types.SimpleNamespace(model="vit_base_patch16", dataset="my_own")) == {}
    assert training_preprocess(None) == {}


def test_flags_fill_what_the_args_leave_and_may_not_contradict_them():
    cfg = small_config()
    recorded = training_preprocess(types.SimpleNamespace(dataset="imagenet"))
    spec = resolve_spec(cfg, recorded, dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=None))
    assert spec.crop_pct == 0.875 and spec.mean == (0.485, 0.456, 0.406)
    assert "dataset imagenet" in spec.source and "--mean" in spec.source
    with pytest.raises(UserError, match="--crop-pct 0.9: the checkpoint's training args record 0.875"):
        resolve_spec(cfg, recorded, dict(crop_pct=0.9))
    with pytest.raises(UserError, match="--mean has 2 values; the model has 3 input channels"):
        resolve_spec(cfg, {}, dict(mean=(0.5, 0.5)))
    default = resolve_spec(cfg)
    assert (default.mean, default.std, default.crop_pct, default.source) == ((0.5,) * 3, (0.5,) * 3, 1.0, "default")


@pytest.mark.parametrize("kind", ["text", "truncated", "gif", "huge"])
def test_images_that_are_not_images_are_refused_in_one_line(kind):
    buffer = io.BytesIO()
    if kind == "text":
        data, message = b"hello, not an image", "not an image file"
    elif kind == "gif":
        _picture(8, 8).save(buffer, "GIF")
        data, message = buffer.getvalue(), "not an image file"
    elif kind == "truncated":
        _picture(64, 64).save(buffer, "PNG")
        data, message = buffer.getvalue()[:200], "cannot decode image"
    else:
        Image.new("L", (4000, 3000)).save(buffer, "PNG")
        data, message = buffer.getvalue(), "4000x3000 pixels; the limit is 10 megapixels"
    with pytest.raises(UserError, match=message) as refused:
        read_image(data, max_pixels=10_000_000)
    assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def public_checkpoint(tmp_path_factory) -> Path:
    """A public-layout training checkpoint whose args say: IN-21K backbone, a full image dataset."""
    model = build_model(small_config(depth=2), seed=0)
    return write_public_checkpoint(model, tmp_path_factory.mktemp("p") / "pets.pth", shape="training",
                                   args={"finetune": "VIT_BASE_IN21K", "dataset": "oxford_iiit_pet_full"})


def test_export_records_the_spec_and_labels_for_the_server(public_checkpoint, run_cli, tmp_path):
    labels = tmp_path / "classes.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(10)))
    out = tmp_path / "pets.onnx"
    done = run_cli(public_checkpoint, "-o", out, "--labels", labels, "--interpolation", "bicubic")
    assert done.returncode == 0, done.stderr
    props = read_metadata(out)
    cfg = small_config(depth=2)
    spec = spec_from_metadata(props, cfg, out)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.crop_pct == 0.875 and "oxford_iiit_pet_full" in spec.source
    assert labels_from_metadata(props, cfg) == [f"class {i}" for i in range(10)]
    assert "resize short side to 36 (bicubic), crop 32" in done.stdout
    assert json.loads(props["dyt.preprocess"])["crop_mode"] == "center"


@pytest.mark.parametrize("case", ["contradicts-args", "labels-count", "labels-missing", "mean-not-a-number",
                                  "crop-pct-out-of-range"])
def test_bad_preprocess_flags_are_refused_before_writing(case, public_checkpoint, run_cli, tmp_path):
    labels = tmp_path / "classes.txt"
    labels.write_text("cat\ndog\n")
    flags, message = {
        "contradicts-args": (["--crop-pct", "1"], "--crop-pct 1: the checkpoint's training args record 0.875"),
        "labels-count": (["--labels", labels], "has 2 class names; the model has 10 classes"),
        "labels-missing": (["--labels", tmp_path / "nope.txt"], "--labels"),
        "mean-not-a-number": (["--mean", "half"], "'half' is not a number"),
        "crop-pct-out-of-range": (["--crop-pct", "1.5"], "'1.5' is not a number in (0, 1]"),
    }[case]
    assert_refused(run_cli(public_checkpoint, "-o", tmp_path / "m.onnx", *flags), message, leftovers=tmp_path)
