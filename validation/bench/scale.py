"""`make scale` (`python -m validation.bench.scale`): how fast does dataset validation run,
here and spread over Ray workers? A benchmark, not a test (issue 24).

For the demo model and ViT-B/16 DyT (built as `make bench` builds it, calibrated to
activation 0.5, exported with its masks), a labeled folder of digit PNGs at the model's
size is validated three ways, parity and accuracy only, on ORT-CPU: sequentially (runtime
and reference on 1 thread), and on a local Ray instance with 1 and then 2 workers of 1
thread each. Each row is one `python -m validation` run in this process; its record's
`execution` gives the rate over the whole parity run (workers' start included) and the
steady rate after the first shard, which is what a long run (ImageNet-val) sees and what
the estimate in docs/validation.md scales. The records must be identical apart from how
they ran (the benchmark checks it, as the tests do).

Run it alone: flock -x /tmp/dyt-bench.lock make scale. Writes OUT/scale.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from dyt_export.cli.common import Parser

from dyt_export.cli.common import number, run_command
from ..machine import machine_info

MODES = (("sequential", None), ("ray, 1 worker", 1), ("ray, 2 workers", 2))
VARIES = ("created", "timings_s", "execution")
"""Fields two runs of one job may differ in: when, how long, how spread."""
IMAGENET_VAL = 50_000


def _vit_b(work: Path, seed: int) -> Path:
    """ViT-B/16 DyT at activation 0.5 with its token masks, as `make bench` builds it."""
    from dyt_export.calibrate import image_like

    from .models import base_model, calibrated

    pool = image_like(4, size=224, seed=seed + 1)
    return calibrated(base_model(seed), 0.5, work, pool, seed, with_masks=True).dynamic


def _rows(name: str, model: Path, folder: Path, chunk: int, out: Path, log: Any) -> list[dict[str, Any]]:
    from ..cli import main

    rows, records = [], []
    out = out / name.replace("/", "")
    for mode, workers in MODES:
        ray = ["--ray", "--workers", str(workers)] if workers else []
        argv = ["--model", str(model), "--images", str(folder), "--out", str(out), "--no-throughput",
                "--threads", "1", "--chunk", str(chunk), "--quiet", *ray]
        code = main(argv)
        if code != 0:
            raise RuntimeError(f"validation of {name} ({mode}) exited {code}")
        record = json.loads((out / "ort-cpu.json").read_text())
        records.append({k: v for k, v in record.items() if k not in VARIES})
        e = record["execution"]
        rows.append({"model": name, "mode": mode, "workers": e["workers"], "threads_per_worker": e["threads_per_worker"],
                     "images": record["inputs"]["images"], "seconds": e["seconds"], "images_per_s": e["images_per_s"],
                     "steady_images_per_s": e["steady_images_per_s"], "accuracy": record["accuracy"]["reference"],
                     "command": "python -m validation " + shlex.join(argv)})
        log(f"{name:<10} {mode:<15} {e['images_per_s']:7.1f} img/s overall, {e['steady_images_per_s']:7.1f} steady "
            f"({e['seconds']:.1f} s)")
    if any(r != records[0] for r in records[1:]):
        raise RuntimeError(f"{name}: the records of the three runs differ beyond how they ran")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["model"]: r for r in rows if r["mode"] == "sequential"}
    lines = ["| model | run | images | img/s overall | img/s steady | steady vs sequential |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["steady_images_per_s"] / base[r["model"]]["steady_images_per_s"]
        lines.append(f"| {r['model']} | {r['mode']} | {r['images']} | {r['images_per_s']:.1f} | "
                     f"{r['steady_images_per_s']:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def estimate(rows: list[dict[str, Any]], cores_per_node: int = 32, nodes: tuple[int, ...] = (1, 4, 16)) -> str:
    """ImageNet-val on N nodes of `cores_per_node` one-thread workers, from ViT-B's measured
    steady rate per worker (2 workers here: the better-loaded figure)."""
    two = next(r for r in rows if r["model"] == "ViT-B/16" and r["workers"] == 2)
    per_worker = two["steady_images_per_s"] / 2
    lines = [f"ViT-B/16: {per_worker:.2f} img/s per one-thread worker (2 workers, steady)."]
    for n in nodes:
        rate = per_worker * cores_per_node * n
        lines.append(f"- {n} node(s) x {cores_per_node} workers: {rate:.0f} img/s, {IMAGENET_VAL / rate / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m validation.bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--demo-images", type=number(int, 1), default=2000, help="digits for the demo model (default 2000)")
    p.add_argument("--vit-images", type=number(int, 1), default=192, help="digits at 224 px for ViT-B/16 (default 192)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--out", type=Path, default=Path("validation/records/scale"))
    p.add_argument("--debug", action="store_true")

    def body(args: argparse.Namespace) -> int:
        import ray

        from ..data import write_digits_folder
        from ..demo.model import ensure_demo_model

        def log(line: str) -> None:
            print(line, file=sys.stderr)

        with tempfile.TemporaryDirectory(prefix="dyt-scale-") as tmp:
            work = Path(tmp)
            demo = ensure_demo_model(log=log).onnx
            vit = _vit_b(work, args.seed)
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)  # once: its start is not timed
            try:
                rows = _rows("demo", demo, write_digits_folder(work / "digits32", args.demo_images), 64, work, log)
                rows += _rows("ViT-B/16", vit, write_digits_folder(work / "digits224", args.vit_images, size=224), 16,
                              work, log)
            finally:
                ray.shutdown()
        report = {"machine": machine_info(), "command": "python -m validation.bench.scale " + shlex.join(argv or sys.argv[1:]),
                  "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
        print(table(rows))
        print()
        print(estimate(rows))
        return 0

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
