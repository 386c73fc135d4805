"""`make gpu-check`: ORT-CUDA end to end on a machine with an NVIDIA GPU, unattended, within
BUDGET_S seconds.

1. The NVIDIA driver must list a GPU and support torch's CUDA major version; otherwise exit 2
   at once, before anything is installed or trained.
2. `python -m runtimes.cuda_setup` (what `make setup-cuda` runs): onnxruntime-gpu for torch's
   CUDA version; then ort-cuda must start a session (asked with torch imported).
3. The demo DyT (trained on first use) validated on ort-cuda, parity only: its fp32 export
   and an fp16 export made here.
4. ViT-B/16 DyT as `make bench` builds it (validation.bench.models: seeded, public checkpoint
   layout, dispatchers calibrated to activation VIT_RATE), exported with its token masks and
   validated on VIT_IMAGES digits images at 224 px, with throughput: DyT against its dense
   export at batch 1, 8 and 32, the paper's GPU figures beside them.

Step lines go to stderr as the steps run, one summary to stdout at the end. Records land
under OUT (default validation/records/gpu-check/). Exit codes: 0 every step passed; 2 no
usable GPU, or ort-cuda did not start after the setup; 3 a parity failure; 1 anything else,
the time budget included (a watchdog ends the run). What imports torch (the harness, the
exporter, the models) is imported in the step that needs it, so that a machine without a
GPU is told so at once.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from dyt_export.cli.common import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_PARITY
from runtimes import get_backend
from runtimes.base import first_line
from runtimes.cuda_driver import query_driver

BUDGET_S = 8 * 60
SETUP_TIMEOUT_S = 4 * 60
RUNTIME = "ort-cuda"
VIT_RATE = 0.5
VIT_IMAGES = 64
VIT_POOL = 8
"""Images the calibrated model is traced on when built (validation.bench.models needs a pool; the
validation computes its own reference masks)."""
SEED = 0
"""`make bench`'s default seed: the same weights and calibration."""
BACKBONE = "vit_base_patch16_224"
"""`make bench`'s backbone (validation.bench.models.BACKBONE)."""
BATCHES = (1, 8, 32)
PAPER_GPU = (("V100", 806.0, 912.0), ("T4", 435.0, 525.0))
"""The DyT paper's GPU throughput, img/s: (GPU, ViT-B/16 dense, DyT)."""
EXIT_FAILED, EXIT_NO_GPU = EXIT_INTERNAL, EXIT_BAD_INPUT
"""gpu-check's 1 is any step that failed for a reason other than parity; its 2 a machine
without a usable GPU, as an unavailable runtime is bad input to `python -m validation`."""


@dataclass
class Step:
    name: str
    passed: bool
    detail: str
    seconds: float
    parity_failed: bool = False


