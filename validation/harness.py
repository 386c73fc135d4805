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
from dyt_export.preprocess import spec_from_metadata
from dyt_export.progress import Steps
from runtimes import ONNX_RUNTIMES, Backend, BackendError, RuntimeFailure, get_backend, open_backend
from runtimes.base import check_fixed_batch
from runtimes.torch_ref import TorchReference

from .compare import Parity, accuracy, compare, tolerances_for, unmeasured
from .costs import activation_rates, gmacs
from .data import ImageSet, load_inputs
from .demo.model import ensure_demo_model
from .machine import machine_info
from .models import ModelUnderTest, read_model, twin
from .record import MASKS_NOT_COMPARED, build_record, write_record
from .throughput import ThroughputRow, batches_of, feed, measure

RUN_CHUNK = 16
"""Images per call in the parity runs (timing uses the requested batch sizes)."""
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
    """Tolerances that replace the defaults of the model's precision (see compare.TOLERANCES)."""
    ref_threads: int = REFERENCE_THREADS
    backend_options: dict[str, Any] = field(default_factory=dict)
    loader_overrides: dict[str, Any] = field(default_factory=dict)
    """num_heads / adapter_scale / trust_checkpoint for the reference checkpoint."""
    tome_r: int | tuple[int, ...] | None = None
    """With the demo model (model None): validate its export with token merging (ToMe)."""
    show: bool = False


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
    if opts.tome_r and opts.model is not None:
        raise UserError(f"--tome-r exports the demo model with token merging; {opts.model.name} merges as it was "
                        f"exported (dyt-export --tome-r), so drop --tome-r or --model")


def _reference(opts: Options, model: ModelUnderTest, steps: Steps) -> TorchReference:
    with steps.step("load reference checkpoint"):
        source = opts.ref or model.path  # an ONNX path makes the reference follow its metadata
        overrides = {k: v for k, v in opts.loader_overrides.items() if v is not None}
        if opts.ref is not None:  # geometry the checkpoint cannot state comes from the ONNX file
            overrides = {"num_heads": model.cfg.num_heads, "adapter_scale": model.cfg.adapter_scale,
                         "img_size": model.cfg.img_size, "tome_r": model.cfg.tome_r or 0, **overrides}
        reference = TorchReference(source, threads=opts.ref_threads, dispatch=model.dispatch, **overrides)
    ref_cfg = reference.module.dyt_config
    differ = [f"{name} {getattr(ref_cfg, name)} vs {getattr(model.cfg, name)}"
              for name in GEOMETRY if getattr(ref_cfg, name) != getattr(model.cfg, name)]
    if differ:
        raise UserError(f"reference {reference.path.name} and model {model.path.name} disagree on "
                        f"{'; '.join(differ)}: their outputs cannot be compared")
    return reference


