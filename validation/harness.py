"""`validate`: run the reference and a runtime on the same images, judge parity, time both
the DyT model and its dense twin, and write the record.

Order matters for the user's time: checks that can refuse the job (runtime availability
and precision, model metadata, output directory, loading the model on the runtime with the
backend options, the reference checkpoint and its geometry) run before any export, parity
run or timing, so a bad option costs seconds, not a whole validation.

The PyTorch reference runs on one thread by default (`ref_threads`): it is not timed, and
torch's OpenMP workers spin-wait between parallel regions, so with two threads on two
cores any other busy process turns every op's barrier into a scheduler time slice. Measured
here (2 cores, one other busy process): the demo model's 450 images took 7-14 s on 2
threads against 0.7-0.8 s on 1 (0.45 s on 2 threads when the machine was quiet;
OMP_WAIT_POLICY=passive brought 2 threads back to 1.3-1.6 s); a ViT-S/16 took 3.3 s for 16
images on 2 busy threads against 1.8 s on 1.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dyt_export.atomic import probe_writable
from dyt_export.errors import UserError
from dyt_export.preprocess import PreprocessSpec, labels_from_metadata, spec_from_metadata
from dyt_export.progress import Steps
from runtimes import ONNX_RUNTIMES, BackendError, RuntimeFailure, get_backend, open_backend
from runtimes.base import check_fixed_batch
from runtimes.torch_ref import TorchReference

from .costs import gmacs, rates_from_counts
from .data import load_inputs
from .dataset import MemorySource, Source, list_folder
from .demo.model import ensure_demo_model
from .machine import machine_info
from .models import ModelUnderTest, read_model, twin
from .parity import Parity, unmeasured
from .record import MASKS_NOT_COMPARED, build_record, write_record
from .shards import ShardStore, run_job
from .stream import CHUNK, Evaluator, Job, run_all
from .throughput import ThroughputRow, batches_of, measure
from .tolerances import tolerances_for

POOL = 512
"""Images of a folder held in memory for timing (an image set in memory is timed whole)."""
REFERENCE_THREADS = 1
"""torch threads of the reference (see the module docstring)."""
GEOMETRY = ("num_classes", "in_chans", "img_size", "patch_size", "dispatcher_names", "tome_r")
"""What the reference and the model must share for their outputs to be comparable at all."""


@dataclass
class Options:
    runtime: str
    model: Path | None = None
    """None: the demo model (trained and exported on first use)."""
    ref: Path | None = None
    """None: the source checkpoint recorded in the model's metadata."""
    out: Path | None = None
    """None: validation/records/<model stem>/."""
    data: str = "digits"
    images: Path | None = None
    limit: int | None = None
    batches: tuple[int, ...] = (1, 8, 32)
    threads: tuple[int, ...] = field(default_factory=lambda: (os.cpu_count() or 1,))
    iters: int = 20
    min_seconds: float = 1.0
    warmup: int = 0
    throughput: bool = True
    precision: str = "fp32"
    """The runtime's precision option ('bf16': OpenVINO lowers on purpose)."""
    tolerance_overrides: dict[str, float] = field(default_factory=dict)
    """Tolerances that replace the defaults of the model's precision (see tolerances.TOLERANCES)."""
    ref_threads: int = REFERENCE_THREADS
    backend_options: dict[str, Any] = field(default_factory=dict)
    loader_overrides: dict[str, Any] = field(default_factory=dict)
    """num_heads / adapter_scale / trust_checkpoint for the reference checkpoint."""
    tome_r: int | tuple[int, ...] | None = None
    """With the demo model (model None): validate its export with token merging (ToMe)."""
    show: bool = False
    labels: Path | None = None
    """With `images`: a file mapping class folder names to the model's class indices."""
    strict: bool = False
    """An unreadable image ends the run (default: it is skipped and listed in the record)."""
    chunk: int = CHUNK
    ray: str | None = None
    """None: run here; '': on a local Ray instance; else the address of a Ray cluster."""
    workers: int | None = None
    """Ray actors (None: as many as the cluster's CPUs hold at `worker_threads` each)."""
    worker_threads: int = 1
    resume: bool = False
    """Reuse the shards a killed run of the same job saved under OUT/partial/."""


@dataclass
class Outcome:
    record: dict[str, Any]
    json_path: Path
    markdown_path: Path
    parity: Parity
    error: dict[str, str] | None = None
    """The runtime failed while running: {"stage", "message"}, as in the record."""

    @property
    def passed(self) -> bool:
        return self.record["passed"]


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an output directory that cannot be created or written: an
    existing file, a path under a file, a read-only place. Missing parents are created later."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} exists and is not a directory")
    existing = next(p for p in out.parents if p.exists()) if not out.exists() else out
    if not existing.is_dir():
        raise UserError(f"cannot create output directory {out}: {existing} is not a directory")
    probe_writable(existing, f"output directory {out} cannot be written ({existing})")


