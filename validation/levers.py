"""Experiment (issue 5, "levers"): which expression of the graph and which runtime settings make
the dispatch pay. Not a test; results and decisions are in docs/performance.md.

Every lever is timed against the shipped form in turns, call by call (`validation.turns`),
on the ViT-B/16 DyT that `make bench` builds (activation 0.5, its work directory), and its
outputs are checked against the shipped form's. ORT kernel-time profiles give each op type's
share, which bounds what a form change can win at all.

    flock -x /tmp/dyt-bench.lock .venv/bin/python -m validation.levers --work validation/records/bench/work
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import onnx

from runtimes import open_backend
from validation.compare import max_rel
from validation.graph_forms import FORMS
from validation.ort_profile import kernel_events, op_type_shares, profiling
from validation.turns import SETTLED_RUNTIMES, Runner, paired_ratio, row, take_turns

OPSET_DEFAULT = 18


FIXED_BATCH = object()
"""Option value replaced by each group's batch size (a session pinned to the batch it serves)."""
EXPERIMENTS = ("dispatch-ort", "dispatch-ov", "dispatcher-ort", "dispatcher-ov", "dense-part-ort", "dense-part-ov",
               "attention-ort", "attention-ov", "qkv-ort", "qkv-ov", "gelu-ov", "gelu-ort", "gelu-op-ort",
               "gelu-op-ov", "gather-back-ort", "gather-back-ov", "ort-session", "ort-pinned", "ov-config", "ov-pinned")
"""Every group of contenders `run` can time, for `--only`."""


