"""Where a DyT export's time goes against its dense export, by role, on ORT-CPU and OpenVINO.

Efficiency (speed-up over the FLOPs-ideal speed-up) at activation 0.3 and batch 1 stays
below 0.95 on 2-core CPUs (issue 5). This splits both exports' time, from each runtime's
own per-node counters (ONNX Runtime's profiler, OpenVINO's `PERF_COUNT`), into the MLP
GEMMs that MLP Dispatch shrinks and the work it leaves alone (qkv, attention core,
projection, adapters, LayerNorm, residuals, patch embedding), and gives two figures that say
which of the two holds efficiency back:

* structure bound: the efficiency if the MLP GEMMs cost exactly their active-token share of
  the dense export's MLP time and everything else cost what it costs in the dense export;
* MLP GEMM efficiency: how close the dispatched fc1/fc2 come to that share (a GEMM over
  fewer rows can run at a lower rate).

Both exports run in turns, call by call, over the same images; the active-token share and
the MACs come from the PyTorch model of the same checkpoint on those images. `--by-op` reads
each role down to the runtime's own op types (ONNX Runtime's kernels, OpenVINO's layers after
its fusions): where two runtimes differ on the same graph.

    flock -x /tmp/dyt-bench.lock .venv/bin/python -m validation.roles --rate 0.3 --batch 1
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from runtimes import CPU_RUNTIMES
from validation.ort_profile import kernel_events, profiling
from validation.turns import ort_options_in_turns

GELU, ATTENTION, OTHER, SMALL = "mlp hidden elementwise (bias, GELU)", "attention core", "other (LayerNorm, adds, ...)", "adapters, head"
MLP_ROLES = ("mlp fc1", GELU, "mlp fc2")
"""The work MLP Dispatch runs on the active tokens only."""


class Widths:
    """Role of a node from its widths: a GEMM's from its reduction width K and output width
    N, any other node's from its output width (the MLP hidden width is the GELU's)."""

    def __init__(self, embed_dim: int, hidden_dim: int) -> None:
        self.hidden_dim = hidden_dim
        self.roles = {(embed_dim, 3 * embed_dim): "qkv", (embed_dim, embed_dim): "attention proj",
                      (embed_dim, hidden_dim): "mlp fc1", (hidden_dim, embed_dim): "mlp fc2", (embed_dim, 1): "dispatcher"}

    def gemm(self, k: int, n: int) -> str:
        return self.roles.get((k, n), SMALL)

    def elementwise(self, n: int | None) -> str:
        return GELU if n == self.hidden_dim else OTHER


Times = collections.Counter[tuple[str, str]]
"""Milliseconds by (role, op type): the runtime's own op type (ONNX Runtime's kernel, OpenVINO's
layer type after its fusions), so a role's time can be read down to what runs it."""


def by_role(times: Times) -> dict[str, float]:
    """Milliseconds by role, summed over op types."""
    roles: collections.Counter[str] = collections.Counter()
    for (role, _), ms in times.items():
        roles[role] += ms
    return dict(roles)


