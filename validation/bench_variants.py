"""Benchmark: each DyT variant against its dense export, beside its FLOPs ratio. Not a test.

ViT-B/16 at 224 from `dyt_export.init_model` (seeded random weights, bottleneck 64, every
dispatcher calibrated to activation R on seeded image-like inputs), exported twice per
variant: `dynamic` (what ships) and `dense` (every token through every unit, adapters
included: the same model without token skipping). Both are timed with
`validation.throughput.measure`, in turns (`validation.interleave`), over the same pool of
image-like inputs (another seed than the calibration's), so the activation reached on them is
measured, not assumed; MACs come
from `dyt_export.flops` at the active counts PyTorch reports on that pool.

Exports need no lock; timing does (the cores are shared):

    .venv/bin/python -m validation.bench_variants --out /tmp/bench --export-only
    flock -x /tmp/dyt-bench.lock .venv/bin/python -m validation.bench_variants --out /tmp/bench
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dyt_export.calibrate import image_like
from dyt_export.config import VARIANTS, DyTConfig
from dyt_export.export import export_onnx
from dyt_export.flops import flops_summary
from dyt_export.init_model import init_model
from runtimes import CPU_RUNTIMES, open_backend
from validation.machine import machine_info
from validation.interleave import interleaved
from validation.throughput import batches_of

BACKBONE = "vit_base_patch16_224"


def padded_counts(cfg: DyTConfig, counts: np.ndarray, batch: int) -> np.ndarray:
    """Active counts as a batched graph computes them: an attention or layer unit pads every
    image to its batch's largest count (the MLP unit gathers rows and does not pad)."""
    sequence = np.array([not name.endswith(".mlp") for name in cfg.dispatcher_names])
    out = counts.copy()
    for group in batches_of(len(counts), batch):
        out[np.ix_(group, sequence)] = counts[np.ix_(group, sequence)].max(axis=0)
    return out


def run(out: Path, variants: list[str], runtimes: list[str], activation: float, threads: int, images: int,
        batches: list[int], rounds: int) -> list[dict]:
    pool = image_like(images, size=224, seed=1)
    rows = []
    for variant in variants:
        model = init_model(BACKBONE, variant=variant, bottleneck=64, activation=activation, seed=0)
        with torch.no_grad():
            masks = model.trace(pool).masks.numpy()
        counts = masks.sum(axis=2)
        flops = flops_summary(model.dyt_config, counts)
        paths = {dispatch: out / f"{variant}-{dispatch}.onnx" for dispatch in ("dynamic", "dense")}
        for dispatch, path in paths.items():
            if not path.exists():
                export_onnx(model, path, dispatch=dispatch)
        for runtime in runtimes:
            backends = {dispatch: open_backend(runtime, path, threads=threads) for dispatch, path in paths.items()}
            for batch in batches:
                timed = interleaved(backends, pool.numpy(), batch, rounds, masks={"dynamic": masks})
                for dispatch, row in timed.items():
                    dense = dispatch == "dense"
                    padded = flops_summary(model.dyt_config, padded_counts(model.dyt_config, counts, batch))
                    rows.append({"variant": variant, "dispatch": dispatch, "runtime": runtime, **row.to_dict(),
                                 "gmacs": flops["dense_gmacs" if dense else "mean_gmacs"],
                                 "flops_ratio": 1.0 if dense else flops["ratio"],
                                 "flops_ratio_padded": 1.0 if dense else padded["ratio"]})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per variant, runtime and batch, img/s dynamic vs dense beside the MACs ratio."""
    lines = ["| variant | runtime | batch | activation | GMACs DyT / dense | FLOPs ratio (padded) | img/s DyT | img/s dense | speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    dense = {(r["variant"], r["runtime"], r["batch"]): r for r in rows if r["dispatch"] == "dense"}
    for r in rows:
        if r["dispatch"] != "dynamic":
            continue
        d = dense.get((r["variant"], r["runtime"], r["batch"]))
        if d is None:
            continue
        lines.append(f"| {r['variant']} | {r['runtime']} | {r['batch']} | {r['activation_rate']:.3f} | "
                     f"{r['gmacs']:.2f} / {d['gmacs']:.2f} | {r['flops_ratio']:.3f} ({r['flops_ratio_padded']:.3f}) | "
                     f"{r['img_per_s']:.2f} | "
                     f"{d['img_per_s']:.2f} | {r['img_per_s'] / d['img_per_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dyt_export.cli.common import Parser
    from validation.cli import names_from, number, positive_ints, run_command
    from validation.harness import check_output_dir, write_json

    p = Parser(prog="python -m validation.bench_variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the ONNX files and results")
    p.add_argument("--variants", type=names_from(VARIANTS, "variant"), default=list(VARIANTS),
                   help=f"{','.join(VARIANTS)} (default: all)")
    p.add_argument("--runtimes", type=names_from(CPU_RUNTIMES, "runtime"), default=["ort-cpu"],
                   help="ort-cpu (default), openvino")
    p.add_argument("--export-only", action="store_true", help="only export (needs no lock; timing does)")
    p.add_argument("--activation", type=number(float, 0.0, 1.0), default=0.5)
    p.add_argument("--threads", type=number(int, 1), default=2)
    p.add_argument("--images", type=number(int, 1), default=16, help="image pool cycled through by the timer")
    p.add_argument("--batches", type=positive_ints, default=(1, 8), help="comma-separated (default 1,8)")
    p.add_argument("--rounds", type=number(int, 1), default=5, help="interleaved timed passes over the pool")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    def body(args: argparse.Namespace) -> int:
        check_output_dir(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        rows = run(args.out, args.variants, [] if args.export_only else args.runtimes, args.activation, args.threads,
                   args.images, list(args.batches), args.rounds)
        if rows:
            write_json(args.out / "results.json", {"machine": machine_info(), "rows": rows})
            print(table(rows))
        return 0

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
