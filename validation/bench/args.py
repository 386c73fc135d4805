"""`make bench`'s command line: its options and their argument types.

Apart from `cli` so that the measuring code stays readable; it imports nothing that loads
torch, so `--help` and a refused argument answer at once.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dyt_export.cli.common import Parser, names_from, number, positive_ints
from runtimes import CPU_RUNTIMES

SECTIONS: tuple[str, ...] = ("masked", "int8", "eager", "memory", "tome")
"""What `--only` chooses from. The DyT exports at every rate and the dense export are always
timed: every ratio of every section is taken against them, in the same turns."""

DESCRIPTION = "make bench: does the token dispatch pay? (ViT-B/16 DyT against its dense export, ONNX Runtime and OpenVINO)"


def _thread_counts(text: str) -> list[int]:
    """An argparse type: comma-separated thread counts, 'all' for every usable core."""
    cores = len(os.sched_getaffinity(0))
    try:
        counts = {cores if part.strip() == "all" else int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts or 'all', got {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"expected positive thread counts, got {text!r}")
    return sorted(counts)


def _rates(text: str) -> list[float]:
    """An argparse type: activation targets strictly between 0 and 1 (calibration needs both
    kinds of token)."""
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 < r < 1 for r in rates):
        raise argparse.ArgumentTypeError(f"expected activation rates between 0 and 1, got {text!r}")
    return rates


def _batches_or_none(text: str) -> tuple[int, ...]:
    return positive_ints(text) if text.strip() else ()


def _sections(text: str) -> list[str]:
    """An argparse type: `SECTIONS` names, comma-separated; '' for none."""
    return names_from(SECTIONS, "section")(text) if text.strip() else []


def parser() -> Parser:
    p = Parser(prog="python -m validation.bench", description=DESCRIPTION)
    p.add_argument("--rates", type=_rates, default=[0.3, 0.5, 0.7], help="activation targets (default 0.3,0.5,0.7)")
    p.add_argument("--batches", type=positive_ints, default=(1, 8, 32))
    p.add_argument("--eager-batches", type=positive_ints, default=(1, 8, 32), help="batches for eager PyTorch")
    p.add_argument("--memory-batches", type=_batches_or_none, default=(1, 32), help="batches for peak memory ('' for none)")
    p.add_argument("--threads", type=_thread_counts, default="2,all", help="comma list; 'all' = every usable core (default 2,all)")
    p.add_argument("--only", type=_sections, default=list(SECTIONS),
                   help=f"comma list of {','.join(SECTIONS)}: the sections to measure besides the DyT and dense exports, "
                        "which are always timed ('' for those alone; default: every section)")
    p.add_argument("--runtimes", type=names_from(CPU_RUNTIMES, "runtime"), default=list(CPU_RUNTIMES), help="ort-cpu,openvino (default)")
    p.add_argument("--images", type=number(int, 1), default=32, help="image pool every contender passes over")
    p.add_argument("--passes", type=number(int, 1), default=1, help="timed passes over the pool per group")
    p.add_argument("--min-calls", type=number(int, 1), default=3,
                   help="timed calls per contender at least, in whole passes (default 3: batch 32 makes three passes)")
    p.add_argument("--pin-ort-batch", dest="ort_fixed_batch", action="store_true",
                   help="give each batch size an ORT session pinned to it (the fixed_batch lever; measured no faster); "
                        "the image pool must then be a multiple of every batch size")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 2), default=0, help="weights and calibration images; timed images use SEED+1")
    p.add_argument("--no-demo-int8", dest="demo_int8", action="store_false",
                   help="skip the int8 accuracy check on the demo model (trains it when not cached)")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="timm ViT name (smaller ones for a smoke run)")
    p.add_argument("--out", type=Path, default=Path("validation/records/bench"))
    p.add_argument("--docs", default="docs/performance.md", help="'' to leave the docs alone")
    p.add_argument("--report", type=Path, metavar="BENCH_JSON",
                   help="measure nothing: print the tables of an earlier bench.json and rewrite the docs from it")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p
