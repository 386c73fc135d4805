"""The parity run, a chunk at a time: reference and runtime on one chunk of images, tallied,
then the next, so memory holds one chunk whatever the dataset's size.

A `Job` is everything a process needs to judge any chunk (model files, reference, runtime
and its options, the images, the chunk size) and nothing it cannot pickle, so the same job
runs here (`run_chunks`) or on Ray workers (`validation.on_ray`). Each chunk's `Partial`
holds tallies that merge exactly (`validation.compare.ParityTally`,
`validation.accuracy.AccuracyTally`, integer activation and MAC counts), so the merged
result does not depend on how the chunks were spread or in what order they finished.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from dyt_export.config import DyTConfig
from runtimes import Backend, RuntimeFailure, open_backend
from runtimes.torch_ref import TorchReference

from .accuracy import AccuracyTally
from .compare import ParityTally
from .costs import active_patches, total_macs
from .dataset import Chunk, Source
from .throughput import feed

RUN_CHUNK = 16
"""Images per call in the parity runs (timing uses the requested batch sizes)."""
CHUNK = 256
"""Images per chunk (and per saved shard) by default: a few MB of pixels at 224 px, and few
enough shards on ImageNet-val (196) that saving each costs nothing."""


def run_all(backend: Backend, images: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`names` outputs of `backend` over all images, RUN_CHUNK images per call. A backend
    pinned to one batch size (`fixed_batch`, or a model exported with a static batch) gets
    calls of exactly that size, the last one filled with repeats of its own images whose
    outputs are dropped: images do not interact, so the kept outputs are the same."""
    pinned = backend.input_specs[0].shape[0]
    chunk = pinned or RUN_CHUNK
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        out = backend.run(feed(backend, part[np.arange(chunk) % len(part)] if pinned else part))
        for n in names:
            parts[n].append(out[n][:len(part)])
    return {n: np.concatenate(v) for n, v in parts.items()}


@dataclass
class Partial:
    """What the chunks run so far say, in a form that merges exactly and saves as JSON."""

    images: int = 0
    """Readable images the reference ran on."""
    parity: ParityTally = field(default_factory=ParityTally)
    accuracy: AccuracyTally = field(default_factory=AccuracyTally)
    active: list[int] = field(default_factory=list)
    """[D] active patch tokens per dispatcher in the reference masks (CLS left out)."""
    macs: int = 0
    """Multiply-adds of every image at its reference masks (whole numbers: they add exactly)."""
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    """The runtime failed on this chunk (RuntimeFailure): the run stops; the reference's part still counts."""

    def merge(self, other: "Partial") -> "Partial":
        active = [a + b for a, b in zip(self.active, other.active)] if self.active and other.active else self.active or other.active
        return Partial(self.images + other.images, self.parity.merge(other.parity), self.accuracy.merge(other.accuracy),
                       active, self.macs + other.macs, sorted(self.unreadable + other.unreadable),
                       self.error or other.error)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "parity": self.parity.to_dict(), "accuracy": self.accuracy.to_dict(),
                "active": self.active, "macs": self.macs, "unreadable": [list(u) for u in self.unreadable],
                "error": self.error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Partial":
        return cls(data["images"], ParityTally.from_dict(data["parity"]), AccuracyTally.from_dict(data["accuracy"]),
                   list(data["active"]), int(data["macs"]), [tuple(u) for u in data["unreadable"]], data["error"])