@dataclass
class Run:
    out: Path
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)
    current: str = "start"
    facts: dict[str, Any] = field(default_factory=dict)

    def log(self, line: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[gpu-check {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {line}", file=sys.stderr, flush=True)

    def step(self, name: str, body: Callable[[], tuple[bool, str]], *, parity: bool = False) -> bool:
        """Run one step; a failure is recorded with its one-line cause, never raised."""
        self.current = name
        self.log(f"{name} ...")
        began = time.monotonic()
        try:
            passed, detail = body()
        except Exception as e:  # any failure of a step is reported in the summary, then the run goes on or stops
            passed, detail, parity = False, f"{type(e).__name__}: {first_line(e)}", False
        self.steps.append(Step(name, passed, detail, time.monotonic() - began, parity_failed=parity and not passed))
        self.log(f"{name}: {'PASS' if passed else 'FAIL'} {detail}")
        return passed


def gpu_problem() -> str:
    """Why this machine cannot run the check ('' when it can): no driver, no GPU, or a driver
    older than torch's CUDA major version (onnxruntime-gpu is picked to match torch)."""
    driver = query_driver()
    if driver.problem:
        return driver.problem
    import torch

    needed = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    if needed and driver.cuda_version and driver.cuda_version[0] < needed:
        return (f"the NVIDIA driver supports CUDA {driver.cuda_version[0]}.{driver.cuda_version[1]}; torch "
                f"{torch.__version__} and the onnxruntime-gpu matched to it need CUDA {needed}: update the driver")
    return ""


def _setup() -> tuple[bool, str]:
    done = subprocess.run([sys.executable, "-m", "runtimes.cuda_setup"], timeout=SETUP_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, stdout=sys.stderr)  # stdout is the summary's
    if done.returncode != 0:
        return False, f"python -m runtimes.cuda_setup exited {done.returncode}"
    return True, f"onnxruntime-gpu {metadata.version('onnxruntime-gpu')}"


def _placement(record: dict[str, Any]) -> str:
    placement = record["runtime_info"].get("placement")
    if placement is None:
        return "placement unknown"
    compute = ", ".join(f"{op} x{n}" for op, n in placement["cpu_compute"].items())
    shape = sum(placement["cpu_shape"].values())
    return f"CPU compute: {compute}" if compute else f"all compute on CUDA ({shape} shape/index nodes on the CPU)"


def _validate(run: Run, model: Path, out: Path, **options: Any) -> tuple[bool, str]:
    from ..harness import Options, validate

    outcome = validate(Options(runtime=RUNTIME, model=model, out=out, ref_threads=os.cpu_count() or 1, **options),
                       log=lambda line: run.log(f"  {line}"))
    run.facts.setdefault("device", outcome.record["runtime_info"]["device"])
    run.facts[out.name] = outcome.record
    return outcome.parity.passed, f"{outcome.parity.summary()}; {_placement(outcome.record)}"


def _demo_fp16(checkpoint: Path, out: Path) -> Path:
    """The demo checkpoint exported in fp16 (`dyt-export --fp16`), into `out`."""
    from dyt_export import export_onnx, load_checkpoint

    from ..demo.train import Recipe

    out.mkdir(parents=True, exist_ok=True)
    path = out / "dyt_digits_fp16.onnx"
    export_onnx(load_checkpoint(checkpoint, num_heads=Recipe().num_heads), path, dispatch="dynamic", fp16=True)
    return path


def _vit(out: Path) -> Path:
    from dyt_export.calibrate import image_like

    from .models import base_model, calibrated

    out.mkdir(parents=True, exist_ok=True)
    base = base_model(SEED, BACKBONE)
    pool = image_like(VIT_POOL, size=base.dyt_config.img_size, seed=SEED + 1)
    return calibrated(base, VIT_RATE, out, pool, SEED, with_masks=True).dynamic


def throughput_table(record: dict[str, Any]) -> list[str]:
    """DyT and dense img/s per batch with the paper's GPU figures beside them."""
    dyt = {r["batch"]: r for r in record["throughput"]}
    dense = {r["batch"]: r["img_per_s"] for r in record["dense_baseline"]}
    speed = {s["batch"]: s for s in record["speedup"]}
    batches = sorted(dyt)
    lines = [f"  {'ViT-B/16 img/s on ' + RUNTIME:<30}" + "".join(f"{'batch ' + str(b):>16}" for b in batches),
             f"  {'dense':<30}" + "".join(f"{dense.get(b, float('nan')):>16.1f}" for b in batches),
             f"  {'DyT (activation %.2f)' % record['activation_rate_mean']:<30}"
             + "".join(f"{dyt[b]['img_per_s']:>16.1f}" for b in batches),
             f"  {'speed-up (FLOPs-ideal)':<30}"
             + "".join(f"{'%.2fx (%.2fx)' % (speed[b]['measured'], speed[b]['flops_ideal']) if b in speed else '-':>16}"
                       for b in batches)]
    paper = " / ".join(f"{gpu} {d:.0f} -> {t:.0f} img/s = {t / d:.2f}x" for gpu, d, t in PAPER_GPU)
    return lines + [f"  paper (ViT-B/16, dense -> DyT): {paper}"]


def summary(run: Run) -> str:
    elapsed = time.monotonic() - run.started
    verdict = "PASS" if run.steps and all(s.passed for s in run.steps) else "FAIL"
    lines = [f"gpu-check on {run.facts.get('device', 'an NVIDIA GPU')}: {int(elapsed) // 60}m{int(elapsed) % 60:02d}s "
             f"of the {BUDGET_S // 60}-minute budget"]
    lines += [f"  {'PASS' if s.passed else 'FAIL'}  {s.name:<26} {s.seconds:6.0f} s  {s.detail}" for s in run.steps]
    vit = run.facts.get("vitb16")
    if vit and vit["throughput"]:
        lines += throughput_table(vit)
    lines.append(f"gpu-check: {verdict} (records under {run.out})")
    return "\n".join(lines)


def exit_code(run: Run) -> int:
    failed = [s for s in run.steps if not s.passed]
    if not failed:
        return EXIT_OK
    return EXIT_PARITY if all(s.parity_failed for s in failed) else EXIT_FAILED


def _watchdog(run: Run) -> threading.Timer:
    """Ends the process when the budget is spent, whatever the main thread is stuck in."""
    def expire() -> None:
        print(f"{summary(run)}\ngpu-check: FAIL: over the {BUDGET_S // 60}-minute budget during '{run.current}'",
              flush=True)
        os._exit(EXIT_FAILED)

    timer = threading.Timer(BUDGET_S, expire)
    timer.daemon = True
    timer.start()
    return timer


def check(run: Run) -> int:
    """Steps 2-4 (the GPU is known to be there)."""
    if not run.step("setup-cuda", _setup):
        return EXIT_FAILED

    def starts() -> tuple[bool, str]:
        available = get_backend(RUNTIME).availability()
        return available.available, available.reason or "a CUDA session started"

    if not run.step(f"{RUNTIME} starts", starts):
        return EXIT_NO_GPU
    run.out.mkdir(parents=True, exist_ok=True)
    from ..demo.model import ensure_demo_model

    demo = None

    def demo_model() -> tuple[bool, str]:
        nonlocal demo
        demo = ensure_demo_model(log=lambda line: run.log(f"  {line}"))
        return True, str(demo.onnx)

    if run.step("demo model", demo_model):
        run.step("demo fp32", lambda: _validate(run, demo.onnx, run.out / "demo-fp32", throughput=False), parity=True)
        run.step("demo fp16", lambda: _validate(run, _demo_fp16(demo.checkpoint, run.out), run.out / "demo-fp16",
                                                throughput=False), parity=True)
    vit: Path | None = None

    def vit_model() -> tuple[bool, str]:
        nonlocal vit
        vit = _vit(run.out / "vitb16")
        return True, str(vit)

    if run.step(f"ViT-B/16 DyT r{VIT_RATE:g}", vit_model):
        run.step(f"ViT-B/16 ({VIT_IMAGES} images)", lambda: _validate(run, vit, run.out / "vitb16", limit=VIT_IMAGES,
                                                                      batches=BATCHES), parity=True)
    return exit_code(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("validation/records/gpu-check"), help="records directory")
    args = parser.parse_args(argv)
    problem = gpu_problem()
    if problem:
        print(f"gpu-check: no GPU to check here: {problem}; nothing was installed or run", file=sys.stderr)
        return EXIT_NO_GPU
    run = Run(args.out)
    watchdog = _watchdog(run)
    code = check(run)
    watchdog.cancel()
    print(summary(run))
    return code


if __name__ == "__main__":
    sys.exit(main())
