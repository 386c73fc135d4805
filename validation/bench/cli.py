"""`make bench`: does the token dispatch pay? (issue 5). A benchmark, not a test.

ViT-B/16 DyT (MLP Dispatch, bottleneck 64, adapter scale 0.1, seeded weights) is calibrated
to each activation rate, saved in the public DyT checkpoint layout, loaded back and exported
(`dynamic`, what `dyt-export` ships). Then, all in one run and at the same thread count:

* per runtime (ORT-CPU, OpenVINO) and batch size, in turns call by call
  (`validation.bench.turns`): the DyT exports, the `dense` export, the `masked` export (its cost
  does not depend on the rate, so one rate suffices), the two int8 exports (static and
  dynamic activations, `validation.bench.int8`), the DyT + ToMe exports and dense + ToMe
  (`validation.bench.tome`) and the runtime's own large GEMM;
* eager PyTorch DyT along the public code's gather/scatter path (`validation.bench.public_eager`),
  in turns with `torch.mm`;
* the machine's fp32 GEMM rate, best of numpy, torch, ONNX Runtime and OpenVINO
  (`validation.bench.gemm`);
* peak memory of the dense and DyT exports, one process per measurement
  (`validation.bench.memory`).

It prints the tables, writes `OUT/bench.json` and replaces the marked section of
`docs/performance.md`. Everything is seeded: calibration images (seed S), timed images
(seed S+1, so the activation on them is measured, not assumed), weights (seed S).
Run it alone on the machine; on shared cores wrap it in `flock -x /tmp/dyt-bench.lock`.
`--only` measures some sections alone (e.g. `--only tome`: the ToMe rows with the DyT and
dense exports they are paired with, a third of the full run).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dyt_export.cli.common import run_command
from dyt_export.errors import UserError
from dyt_export.files import check_input_file
from runtimes import open_backend
from validation.compare import max_rel
from validation.costs import gmacs
from validation.machine import machine_info
from validation.throughput import batches_of
from validation.bench.turns import SETTLED_RUNTIMES, Runner, paired_ratio, row, take_turns

from .args import parser
from .gemm import DEFAULT_SIZE, machine_gemm_rates, matmul_runner, square
from .int8 import contender, demo_agreement, int8_checks, int8_exports, int8_rows
from .memory import EXTERNAL_DATA, SETUPS, external_copy, peak_memory
from .report import (Result, markdown, memory_table, results_from_record, results_table, section_tables, target_checks,
                     targets_table, write_docs)
from .tome import ToMeExports, tome_checks, tome_exports, tome_rows

RUNTIME_GEMM_LIBRARY = {"ort-cpu": "onnxruntime", "openvino": "openvino", "torch": "torch"}
MEMORY_IMAGES = 8
"""Images per memory measurement at small batches: memory settles within the first calls."""
GROUP_GEMM_SIZE = 2048
"""The in-turns GEMM: ~0.1 s a call, a load sensor beside each group's models."""


