"""`--int8` in `make bench`: the quantized ViT-B/16 DyT for speed, the demo model for accuracy.

Speed is measured on the benchmark's ViT-B/16 (seeded weights; its top-1 is meaningless);
accuracy on the demo model (a DyT really trained on scikit-learn's digits), whose int8 file
is calibrated on the digits training split (the user's own images, as `dyt-export --int8
--calibration-images` takes them) and compared with its fp32 export on the test split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

CALIBRATION_IMAGES = 64
"""Seeded image-like calibration inputs for the ViT-B/16 int8 export (as `dyt-export --int8`)."""


def int8_export(fp32: Path, out: Path, img_size: int, seed: int) -> Path:
    """The int8 form of the fp32 export `fp32`, calibrated like `dyt-export --int8` does."""
    from dyt_export.calibrate import image_like
    from dyt_export.quantize import quantize_int8

    quantize_int8(fp32, out, image_like(CALIBRATION_IMAGES, size=img_size, seed=seed).numpy())
    return out


def demo_agreement(work: Path, runtimes: list[str], threads: int) -> dict[str, Any]:
    """Top-1 agreement of the demo model's int8 export with its fp32 export on the digits test
    split, per runtime, with both accuracies. Trains the demo model first if it is not cached."""
    from dyt_export.quantize import quantize_int8
    from runtimes import open_backend
    from validation.data import digits
    from validation.demo import ensure_demo_model
    from validation.train import Recipe

    demo = ensure_demo_model()
    size = Recipe().img_size
    train, test = digits(size, split="train"), digits(size, split="test")
    calibration = train.pixel_values
    int8 = quantize_int8(demo.onnx, work / "demo-int8.onnx", calibration).path
    result: dict[str, Any] = {"test_images": len(test), "calibration_images": len(calibration)}
    for runtime in runtimes:
        fp32_top1 = open_backend(runtime, demo.onnx, threads=threads).run({"pixel_values": test.pixel_values})["logits"].argmax(1)
        int8_top1 = open_backend(runtime, int8, threads=threads).run({"pixel_values": test.pixel_values})["logits"].argmax(1)
        result[runtime] = {"top1_agreement": float((fp32_top1 == int8_top1).mean()),
                           "accuracy_fp32": float((fp32_top1 == test.labels).mean()),
                           "accuracy_int8": float((int8_top1 == test.labels).mean())}
    return result


def int8_rows(timed: dict[tuple[str, int, int], dict[str, list[float]]], rate: float) -> list[dict[str, Any]]:
    """int8 vs fp32 DyT img/s at `rate` per runtime, threads and batch, from the same turns."""
    from validation.turns import paired_ratio, row

    rows = []
    for (runtime, threads, batch), lat in timed.items():
        fp32, int8 = lat.get(f"dyt@{rate:g}"), lat.get(f"int8@{rate:g}")
        if fp32 is None or int8 is None:
            continue
        fp32_ips, int8_ips = row(fp32, batch, threads, None).img_per_s, row(int8, batch, threads, None).img_per_s
        rows.append({"runtime": runtime, "threads": threads, "batch": batch, "rate": rate, "fp32_img_s": fp32_ips,
                     "int8_img_s": int8_ips, "speedup": int8_ips / fp32_ips, "paired_speedup": paired_ratio(fp32, int8)})
    return rows


def int8_table(rows: list[dict[str, Any]], demo: dict[str, Any] | None) -> str:
    lines = ["| runtime | batch | img/s DyT fp32 | img/s DyT int8 | speed-up (paired) | target |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['batch']} | {r['fp32_img_s']:.2f} | {r['int8_img_s']:.2f} | "
                     f"{r['speedup']:.2f}x ({r['paired_speedup']:.2f}) | {'met' if r['speedup'] >= 1.8 else 'missed'} (>= 1.8x) |")
    if demo:
        lines += ["", f"Demo model (digits, {demo['test_images']} test images; int8 calibrated on the "
                      f"{demo['calibration_images']} training images):", "",
                  "| runtime | top-1 agreement int8 vs fp32 | accuracy fp32 | accuracy int8 | target |",
                  "|---|---:|---:|---:|---|"]
        for runtime, d in demo.items():
            if isinstance(d, dict):
                lines.append(f"| {runtime} | {d['top1_agreement']:.4f} | {d['accuracy_fp32']:.4f} | {d['accuracy_int8']:.4f} | "
                             f"{'met' if d['top1_agreement'] >= 0.99 else 'missed'} (>= 0.99) |")
    return "\n".join(lines)


def int8_checks(rows: list[dict[str, Any]], demo: dict[str, Any] | None, threads: int) -> list[dict[str, Any]]:
    """The int8 targets in `bench_report.target_checks`' shape: speed-up >= 1.8x per runtime
    and batch, top-1 agreement >= 0.99 on the demo test set per runtime."""
    checks = [{"target": "int8 speed-up", "runtime": r["runtime"], "batch": r["batch"], "measured": r["speedup"],
               "needed": 1.8, "met": r["speedup"] >= 1.8} for r in rows if r["threads"] == threads]
    for runtime, d in (demo or {}).items():
        if isinstance(d, dict):
            checks.append({"target": "int8 top-1 agreement (demo)", "runtime": runtime, "batch": 0,
                           "measured": d["top1_agreement"], "needed": 0.99, "met": d["top1_agreement"] >= 0.99})
    return checks
