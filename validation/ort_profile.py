"""ONNX Runtime's profiler, read once for every experiment that splits a model's time by node.

ORT writes one JSON event per node and call; the first call of a session also allocates its
buffers and fills caches, so its events would weigh a one-off cost into a steady-state split.
"""
from __future__ import annotations

import bisect
import collections
import json
from pathlib import Path
from typing import Any


def profiling(options: Any, prefix: str) -> Any:
    """`options` (onnxruntime.SessionOptions) with the profiler on, writing to `prefix`*.json."""
    options.enable_profiling, options.profile_file_prefix = True, prefix
    return options


def kernel_events(session: Any, every: int = 1) -> list[dict[str, Any]]:
    """Ends `session`'s profiling: its per-node kernel events from the calls after the first,
    of those only every `every`-th (`every=2` keeps the timed call of each settle + timed pair,
    `validation.turns.take_turns(settle=True)`'s way, and drops the settling call)."""
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    kept = runs[every::every]
    starts = [start for start, _ in kept]

    def in_kept_run(ts: int) -> bool:
        i = bisect.bisect_right(starts, ts) - 1  # the last kept run starting at or before ts
        return i >= 0 and ts <= kept[i][1]
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and in_kept_run(e["ts"])]


def op_type_shares(events: list[dict[str, Any]]) -> dict[str, float]:
    """Share of kernel time per op type, largest first."""
    per_op: collections.Counter[str] = collections.Counter()
    for event in events:
        per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {op: us / total for op, us in per_op.most_common()}