def check_output_file(path: Path) -> None:
    """Refuse, before any work, a file output (`--out x.json`) whose directory cannot be made
    or written (`check_output_dir`)."""
    check_output_dir(Path(path).absolute().parent)


def _default_out(model: Path) -> Path:
    return Path(__file__).resolve().parent / "records" / model.stem


def _check_options(opts: Options) -> None:
    if opts.runtime not in ONNX_RUNTIMES:
        raise BackendError(f"cannot validate on {opts.runtime!r}; choose one of {', '.join(ONNX_RUNTIMES)}")
    backend = get_backend(opts.runtime)
    available = backend.availability()
    if not available:
        raise BackendError(f"{opts.runtime} is not available: {available.reason}")
    if opts.precision not in backend.precisions:
        raise UserError(f"{opts.runtime} takes precision {', '.join(backend.precisions)}, not {opts.precision!r}")
    for name, values in (("batch sizes", opts.batches), ("thread counts", opts.threads),
                         ("reference threads", (opts.ref_threads,))):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise UserError(f"{name} must be integers >= 1, got {list(values)}")
    pinned = check_fixed_batch(opts.backend_options.get("fixed_batch"), opts.runtime)
    if opts.throughput and pinned is not None and set(opts.batches) != {pinned}:
        raise UserError(f"fixed_batch={pinned} pins the batch axis: time it with --batches {pinned}, "
                        f"not {','.join(map(str, opts.batches))}")
    if opts.iters < 1 or opts.warmup < 0 or not 0 <= opts.min_seconds < float("inf"):
        raise UserError(f"need iters >= 1, warmup >= 0 and a finite min_seconds >= 0, got {opts.iters}, "
                        f"{opts.warmup}, {opts.min_seconds}")
    tolerances_for("fp32", **opts.tolerance_overrides)  # a bad override fails now, not after the runs
    if min(opts.chunk, opts.worker_threads, opts.workers or 1) < 1:
        raise UserError(f"chunk, workers and worker threads must be >= 1, got {opts.chunk}, {opts.workers}, "
                        f"{opts.worker_threads}")
    if opts.ray is None and (opts.workers is not None or opts.worker_threads != 1):
        raise UserError("--workers and --worker-threads size the Ray workers: add --ray [ADDRESS]")
    if opts.labels is not None and opts.images is None:
        raise UserError("--labels maps the class folders of --images DIR; give the folder")
    if opts.tome_r and opts.model is not None:
        raise UserError(f"--tome-r exports the demo model with token merging; {opts.model.name} merges as it was "
                        f"exported (dyt-export --tome-r), so drop --tome-r or --model")


def _reference(opts: Options, model: ModelUnderTest, steps: Steps) -> tuple[TorchReference, Path, dict[str, Any]]:
    """The reference, with the file and keywords it was loaded from (workers load their own)."""
    with steps.step("load reference checkpoint"):
        source = opts.ref or model.path  # an ONNX path makes the reference follow its metadata
        overrides = {k: v for k, v in opts.loader_overrides.items() if v is not None}
        if opts.ref is not None:  # geometry the checkpoint cannot state comes from the ONNX file
            overrides = {"num_heads": model.cfg.num_heads, "adapter_scale": model.cfg.adapter_scale,
                         "img_size": model.cfg.img_size, "tome_r": model.cfg.tome_r or 0, **overrides}
        options = {"threads": opts.ref_threads, "dispatch": model.dispatch, **overrides}
        reference = TorchReference(source, **options)
    ref_cfg = reference.module.dyt_config
    differ = [f"{name} {getattr(ref_cfg, name)} vs {getattr(model.cfg, name)}"
              for name in GEOMETRY if getattr(ref_cfg, name) != getattr(model.cfg, name)]
    if differ:
        raise UserError(f"reference {reference.path.name} and model {model.path.name} disagree on "
                        f"{'; '.join(differ)}: their outputs cannot be compared")
    return reference, Path(source), options


