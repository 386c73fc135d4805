"""The batch queue in front of one model, without a server: which requests share a runtime
call, and that the next batch is already in the runtime thread's hands while one computes."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("ray")

from runtimes.serving.batching import Batcher, Work  # noqa: E402


class HeldBackend:
    """A runtime whose calls each wait for a permit, and which records the batch sizes it got."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.permits = threading.Semaphore(0)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = feeds["pixel_values"]
        self.batches.append(len(pixels))
        self.permits.acquire()
        return {"logits": pixels.sum(axis=1, keepdims=True) * 2}


def _model(backend: HeldBackend) -> SimpleNamespace:
    return SimpleNamespace(name="held", backend=backend, input=SimpleNamespace(name="pixel_values"))


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_next_batch_is_handed_to_the_runtime_thread_while_one_computes(monkeypatch):
    """A lone request runs at once (nothing to wait for); three sent while it computes form the
    next batch, which is queued on the runtime thread before the first call ends: the runtime
    starts it without waiting for the event loop. Each request gets its own rows back."""
    from ray import serve

    # outside a replica, Ray's queue only asks the deployment's request cap, to warn when it is low
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    backend = HeldBackend()

    async def scenario() -> None:
        batcher = Batcher(_model(backend), max_batch=8, wait_s=0.05)
        handed = []
        submit = batcher._executor.submit
        batcher._executor.submit = lambda *a, **k: handed.append(1) or submit(*a, **k)
        try:
            first = asyncio.ensure_future(batcher.submit(Work(np.full((1, 2), 1.0, np.float32))))
            await _until(lambda: backend.batches == [1])
            rest = [asyncio.ensure_future(batcher.submit(Work(np.full((1, 2), v, np.float32)))) for v in (2.0, 3.0, 4.0)]
            await _until(lambda: len(handed) == 2)
            assert backend.batches == [1] and not first.done()  # the first call still computes
            backend.permits.release(2)
            done = await asyncio.gather(first, *rest)
        finally:
            backend.permits.release(8)  # a failed check must not leave the runtime thread held
            batcher.close()
        assert backend.batches == [1, 3]
        assert [d.batch_images for d in done] == [1, 3, 3, 3]
        assert [float(d.outputs["logits"][0, 0]) for d in done] == [4.0, 8.0, 12.0, 16.0]

    asyncio.run(scenario())
