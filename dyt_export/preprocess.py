"""How an image file becomes a model input, recorded with the model so every user of the
file prepares images the same way.

A `PreprocessSpec` (resize, centre crop, interpolation, mean, std) is written into the ONNX
metadata at export as `dyt.preprocess`, and `preprocess` is the one function that applies
it: the server's image route and validation's image folders both call it, so an image
served and the same image validated are the same tensor. The spec comes, field by field,
from the public DyT training code's recorded `args` where they say (`training_preprocess`),
else from export flags, else from the default: short side resized to the model's size,
centre crop, bicubic, mean 0.5 and std 0.5 (the demo's and timm augreg ViTs' normalisation).
Class names (`--labels FILE`, one per line) travel the same way as `dyt.labels`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .config import DyTConfig
from .errors import UserError

if TYPE_CHECKING:
    import numpy as np

INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "lanczos")
CROP_MODES: tuple[str, ...] = ("center", "squash")
"""center: the short side is resized to img_size / crop_pct, then the centre is cut out;
squash: both sides are resized to img_size / crop_pct (aspect ratio not kept), then cut."""
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP")
DEFAULT_MEAN = DEFAULT_STD = 0.5
METADATA_KEYS = ("dyt.preprocess", "dyt.labels")

INCEPTION_MEAN_STD = (0.5, 0.5, 0.5)
"""timm's IMAGENET_INCEPTION_MEAN/STD, which the public DyT code uses for its ViT-B/16 IN-21K backbone."""
VTAB_DATASETS = ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
                 "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist",
                 "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele")
"""`args.dataset` values of the public code's VTAB-1K runs: images resized straight to 224x224
(bicubic, no crop). Its other image datasets (`imagenet`, `*_full`) resize to 256 and cut the
centre 224 (crop_pct 0.875)."""


