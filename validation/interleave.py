"""Time several backends against each other, in turns, on a machine other work shares.

Timing A for a minute and then B for a minute lets a burst of load from another process land
on one of them only, and on 2 shared cores such bursts halve results. Here every backend gets
one pass over the image pool per round, in turn, for several rounds, and each keeps its
fastest round: the one least disturbed by other work, the closest to what the machine does
alone (other work only ever slows a round down). A burst spoils a round, not a contender.
"""
from __future__ import annotations

import numpy as np

from runtimes.base import Backend
from validation.throughput import ThroughputRow, measure


def interleaved(backends: dict[str, Backend], images: np.ndarray, batch: int, rounds: int,
                masks: dict[str, np.ndarray | None] | None = None) -> dict[str, ThroughputRow]:
    """Per backend, its fastest of `rounds` interleaved rounds (each one warm-up pass and one
    timed pass of `validation.throughput.measure` over `images`)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    results: dict[str, list[ThroughputRow]] = {name: [] for name in backends}
    for _ in range(rounds):
        for name, backend in backends.items():
            results[name].append(measure(backend, images, batch, iters=1, masks=(masks or {}).get(name)))
    return {name: max(rows, key=lambda r: r.img_per_s) for name, rows in results.items()}