def _form_file(source: Path, forms: list[str], out: Path) -> Path:
    model = onnx.load(str(source))
    for form in forms:
        model = FORMS[form](model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    return out


ModelFile = Path | Callable[[], Path]
"""A model file, or the `_lazy` maker of one."""
Contenders = dict[str, tuple[str, ModelFile, dict[str, Any]]]
"""name -> (runtime, model, backend options), timed in turns against the first."""


def _lazy(make: Callable[[], Path]) -> Callable[[], Path]:
    """A model file made on first use, so `--only` one group builds that group's models only
    (all of them take ~6 minutes and ~5 GB)."""
    return functools.cache(make)


def _group(contenders: Contenders, images: np.ndarray, batch: int, threads: int, passes: int) -> list[dict[str, Any]]:
    """Time contenders (name -> (runtime, model or its `_lazy` maker, backend options)) in
    turns; the first one is the reference for speed and outputs."""
    backends = {name: open_backend(runtime, path() if callable(path) else path, threads=threads, **opts)
                for name, (runtime, path, opts) in contenders.items()}
    probe = {"pixel_values": images[:batch]}
    outputs = {name: b.run(probe)["logits"] for name, b in backends.items()}
    first = next(iter(contenders))
    runners: dict[str, Runner] = {name: (lambda feed, b=b: b.run({"pixel_values": feed})) for name, b in backends.items()}
    settle = any(runtime in SETTLED_RUNTIMES for runtime, _, _ in contenders.values())
    latencies = take_turns(runners, images, batch, passes=passes, settle=settle)
    base = row(latencies[first], batch, threads, None).img_per_s
    rows = []
    for name, calls in latencies.items():
        r = row(calls, batch, threads, None)
        rows.append({"lever": name, "runtime": contenders[name][0], "batch": batch, "img_per_s": r.img_per_s,
                     "p50_ms": r.p50_ms, "vs_first": r.img_per_s / base,
                     "vs_first_paired": paired_ratio(latencies[first], calls),
                     "max_rel_vs_first": max_rel(outputs[name], outputs[first])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ort_profile(path: Path, images: np.ndarray, threads: int, runs: int = 2) -> dict[str, float]:
    """Share of kernel time per op type (ORT profiler), over `runs` calls on `images` after a first one."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), profiling(options, f"{tmp}/profile"), providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, {"pixel_values": images})
        return op_type_shares(kernel_events(session))


def _export_once(checkpoint: Path, out: Path, patch: Any, **options: Any) -> Path:
    """Export `checkpoint` to `out` (once; the file is kept) with one exporter attribute patched
    (`unittest.mock.patch.object(...)`), to time a model-code or exporter alternative."""
    from dyt_export import load_checkpoint
    from dyt_export.export import export_onnx

    if not out.exists():
        with patch:
            export_onnx(load_checkpoint(checkpoint), out, **options)
    return out


def _cls_sliced_forward(self: Any, x: Any) -> tuple[Any, Any]:
    """The dispatcher as exported before 2026-11-26: CLS sliced off the hidden state before the
    logit (an ONNX Slice copying [B, N-1, C] per layer), the mask a ones column concatenated
    with the patch tokens' threshold."""
    import torch
    import torch.nn.functional as F

    from dyt_export.config import THRESHOLD_LOGIT

    logits = F.linear(x[:, 1:, :].float(), self.mlp_head.weight.float(), self.mlp_head.bias.float()).squeeze(-1)
    cls = torch.ones_like(logits[:, :1], dtype=torch.bool)
    return torch.cat([cls, logits > THRESHOLD_LOGIT], dim=1), logits


def _gather_back_rowwise(x: Any, mask: Any, fn: Any, **_: Any) -> Any:
    """MLP rows put back by one Gather from `[zeros(1, C); rows]` (each token's 1-based active
    row, 0 for a skipped one: CumSum of the mask times the mask) instead of ScatterND into a
    zeros fill: no full-size zeros tensor and no scatter, one small Concat. Bit-identical."""
    import torch

    from dyt_export.model.gather import active_index

    b, n, c = x.shape
    rows = fn(x.reshape(b * n, c).index_select(0, active_index(mask)))
    active = mask.reshape(-1).to(torch.int64)
    source = active.cumsum(0) * active
    return x + torch.cat([torch.zeros_like(rows[:1]), rows]).index_select(0, source).reshape(b, n, c)


@functools.cache
def ort_optimized(source: Path, out: Path, threads: int) -> Path:
    """ONNX Runtime's own optimized graph of `source`, saved by a session that optimized it
    (once per process: the ort-session group and the start-up check both load it)."""
    path = out / "dyt-ort-optimized.onnx"
    open_backend("ort-cpu", source, threads=threads, optimized_model_path=path)
    return path


def _ort_transformers(source: Path, out: Path) -> Path:
    """ONNX Runtime's transformer optimizer (contrib ops, ORT-only): SkipLayerNormalization,
    BiasGelu/Gelu; it finds no attention to fuse in timm's qkv layout."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(source), model_type="vit", num_heads=12, hidden_size=768, opt_level=0).save_model_to_file(str(out))
    return out


def run(work: Path, out: Path, threads: int, passes: int, batches: list[int], only: set[str]) -> list[dict]:
    import dyt_export.export.onnx_export as exporter
    import dyt_export.model.block as block
    from dyt_export.model.dispatcher import TokenDispatcher

    out.mkdir(parents=True, exist_ok=True)
    pool = np.load(work / "pool.npy")
    dyt, dense = work / "dyt-r0.5.onnx", work / "dyt-r0.5-dense.onnx"
    files = {name: _lazy(functools.partial(_form_file, dyt, [name], out / f"dyt-{name}.onnx")) for name in FORMS}
    # the forms that touch the dense part too
    for name in ("linear_as_gemm", "attention_op", "split_qkv", "qkv_heads_first", "gelu_op"):
        files[f"dense-{name}"] = _lazy(functools.partial(_form_file, dense, [name], out / f"dense-{name}.onnx"))
    checkpoint = work / "dyt-r0.5.pth"
    # MLP units adding their rows into the residual inside the scatter (ScatterND reduction "add")
    scatter_add = _lazy(functools.partial(_export_once, checkpoint, out / "dyt-scatter_add.onnx", mock.patch.object(
        block, "rowwise_added", functools.partial(block.rowwise_added, add_in_scatter=True))))
    gather_back = _lazy(functools.partial(_export_once, checkpoint, out / "dyt-gather_back.onnx",
                                          mock.patch.object(block, "rowwise_added", _gather_back_rowwise)))
    cls_sliced = _lazy(functools.partial(_export_once, checkpoint, out / "dyt-cls_sliced.onnx",
                                         mock.patch.object(TokenDispatcher, "forward", _cls_sliced_forward)))
    # GELU as torchlib writes it, without the exporter's exact rewrite (dyt_export.export.rewrites)
    no_rewrite = mock.patch.object(exporter, "apply_exact_rewrites", lambda model: {})
    torch_gelu = {"dyt": _lazy(functools.partial(_export_once, checkpoint, out / "dyt-torch_gelu.onnx", no_rewrite)),
                  "dense": _lazy(functools.partial(_export_once, checkpoint, out / "dense-torch_gelu.onnx", no_rewrite,
                                                   dispatch="dense"))}
    opt_ort = _lazy(functools.partial(ort_optimized, dyt, out, threads))
    fused = {name: _lazy(functools.partial(_ort_transformers, path, out / f"{name}-ort-transformers.onnx"))
             for name, path in (("dyt", dyt), ("dense", dense))}

    def against_shipped(runtime: str, lever: str, dyt_form: ModelFile, dense_form: ModelFile) -> Contenders:
        """The shipped DyT and dense exports and the same lever applied to each, on one runtime."""
        return {"shipped": (runtime, dyt, {}), lever: (runtime, dyt_form, {}),
                "dense": (runtime, dense, {}), f"dense-{lever}": (runtime, dense_form, {})}

    def qkv_forms(runtime: str) -> Contenders:
        """The shipped exports and both other head splits of the qkv product, on one runtime."""
        forms = ("split_qkv", "qkv_heads_first")
        return {"shipped": (runtime, dyt, {}), **{form: (runtime, files[form], {}) for form in forms},
                "dense": (runtime, dense, {}), **{f"dense-{form}": (runtime, files[f"dense-{form}"], {}) for form in forms}}

    def pinned(runtime: str) -> Contenders:
        """The DyT and dense exports with a dynamic batch and with the batch axis pinned to
        the batch timed (`fixed_batch`), on one runtime."""
        return {"dynamic": (runtime, dyt, {}), "pinned": (runtime, dyt, {"fixed_batch": FIXED_BATCH}),
                "dense-dynamic": (runtime, dense, {}), "dense-pinned": (runtime, dense, {"fixed_batch": FIXED_BATCH})}

    ort_, ov = "ort-cpu", "openvino"
    experiments: dict[str, Contenders] = {
        "dispatch-ort": {"shipped": (ort_, dyt, {}), "scatter_add": (ort_, scatter_add, {}),
                         "gather_nd": (ort_, files["gather_nd"], {}), "compress": (ort_, files["compress"], {}),
                         "scatter_elements": (ort_, files["scatter_elements"], {})},
        "dispatch-ov": {"shipped": (ov, dyt, {}), "scatter_add": (ov, scatter_add, {}),
                        "gather_nd": (ov, files["gather_nd"], {}), "compress": (ov, files["compress"], {}),
                        "scatter_elements": (ov, files["scatter_elements"], {})},
        "dispatcher-ort": {"shipped": (ort_, dyt, {}), "cls_sliced": (ort_, cls_sliced, {})},
        "dispatcher-ov": {"shipped": (ov, dyt, {}), "cls_sliced": (ov, cls_sliced, {})},
        "dense-part-ort": {"shipped": (ort_, dyt, {}), "linear_as_gemm": (ort_, files["linear_as_gemm"], {}),
                           "ort-transformers": (ort_, fused["dyt"], {}),
                           "dense": (ort_, dense, {}), "dense-linear_as_gemm": (ort_, files["dense-linear_as_gemm"], {}),
                           "dense-ort-transformers": (ort_, fused["dense"], {})},
        "dense-part-ov": against_shipped(ov, "linear_as_gemm", files["linear_as_gemm"], files["dense-linear_as_gemm"]),
        "attention-ort": against_shipped(ort_, "attention_op", files["attention_op"], files["dense-attention_op"]),
        "attention-ov": against_shipped(ov, "attention_op", files["attention_op"], files["dense-attention_op"]),
        "qkv-ort": qkv_forms(ort_),
        "qkv-ov": qkv_forms(ov),
        "gelu-ov": against_shipped(ov, "torch_gelu", torch_gelu["dyt"], torch_gelu["dense"]),
        "gelu-ort": against_shipped(ort_, "torch_gelu", torch_gelu["dyt"], torch_gelu["dense"]),
        "gelu-op-ort": against_shipped(ort_, "gelu_op", files["gelu_op"], files["dense-gelu_op"]),
        "gelu-op-ov": against_shipped(ov, "gelu_op", files["gelu_op"], files["dense-gelu_op"]),
        "gather-back-ort": {"shipped": (ort_, dyt, {}), "gather_back": (ort_, gather_back, {})},
        "gather-back-ov": {"shipped": (ov, dyt, {}), "gather_back": (ov, gather_back, {})},
        "ort-session": {"all": (ort_, dyt, {}), "extended": (ort_, dyt, {"graph_optimization": "extended"}),
                        "basic": (ort_, dyt, {"graph_optimization": "basic"}),
                        "saved-optimized": (ort_, opt_ort, {"graph_optimization": "disable"}),
                        "no-spinning": (ort_, dyt, {"session_config": {"session.intra_op.allow_spinning": "0"}}),
                        "dynamic-block": (ort_, dyt, {"session_config": {"session.dynamic_block_base": "4"}}),
                        "fixed-batch": (ort_, dyt, {"fixed_batch": FIXED_BATCH}),
                        "no-arena": (ort_, dyt, {"memory_arena": False})},
        "ort-pinned": pinned(ort_),
        "ov-config": {"latency": (ov, dyt, {}), "bounded-batch": (ov, dyt, {"max_batch": 32}),
                      "throughput-hint": (ov, dyt, {"performance_hint": "THROUGHPUT", "streams": None}),
                      "pinning": (ov, dyt, {"pinning": True})},
        "ov-pinned": pinned(ov),
    }
    assert tuple(experiments) == EXPERIMENTS, "EXPERIMENTS names every experiment, in order"
    rows = []
    for name, contenders in experiments.items():
        if name not in only:
            continue
        for batch in batches:
            images = pool[: max(8, 2 * batch)]
            print(f"# {name}, batch {batch}", flush=True)
            at_batch = {lever: (runtime, path, {k: batch if v is FIXED_BATCH else v for k, v in opts.items()})
                        for lever, (runtime, path, opts) in contenders.items()}
            rows += [{"experiment": name, **r} for r in _group(at_batch, images, batch, threads, passes)]
    return rows


def startup(work: Path, out: Path, threads: int) -> list[dict[str, Any]]:
    """Seconds to a ready model: ORT session from the export vs from its saved optimized graph;
    OpenVINO compile without and with a model cache (second compile)."""
    dyt = work / "dyt-r0.5.onnx"
    cases = [("ort: export", "ort-cpu", dyt, {}),
             ("ort: saved optimized", "ort-cpu", ort_optimized(dyt, out, threads), {"graph_optimization": "disable"}),
             ("openvino: compile", "openvino", dyt, {}),
             ("openvino: cache warm", "openvino", dyt, {"cache_dir": str(out / "ov-cache")})]
    open_backend("openvino", dyt, threads=threads, cache_dir=str(out / "ov-cache"))  # fill the cache
    rows = []
    for label, runtime, path, opts in cases:
        t0 = time.perf_counter()
        open_backend(runtime, path, threads=threads, **opts)
        rows.append({"startup": label, "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from dyt_export.cli.common import Parser
    from validation.bench_models import WORK
    from validation.cli import number, positive_ints, run_command

    p = Parser(prog="python -m validation.levers", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=WORK, help="make bench's work directory")
    p.add_argument("--out", type=Path, default=Path("validation/records/levers"))
    p.add_argument("--threads", type=number(int, 1), default=2)
    p.add_argument("--passes", type=number(int, 1), default=2)
    p.add_argument("--batches", type=positive_ints, default=(1, 8))
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS), metavar="EXPERIMENT",
                   help=f"experiments to run (default all: {' '.join(EXPERIMENTS)})")
    p.add_argument("--profile", action="store_true", help="also write ORT op-type time shares")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return run_command(p, argv, _measure)


def _measure(args: argparse.Namespace) -> int:
    from validation.bench_models import require_work_files
    from validation.harness import check_output_dir, write_json

    require_work_files(args.work, "pool.npy", "dyt-r0.5.pth", "dyt-r0.5.onnx", "dyt-r0.5-dense.onnx")
    check_output_dir(args.out)
    record: dict[str, Any] = {"rows": run(args.work, args.out, args.threads, args.passes, list(args.batches), set(args.only))}
    record["startup"] = startup(args.work, args.out, args.threads)
    if args.profile:
        pool = np.load(args.work / "pool.npy")
        record["profile"] = {f"{name} b{b}": ort_profile(args.work / file, pool[:b], args.threads)
                             for name, file in (("dyt", "dyt-r0.5.onnx"), ("dense", "dyt-r0.5-dense.onnx"))
                             for b in args.batches}
    write_json(args.out / "levers.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