@dataclass(frozen=True)
class Job:
    """One validation's parity run, picklable: what a worker opens and what a saved shard belongs to."""

    runtime: str
    model: Path
    masks_model: Path | None
    """The file whose token_masks are compared (the model itself, its mask twin), None: not compared."""
    reference: Path
    reference_options: dict[str, Any]
    """TorchReference keywords: dispatch, loader overrides, threads."""
    precision: str
    backend_options: dict[str, Any]
    cfg: DyTConfig
    flip_logit: float
    merge_tie: float
    max_rel: float
    """With merge_tie: the logit bound past which a near-tie image shows another merge."""
    source: Source
    chunk: int = CHUNK

    def shards(self) -> list[tuple[int, int, int]]:
        """(index, start, stop) of every chunk: the units that are run, saved and resumed."""
        return [(i, start, min(start + self.chunk, len(self.source)))
                for i, start in enumerate(range(0, len(self.source), self.chunk))]

    def key(self) -> dict[str, Any]:
        """What decides a shard's result: a saved shard is reused only under the same key.
        Thread counts are left out: results do not depend on them (measured bit-exact on both
        CPU runtimes, 1 vs 2 threads), so a run resumed on Ray workers reuses a local run's shards."""
        reference = {k: v for k, v in self.reference_options.items() if k != "threads"}
        return {"runtime": self.runtime, "model": _file_key(self.model),
                "masks_model": None if self.masks_model is None else _file_key(self.masks_model),
                "reference": _file_key(self.reference), "reference_options": repr(sorted(reference.items())),
                "precision": self.precision, "backend_options": repr(sorted(self.backend_options.items())),
                "flip_logit": self.flip_logit, "merge_tie": self.merge_tie, "max_rel": self.max_rel,
                "images": self.source.fingerprint(), "count": len(self.source),
                "chunk": self.chunk}


def _file_key(path: Path) -> str:
    info = Path(path).stat()
    return f"{Path(path).resolve()}:{info.st_size}:{info.st_mtime_ns}"


class Evaluator:
    """Runs a job's reference and runtime on chunks; built once per process (a worker's
    runtime threads are the CPUs Ray reserved for it)."""

    def __init__(self, job: Job, threads: int | None, *, reference: TorchReference | None = None,
                 backend: Backend | None = None) -> None:
        self.job = job
        self.reference = reference or TorchReference(job.reference, **job.reference_options)
        options = dict(threads=threads, precision=job.precision, **job.backend_options)
        self.backend = backend or open_backend(job.runtime, job.model, **options)
        self.has_masks = "token_masks" in self.backend.output_names
        self.mask_backend = (open_backend(job.runtime, job.masks_model, **options)
                             if job.masks_model is not None and job.masks_model != job.model else None)

    def __call__(self, chunk: Chunk) -> Partial:
        job, cfg = self.job, self.job.cfg
        part = Partial(unreadable=list(chunk.unreadable))
        if not len(chunk):
            return part
        ref = run_all(self.reference, chunk.pixel_values, ("logits", "token_masks", "dispatch_logits", "merge_margins"))
        part.images = len(chunk)
        part.active = active_patches(ref["token_masks"]).tolist()
        part.macs = total_macs(cfg, ref["token_masks"])
        try:
            got = run_all(self.backend, chunk.pixel_values, ("logits", "token_masks") if self.has_masks else ("logits",))
            masks = got.get("token_masks") if job.masks_model == job.model else None
            if self.mask_backend is not None:
                masks = run_all(self.mask_backend, chunk.pixel_values, ("token_masks",))["token_masks"]
        except RuntimeFailure as e:
            part.error = str(e)
            part.accuracy.add(ref["logits"], None, chunk.labels)
            return part
        part.parity.add(ref, got["logits"], masks, cfg.dispatcher_names, job.flip_logit, cfg.dispatcher_tokens, chunk.ids,
                        blocks=cfg.dispatcher_blocks, merge_tie=job.merge_tie, max_rel=job.max_rel)
        part.accuracy.add(ref["logits"], got["logits"], chunk.labels)
        return part


class _Speed(ProgressColumn):
    """Images per second since the bar started (rich's own speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.1f} img/s" if task.speed else "- img/s")


def progress_bar(show: bool) -> Progress:
    """A bar with images done, images/s and ETA, on stderr when it is a terminal (logs and
    CI output stay free of redraws)."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Speed(),
                        TextColumn("ETA"), TimeRemainingColumn(), transient=True, disable=not show)
    if not progress.console.is_terminal:
        progress.disable = True
    return progress


def run_chunks(job: Job, evaluate: Callable[[Chunk], Partial], shards: list[tuple[int, int, int]],
               save: Callable[[int, Partial], None], advance: Callable[[int], None]) -> Partial:
    """The merged Partial of `shards`, run in order in this process, each saved as it
    finishes. Stops after a shard whose runtime failed (that one is merged, not saved)."""
    total = Partial()
    for index, start, stop in shards:
        part = evaluate(job.source.chunk(start, stop))
        total = total.merge(part)
        advance(stop - start)
        if part.error:
            break
        save(index, part)
    return total
