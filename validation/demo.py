"""`make demo`: train (or reuse) the demo DyT, export it, validate it on ORT-CPU and
OpenVINO, and print one table.

The demo model is a small DyT trained here on scikit-learn's digits (validation/train.py),
saved in the public DyT training code's checkpoint layout (full training checkpoint with
`args`) and cached with its ONNX export under `.cache/demo/` (override with DYT_CACHE_DIR).
The cache is keyed by the training recipe (the ONNX file also by the checkpoint's hash and the
exporter's graph form); `--retrain` ignores it. The export carries its token masks, the digit
names and how its images were prepared (bilinear upscaling), so `make serve` serves it with
activation rates on its image route, and validation compares its own masks (no mask twin).

Geometry (validation/train.py `Recipe`): 32x32 inputs (8x8 digits upscaled 4x), patch 4,
so each token is one digit pixel and the 64 patch tokens split cleanly into strokes and
empty background, which is what a token dispatcher should learn to tell apart; width 96,
4 blocks, 3 heads, MLP 384, adapter bottleneck 16: the largest model whose two training
phases fit ~1-2 minutes on 2 CPU cores. Width 96 has no conventional head count, so the
checkpoint needs `--num-heads 3` when given to dyt-export alone (the ONNX metadata carries it).

Exit codes as `python -m validation`: 0 every runtime passed, 3 a parity failure, 4 a
runtime that failed while running the model (its record holds the error), 2 a runtime that
is unknown or not available here (refused before training) or that could not load the
model, 1 internal error; when runtimes end differently, 2 wins over 4, and 4 over 3.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from dyt_export.preprocess import PreprocessSpec

from .train import Recipe

CHECKPOINT_NAME = "dyt_digits.pth"
ONNX_NAME = "dyt_digits.onnx"
DIGIT_LABELS = [str(digit) for digit in range(10)]


def demo_preprocess(recipe: Recipe) -> PreprocessSpec:
    """How the demo saw its images in training (`data.normalize`: the 8x8 digits upscaled
    bilinearly, mean and std 0.5), recorded in its export for the image route."""
    return PreprocessSpec(recipe.img_size, interpolation="bilinear", source="demo training: digits upscaled bilinearly")


def cache_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".cache"
    return Path(os.environ.get("DYT_CACHE_DIR", default)) / "demo"


@dataclass
class DemoModel:
    checkpoint: Path
    onnx: Path
    export_timings: dict[str, float]
    """Step timings of the export, empty when the cached ONNX file was reused."""


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time trains or exports the demo model (tests run in parallel)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train(recipe: Recipe, path: Path, log: Callable[[str], None]) -> None:
    from dyt_export import write_public_checkpoint

    from .train import train_demo

    log(f"training the demo DyT on sklearn digits (dim {recipe.embed_dim}, depth {recipe.depth}, "
        f"target activation {recipe.target_rate}); about 1-2 minutes on 2 cores...")
    result = train_demo(recipe, log=log)
    write_public_checkpoint(result.model, path, shape="training", epoch=recipe.pretrain_epochs + recipe.tune_epochs - 1,
                            args={"model": "dyt_digits", "token_target_ratio": recipe.target_rate,
                                  "epochs": recipe.tune_epochs, "lr": recipe.tune_lr, "batch_size": recipe.batch})
    log(f"trained in {result.seconds:.0f} s -> {path}")


def onnx_name(tome_r: int | tuple[int, ...] | None) -> str:
    """The demo export's file name; with token merging (ToMe) it names r: `dyt_digits-tome2.onnx`
    for 2 per block, `dyt_digits-tome2-0-1-1.onnx` for one r per block."""
    if not tome_r:
        return ONNX_NAME
    values = (tome_r,) if isinstance(tome_r, int) else tuple(tome_r)
    r = str(values[0]) if len(set(values)) == 1 else "-".join(map(str, values))
    return ONNX_NAME.replace(".onnx", f"-tome{r}.onnx")


def ensure_demo_model(recipe: Recipe = Recipe(), *, retrain: bool = False, show_steps: bool = False,
                      log: Callable[[str], None] = lambda _: None,
                      tome_r: int | tuple[int, ...] | None = None) -> DemoModel:
    """The cached demo checkpoint and its dynamic ONNX export, made when missing or stale;
    `tome_r`: the export merges tokens (ToMe) as `dyt-export --tome-r` does."""
    from dyt_export import export_onnx, load_checkpoint
    from dyt_export.checkpoint import file_sha256
    from dyt_export.export import current_graph_form, read_metadata
    from dyt_export.progress import Steps

    directory = cache_dir()
    checkpoint, onnx_path, stamp = directory / CHECKPOINT_NAME, directory / onnx_name(tome_r), directory / "recipe.json"
    wanted = json.dumps(recipe.to_dict(), sort_keys=True)
    with _locked(directory):
        fresh = retrain or not checkpoint.exists() or not stamp.exists() or stamp.read_text() != wanted
        if fresh:
            for stale in (checkpoint, onnx_path, stamp):
                stale.unlink(missing_ok=True)
            _train(recipe, checkpoint, log)
            stamp.write_text(wanted)
        timings: dict[str, float] = {}
        sha256 = file_sha256(checkpoint)
        cached = read_metadata(onnx_path) if onnx_path.exists() else {}
        if cached.get("dyt.source_sha256") != sha256 or not current_graph_form(cached):
            onnx_path.unlink(missing_ok=True)
            steps = Steps(show=show_steps)
            with steps.step("load checkpoint"):
                model = load_checkpoint(checkpoint, num_heads=recipe.num_heads, tome_r=tome_r)
            export_onnx(model, onnx_path, dispatch="dynamic", with_masks=True, preprocess=demo_preprocess(recipe),
                        labels=DIGIT_LABELS, steps=steps)
            timings = dict(steps.timings)
        return DemoModel(checkpoint, onnx_path, timings)


def _runtimes(text: str) -> list[str]:
    """argparse type: comma-separated runtime names, each one validation runs on (imported
    here, not when the parser is built, so that --help stays instant)."""
    from runtimes import ONNX_RUNTIMES

    from .cli import names_from

    return names_from(ONNX_RUNTIMES, "runtime")(text)


def _table(results: list[tuple[str, dict[str, Any] | None, str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    from .compare import fmt

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


def main(argv: list[str] | None = None) -> int:
    from dyt_export.cli.common import EXIT_BAD_INPUT, EXIT_RUNTIME_FAILURE, Parser

    from .cli import EXIT_OK, EXIT_PARITY, run_command

    p = Parser(prog="python -m validation.demo", description=__doc__.splitlines()[0])
    p.add_argument("--runtimes", type=_runtimes, default="ort-cpu,openvino",
                   help="comma-separated (default ort-cpu,openvino)")
    p.add_argument("--retrain", action="store_true", help="train again even when a cached model exists")
    p.add_argument("--out", type=Path, help="record directory (default validation/records/dyt_digits/)")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--debug", action="store_true")

    def body(args: argparse.Namespace) -> int:
        from dyt_export.errors import UserError
        from runtimes import BackendError, get_backend

        from .harness import Options, check_output_dir, validate

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
