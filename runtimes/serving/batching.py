"""Batching across requests: Ray Serve's `@serve.batch` queue in front of one model, counted
in images, and one runtime thread per model and replica behind it.

Requests may carry several images each, so a batch is capped by images, not by requests
(`batch_size_fn`); a request larger than the cap runs alone. The batch runs on the model's
own single-thread executor: the replica's event loop keeps accepting and queueing requests
while the runtime computes, and the backend is never called by two threads at once, whatever
its own thread-safety (the runtime's intra-op threads still use every CPU of the replica).
The next batch waits on that thread while one runs (PIPELINE), so the runtime never idles
while the event loop answers.
With DyT's MLP dispatch every image keeps static input and output shapes whatever its active
token count, so images of very different activation share one batch and each gets its
single-image answer.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ray import serve

from .models import ServedModel

PIPELINE = 2
"""Batches a model's runtime thread holds at once: the one computing and the next, already
formed, so the runtime starts it the moment the last one ends instead of waiting while the
event loop answers the finished batch's requests (docs/serving.md: at one runtime thread the
demo serves ~30 % more img/s at 32 clients; deeper only adds latency)."""


@dataclass
class Work:
    """One request's input, already checked against the model."""

    pixels: np.ndarray

    @property
    def images(self) -> int:
        return int(self.pixels.shape[0])


@dataclass
class Done:
    """One request's outputs, and the size of the batch it ran in."""

    outputs: dict[str, np.ndarray]
    batch_images: int


class Batcher:
    """`submit(work)` -> its `Done`. A request that finds the model idle (nothing queued or
    running) does not wait for company: Ray's queue waits the full timeout after a batch's
    first request even when no other is coming, which at one client is pure added latency.
    Once requests overlap, batches wait as configured."""

    def __init__(self, model: ServedModel, max_batch: int, wait_s: float) -> None:
        self.model = model
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dyt-{model.name}")
        self._queue = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s, batch_size_fn=self.cost,
                                  max_concurrent_batches=PIPELINE)(self._run)

    async def submit(self, work: Work) -> Done:
        # read by the queue when this request starts a batch, so set before it is queued
        self._queue.set_batch_wait_timeout_s(0.0 if self._pending == 0 else self.wait_s)
        self._pending += 1
        try:
            return await self._queue(work)
        finally:
            self._pending -= 1

    def cost(self, items: list[Work]) -> int:
        """What a batch of `items` counts against max_batch: its images (a request over the cap
        counts as the cap, so it forms a batch of its own instead of being refused)."""
        return sum(min(item.images, self.max_batch) for item in items)

    async def _run(self, items: list[Work]) -> list[Done]:
        pixels = items[0].pixels if len(items) == 1 else np.concatenate([item.pixels for item in items])
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, self.model.backend.run, {self.model.input.name: pixels})
        total = int(pixels.shape[0])
        done, start = [], 0
        for item in items:
            end = start + item.images
            done.append(Done({name: value[start:end] for name, value in outputs.items()}, total))
            start = end
        return done

    def close(self) -> None:
        self._executor.shutdown(wait=True)