def write_json(path: Path, data: Any) -> None:
    """A record as indented JSON at `path`, its directory made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _time_group(runners: dict[str, Runner], gemm: Runner, images: np.ndarray, batch: int,
                args: argparse.Namespace, settle: bool = False) -> tuple[dict[str, list[float]], float]:
    """Call times of every runner and the in-turns GEMM rate (GMAC/s) of one group."""
    latencies = take_turns({**runners, "gemm": lambda _: gemm()}, images, batch, passes=args.passes,
                           min_calls=args.min_calls, settle=settle)
    gemm_s = latencies.pop("gemm")
    return latencies, GROUP_GEMM_SIZE ** 3 / float(np.median(gemm_s)) / 1e9


@dataclass
class Exports:
    """Everything timed: calibrated DyT models (one per rate) and the middle rate's twins."""

    models: list[Any]
    """`validation.bench.models.CalibratedModel` per rate."""
    dense: Path
    masked: Path | None
    int8: dict[str, Path]
    """The middle rate's int8 exports by `--int8-activations` form."""
    tome: ToMeExports | None
    pool: np.ndarray

    @property
    def middle(self) -> Any:
        return self.models[len(self.models) // 2]

    def onnx_files(self) -> dict[str, Path]:
        return {"dense": self.dense, **({"masked": self.masked} if self.masked else {}),
                **{f"dyt@{m.rate:g}": m.dynamic for m in self.models},
                **{contender(a, self.middle.rate): path for a, path in self.int8.items()},
                **(self.tome.onnx_files() if self.tome else {})}


def build_exports(args: argparse.Namespace, work: Path) -> Exports:
    """Seeded model, calibrated per rate, public layout, exported; dense, masked and int8 twins
    at the middle rate (dense ignores the dispatchers, masked costs the same at every rate);
    every checkpoint with ToMe. Only what `--only` asks for besides DyT and dense."""
    # these import torch: here, so that --help and a refused argument stay instant
    from dyt_export.calibrate import image_like

    from .models import base_model, calibrated, export_twin
    from .public_eager import PublicEagerDyT

    base = base_model(args.seed, args.backbone)
    pool = image_like(args.images, size=base.dyt_config.img_size, seed=args.seed + 1)
    np.save(work / "pool.npy", pool.numpy())
    models = [calibrated(base, rate, work, pool, args.seed) for rate in args.rates]
    middle = models[len(models) // 2]
    if "eager" in args.only:  # the re-implemented public path must give the toolkit's answers
        for m in models:
            ref = m.model.trace(pool[:2]).logits.numpy()
            rel = max_rel(PublicEagerDyT(m.model)(pool.numpy()[:2]), ref)
            if rel > 1e-4:
                raise RuntimeError(f"public eager path differs from the toolkit's model at rate {m.rate}: {rel:.2e}")
    return Exports(models, export_twin(middle.model, "dense", work),
                   export_twin(middle.model, "masked", work) if "masked" in args.only else None,
                   int8_exports(middle.dynamic, work, base.dyt_config.img_size, args.seed) if "int8" in args.only else {},
                   tome_exports({m.rate: m.checkpoint for m in models}, middle.rate, work, pool)
                   if "tome" in args.only else None,
                   pool.numpy())


def time_all(args: argparse.Namespace, ex: Exports, threads: list[int]) -> tuple[dict, dict]:
    """Call times per (runtime, threads, batch) group and contender, and each group's GEMM rate."""
    import torch  # not for --help (nor public_eager, which imports it)

    from .public_eager import PublicEagerDyT

    timed: dict[tuple[str, int, int], dict[str, list[float]]] = {}
    group_gemm: dict[tuple[str, int, int], float] = {}
    def runners_for(runtime: str, t: int, **options: Any) -> dict[str, Runner]:
        _log(f"{runtime}, {t} threads{', batch pinned to %d' % options['fixed_batch'] if options else ''}: "
             f"loading {len(ex.onnx_files())} models")
        backends = {name: open_backend(runtime, path, threads=t, **options) for name, path in ex.onnx_files().items()}
        return {name: (lambda feed, b=b: b.run({"pixel_values": feed})) for name, b in backends.items()}

    for t in threads:
        for runtime in args.runtimes:
            pinned = runtime == "ort-cpu" and args.ort_fixed_batch
            runners = None if pinned else runners_for(runtime, t)
            gemm = matmul_runner(RUNTIME_GEMM_LIBRARY[runtime], square(GROUP_GEMM_SIZE), t)
            for batch in args.batches:
                group = runners_for(runtime, t, fixed_batch=batch) if pinned else runners
                _log(f"{runtime}, {t} threads, batch {batch}: {len(group)} models in turns")
                key = (runtime, t, batch)
                timed[key], group_gemm[key] = _time_group(group, gemm, ex.pool, batch, args,
                                                          settle=runtime in SETTLED_RUNTIMES)
                del group
            del runners, gemm
        if "eager" not in args.only:
            continue
        torch.set_num_threads(t)
        eager = {f"dyt@{m.rate:g}": PublicEagerDyT(m.model) for m in ex.models}
        gemm = matmul_runner("torch", square(GROUP_GEMM_SIZE), t)
        for batch in args.eager_batches:
            _log(f"eager PyTorch (public path), {t} threads, batch {batch}")
            key = ("torch", t, batch)
            timed[key], group_gemm[key] = _time_group(eager, gemm, ex.pool, batch, args)
    return timed, group_gemm


def measure_memory(args: argparse.Namespace, ex: Exports, work: Path, threads: int) -> list[dict[str, Any]]:
    """Peak memory of the dense and DyT exports, one process each (`validation.bench.memory`),
    per allocator setting and weights layout."""
    models = [("dense", ex.dense), *[(f"dyt@{m.rate:g}", m.dynamic) for m in ex.models]]
    memory = []
    for runtime in args.runtimes:
        for allocator, weights in SETUPS[runtime]:
            for batch in args.memory_batches:
                images = work / "memory-pool.npy"
                np.save(images, ex.pool[: max(batch, MEMORY_IMAGES)])
                for name, path in models:
                    if weights == EXTERNAL_DATA:
                        path = external_copy(path, work / "external-data")
                    _log(f"peak memory: {runtime}, {allocator}, {weights}, batch {batch}, {name}")
                    memory.append({"runtime": runtime, "allocator": allocator, "weights": weights, "batch": batch,
                                   "model": name, "threads": threads,
                                   **peak_memory(runtime, path, images, batch, threads, allocator)})
    return memory


def results_of(ex: Exports, timed: dict, group_gemm: dict, gemm_best: float) -> list[Any]:
    """One `Result` per runtime, threads, batch and rate, with its baselines from the same turns."""
    cfg = ex.middle.model.dyt_config
    dense_gmacs = float(gmacs(cfg, None)[0])
    results = []
    for (runtime, t, batch), lat in timed.items():
        if runtime == "torch":
            continue
        covered = np.concatenate(batches_of(len(ex.pool), batch))
        for m in ex.models:
            masks, name = m.masks[covered], f"dyt@{m.rate:g}"
            eager = timed.get(("torch", t, batch), {}).get(name)
            results.append(Result(
                runtime=runtime, threads=t, batch=batch, rate=m.rate, activation=float(masks[:, :, 1:].mean()),
                dyt_gmacs=float(gmacs(cfg, masks).mean()), dense_gmacs=dense_gmacs,
                dyt_img_s=row(lat[name], batch, t, None).img_per_s, dense_img_s=row(lat["dense"], batch, t, None).img_per_s,
                eager_img_s=row(eager, batch, t, None).img_per_s if eager else None,
                masked_img_s=row(lat["masked"], batch, t, None).img_per_s if m is ex.middle and ex.masked else None,
                gemm_gmac_s=gemm_best, group_gemm_gmac_s=group_gemm[(runtime, t, batch)],
                paired_speedup=paired_ratio(lat["dense"], lat[name])))
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # not for --help

    start = time.perf_counter()
    load_start = os.getloadavg()
    threads = args.threads
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    _log(f"fp32 GEMM rate ({DEFAULT_SIZE}^3) per library, {max(threads)} threads")
    gemm_rates = machine_gemm_rates(max(threads))
    best_library = max(gemm_rates, key=gemm_rates.get)
    _log(f"models: seeded {args.backbone} DyT, calibrated, public layout, exported")
    ex = build_exports(args, work)
    timed, group_gemm = time_all(args, ex, threads)
    memory = measure_memory(args, ex, work, min(threads)) if "memory" in args.only else []
    demo_int8 = demo_agreement(work, args.runtimes, min(threads)) if args.demo_int8 and "int8" in args.only else None
    results = results_of(ex, timed, group_gemm, gemm_rates[best_library])
    rows = [{"runtime": runtime, "threads": t, "model": name, **row(calls, batch, t, None).to_dict()}
            for (runtime, t, batch), lat in timed.items() for name, calls in lat.items()]
    return {
        "schema": "dyt-bench/1",
        "command": args.command,
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": time.perf_counter() - start,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "machine": machine_info(),
        "threads": min(threads),
        "thread_counts": threads,
        "ort_sessions": ("pinned to each batch size (fixed_batch)" if args.ort_fixed_batch else "dynamic batch")
                        + ", spinning (ORT's default); each timed call right after an untimed one of the same session",
        "images": args.images,
        "seed": args.seed,
        "backbone": args.backbone,
        "sections": args.only,
        "gemm": {"size": DEFAULT_SIZE, "by_library": gemm_rates, "library": best_library,
                 "best": gemm_rates[best_library], "in_turns": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in group_gemm.items()}},
        "models": [{"rate": m.rate, "checkpoint": str(m.checkpoint), "onnx": str(m.dynamic),
                    "activation_per_dispatcher": m.masks[:, :, 1:].mean(axis=(0, 2)).round(4).tolist()} for m in ex.models],
        "rows": rows,
        "results": [r.to_dict() for r in results],
        "memory": memory,
        "int8": {"rows": int8_rows(timed, ex.middle.rate), "demo": demo_int8},
        "tome": {"rows": tome_rows(timed, ex.tome, {m.rate: m.masks for m in ex.models}, ex.middle.model.dyt_config,
                                   ex.middle.rate) if ex.tome else []},
        "_results": results,
    }


def report_only(path: Path, docs: str) -> int:
    """Tables and docs section from a bench.json, e.g. after the report's wording changed."""
    check_input_file(path, "--report")
    try:
        record = json.loads(path.read_text())
        section = markdown(record, results_from_record(record), record["targets"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--report {path} is not a bench.json written by make bench ({type(e).__name__}: {e})") from None
    print(section)
    if docs:
        write_docs(Path(docs), section)
    return 0


def _refuse_before_work(args: argparse.Namespace) -> None:
    """What would otherwise fail after half an hour of measuring."""
    # these import torch: here, so that --help and a refused argument stay instant
    from dyt_export.export import weights_need_external_data
    from dyt_export.init_model import backbone_config
    from dyt_export.quantize import INT8_SINGLE_FILE_ONLY
    from validation.harness import check_output_dir, check_output_file

    from .models import ADAPTER_SCALE, BOTTLENECK, NUM_CLASSES, meta_model, require_work_space

    model = meta_model(backbone_config(args.backbone, bottleneck=BOTTLENECK, adapter_scale=ADAPTER_SCALE,
                                       num_classes=NUM_CLASSES))
    if weights_need_external_data(model):
        raise UserError(f"--backbone {args.backbone}: {INT8_SINGLE_FILE_ONLY}, and make bench measures int8")
    if args.ort_fixed_batch and "ort-cpu" in args.runtimes and any(args.images % b for b in args.batches):
        raise UserError(f"--images {args.images} must be a multiple of every batch size for --pin-ort-batch")
    check_output_dir(args.out)
    if args.docs:
        check_output_file(Path(args.docs))
    require_work_space(args.out / "work", model, len(args.rates), args.only)


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        if args.report:
            return report_only(args.report, args.docs)
        _refuse_before_work(args)
        if os.environ.get("DYT_BENCH_FROM_MAKE"):
            args.command = "make bench" + (f" ARGS={shlex.quote(shlex.join(given))}" if given else "")
        else:
            args.command = shlex.join(["python", "-m", "validation.bench", *given])
        record = run(args)
        results = record.pop("_results")
        checks = target_checks([r for r in results if r.threads == record["threads"]], record["memory"])
        checks += int8_checks(record["int8"]["rows"], record["int8"]["demo"], record["threads"])
        checks += tome_checks(record["tome"]["rows"], record["threads"])
        record["targets"] = checks
        write_json(args.out / "bench.json", record)
        print(results_table(results), targets_table(checks), memory_table(record["memory"]),
              *section_tables(record).values(), sep="\n\n")
        if args.docs:
            write_docs(Path(args.docs), markdown(record, results, checks))
        _log(f"wrote {args.out / 'bench.json'}{' and ' + args.docs if args.docs else ''}; "
             f"{sum(c['met'] for c in checks)}/{len(checks)} targets met")
        return 0

    given = sys.argv[1:] if argv is None else argv
    return run_command(parser(), given, body)


if __name__ == "__main__":
    sys.exit(main())
