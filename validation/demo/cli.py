"""`make demo`: train (or reuse) the demo DyT, export it, validate it on ORT-CPU and
OpenVINO, and print one table.

The model and its cache: validation/demo/model.py (`--retrain` ignores the cache).

Exit codes as `python -m validation`: 0 every runtime passed, 3 a parity failure, 4 a
runtime that failed while running the model (its record holds the error), 2 a runtime that
is unknown or not available here (refused before training) or that could not load the
model, 1 internal error; when runtimes end differently, 2 wins over 4, and 4 over 3.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dyt_export.cli.common import (EXIT_BAD_INPUT, EXIT_OK, EXIT_PARITY, EXIT_RUNTIME_FAILURE, Parser, names_from, number,
                                   run_command)
from dyt_export.errors import UserError
from runtimes import ONNX_RUNTIMES, BackendError, get_backend

from ..parity import fmt


def _table(results: list[tuple[str, dict[str, Any] | None, str]]) -> str:
    table = Table(title="DyT demo: sklearn digits test split, PyTorch reference vs runtime")
    for column in ("runtime", "acc torch", "acc runtime", "max rel", "on logits", "top-1 agree", "mask agree", "flips",
                   "activation", "GMACs dense/DyT", "img/s b1 / b8 / b32", "speedup b32 (ideal)", "result"):
        table.add_column(column)
    for runtime, record, note in results:
        if record is None:
            table.add_row(runtime, *["-"] * 11, note)
            continue
        p, a, f = record["parity"], record["accuracy"] or {}, record["flops_g"]
        speeds = {r["batch"]: r["img_per_s"] for r in record["throughput"]}
        s32 = next((s for s in record["speedup"] if s["batch"] == max(speeds, default=0)), None)
        table.add_row(
            runtime, fmt(a.get("reference"), ".4f"), fmt(a.get("runtime"), ".4f"), fmt(p["max_rel"], ".1e"),
            f"{p['images_compared_on_logits']}/{p['images']}", fmt(p["top1_agreement"], ".4f"),
            fmt(p["mask_agreement"], ".6f"), str(len(p["flips"])),
            f"{record['activation_rate_mean']:.3f}", f"{f['dense'] * 1e3:.1f}M / {f['dyt'] * 1e3:.1f}M",
            " / ".join(f"{speeds[b]:.0f}" for b in sorted(speeds)) or "-",
            f"{s32['measured']:.2f}x ({s32['flops_ideal']:.2f}x)" if s32 else "-",
            "PASS" if record["passed"] else "ERROR" if record["error"] else "FAIL")
    console = Console(width=200)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _write_folder(out: Path, count: int | None) -> int:
    from ..data import write_digits_folder

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory: give a new folder")
    write_digits_folder(out, count)
    print(f"wrote {sum(1 for _ in out.rglob('*.png'))} digit images in {len(list(out.iterdir()))} class folders: {out}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m validation.demo", description=__doc__.splitlines()[0])
    p.add_argument("--runtimes", type=names_from(ONNX_RUNTIMES, "runtime"), default="ort-cpu,openvino",
                   help="comma-separated (default ort-cpu,openvino)")
    p.add_argument("--retrain", action="store_true", help="train again even when a cached model exists")
    p.add_argument("--out", type=Path, help="record directory (default validation/records/dyt_digits/)")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--write-folder", type=Path, metavar="DIR",
                   help="only write the digits test split as PNG files in one folder per class, then exit: a labeled "
                        "folder for `python -m validation --images DIR` (docs/validation.md)")
    p.add_argument("--count", type=number(int, 1), help="with --write-folder: this many images (cycling through the split)")
    p.add_argument("--debug", action="store_true")

    def body(args: argparse.Namespace) -> int:
        if args.write_folder is not None:
            return _write_folder(args.write_folder, args.count)
        # Both import torch: imported here, so that --help and a refused argument stay instant.
        from ..harness import Options, check_output_dir, validate
        from .model import ensure_demo_model

        def log(line: str) -> None:
            print(line, file=sys.stderr)

        for runtime in args.runtimes:  # refuse before two minutes of training
            available = get_backend(runtime).availability()
            if not available:
                raise BackendError(f"{runtime} is not available: {available.reason}")
        if args.out is not None:
            check_output_dir(args.out)
        start = time.perf_counter()
        demo = ensure_demo_model(retrain=args.retrain, show_steps=True, log=log)
        print(f"demo checkpoint (public DyT layout): {demo.checkpoint}")
        print(f"demo ONNX (dynamic dispatch):       {demo.onnx}")
        if demo.export_timings:
            print("export steps: " + ", ".join(f"{k} {v:.2f} s" for k, v in demo.export_timings.items()))
        else:
            print("export: reused the cached ONNX file (delete it or pass --retrain to time the export)")
        results, code = [], EXIT_OK
        for runtime in args.runtimes:
            try:
                outcome = validate(Options(runtime=runtime, model=demo.onnx, out=args.out, data="digits",
                                           throughput=not args.no_throughput, show=True), log=log)
            except (BackendError, UserError) as e:
                results.append((runtime, None, str(e)))
                code = EXIT_BAD_INPUT
                continue
            error = outcome.error
            results.append((runtime, outcome.record, f"runtime failure: {error['message']}; {outcome.json_path}"
                            if error else str(outcome.json_path)))
            if error and code != EXIT_BAD_INPUT:
                code = EXIT_RUNTIME_FAILURE
            elif not outcome.passed and code == EXIT_OK:
                code = EXIT_PARITY
        print(_table(results))
        for runtime, record, note in results:
            print(f"{runtime}: {note}")
        print(f"demo finished in {time.perf_counter() - start:.0f} s")
        return code

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
