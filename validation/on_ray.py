"""The parity run sharded over Ray Data: `python -m validation --ray [ADDRESS]`.

The shards (`stream.Job.shards`) become a Ray dataset of one row each, and `map_batches`
hands them, one at a time, to a fixed pool of actors (`ActorPoolStrategy(size=workers)`),
each holding the reference and the runtime for its whole life, so a model is loaded once
per worker, not per shard. An actor reserves `threads` CPUs (`num_cpus`), and its runtime
is told to use exactly those: Ray sets OMP_NUM_THREADS, which ONNX Runtime ignores
(intra_op_num_threads) and OpenVINO does not read (INFERENCE_NUM_THREADS); the backends'
`threads` option sets both. Results come back to this process as they finish, in any
order; each is saved here (so a cluster needs no shared disk for the output) and merged
with tallies whose merge does not depend on order.

Without an address, a local Ray instance of this machine's cores is started and stopped;
with one, this process joins that cluster, whose nodes must hold the model files at the
same paths and dyt-export installed. A process that already runs Ray (a notebook, a test's
instance) keeps its own.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import ray

from dyt_export.errors import UserError
from runtimes import BackendError

from .stream import Evaluator, Job, Partial


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the run: the caller's when it already runs, else the cluster at `address`, else
    a local instance; what this function started it stops."""
    if ray.is_initialized():
        yield
        return
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local": a new instance even when RAY_ADDRESS or a recorded `ray start` cluster exists
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot start Ray{f' at {address}' if address else ''}: {str(e).splitlines()[0]}") from None
    try:
        yield
    finally:
        ray.shutdown()


def default_workers(threads: int) -> int:
    """As many workers of `threads` CPUs as the cluster holds (at least one)."""
    return max(1, int(ray.cluster_resources().get("CPU", 0)) // threads)


def check_cpus(workers: int, threads: int) -> None:
    """Refuse a pool the cluster cannot place: Ray Data would wait for it forever."""
    total = ray.cluster_resources().get("CPU", 0)
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if workers * threads > total or threads > largest:
        raise UserError(f"{workers} worker(s) x {threads} thread(s) need {workers * threads} CPUs, {threads} on one "
                        f"node; this Ray cluster has {total:g} CPUs, at most {largest:g} on a node "
                        "(lower --workers or --worker-threads)")


class ShardWorker:
    """A Ray Data actor: opens the job once, then judges the shards it is handed. Bad input
    met on a worker (a model file missing on its node, an unreadable image with --strict)
    comes back as a row, so the driver reports it in one line instead of Ray's traceback."""

    def __init__(self, job: Job) -> None:
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
        self.job = job
        self.failure = ""
        try:
            self.evaluate = Evaluator(job, max(1, int(assigned)) if assigned else None)
        except (UserError, BackendError) as e:
            self.failure = str(e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        partials, failures = [], []
        for start, stop in zip(batch["start"], batch["stop"]):
            failure, partial = self.failure, ""
            if not failure:
                try:
                    partial = json.dumps(self.evaluate(self.job.source.chunk(int(start), int(stop))).to_dict())
                except (UserError, BackendError) as e:
                    failure = str(e)
            partials.append(partial)
            failures.append(failure)
        return {"shard": batch["shard"], "images": batch["stop"] - batch["start"], "partial": np.array(partials),
                "failure": np.array(failures)}


def _quiet_data() -> None:
    """Ray Data's own progress bars, execution logs and advice (a ViT-B/16 worker's memory)
    would interleave with ours; errors still reach the user."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.issue_detectors_config.detectors = []
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def run_on_ray(job: Job, shards: list[tuple[int, int, int]], *, workers: int, threads: int,
               save: Callable[[int, Partial], None], advance: Callable[[int], None]) -> Partial:
    """The merged Partial of `shards` judged by `workers` actors of `threads` CPUs each (Ray
    must be running: `ray_session`); each saved as it arrives. Stops at a shard whose
    runtime failed (merged, not saved)."""
    check_cpus(workers, threads)
    _quiet_data()
    rows: list[dict[str, Any]] = [{"shard": i, "start": start, "stop": stop} for i, start, stop in shards]
    results = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardWorker, fn_constructor_args=(job,), batch_size=1, num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=workers))
    total = Partial()
    for row in results.iter_rows():
        if row["failure"]:
            raise UserError(row["failure"])
        part = Partial.from_dict(json.loads(row["partial"]))
        total = total.merge(part)
        advance(int(row["images"]))
        if part.error:
            break
        save(int(row["shard"]), part)
    return total
