"""Image-like inputs for validation, the demo and the pictures.

Never plain noise: a token dispatcher decides per token from image content, so white noise
gives activation rates (and therefore speed and mask statistics) that no real input has.
Three sources, all deterministic and shipped or generated locally (nothing downloads):

* `digits`: scikit-learn's handwritten digits (8x8, ships with the package), upscaled
  bilinearly to the model's resolution; labeled, so accuracy can be measured. The test
  split is the demo model's held-out set.
* `scenes`: procedural natural-image-like pictures: a colour gradient, low-frequency
  "cloud" texture and a few soft-edged shapes, i.e. the smooth regions and edges that
  dominate photographs.
* a folder of image files (PNG, JPEG, BMP, WebP), prepared as the model's `dyt.preprocess`
  says (`dyt_export.preprocess`, the server's image route too).

Pixels are mapped from [0, 1] with mean 0.5 and std 0.5 (to [-1, 1]), the normalisation
of timm's augreg ViTs and of the demo model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyt_export.errors import UserError
from dyt_export.preprocess import PreprocessSpec

from .dataset import list_folder

MEAN = 0.5
STD = 0.5
SOURCES = ("digits", "scenes", "digits+scenes")
DIGITS_TEST_FRACTION = 0.25
SPLIT_SEED = 0


@dataclass
class ImageSet:
    """Normalised model inputs and what is known about them."""

    pixel_values: np.ndarray
    """[N, C, H, W] float32, normalised."""
    labels: np.ndarray | None
    """[N] int64 class indices (-1: unlabeled image), or None when no image is labeled."""
    source: str
    names: list[str]

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def take(self, count: int) -> "ImageSet":
        labels = None if self.labels is None else self.labels[:count]
        return ImageSet(self.pixel_values[:count], labels, self.source, self.names[:count])

    def __add__(self, other: "ImageSet") -> "ImageSet":
        labels = None
        if self.labels is not None or other.labels is not None:
            labels = np.concatenate([np.full(len(s), -1, np.int64) if s.labels is None else s.labels
                                     for s in (self, other)])
        return ImageSet(np.concatenate([self.pixel_values, other.pixel_values]), labels,
                        f"{self.source}+{other.source}", self.names + other.names)

    def pixels01(self) -> np.ndarray:
        """[N, H, W, C] in [0, 1], for drawing."""
        return np.clip(self.pixel_values.transpose(0, 2, 3, 1) * STD + MEAN, 0.0, 1.0)


def normalize(images01: np.ndarray, img_size: int, in_chans: int) -> np.ndarray:
    """[N, h, w] or [N, h, w, 3] in [0, 1] -> [N, in_chans, img_size, img_size] normalised."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(images01, dtype=np.float32))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > img_size)
    if in_chans == 1 and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] != in_chans:
        if x.shape[1] != 1:
            raise UserError(f"cannot feed {x.shape[1]}-channel images to a model with {in_chans} input channels")
        x = x.expand(-1, in_chans, -1, -1)
    return ((x.clamp(0, 1) - MEAN) / STD).contiguous().numpy().astype(np.float32)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as ([N, 8, 8] in [0, 1], labels), stratified split, fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, data.target.astype(np.int64), test_size=DIGITS_TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=data.target)
    return (train_x, train_y) if split == "train" else (test_x, test_y)


