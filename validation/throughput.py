"""Throughput of one backend on real (image-like) batches: the img/s and latency of a
validation record (and of the load test's in-process rows). Timing several contenders
against each other, for the benchmark's ratios, is `validation.bench.turns`' job.

How it times, and why:
* The image pool is cut into consecutive batches (`batches_of`). Activation, hence the
  shapes inside a data-dependent graph, depends on the images, so timing always cycles
  over real batches, never one batch repeated or random noise.
* Warm-up first runs every distinct batch once (at least `warmup` calls): OpenVINO
  re-prepares kernels for each new active-token count and ORT grows its arenas, so every
  shape the timed loop meets has been seen before the clock starts.
* The timed loop runs whole passes over the batches until both `iters` calls and
  `min_seconds` are reached, so each batch weighs the same in the result and the
  activation rate of a row is exactly that of the batches it ran.
* One synchronous call at a time; latency percentiles are per call, img/s is images over
  total wall time of the timed calls.

Numbers measured while other processes use the cores are indicative only; benchmarks
take `flock -x /tmp/dyt-bench.lock` around their runs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from runtimes.base import Backend

from .costs import pooled_rate


@dataclass(frozen=True)
class ThroughputRow:
    batch: int
    threads: int | None
    img_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    calls: int
    activation_rate: float | None
    """Mean fraction of patch tokens active over the timed batches (None: unknown)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batches_of(count: int, batch: int) -> list[np.ndarray]:
    """Index arrays of the consecutive batches cut from a pool of `count` images; a pool
    smaller than one batch is repeated to fill it."""
    if batch < 1 or count < 1:
        raise ValueError(f"need batch >= 1 and images >= 1, got batch {batch}, images {count}")
    if count < batch:
        return [np.arange(batch) % count]
    return [np.arange(i, i + batch) for i in range(0, count - batch + 1, batch)]


def feed(backend: Backend, images: np.ndarray) -> dict[str, np.ndarray]:
    """`images` as the input of a one-input `backend`, in the dtype the model declares:
    image sets are float32, and an export made with `--fp16 --fp16-io` takes float16."""
    spec = backend.input_specs[0]
    return {spec.name: np.ascontiguousarray(images, dtype=spec.dtype)}


def measure(backend: Backend, images: np.ndarray, batch: int, *, iters: int = 20, warmup: int = 0,
            min_seconds: float = 0.0, masks: np.ndarray | None = None,
            tokens: Sequence[int] | None = None) -> ThroughputRow:
    """Time `backend` on batches of `batch` images cut from `images` [N, C, H, W].

    `masks` [N, D, T] (the reference token masks of `images`) gives the row its activation
    rate; without it the rate comes from the backend's `token_masks` output when it has
    one, else it is None; `tokens` (`cfg.dispatcher_tokens`) makes it count only the tokens each
    dispatcher sees after ToMe merges. `threads` is the backend's own setting.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    groups = batches_of(len(images), batch)
    feeds = [feed(backend, images[g]) for g in groups]
    seen_masks: list[np.ndarray] = []
    for i in range(max(warmup, len(feeds))):
        backend.run(feeds[i % len(feeds)])

    latencies: list[float] = []
    passes = 0
    start = time.perf_counter()
    while len(latencies) < iters or time.perf_counter() - start < min_seconds:
        for inputs in feeds:
            t0 = time.perf_counter()
            out = backend.run(inputs)
            latencies.append(time.perf_counter() - t0)
            if passes == 0 and masks is None and "token_masks" in out:
                seen_masks.append(out["token_masks"])
        passes += 1

    total = float(np.sum(latencies))
    ms = np.asarray(latencies) * 1e3
    if masks is not None:
        rate = pooled_rate(np.concatenate([masks[g] for g in groups]), tokens)
    elif seen_masks:
        rate = pooled_rate(np.concatenate(seen_masks), tokens)
    else:
        rate = None
    return ThroughputRow(batch=batch, threads=backend.threads, img_per_s=batch * len(latencies) / total,
                         p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                         p99_ms=float(np.percentile(ms, 99)), calls=len(latencies), activation_rate=rate)
