"""The images a validation runs on, read a chunk at a time: an image folder (flat, or one
subfolder per class) or an image set already in memory (the digits, the scenes).

A folder is listed once (paths, labels, sizes) and its files are read only when their chunk
runs, so memory holds one chunk of pixels whatever the dataset's size (ImageNet-val's
50,000 images at 224 px would be ~30 GB at once). Images are numbered by their place in the
sorted listing, unreadable ones included, so every way of cutting the run (chunks, shards,
workers) names the same image by the same number. An unreadable file is skipped and listed
with its reason, or ends the run with `strict`; never silently dropped.

Labels follow torchvision's ImageFolder: class index = the class folder's place among the
sorted folder names, unless a labels file maps folder names to the indices of a checkpoint
whose head uses another order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from dyt_export.errors import UserError
from dyt_export.preprocess import PreprocessSpec, preprocess, read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class Chunk:
    """Images [start, stop) of a source, ready for the model."""

    ids: np.ndarray
    """[B] int64: the readable images' numbers in the whole source."""
    pixel_values: np.ndarray
    """[B, C, H, W] float32, prepared as the model's `dyt.preprocess` says."""
    labels: np.ndarray | None
    """[B] int64 class indices (-1: unlabeled), or None when the source has no labels."""
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of the files in the range that could not be read."""

    def __len__(self) -> int:
        return len(self.ids)


class Source(Protocol):
    """What the chunked run needs of its inputs; picklable, so Ray workers read their own shards."""

    def __len__(self) -> int: ...

    def chunk(self, start: int, stop: int) -> Chunk: ...

    def describe(self) -> dict:
        """What the record's `inputs` says about the source besides its counts."""

    def fingerprint(self) -> str: ...

    @property
    def class_names(self) -> dict[int, str]: ...


@dataclass
class MemorySource:
    """An image set already in memory (`validation.data`): digits, scenes."""

    pixel_values: np.ndarray
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.pixel_values)

    def chunk(self, start: int, stop: int) -> Chunk:
        labels = None if self.labels is None else self.labels[start:stop]
        return Chunk(np.arange(start, min(stop, len(self)), dtype=np.int64), self.pixel_values[start:stop], labels)

    def describe(self) -> dict:
        return {"source": self.source}

    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.pixel_values).tobytes())
        digest.update(b"" if self.labels is None else self.labels.tobytes())
        return f"{self.source}:{digest.hexdigest()}"

    @property
    def class_names(self) -> dict[int, str]:
        return {}


@dataclass
class FolderSource:
    """Image files under `root`, listed and labeled by `list_folder`; read a chunk at a time."""

    root: Path
    layout: str
    """'imagefolder' (one subfolder per class) or 'flat' (unlabeled)."""
    files: list[str]
    """Paths relative to root, sorted."""
    labels: np.ndarray | None
    classes: dict[int, str]
    """Class index -> folder name."""
    spec: PreprocessSpec
    strict: bool = False
    stamp: str = ""
    """sha256 of the listing with sizes and modification times: a resumed run refuses a folder that changed."""

    def __len__(self) -> int:
        return len(self.files)

    def chunk(self, start: int, stop: int) -> Chunk:
        ids, pictures, unreadable = [], [], []
        for i in range(start, min(stop, len(self))):
            try:
                pictures.append(preprocess(read_image(self.root / self.files[i]), self.spec))
                ids.append(i)
            except (UserError, OSError) as e:
                reason = str(e) if isinstance(e, UserError) else (e.strerror or str(e))
                if self.strict:
                    raise UserError(f"cannot read image {self.root / self.files[i]}: {reason}") from None
                unreadable.append((self.files[i], reason))
        ids_array = np.asarray(ids, dtype=np.int64)
        pixels = (np.stack(pictures) if pictures else
                  np.zeros((0, len(self.spec.mean), self.spec.img_size, self.spec.img_size), np.float32))
        return Chunk(ids_array, pixels, None if self.labels is None else self.labels[ids_array], unreadable)

    def describe(self) -> dict:
        return {"source": f"folder:{self.root}", "layout": self.layout, "classes": len(self.classes)}

    def fingerprint(self) -> str:
        return f"folder:{self.root.resolve()}:{self.stamp}"

    @property
    def class_names(self) -> dict[int, str]:
        return self.classes


def read_class_map(path: Path) -> dict[str, int]:
    """A labels file: a JSON object {folder: index}, or text with one folder name per line
    (the first word of the line; the line's place, from 0, is the index), as ImageNet's
    synset lists are written."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read labels file {path}: {e}") from None
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"labels file {path} is not valid JSON: {e}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mapping.values()):
            raise UserError(f"labels file {path}: every class index must be an integer >= 0")
        return {str(k): v for k, v in mapping.items()}
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"labels file {path} names folder {repeated[0]} twice")
    return {name: i for i, name in enumerate(names)}


def _images_in(directory: Path) -> list[os.DirEntry]:
    """The image files under `directory`, recursively, hidden entries skipped."""
    found = []
    for entry in os.scandir(directory):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += _images_in(Path(entry.path))
        elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            found.append(entry)
    return found


def list_folder(root: Path, spec: PreprocessSpec, num_classes: int | None = None, *,
                labels_file: Path | None = None, strict: bool = False) -> FolderSource:
    """List an image folder: image files directly in it (flat, unlabeled) or one subfolder
    per class (ImageFolder). A folder that has both, no image, or a class index the model
    does not have (`num_classes`; None: not checked) is refused in one line, before any work."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist or is not a directory")
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    loose = [e for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
    found = {e.name: _images_in(Path(e.path)) for e in entries if e.is_dir()}
    folders = [e for e in entries if found.get(e.name)]
    if loose and folders:
        raise UserError(f"image folder {root} holds both image files and class folders ({folders[0].name}/); "
                        "use one layout: files only (unlabeled) or one folder per class")
    if not loose and not folders:
        raise UserError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    if labels_file is not None and not folders:
        raise UserError(f"--labels maps class folders to indices, and {root} has no class folders")
    if loose:
        files = sorted(loose, key=lambda e: e.name)
        return FolderSource(root, "flat", [e.name for e in files], None, {}, spec, strict, _stamp(root, files))
    names = [e.name for e in folders]
    mapping = read_class_map(labels_file) if labels_file is not None else {name: i for i, name in enumerate(names)}
    missing = [name for name in names if name not in mapping]
    if missing:
        raise UserError(f"labels file {labels_file} has no index for class folder {missing[0]}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    beyond = [name for name in names if num_classes is not None and mapping[name] >= num_classes]
    if beyond:
        raise UserError(f"class folder {beyond[0]} has index {mapping[beyond[0]]}, and the model has {num_classes} "
                        f"classes{'' if labels_file else ' (folders are numbered in sorted order; --labels FILE maps them)'}")
    files, labels = [], []
    for folder in folders:
        files += sorted(found[folder.name], key=lambda e: e.path)
        labels += [mapping[folder.name]] * len(found[folder.name])
    relative = [str(Path(e.path).relative_to(root)) for e in files]
    return FolderSource(root, "imagefolder", relative, np.asarray(labels, np.int64),
                        {mapping[name]: name for name in names}, spec, strict, _stamp(root, files))


def _stamp(root: Path, files: list[os.DirEntry]) -> str:
    digest = hashlib.sha256()
    for entry in files:
        info = entry.stat()
        digest.update(f"{Path(entry.path).relative_to(root)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()