@dataclass(frozen=True)
class PreprocessSpec:
    img_size: int
    crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (DEFAULT_MEAN,) * 3
    std: tuple[float, ...] = (DEFAULT_STD,) * 3
    source: str = "default"
    """Where the values came from (checkpoint args, flags, default), for people reading the metadata."""

    def __post_init__(self) -> None:
        if not isinstance(self.img_size, int) or self.img_size < 1:
            raise UserError(f"preprocess: img_size must be a positive integer, got {self.img_size!r}")
        if not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            raise UserError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.crop_mode not in CROP_MODES:
            raise UserError(f"crop mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise UserError(f"mean and std need one value per input channel, got {len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise UserError("mean must be finite and std finite and positive")

    @property
    def resize_to(self) -> int:
        """The short side (center) or both sides (squash) before the crop, as timm computes it."""
        return math.floor(self.img_size / self.crop_pct)

    def describe(self) -> str:
        how = "short side" if self.crop_mode == "center" else "both sides"
        return (f"resize {how} to {self.resize_to} ({self.interpolation}), crop {self.img_size}, "
                f"mean {_show(self.mean)}, std {_show(self.std)} [{self.source}]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def training_preprocess(args: Any) -> dict[str, Any]:
    """What the public DyT training code's `args` say about its evaluation transform: the
    fields it decides, plus `source`. Empty when they say nothing (a bare state dict, or
    args without these fields)."""
    if args is None:
        return {}
    said: dict[str, Any] = {}
    reasons = []
    finetune = os.path.basename(str(getattr(args, "finetune", "") or ""))
    if getattr(args, "inception", False) is True or finetune.startswith("VIT_BASE_IN21K"):
        said.update(mean=INCEPTION_MEAN_STD, std=INCEPTION_MEAN_STD)
        reasons.append("inception mean/std" + (f" ({finetune})" if finetune else ""))
    dataset = getattr(args, "dataset", None)
    if isinstance(dataset, str) and dataset in VTAB_DATASETS:
        said.update(crop_pct=1.0, crop_mode="squash", interpolation="bicubic")
        reasons.append(f"dataset {dataset}: resize to the input size, bicubic")
    elif isinstance(dataset, str) and (dataset == "imagenet" or dataset.endswith("_full")):
        said.update(crop_pct=224 / 256, crop_mode="center", interpolation="bicubic")
        reasons.append(f"dataset {dataset}: resize 256, centre crop 224, bicubic")
    if said:
        said["source"] = "checkpoint args (" + "; ".join(reasons) + ")"
    return said


def resolve_spec(cfg: DyTConfig, recorded: Mapping[str, Any] | None = None,
                 flags: Mapping[str, Any] | None = None) -> PreprocessSpec:
    """The spec of a model: each field from the checkpoint's recorded args (`recorded`, from
    `training_preprocess`), else from `flags` (mean, std, crop_pct, interpolation; None when
    not given), else the default. A flag that contradicts the checkpoint is refused, as
    `--num-heads` is for a file that records its own."""
    recorded = dict(recorded or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    for name, value in flags.items():
        if name in recorded and _normalised(name, value, cfg) != _normalised(name, recorded[name], cfg):
            raise UserError(f"--{name.replace('_', '-')} {_show(value)}: the checkpoint's training args record "
                            f"{_show(recorded[name])}; the flag is only for checkpoints that do not say")
    values = {**{k: v for k, v in flags.items()}, **{k: v for k, v in recorded.items() if k != "source"}}
    sources = [recorded["source"]] if "source" in recorded else []
    given = [f"--{k.replace('_', '-')}" for k in flags if k not in recorded]
    if given:
        sources.append("flags " + " ".join(given))
    for name in ("mean", "std"):
        values[name] = _normalised(name, values.get(name, (DEFAULT_MEAN,)), cfg)
    return PreprocessSpec(img_size=cfg.img_size, source="; ".join(sources) or "default", **values)


def _normalised(name: str, value: Any, cfg: DyTConfig) -> Any:
    """mean/std as one value per input channel (a single value is repeated)."""
    if name not in ("mean", "std"):
        return value
    value = tuple(float(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if len(value) == 1:
        return value * cfg.in_chans
    if len(value) != cfg.in_chans:
        raise UserError(f"--{name} has {len(value)} values; the model has {cfg.in_chans} input channels")
    return value


def _show(value: Any) -> str:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in values)


def read_labels(path: Path, num_classes: int) -> list[str]:
    """Class names from a text file, one per line, exactly one per class."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read labels file {path}: {e}") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    return check_labels(labels, num_classes, str(path))


def check_labels(labels: Sequence[str], num_classes: int, where: str) -> list[str]:
    labels = list(labels)
    if len(labels) != num_classes:
        raise UserError(f"{where} has {len(labels)} class names; the model has {num_classes} classes")
    empty = [i + 1 for i, label in enumerate(labels) if not isinstance(label, str) or not label.strip()]
    if empty:
        raise UserError(f"{where}: class name {empty[0]} is empty")
    return labels


def metadata_props(spec: PreprocessSpec, labels: Sequence[str] | None) -> dict[str, str]:
    """The ONNX metadata_props that carry `spec` and the class names."""
    props = {"dyt.preprocess": json.dumps(spec.to_dict())}
    if labels is not None:
        props["dyt.labels"] = json.dumps(list(labels))
    return props


def spec_from_metadata(props: Mapping[str, str], cfg: DyTConfig, path: Path | str = "model") -> PreprocessSpec:
    """The spec an ONNX file records; the default for files exported before `dyt.preprocess`."""
    text = props.get("dyt.preprocess")
    if text is None:
        return resolve_spec(cfg)
    try:
        fields = json.loads(text)
        fields["mean"], fields["std"] = tuple(fields["mean"]), tuple(fields["std"])
        spec = PreprocessSpec(**fields)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path} has malformed dyt.preprocess metadata ({e})") from None
    if spec.img_size != cfg.img_size or len(spec.mean) != cfg.in_chans:
        raise UserError(f"{path}: dyt.preprocess is for {spec.img_size}px {len(spec.mean)}-channel images; "
                        f"the model takes {cfg.img_size}px with {cfg.in_chans} channels")
    return spec


def labels_from_metadata(props: Mapping[str, str], cfg: DyTConfig, path: Path | str = "model") -> list[str] | None:
    text = props.get("dyt.labels")
    if text is None:
        return None
    try:
        labels = json.loads(text)
    except ValueError:
        raise UserError(f"{path} has malformed dyt.labels metadata") from None
    return check_labels(labels if isinstance(labels, list) else [], cfg.num_classes, f"{path} (dyt.labels)")


def read_image(source: bytes | Path, *, max_pixels: int | None = None) -> Any:
    """A PIL image from file bytes or a path, PNG/JPEG/WebP/BMP only, decoded (so a file cut
    short fails here, not later); UserError in one line for anything else."""
    from PIL import Image, UnidentifiedImageError

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        image = Image.open(stream, formats=IMAGE_FORMATS)
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise UserError(f"image is {image.width}x{image.height} pixels; the limit is {max_pixels / 1e6:g} megapixels")
        image.load()
    except UnidentifiedImageError:
        raise UserError(f"not an image file ({', '.join(IMAGE_FORMATS)} are read)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated or corrupt data
        raise UserError(f"cannot decode image: {e}") from None
    return image


_PIL_FILTERS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS"}


def preprocess(image: Any, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image -> the model input [C, img_size, img_size] float32, as `spec` says:
    RGB (the channel mean for one-channel models), resized on the 8-bit image as torchvision
    and timm do, centre-cropped, scaled to [0, 1], then (x - mean) / std."""
    import numpy as np  # not at module level: the command line reads this module's flags before any work
    from PIL import Image

    rgb = image.convert("RGB")
    size, target = spec.img_size, spec.resize_to
    if spec.crop_mode == "squash":
        dims = (target, target)
    else:
        scale = target / min(rgb.size)
        dims = (max(target, round(rgb.width * scale)), max(target, round(rgb.height * scale)))
    resized = rgb.resize(dims, getattr(Image.Resampling, _PIL_FILTERS[spec.interpolation]))
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    if len(spec.mean) == 1:
        pixels = pixels.mean(axis=2, keepdims=True)
    elif len(spec.mean) != 3:
        raise UserError(f"cannot feed RGB images to a model with {len(spec.mean)} input channels")
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))