def _source(opts: Options, model: ModelUnderTest, spec: PreprocessSpec) -> Source:
    """The images: the folder (listed, not read), or the image set in memory, cut to `limit`."""
    cfg = model.cfg
    if opts.images is None:
        images = load_inputs(opts.data, cfg.img_size, cfg.in_chans, limit=opts.limit, spec=spec)
        return MemorySource(images.pixel_values, images.labels, images.source)
    folder = list_folder(opts.images, spec, cfg.num_classes, labels_file=opts.labels, strict=opts.strict)
    if opts.limit is not None:
        folder = dataclasses.replace(folder, files=folder.files[:opts.limit],
                                     labels=None if folder.labels is None else folder.labels[:opts.limit])
    return folder


def _pool(source: Source) -> np.ndarray:
    """The images timing cycles over: an image set in memory whole, a folder's first POOL."""
    if isinstance(source, MemorySource):
        return source.pixel_values
    return source.chunk(0, POOL).pixel_values


def _throughput(opts: Options, model: Path, dense: Path, images: np.ndarray, masks: np.ndarray, tokens: list[int],
                log: Callable[[str], None]) -> tuple[list[ThroughputRow], list[ThroughputRow]]:
    """(DyT rows, dense rows). Each DyT row is timed right before its dense row, so load from
    other processes drifting over the run moves both sides of a speedup alike."""
    rows, dense_rows = [], []
    for threads in opts.threads:
        backends = [open_backend(opts.runtime, path, threads=threads, precision=opts.precision, **opts.backend_options)
                    for path in (model, dense)]
        for batch in opts.batches:
            row, base = (measure(backend, images, batch, iters=opts.iters, warmup=opts.warmup,
                                 min_seconds=opts.min_seconds, masks=rate_masks, tokens=tokens)
                         for backend, rate_masks in zip(backends, (masks, None)))
            base = dataclasses.replace(base, activation_rate=1.0)  # the dense graph runs every token
            rows.append(row)
            dense_rows.append(base)
            log(f"  batch {batch:>3} threads {threads}: DyT {row.img_per_s:8.1f} img/s (p50 {row.p50_ms:.2f} ms), "
                f"dense {base.img_per_s:8.1f} img/s (p50 {base.p50_ms:.2f} ms)")
    return rows, dense_rows


def _speedups(cfg: Any, rows: list[ThroughputRow], dense: list[ThroughputRow], masks: np.ndarray,
              count: int) -> list[dict[str, Any]]:
    """Measured DyT/dense speed beside the FLOPs-ideal one, for the images each row ran."""
    dense_macs = float(gmacs(cfg, None)[0])
    by_key = {(r.batch, r.threads): r for r in dense}
    result = []
    for row in rows:
        base = by_key.get((row.batch, row.threads))
        if base is None:
            continue
        timed = np.concatenate(batches_of(count, row.batch))
        ideal = dense_macs / float(gmacs(cfg, masks[timed]).mean())
        measured = row.img_per_s / base.img_per_s
        result.append({"batch": row.batch, "threads": row.threads, "measured": measured,
                       "flops_ideal": ideal, "efficiency": measured / ideal})
    return result


