"""The machine's fp32 GEMM rate: the denominator of the benchmark's roofline ratio.

A large square matmul (`n`^3 multiply-adds) in each library the benchmark touches, at the
benchmark's thread count: numpy (its BLAS, OpenBLAS in the wheels), PyTorch (`torch.mm`:
MKL on x86), ONNX Runtime (one MatMul node: MLAS) and OpenVINO (one MatMul: oneDNN). The
machine's rate is the best of them, so the roofline is measured against the fastest GEMM
this machine is known to run, not against the runtime under test.

Each library keeps its own worker threads, and some spin after a call (OpenBLAS for a long
while), so libraries are timed one after the other, never interleaved with each other.

The same runners time any shape: `python -m validation.gemm --shapes 60x768x3072,...` probes a
kernel on a layer's own shape, and `validation.gemm_ceiling` times every layer of the
benchmark's model to bound its roofline. A `Chain` (`--chain 12`) times the shapes as a model
runs them: one after the other, each layer with its own weights, so they stream from memory
(12 ViT-B/16 MLPs hold 226 MB) instead of staying in cache as one shape's do call after call.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from validation.turns import ort_options_in_turns

LIBRARIES: tuple[str, ...] = ("numpy", "torch", "onnxruntime", "openvino")
DEFAULT_SIZE = 4096

Shape = tuple[int, int, int]
"""(m, k, n): an [m, k] x [k, n] product, m * k * n multiply-adds."""


def square(n: int) -> Shape:
    return (n, n, n)


def shape_name(shape: Shape) -> str:
    """MxKxN, as `--shapes` takes it and records key it."""
    return "x".join(map(str, shape))


@dataclass(frozen=True)
class Chain:
    """`shapes` in sequence (each one's N the next one's K), `layers` times over, every
    product with its own weights: [m, k0] x W1 x W2 x ... as a model's layers multiply."""

    shapes: tuple[Shape, ...]
    layers: int = 1

    def __post_init__(self) -> None:
        chain = self.steps
        if self.layers < 1 or len({m for m, _, _ in chain}) != 1 or any(a[2] != b[1] for a, b in zip(chain, chain[1:])):
            raise ValueError(f"chain {self.name}: each shape's N must be the next one's K (and the first's K the last's N "
                             "when repeated), with the same M throughout")

    @property
    def steps(self) -> tuple[Shape, ...]:
        return self.shapes * self.layers

    @property
    def name(self) -> str:
        return f"{self.layers} x ({', '.join(map(shape_name, self.shapes))})"


Job = Shape | Chain
"""What one runner computes: one product, or a chain of them."""


def steps(job: Job) -> tuple[Shape, ...]:
    """The products `job` computes, in order."""
    return job.steps if isinstance(job, Chain) else (job,)


def job_name(job: Job) -> str:
    return job.name if isinstance(job, Chain) else shape_name(job)


def macs(job: Job) -> int:
    return sum(map(math.prod, steps(job)))


def _operands(job: Job) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(steps(job)[0][:2], dtype=np.float32)
    return a, [rng.standard_normal((k, n), dtype=np.float32) / np.float32(math.sqrt(k))
               for _, k, n in steps(job)]  # scaled, so a chain's values stay near 1


