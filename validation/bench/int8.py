"""`--int8` in `make bench`: the quantized ViT-B/16 DyT for speed, the demo model for accuracy.

Both forms of `--int8-activations` are measured: static (the default) and dynamic. Speed is
measured on the benchmark's ViT-B/16 (seeded weights; its top-1 is meaningless); accuracy on
the demo model (a DyT really trained on scikit-learn's digits), whose static int8 file is
calibrated on the digits training split (the user's own images, as `dyt-export --int8
--calibration-images` takes them), each form compared with its fp32 export on the test split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dyt_export.config import INT8_ACTIVATIONS, int8_label
from dyt_export.quantize import quantize_int8
from runtimes import open_backend
from validation.data import digits
from validation.bench.turns import paired_ratio, row

CALIBRATION_IMAGES = 64
"""Seeded image-like calibration inputs for the ViT-B/16 int8 export (as `dyt-export --int8`)."""


def contender(activations: str, rate: float) -> str:
    """The name an int8 export is timed under in `make bench`'s turns."""
    return f"{int8_label(activations)}@{rate:g}"


def int8_exports(fp32: Path, work: Path, img_size: int, seed: int) -> dict[str, Path]:
    """The int8 forms of the fp32 export `fp32` by activations, made like `dyt-export --int8
    [--int8-activations dynamic]` makes them (static: calibrated on seeded image-like inputs)."""
    from dyt_export.calibrate import image_like  # imports torch: not for make bench --help

    calibration = image_like(CALIBRATION_IMAGES, size=img_size, seed=seed).numpy()
    return {a: quantize_int8(fp32, work / f"{fp32.stem}-{int8_label(a)}.onnx",
                             calibration if a == "static" else None, a).path for a in INT8_ACTIVATIONS}


def demo_agreement(work: Path, runtimes: list[str], threads: int) -> dict[str, Any]:
    """Top-1 agreement of the demo model's int8 export with its fp32 export on the digits test
    split, per runtime, with both accuracies. Trains the demo model first if it is not cached."""
    # these import torch: not for make bench --help
    from validation.demo.model import ensure_demo_model
    from validation.demo.train import Recipe

    demo = ensure_demo_model()
    size = Recipe().img_size
    train, test = digits(size, split="train"), digits(size, split="test")
    calibration = train.pixel_values
    int8 = {a: quantize_int8(demo.onnx, work / f"demo-{int8_label(a)}.onnx", calibration if a == "static" else None, a).path
            for a in INT8_ACTIVATIONS}

    def top1(runtime: str, path: Path) -> Any:
        return open_backend(runtime, path, threads=threads).run({"pixel_values": test.pixel_values})["logits"].argmax(1)

    forms: dict[str, dict[str, Any]] = {a: {} for a in INT8_ACTIVATIONS}
    for runtime in runtimes:
        fp32_top1 = top1(runtime, demo.onnx)  # once per runtime, for both forms
        for activations, path in int8.items():
            int8_top1 = top1(runtime, path)
            forms[activations][runtime] = {"top1_agreement": float((fp32_top1 == int8_top1).mean()),
                                           "accuracy_fp32": float((fp32_top1 == test.labels).mean()),
                                           "accuracy_int8": float((int8_top1 == test.labels).mean())}
    return {"test_images": len(test), "calibration_images": len(calibration), "forms": forms}


def demo_forms(demo: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per activations form, per runtime, the demo's agreement figures; records from before
    `--int8-activations` hold the static form's runtimes at the top level."""
    if not demo:
        return {}
    return demo.get("forms") or {"static": {k: v for k, v in demo.items() if isinstance(v, dict)}}


def int8_rows(timed: dict[tuple[str, int, int], dict[str, list[float]]], rate: float) -> list[dict[str, Any]]:
    """int8 vs fp32 DyT img/s at `rate` per activations form, runtime, threads and batch, from
    the same turns."""
    rows = []
    for activations in INT8_ACTIVATIONS:
        for (runtime, threads, batch), lat in timed.items():
            fp32, int8 = lat.get(f"dyt@{rate:g}"), lat.get(contender(activations, rate))
            if fp32 is None or int8 is None:
                continue
            fp32_ips, int8_ips = row(fp32, batch, threads, None).img_per_s, row(int8, batch, threads, None).img_per_s
            rows.append({"activations": activations, "runtime": runtime, "threads": threads, "batch": batch,
                         "rate": rate, "fp32_img_s": fp32_ips, "int8_img_s": int8_ips, "speedup": int8_ips / fp32_ips,
                         "paired_speedup": paired_ratio(fp32, int8)})
    return rows


def _activations(row: dict[str, Any]) -> str:
    return row.get("activations", "static")  # records from before --int8-activations: static only


def int8_table(rows: list[dict[str, Any]], demo: dict[str, Any] | None) -> str:
    lines = ["| activations | runtime | batch | img/s DyT fp32 | img/s DyT int8 | speed-up (paired) | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {_activations(r)} | {r['runtime']} | {r['batch']} | {r['fp32_img_s']:.2f} | {r['int8_img_s']:.2f} | "
                     f"{r['speedup']:.2f}x ({r['paired_speedup']:.2f}) | {'met' if r['speedup'] >= 1.8 else 'missed'} (>= 1.8x) |")
    if demo:
        lines += ["", f"Demo model (digits, {demo['test_images']} test images; static int8 calibrated on the "
                      f"{demo['calibration_images']} training images):", "",
                  "| activations | runtime | top-1 agreement int8 vs fp32 | accuracy fp32 | accuracy int8 | target |",
                  "|---|---|---:|---:|---:|---|"]
        for activations, by_runtime in demo_forms(demo).items():
            for runtime, d in by_runtime.items():
                lines.append(f"| {activations} | {runtime} | {d['top1_agreement']:.4f} | {d['accuracy_fp32']:.4f} | "
                             f"{d['accuracy_int8']:.4f} | {'met' if d['top1_agreement'] >= 0.99 else 'missed'} (>= 0.99) |")
    return "\n".join(lines)


def _target(name: str, activations: str) -> str:
    return name if activations == "static" else f"{name} ({activations} activations)"


def int8_checks(rows: list[dict[str, Any]], demo: dict[str, Any] | None, threads: int) -> list[dict[str, Any]]:
    """The int8 targets in `bench_report.target_checks`' shape, per activations form: speed-up
    >= 1.8x per runtime and batch, top-1 agreement >= 0.99 on the demo test set per runtime."""
    checks = [{"target": _target("int8 speed-up", _activations(r)), "runtime": r["runtime"], "batch": r["batch"],
               "measured": r["speedup"], "needed": 1.8, "met": r["speedup"] >= 1.8} for r in rows if r["threads"] == threads]
    for activations, by_runtime in demo_forms(demo).items():
        for runtime, d in by_runtime.items():
            checks.append({"target": _target("int8 top-1 agreement (demo)", activations), "runtime": runtime, "batch": 0,
                           "measured": d["top1_agreement"], "needed": 0.99, "met": d["top1_agreement"] >= 0.99})
    return checks