def validate(opts: Options, log: Callable[[str], None] = lambda _: None) -> Outcome:
    """Validate one ONNX model on one runtime; writes OUT/<runtime>.json and .md, also when
    the runtime fails while running (RuntimeFailure): the record then holds the error."""
    _check_options(opts)
    steps = Steps(show=opts.show)
    started = time.perf_counter()
    if opts.out is not None:
        check_output_dir(opts.out)  # before the demo model may train
    if opts.model is None:
        opts = dataclasses.replace(opts, model=ensure_demo_model(log=log, tome_r=opts.tome_r).onnx)
    model = read_model(opts.model)
    out = Path(opts.out) if opts.out is not None else _default_out(model.path)
    if opts.out is None:
        check_output_dir(out)
    tolerances = tolerances_for(model.precision, **opts.tolerance_overrides)
    with steps.step(f"load model ({opts.runtime})"):  # as the parity run will: here, or on each Ray worker
        backend = open_backend(opts.runtime, model.path, threads=opts.threads[0] if opts.ray is None else opts.worker_threads,
                               precision=opts.precision, **opts.backend_options)
    for note in backend.notes():  # e.g. compute ORT left on the CPU (also in the record's runtime_info)
        log(note)
    reference, reference_file, reference_options = _reference(opts, model, steps)
    cfg, layers = model.cfg, model.cfg.dispatcher_names
    with steps.step("list inputs"):
        source = _source(opts, model, spec_from_metadata(model.props, cfg, model.path))

    twins: dict[str, str | None] = {"masks": None, "dense": None}
    twin_dir = out / "twins"
    ref_sha256 = getattr(reference.module, "provenance", {}).get("sha256", "")
    # Twins are exported from the reference: only when it is the model's recorded source do
    # their masks speak for the model (None: the model records no source).
    is_source = ref_sha256 == model.source_sha256 if model.source_sha256 else None
    masks_path: Path | None = model.path
    if not model.has_masks and is_source is False:
        masks_path = None
        log(f"masks not compared: {MASKS_NOT_COMPARED}")
    elif not model.has_masks:
        with steps.step("export mask twin"):
            masks_path, _ = twin(reference.module, model, twin_dir, dispatch=model.dispatch, with_masks=True)
        twins["masks"] = str(masks_path)
    dense_path = model.path
    if model.dispatch != "dense" and opts.throughput:
        with steps.step("export dense twin"):
            dense_path, _ = twin(reference.module, model, twin_dir, dispatch="dense", with_masks=False)
        twins["dense"] = str(dense_path)

    job = Job(runtime=opts.runtime, model=model.path, masks_model=masks_path, reference=reference_file,
              reference_options=reference_options, precision=opts.precision, backend_options=dict(opts.backend_options),
              cfg=cfg, flip_logit=tolerances.flip_logit, merge_tie=tolerances.merge_tie, max_rel=tolerances.max_rel,
              source=source, chunk=opts.chunk)
    store = ShardStore(out / "partial" / opts.runtime, job.key(), resume=opts.resume)
    runtime_info = backend.info()
    # On Ray the workers load their own: the session is let go here (a ViT-B/16 one holds ~1 GB).
    local = None if opts.ray is not None else Evaluator(job, opts.threads[0], reference=reference, backend=backend)
    del backend
    with steps.step(f"parity run ({opts.runtime})"):
        total, execution = run_job(job, store, local, ray=opts.ray, workers=opts.workers,
                                   worker_threads=opts.worker_threads, show=opts.show, log=log)
    del local
    if not total.images:
        first = f", e.g. {total.unreadable[0][0]}: {total.unreadable[0][1]}" if total.unreadable else ""
        raise UserError(f"no image could be read ({len(total.unreadable)} unreadable{first})")
    for file, reason in total.unreadable:
        log(f"unreadable, skipped: {file}: {reason}")
    # A runtime that fails while running (RuntimeFailure) still gets its record, holding the error.
    error: dict[str, str] | None = None
    if total.error:
        error = {"stage": "parity run", "message": total.error}
        parity = unmeasured(total.images, f"not compared: the runtime failed during the parity run ({total.error})")
    else:
        parity = total.parity.verdict(tolerances)
    log(f"parity: {'PASS' if parity.passed else 'FAIL'}  {parity.summary()}")

    throughput: list[ThroughputRow] = []
    dense: list[ThroughputRow] = []
    pool_masks = np.zeros((0,))
    if opts.throughput and error is None:
        try:
            with steps.step("throughput"):
                pool = _pool(source)
                pool_masks = run_all(reference, pool, ("token_masks",))["token_masks"]
                throughput, dense = _throughput(opts, model.path, dense_path, pool, pool_masks, cfg.dispatcher_tokens, log)
        except RuntimeFailure as e:
            error = {"stage": "throughput", "message": str(e)}

    names = source.class_names or dict(enumerate(labels_from_metadata(model.props, cfg, model.path) or []))
    record = build_record(
        runtime=opts.runtime, runtime_info=runtime_info, model=model, twins=twins,
        reference={"backend": "torch", "checkpoint": str(reference.path), "threads": reference.threads,
                   "sha256": ref_sha256, "matches_model_source": is_source},
        machine=machine_info(),
        inputs={**source.describe(), "images": total.images, "labeled": total.accuracy.images,
                "img_size": cfg.img_size, "listed": len(source), "unreadable": len(total.unreadable),
                "unreadable_files": [{"file": file, "reason": reason} for file, reason in total.unreadable]},
        tolerances=tolerances, parity=parity, accuracy=total.accuracy.summary(cfg.num_classes, names),
        activation_rate=dict(zip(layers, map(float, rates_from_counts(total.active, total.images,
                                                                      cfg.dispatcher_tokens)))),
        flops_g={"dense": float(gmacs(cfg, None)[0]), "dyt": total.macs / total.images / 1e9},
        throughput=throughput, dense_baseline=dense,
        speedup=_speedups(cfg, throughput, dense, pool_masks, len(pool_masks)) if throughput else [],
        timings={**steps.timings, "total": time.perf_counter() - started}, error=error, execution=execution,
    )
    json_path, markdown_path = write_record(record, out)
    if error is None:
        store.remove()  # the record holds everything the shards did
    log("steps:\n" + steps.report())
    return Outcome(record, json_path, markdown_path, parity, error)