def _matmul_model(m: int, weights: list[np.ndarray]) -> bytes:
    """An ONNX chain of MatMul nodes with the weights as initializers, as they are in a model."""
    import onnx
    from onnx import helper, numpy_helper

    names = ["A", *(f"C{i}" for i in range(1, len(weights))), "C"]
    graph = helper.make_graph([helper.make_node("MatMul", [x, f"B{i}"], [y]) for i, (x, y) in enumerate(zip(names, names[1:]))],
                              "gemm", [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [m, weights[0].shape[0]])],
                              [helper.make_tensor_value_info("C", onnx.TensorProto.FLOAT, [m, weights[-1].shape[1]])],
                              [numpy_helper.from_array(b, f"B{i}") for i, b in enumerate(weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def matmul_runner(library: str, job: Job, threads: int) -> Callable[[], np.ndarray]:
    """A zero-argument callable computing `job` (one fp32 matmul, or a chain) in `library` into
    one product array, which it returns. Nothing is copied or allocated around the call, or that
    would be timed too: for ViT-B/16's fc1 at batch 32, ONNX Runtime's copy of the [6304, 3072]
    product out of `run` and OpenVINO's copy of the input into its request each cost 0-9 % of
    the call in four runs here. (ONNX Runtime and OpenVINO allocate a chain's intermediate
    products, as they do in a model.)"""
    a, weights = _operands(job)
    # written in place, so no allocation is timed; ONNX Runtime and OpenVINO need the product's only
    written = weights if library in ("numpy", "torch") else weights[-1:]
    outs = [np.empty((len(a), b.shape[1]), np.float32) for b in written]
    product = outs[-1]
    if library == "numpy":
        from threadpoolctl import ThreadpoolController

        blas = ThreadpoolController()  # finding the BLAS libraries takes ~5 ms: once, not per call

        def run_numpy() -> np.ndarray:
            with blas.limit(limits=threads, user_api="blas"):
                x = a
                for b, out in zip(weights, outs):
                    x = np.matmul(x, b, out=out)
                return x
        return run_numpy
    if library == "torch":
        import torch

        torch.set_num_threads(threads)
        tensors = [(torch.from_numpy(b), torch.from_numpy(out)) for b, out in zip(weights, outs)]

        def run_torch() -> np.ndarray:
            x = torch.from_numpy(a)
            for b, out in tensors:
                x = torch.mm(x, b, out=out)
            return product
        return run_torch
    if library == "onnxruntime":
        import onnxruntime as ort

        # also the load sensor timed in turns with ORT models
        session = ort.InferenceSession(_matmul_model(len(a), weights), ort_options_in_turns(threads), providers=["CPUExecutionProvider"])
        binding = session.io_binding()
        binding.bind_cpu_input("A", a)
        binding.bind_output("C", "cpu", 0, np.float32, product.shape, product.ctypes.data)

        def run_onnxruntime() -> np.ndarray:
            session.run_with_iobinding(binding)
            return product
        return run_onnxruntime
    if library == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(_matmul_model(len(a), weights), b""), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        request.set_output_tensor(0, ov.Tensor(product, shared_memory=True))

        def run_openvino() -> np.ndarray:
            request.infer({0: a}, share_inputs=True, share_outputs=True)
            return product
        return run_openvino
    raise ValueError(f"unknown library {library!r}; choose one of {', '.join(LIBRARIES)}")


def gemm_rate(library: str, threads: int, job: Job = square(DEFAULT_SIZE), reps: int = 3) -> float:
    """GMAC/s of the fastest of `reps` timed calls, after one untimed call."""
    run = matmul_runner(library, job, threads)
    run()
    best = min(_timed(run) for _ in range(reps))
    return macs(job) / best / 1e9


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_rates(jobs: Iterable[tuple[str, Job]], threads: int, reps: int, rounds: int,
               log: Callable[[str], None] = lambda _: None) -> dict[tuple[str, Job], float]:
    """Each (library, job)'s best GMAC/s over `rounds` rounds of `reps` calls each: rounds
    spread every job's calls over the run, so a neighbour busy for a few seconds (this is a
    shared machine) does not decide a job's rate."""
    jobs = list(dict.fromkeys(jobs))
    best: dict[tuple[str, Job], float] = {}
    for round_ in range(rounds):
        log(f"round {round_ + 1} of {rounds}: {len(jobs)} GEMMs")
        for library, job in jobs:
            best[library, job] = max(gemm_rate(library, threads, job, reps), best.get((library, job), 0.0))
    return best


def machine_gemm_rates(threads: int, n: int = DEFAULT_SIZE, reps: int = 3) -> dict[str, float]:
    """GMAC/s per library; the machine's rate is `max` of these."""
    return {library: gemm_rate(library, threads, square(n), reps) for library in LIBRARIES}


def _shape(text: str) -> Shape:
    """An argparse type: MxKxN, three positive integers."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected MxKxN with positive integers, got {text!r}")
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    """--threads, --reps, --rounds (for `best_rates`) and --debug, for the GEMM-timing commands."""
    from validation.cli import number

    parser.add_argument("--threads", type=number(int, 1), default=2)
    parser.add_argument("--reps", type=number(int, 1), default=3, help="timed calls per shape and round; the fastest counts")
    parser.add_argument("--rounds", type=number(int, 1), default=3, help="rounds over all shapes; each shape's best counts")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def main(argv: list[str] | None = None) -> int:
    """`python -m validation.gemm --shapes 60x768x3072,64x768x3072`: each library's rate on
    each shape, for probing a kernel's behaviour (row counts, tiles) outside a model;
    `--shapes 60x768x3072,60x3072x768 --chain 12`: the rate of 12 such MLPs in a row."""
    from dyt_export.cli.common import Parser
    from validation.cli import names_from, number, run_command

    p = Parser(prog="python -m validation.gemm", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=lambda text: [_shape(s) for s in text.split(",")], required=True,
                   help="comma-separated MxKxN ([M, K] x [K, N])")
    p.add_argument("--libraries", type=names_from(LIBRARIES, "library"), default=list(LIBRARIES))
    p.add_argument("--chain", type=number(int, 1), metavar="LAYERS",
                   help="time the shapes as one chain, LAYERS times over with distinct weights (each N the next K)")
    add_timing_options(p)

    def body(args: argparse.Namespace) -> int:
        try:
            jobs: list[Job] = [Chain(tuple(args.shapes), args.chain)] if args.chain else args.shapes
        except ValueError as e:
            p.error(f"--chain: {e}")
        best = best_rates(((lib, job) for lib in args.libraries for job in jobs), args.threads, args.reps, args.rounds)
        print("| shape | " + " | ".join(args.libraries) + " |\n|---|" + "---:|" * len(args.libraries))
        for job in jobs:
            rates = " | ".join(f"{best[lib, job]:.3g}" for lib in args.libraries)
            print(f"| {job_name(job)} | {rates} |")
        return 0
    return run_command(p, argv, body)


if __name__ == "__main__":
    import sys

    sys.exit(main())
