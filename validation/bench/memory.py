"""Peak memory of one model on one runtime, measured in a process of its own.

Runtimes keep arenas and caches for the life of a process, so memory read in the process
that times ten models says nothing about any one of them. Each measurement is a fresh
`python -m validation.bench.memory` process that imports the runtime, loads the images,
records its resident set (the baseline), loads the model, runs one pass over the image pool
at the given batch size, and reports the kernel's high-water mark of its resident set
(`VmHWM`, the same figure as `ru_maxrss`). Baseline and peak are both reported: the peak is
what a user's process would need; peak minus baseline is what the model and its inference
cost on top of the interpreter and libraries.

Allocator. ONNX Runtime copies every weight into a packed layout at load and frees the
original; glibc's malloc then keeps or returns those ~100 freed 2-9 MB blocks depending on
its *dynamic* mmap threshold, i.e. on the order of earlier allocations, not on the model.
Measured on ViT-B/16: the DyT export's process kept ~190 MB of freed weights that the dense
export's returned, while with ORT's graph optimizations below 'all', or with its initializers
merely listed in first-use order, the dense export kept them too. So each measurement can
also run with `MALLOC_MMAP_THRESHOLD_=1048576` (a fixed 1 MiB threshold: large blocks are
always mmap'd and go back to the OS when freed), which measures what the models hold rather
than the allocator's luck. Both are reported.

Weights layout. With the weights in external data (`dyt-export --external-data`) ONNX Runtime
maps each weight from the file and unmaps it once packed: no freed heap blocks, so no
allocator luck either, and no copy of the weights in the heap. Each runtime is also measured
with the same models saved that way (`external_copy`, the exporter's own save).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import open_backend
from validation.throughput import batches_of


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_here(runtime: str, model: Path, images: np.ndarray, batch: int, threads: int) -> dict[str, float]:
    """Resident-set figures (MB) of this process around loading and running `model`."""
    feeds = [np.ascontiguousarray(images[g]) for g in batches_of(len(images), batch)]
    baseline = _status_kb("VmRSS")
    backend = open_backend(runtime, model, threads=threads)
    loaded = _status_kb("VmRSS")
    name = backend.input_names[0]
    for feed in feeds:
        backend.run({name: feed})
    peak = _status_kb("VmHWM")
    return {"baseline_mb": baseline / 1024, "loaded_mb": loaded / 1024, "peak_mb": peak / 1024,
            "peak_over_baseline_mb": (peak - baseline) / 1024}


ALLOCATORS: dict[str, dict[str, str]] = {"glibc default": {}, "mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
"""Environment of the measuring process per allocator setting."""
SINGLE_FILE, EXTERNAL_DATA = "single file", "external data"
SETUPS: dict[str, list[tuple[str, str]]] = {
    "ort-cpu": [("glibc default", SINGLE_FILE), ("mmap threshold 1 MiB", SINGLE_FILE), ("glibc default", EXTERNAL_DATA)],
    "openvino": [("glibc default", SINGLE_FILE), ("glibc default", EXTERNAL_DATA)],
}
"""(allocator, weights layout) measured per runtime."""


def external_copy(model: Path, folder: Path) -> Path:
    """`model` saved again with its weights in external data, as `dyt-export --external-data`
    writes them (the graph is the same; exporting ViT-B/16 again would take a minute)."""
    from onnxscript import ir

    from dyt_export.export import save_onnx  # imports torch: only when a copy is made

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / model.name
    if not out.exists() or out.stat().st_mtime < model.stat().st_mtime:
        save_onnx(ir.load(model), out, external_data=True)
    return out


def peak_memory(runtime: str, model: Path, images: Path, batch: int, threads: int,
                allocator: str = "glibc default") -> dict[str, Any]:
    """`measure_here` in a fresh interpreter; `images` is a .npy file of pixel values."""
    command = [sys.executable, "-m", "validation.bench.memory", "--runtime", runtime, "--model", str(model),
               "--images", str(images), "--batch", str(batch), "--threads", str(threads)]
    env = {**os.environ, **ALLOCATORS[allocator]}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {model.name} on {runtime} failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Peak resident memory of one model on one runtime.")
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help=".npy file of pixel values [N, C, H, W]")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    images = np.load(args.images)
    print(json.dumps(measure_here(args.runtime, args.model, images, args.batch, args.threads)))


if __name__ == "__main__":
    main()
