"""Wall time and peak memory of `dyt-export` on ViT-S/16 and ViT-B/16 (README figures).

Each export runs as its own `dyt-export` process, started by a one-child wrapper so that
`getrusage(RUSAGE_CHILDREN).ru_maxrss` is that export's own peak resident memory. The
checkpoints are seeded, in the public DyT training code's layout.
Usage: python -m validation.export_cost [--sizes small base] [-- extra dyt-export flags]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dyt_export import build_model, vit_config, write_public_checkpoint

_PEAK_OF_ONE_CHILD = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def measure(size: str, workdir: Path, extra: list[str]) -> tuple[float, float, float]:
    """(checkpoint MB, export wall seconds, peak RSS MB) of one `dyt-export` run."""
    checkpoint = workdir / f"vit_{size}_dyt.pt"
    write_public_checkpoint(build_model(vit_config(size, num_classes=100, bottleneck=8), seed=0), checkpoint)
    command = [sys.executable, "-m", "dyt_export", str(checkpoint), "-o", str(workdir / f"{size}.onnx"), *extra]
    start = time.perf_counter()
    peak_kb = subprocess.run([sys.executable, "-c", _PEAK_OF_ONE_CHILD, *command],
                             check=True, capture_output=True, text=True).stdout.strip()
    return checkpoint.stat().st_size / 1e6, time.perf_counter() - start, int(peak_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "base"], choices=["tiny", "small", "base", "large"])
    parser.add_argument("extra", nargs="*", help="extra dyt-export flags, after --")
    args = parser.parse_args()
    print("| model | checkpoint | dyt-export wall time | peak memory (RSS) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            mb, wall, peak = measure(size, Path(tmp), args.extra)
            print(f"| ViT-{size[0].upper()}/16 DyT, 224 px | {mb:.0f} MB | {wall:.1f} s | {peak:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