def openvino_times(models: dict[str, Path], images: np.ndarray, batch: int, threads: int, widths: Widths,
                   passes: int) -> dict[str, Times]:
    """Milliseconds by (role, op type) per model, summed over every timed call (one untimed call first)."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads,
              "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True}
    compiled = {name: core.compile_model(str(path), "CPU", config) for name, path in models.items()}
    roles = {name: {op.get_friendly_name(): _openvino_role(op, widths) for op in c.get_runtime_model().get_ops()}
             for name, c in compiled.items()}
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    for request in requests.values():
        request.infer({0: images[:batch]})
    totals: dict[str, Times] = {name: collections.Counter() for name in models}
    for feed in _feeds(images, batch, passes):
        for name, request in requests.items():
            request.infer({0: feed})
            for info in request.profiling_info:
                role = roles[name].get(info.node_name, OTHER)
                totals[name][role, info.node_type] += info.real_time.total_seconds() * 1e3
    return totals


def _openvino_role(op: Any, widths: Widths) -> str:
    kind = op.get_rt_info()["layerType"].astype(str)
    if kind == "Subgraph":
        return ATTENTION  # the MHA snippet: q.kT, softmax, attention.v fused
    shape = op.output(0).get_partial_shape() if op.get_output_size() else None
    n = shape[-1].get_length() if shape is not None and shape.rank.is_static and shape.rank.get_length() \
        and shape[-1].is_static else None
    if kind == "FullyConnected":
        return widths.gemm(op.input(0).get_partial_shape()[-1].get_length(), n)
    return widths.elementwise(n)


def ort_times(models: dict[str, Path], images: np.ndarray, batch: int, threads: int, widths: Widths,
              passes: int, spinning: bool = True) -> dict[str, Times]:
    """Milliseconds by (role, op type) per model from ORT's profiler, summed over every timed call.

    With `spinning` (ORT's default, as `make bench` times it) each profiled call comes right
    after an unprofiled call of the same session, so the other session's spinning threads have
    gone quiet (`validation.turns.ORT_IN_TURNS`); without it every call is profiled, in turns."""
    import onnxruntime as ort

    calls = 2 if spinning else 1  # per feed and session: a settling call, then the profiled one
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, path in models.items():
            options = ort_options_in_turns(threads, spinning=spinning)
            sessions[name] = ort.InferenceSession(str(path), profiling(options, f"{tmp}/{name}"), providers=["CPUExecutionProvider"])
        for session in sessions.values():
            session.run(None, {"pixel_values": images[:batch]})
        for feed in _feeds(images, batch, passes):
            for session in sessions.values():
                for _ in range(calls):
                    session.run(None, {"pixel_values": feed})
        return {name: _ort_roles(kernel_events(s, every=calls), widths) for name, s in sessions.items()}


def _ort_roles(events: list[dict[str, Any]], widths: Widths) -> Times:
    totals: Times = collections.Counter()
    for e in events:
        op, args = e["args"]["op_name"], e["args"]
        shape = next(iter(args["input_type_shape"][0].values())) if args.get("input_type_shape") else []
        if op in ("MatMul", "FusedMatMul", "Gemm") and len(shape) == 4 or op == "Softmax":
            role = ATTENTION  # per-head q.kT and attention.v, and their softmax
        else:
            out = next(iter(args["output_type_shape"][0].values())) if args.get("output_type_shape") else []
            if op in ("MatMul", "FusedMatMul", "Gemm"):
                role = widths.gemm(shape[-1], out[-1])
            else:
                role = widths.elementwise(out[-1] if out else None)
        totals[role, op] += e["dur"] / 1e3
    return totals


def _feeds(images: np.ndarray, batch: int, passes: int) -> list[np.ndarray]:
    return [images[s:s + batch] for _ in range(passes) for s in range(0, len(images) - batch + 1, batch)]


def bounds(times: dict[str, dict[str, float]], token_share: float, ideal: float) -> dict[str, float]:
    """Measured efficiency, the structure bound and the MLP GEMMs' efficiency (module docstring)."""
    dense, dyt = sum(times["dense"].values()), sum(times["dyt"].values())
    dense_mlp = sum(times["dense"].get(r, 0.0) for r in MLP_ROLES)
    dyt_mlp = sum(times["dyt"].get(r, 0.0) for r in MLP_ROLES)
    structure = dense - dense_mlp + dense_mlp * token_share
    return {"dense_ms": dense, "dyt_ms": dyt, "speedup": dense / dyt, "ideal": ideal,
            "efficiency": dense / dyt / ideal, "structure_bound": dense / structure / ideal,
            "mlp_gemm_efficiency": dense_mlp * token_share / dyt_mlp,
            "untouched_share_of_dense": (dense - dense_mlp) / dense}


def main(argv: list[str] | None = None) -> int:
    from dyt_export.cli.common import Parser
    from validation.bench_models import WORK
    from validation.cli import names_from, number, run_command

    p = Parser(prog="python -m validation.roles", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=WORK, help="make bench's work directory")
    p.add_argument("--rate", default="0.3", help="which calibrated DyT export (dyt-rRATE.onnx)")
    p.add_argument("--batch", type=number(int, 1), default=1)
    p.add_argument("--threads", type=number(int, 1), default=2)
    p.add_argument("--passes", type=number(int, 1), default=1)
    p.add_argument("--runtimes", type=names_from(CPU_RUNTIMES, "runtime"), default=list(CPU_RUNTIMES), help="ort-cpu,openvino (default)")
    p.add_argument("--ort-no-spinning", action="store_true",
                   help="profile ONNX Runtime without intra-op spinning, every call in turns (default: spinning, each profiled call after a settling one, as make bench times it)")
    p.add_argument("--by-op", action="store_true", help="also split each role's time by the runtime's op types")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return run_command(p, argv, _profile_roles)


def _profile_roles(args: argparse.Namespace) -> int:
    import torch

    from dyt_export import load_checkpoint
    from validation.bench_models import require_work_files
    from validation.costs import gmacs
    from validation.harness import check_output_file, write_json

    require_work_files(args.work, "pool.npy", f"dyt-r{args.rate}.pth", f"dyt-r{args.rate}.onnx", "dyt-r0.5-dense.onnx")
    if args.out:
        check_output_file(args.out)
    images = np.load(args.work / "pool.npy")
    model = load_checkpoint(args.work / f"dyt-r{args.rate}.pth")
    cfg = model.dyt_config
    with torch.no_grad():
        masks = model.trace(torch.from_numpy(images)).masks.numpy()
    token_share = float(masks.mean())  # rows of the MLP GEMMs, CLS included, over the dense rows
    ideal = float(gmacs(cfg, None).mean() / gmacs(cfg, masks).mean())
    models = {"dense": args.work / "dyt-r0.5-dense.onnx", "dyt": args.work / f"dyt-r{args.rate}.onnx"}
    widths = Widths(cfg.embed_dim, cfg.mlp_hidden_dim)
    record: dict[str, Any] = {"rate": args.rate, "batch": args.batch, "threads": args.threads, "images": len(images),
                              "ort_spinning": not args.ort_no_spinning,
                              "token_share": token_share, "ideal": ideal}
    for runtime in args.runtimes:
        if runtime == "ort-cpu":
            totals = ort_times(models, images, args.batch, args.threads, widths, args.passes, spinning=not args.ort_no_spinning)
        else:
            totals = openvino_times(models, images, args.batch, args.threads, widths, args.passes)
        profiled_images = len(images) * args.passes
        ops = {name: {(role, op): ms / profiled_images for (role, op), ms in t.items()} for name, t in totals.items()}
        per_image = {name: dict(sorted(by_role(t).items())) for name, t in ops.items()}
        record[runtime] = {"ms_per_image": per_image, **bounds(per_image, token_share, ideal),
                           "ms_per_image_by_op": {name: [[role, op, ms] for (role, op), ms in sorted(t.items())]
                                                  for name, t in ops.items()}}
        print(f"{runtime}, batch {args.batch}, activation {args.rate} (MLP rows {token_share:.3f} of dense):")
        for role in sorted(set(per_image["dense"]) | set(per_image["dyt"])):
            _print_row(role, per_image["dense"].get(role, 0.0), per_image["dyt"].get(role, 0.0), indent=2)
            if args.by_op:
                for op in sorted({op for t in ops.values() for r, op in t if r == role}):
                    _print_row(op, ops["dense"].get((role, op), 0.0), ops["dyt"].get((role, op), 0.0), indent=6)
        print("  " + json.dumps({k: round(v, 3) for k, v in record[runtime].items() if not k.startswith("ms_per_image")}))
    if args.out:
        write_json(args.out, record)
    return 0


def _print_row(label: str, dense_ms: float, dyt_ms: float, indent: int) -> None:
    print(f"{' ' * indent}{label:{38 - indent}s} dense {dense_ms:8.2f} ms  DyT {dyt_ms:8.2f} ms  "
          f"ratio {dense_ms / dyt_ms if dyt_ms else float('nan'):5.2f}")


if __name__ == "__main__":
    sys.exit(main())