def digits(img_size: int, in_chans: int = 3, split: str = "test") -> ImageSet:
    images, labels = digits_split(split)
    return ImageSet(normalize(images, img_size, in_chans), labels, f"sklearn-digits/{split}",
                    [f"digits-{split}-{i}" for i in range(len(labels))])


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """One [size, size, 3] picture in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    top, bottom = rng.uniform(0.1, 0.9, size=(2, 3)).astype(np.float32)
    image = top * ramp[..., None] + bottom * (1 - ramp[..., None])
    # Low-frequency texture: a coarse random grid upsampled by bilinear interpolation.
    coarse = rng.normal(0, 0.12, size=(5, 5, 3)).astype(np.float32)
    gy, gx = yy * 4, xx * 4
    y0, x0 = np.floor(gy).astype(int).clip(0, 3), np.floor(gx).astype(int).clip(0, 3)
    fy, fx = (gy - y0)[..., None], (gx - x0)[..., None]
    image += (coarse[y0, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1, x0] * fy * (1 - fx)
              + coarse[y0, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1, x0 + 1] * fy * fx)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        ry, rx = rng.uniform(0.06, 0.3, size=2)
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        if rng.random() < 0.5:  # ellipse
            distance = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        else:  # rectangle
            distance = np.maximum(np.abs(yy - cy) / ry, np.abs(xx - cx) / rx) ** 2
        alpha = np.clip((1.0 - distance) * 6.0, 0.0, 1.0)[..., None]  # soft edge
        image = image * (1 - alpha) + colour * alpha
    return np.clip(image, 0.0, 1.0)


def scenes(count: int, img_size: int, in_chans: int = 3, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    pictures = np.stack([_scene(rng, img_size) for _ in range(count)])
    return ImageSet(normalize(pictures, img_size, in_chans), None, "scenes", [f"scene-{i}" for i in range(count)])


def folder(path: Path, img_size: int, in_chans: int = 3, spec: PreprocessSpec | None = None) -> ImageSet:
    """Every image file in `path` (a flat folder, or one subfolder per class: labeled), prepared
    as `spec` says (default: short side resized bicubically to img_size, centre crop, mean/std
    0.5) by the function the server's image route uses; an unreadable file is an error."""
    spec = spec or PreprocessSpec(img_size, mean=(MEAN,) * in_chans, std=(STD,) * in_chans)
    source = list_folder(path, spec, strict=True)
    chunk = source.chunk(0, len(source))
    return ImageSet(chunk.pixel_values, chunk.labels, f"folder:{path}", [Path(f).name for f in source.files])


def write_digits_folder(out: Path, count: int | None = None, split: str = "test", size: int = 32) -> Path:
    """The digits `split` as PNG files in one folder per class (`out/3/00017.png`), `size` px
    upscaled as the demo model saw them: a labeled folder of real-looking images for dataset
    validation. `count` above the split's size cycles through it again. Written beside `out`
    and renamed into place, so an interrupted call leaves no half folder."""
    from PIL import Image

    images, labels = digits_split(split)
    count = len(labels) if count is None else count
    pixels = normalize(images, size, 1)[:, 0] * STD + MEAN  # [N, size, size] in [0, 1]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        for i in range(count):
            label = int(labels[i % len(labels)])
            (stage / str(label)).mkdir(exist_ok=True)
            Image.fromarray(np.round(pixels[i % len(labels)] * 255).astype(np.uint8)).save(stage / str(label) / f"{i:05d}.png")
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def load_inputs(source: str, img_size: int, in_chans: int = 3, *, limit: int | None = None,
                images_dir: Path | None = None, scene_count: int = 64,
                spec: PreprocessSpec | None = None) -> ImageSet:
    """The validation inputs: the folder's images first (when given, prepared as `spec`
    says), then `source` (one of SOURCES; 'digits+scenes' splits a limit half and half), cut to
    `limit` images."""
    if source not in SOURCES:
        raise UserError(f"unknown input source {source!r}; choose one of {', '.join(SOURCES)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    parts = [folder(images_dir, img_size, in_chans, spec)] if images_dir is not None else []
    room = None if limit is None else max(0, limit - sum(len(p) for p in parts))
    if source == "digits":
        parts.append(digits(img_size, in_chans))
    elif source == "scenes":
        parts.append(scenes(scene_count if room is None else min(scene_count, max(room, 1)), img_size, in_chans))
    else:
        pictures = scenes(scene_count if room is None else max(1, room // 2), img_size, in_chans)
        labeled = digits(img_size, in_chans)
        parts += [labeled if room is None else labeled.take(max(0, room - len(pictures))), pictures]
    images = parts[0]
    for part in parts[1:]:
        images = images + part if len(part) else images
    return images.take(limit) if limit is not None else images
