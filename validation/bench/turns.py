"""Time several contenders call by call, in turns: ratios that survive a shared machine.

Alternating whole passes and repeating `throughput.measure`'s warm-up pass every round (the
timer of the variant and attention-form experiments, docs/levers.md) is too slow here: on
ViT-B/16 with 2 cores a pass over 32 images takes a minute per model, so `make bench` (ten
models, three batch sizes, two runtimes) cannot afford either. Here
every contender sees each distinct batch once to warm up, then the timed loop goes batch by
batch and runs *every* contender on that batch before moving on, rotating who goes first.
A burst of load from another process lands on neighbouring calls of all contenders alike,
so a ratio of two contenders' times moves far less than either time does.

Rows keep `validation.throughput`'s meaning: whole passes over the pool, img/s is images
over the total wall time of the timed calls, latency percentiles are per call. The two timers
answer different questions: `throughput.measure` times ONE backend for a validation record
(its img/s and latency); this module times SEVERAL contenders against each other for the
benchmark's ratios (`paired_ratio`), which only a shared timeline makes honest. Only
`validation.bench` uses it.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from validation.throughput import ThroughputRow, batches_of

Runner = Callable[[np.ndarray], object]
"""Runs one batch of pixel values [B, C, H, W]; what it returns is ignored."""

ORT_IN_TURNS: dict[str, str] = {"session.intra_op.allow_spinning": "0"}
"""Session config of the bare ONNX Runtime sessions that run in turns with others: the
benchmark's GEMM load sensor. A session's worker
threads spin after each call; the next contender's call then shares the two cores with them.
The benchmark's bare sessions get it through `runtimes.ort_session.session_options`. Measured (2 cores): a chain of 12 MLP GEMM pairs on 60 rows ran at 35-37 GMAC/s in two
spinning sessions taking turns, 67-69 without spinning, 67.5 for one session alone; ViT-B/16
at batch 1 lost 15-25 % of its speed, the DyT export more than the dense one (its calls are
shorter). Timing the models themselves keeps ORT's spinning and uses `settle` instead:
without spinning the dense export at batch 8 ran 15-20 % slower than with it."""

SETTLED_RUNTIMES = ("ort-cpu",)
"""Runtimes whose models `make bench` times with `take_turns(settle=True)`: ONNX Runtime's
spinning threads otherwise take the cores from the next contender's call (ORT_IN_TURNS)."""


def take_turns(runners: dict[str, Runner], images: np.ndarray, batch: int, *, passes: int = 1,
               min_calls: int = 1, min_seconds: float = 0.0, settle: bool = False) -> dict[str, list[float]]:
    """Per contender, the wall time (s) of each timed call, over whole passes of the pool
    cut into batches of `batch` (at least `passes` of them, at least `min_calls` calls per
    contender, and at least `min_seconds`). `min_calls` is for large batches: a pool of 32
    images at batch 32 is one call per pass, and one slow call is then the whole measurement.

    `settle`: each timed call comes right after an untimed call of the same contender on the
    same batch, so the previous contender's threads have gone quiet and this one's are awake,
    as in a service that runs one model back to back (ONNX Runtime: see ORT_IN_TURNS)."""
    if passes < 1:
        raise ValueError("passes must be >= 1")
    feeds = [np.ascontiguousarray(images[g]) for g in batches_of(len(images), batch)]
    names = list(runners)
    for feed in feeds:
        for name in names:
            runners[name](feed)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    done = 0
    start = time.perf_counter()
    while done < passes or done * len(feeds) < min_calls or time.perf_counter() - start < min_seconds:
        for feed in feeds:
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                if settle:
                    runners[name](feed)
                t0 = time.perf_counter()
                runners[name](feed)
                latencies[name].append(time.perf_counter() - t0)
            turn += 1
        done += 1
    return latencies


def row(latencies: list[float], batch: int, threads: int | None, activation_rate: float | None) -> ThroughputRow:
    """A `ThroughputRow` from one contender's call times."""
    ms = np.asarray(latencies) * 1e3
    return ThroughputRow(batch=batch, threads=threads, img_per_s=batch * len(latencies) / float(np.sum(latencies)),
                         p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                         p99_ms=float(np.percentile(ms, 99)), calls=len(latencies), activation_rate=activation_rate)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over turns of numerator[i] / denominator[i]: two contenders' call times on the
    same batch, one right after the other. Bursts of load that hit a turn hit both calls, so
    this estimates their speed ratio more robustly than the ratio of totals on a busy machine."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty lists of call times from take_turns")
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))