def _throughput(opts: Options, model: Path, dense: Path, images: ImageSet, masks: np.ndarray, tokens: list[int],
                log: Callable[[str], None]) -> tuple[list[ThroughputRow], list[ThroughputRow]]:
    """(DyT rows, dense rows). Each DyT row is timed right before its dense row, so load from
    other processes drifting over the run moves both sides of a speedup alike."""
    rows, dense_rows = [], []
    for threads in opts.threads:
        backends = [open_backend(opts.runtime, path, threads=threads, precision=opts.precision, **opts.backend_options)
                    for path in (model, dense)]
        for batch in opts.batches:
            row, base = (measure(backend, images.pixel_values, batch, iters=opts.iters, warmup=opts.warmup,
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
    with steps.step(f"load model ({opts.runtime})"):
        backend = open_backend(opts.runtime, model.path, threads=opts.threads[0], precision=opts.precision,
                               **opts.backend_options)
    for note in backend.notes():  # e.g. compute ORT left on the CPU (also in the record's runtime_info)
        log(note)
    reference = _reference(opts, model, steps)
    cfg, layers = model.cfg, model.cfg.dispatcher_names

    with steps.step("prepare inputs"):
        images = load_inputs(opts.data, cfg.img_size, cfg.in_chans, limit=opts.limit, images_dir=opts.images,
                             spec=spec_from_metadata(model.props, cfg, model.path))
    with steps.step("reference (torch)"):
        ref = run_all(reference, images.pixel_values, ("logits", "token_masks", "dispatch_logits"))

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

    # A runtime that fails while running (RuntimeFailure) still gets its record, holding the error.
    error: dict[str, str] | None = None
    got: dict[str, Any] = {"logits": None, "token_masks": None}
    runtime_info = backend.info()
    try:
        with steps.step(f"parity run ({opts.runtime})"):
            outputs = ("logits", "token_masks") if model.has_masks else ("logits",)
            got.update(run_all(backend, images.pixel_values, outputs))
            del backend
            if masks_path is not None and not model.has_masks:
                mask_backend = open_backend(opts.runtime, masks_path, threads=opts.threads[0], precision=opts.precision,
                                            **opts.backend_options)
                got["token_masks"] = run_all(mask_backend, images.pixel_values, ("token_masks",))["token_masks"]
                del mask_backend
    except RuntimeFailure as e:
        error = {"stage": "parity run", "message": str(e)}
        got["logits"] = None  # a run cut short reports nothing: its record's parity and accuracy say why
        parity = unmeasured(len(images), f"not compared: the runtime failed during the parity run ({e})")
    else:
        parity = compare(ref, got["logits"], got["token_masks"], layers, tolerances, cfg.dispatcher_tokens)
    log(f"parity: {'PASS' if parity.passed else 'FAIL'}  {parity.summary()}")

    throughput: list[ThroughputRow] = []
    dense: list[ThroughputRow] = []
    if opts.throughput and error is None:
        try:
            with steps.step("throughput"):
                throughput, dense = _throughput(opts, model.path, dense_path, images, ref["token_masks"],
                                                cfg.dispatcher_tokens, log)
        except RuntimeFailure as e:
            error = {"stage": "throughput", "message": str(e)}

    rates = activation_rates(ref["token_masks"], cfg.dispatcher_tokens)
    record = build_record(
        runtime=opts.runtime, runtime_info=runtime_info, model=model, twins=twins,
        reference={"backend": "torch", "checkpoint": str(reference.path), "threads": reference.threads,
                   "sha256": ref_sha256, "matches_model_source": is_source},
        machine=machine_info(),
        inputs={"source": images.source, "images": len(images), "labeled": int((images.labels >= 0).sum())
                if images.labels is not None else 0, "img_size": cfg.img_size},
        tolerances=tolerances, parity=parity,
        accuracy=_accuracy(ref["logits"], got["logits"], images),
        activation_rate=dict(zip(layers, map(float, rates))),
        flops_g={"dense": float(gmacs(cfg, None)[0]), "dyt": float(gmacs(cfg, ref["token_masks"]).mean())},
        throughput=throughput, dense_baseline=dense,
        speedup=_speedups(cfg, throughput, dense, ref["token_masks"], len(images)) if throughput else [],
        timings={**steps.timings, "total": time.perf_counter() - started}, error=error,
    )
    json_path, markdown_path = write_record(record, out)
    log("steps:\n" + steps.report())
    return Outcome(record, json_path, markdown_path, parity, error)


def _accuracy(reference_logits: np.ndarray, logits: np.ndarray | None, images: ImageSet) -> dict[str, Any] | None:
    """Top-1 accuracy of both on the labeled images; the runtime's None when it gave no logits."""
    ref_acc = accuracy(reference_logits, images.labels)
    if ref_acc is None:
        return None
    labeled = int((images.labels >= 0).sum())
    return {"images": labeled, "reference": ref_acc,
            "runtime": None if logits is None else accuracy(logits, images.labels)}
