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
benchmark's model to bound its roofline.
"""
from __future__ import annotations

import argparse
import math
import time
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


def _operands(shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    m, k, n = shape
    rng = np.random.default_rng(0)
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)


def _matmul_model(m: int, b: np.ndarray) -> bytes:
    """A one-node ONNX MatMul with B as an initializer, as weights are in a model."""
    import onnx
    from onnx import helper, numpy_helper

    k, n = b.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("C", onnx.TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def matmul_runner(library: str, shape: Shape, threads: int) -> Callable[[], np.ndarray]:
    """A zero-argument callable computing one fp32 matmul of `shape` in `library` into one
    product array, which it returns. Nothing is copied or allocated around the call, or that
    would be timed too: for ViT-B/16's fc1 at batch 32, ONNX Runtime's copy of the [6304, 3072]
    product out of `run` and OpenVINO's copy of the input into its request each cost 0-9 % of
    the call in four runs here."""
    a, b = _operands(shape)
    product = np.empty((len(a), b.shape[1]), np.float32)  # written in place: no allocation is timed
    if library == "numpy":
        from threadpoolctl import ThreadpoolController

        blas = ThreadpoolController()  # finding the BLAS libraries takes ~5 ms: once, not per call

        def run_numpy() -> np.ndarray:
            with blas.limit(limits=threads, user_api="blas"):
                return np.matmul(a, b, out=product)
        return run_numpy
    if library == "torch":
        import torch

        torch.set_num_threads(threads)
        ta, tb, tp = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(product)
        return lambda: torch.mm(ta, tb, out=tp).numpy()
    if library == "onnxruntime":
        import onnxruntime as ort

        # also the load sensor timed in turns with ORT models
        session = ort.InferenceSession(_matmul_model(len(a), b), ort_options_in_turns(threads), providers=["CPUExecutionProvider"])
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
        compiled = core.compile_model(core.read_model(_matmul_model(len(a), b), b""), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        request.set_output_tensor(0, ov.Tensor(product, shared_memory=True))

        def run_openvino() -> np.ndarray:
            request.infer({0: a}, share_inputs=True, share_outputs=True)
            return product
        return run_openvino
    raise ValueError(f"unknown library {library!r}; choose one of {', '.join(LIBRARIES)}")


def gemm_rate(library: str, threads: int, shape: Shape = square(DEFAULT_SIZE), reps: int = 3) -> float:
    """GMAC/s of the fastest of `reps` timed calls, after one untimed call."""
    run = matmul_runner(library, shape, threads)
    run()
    best = min(_timed(run) for _ in range(reps))
    return math.prod(shape) / best / 1e9


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_rates(jobs: Iterable[tuple[str, Shape]], threads: int, reps: int, rounds: int,
               log: Callable[[str], None] = lambda _: None) -> dict[tuple[str, Shape], float]:
    """Each (library, shape)'s best GMAC/s over `rounds` rounds of `reps` calls each: rounds
    spread every shape's calls over the run, so a neighbour busy for a few seconds (this is a
    shared machine) does not decide a shape's rate."""
    jobs = list(dict.fromkeys(jobs))
    best: dict[tuple[str, Shape], float] = {}
    for round_ in range(rounds):
        log(f"round {round_ + 1} of {rounds}: {len(jobs)} GEMMs")
        for library, shape in jobs:
            best[library, shape] = max(gemm_rate(library, threads, shape, reps), best.get((library, shape), 0.0))
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
    each shape, for probing a kernel's behaviour (row counts, tiles) outside a model."""
    from dyt_export.cli.common import Parser
    from validation.cli import names_from, run_command

    p = Parser(prog="python -m validation.gemm", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=lambda text: [_shape(s) for s in text.split(",")], required=True,
                   help="comma-separated MxKxN ([M, K] x [K, N])")
    p.add_argument("--libraries", type=names_from(LIBRARIES, "library"), default=list(LIBRARIES))
    add_timing_options(p)

    def body(args) -> int:
        best = best_rates(((lib, shape) for lib in args.libraries for shape in args.shapes),
                          args.threads, args.reps, args.rounds)
        print("| shape | " + " | ".join(args.libraries) + " |\n|---|" + "---:|" * len(args.libraries))
        for shape in args.shapes:
            rates = " | ".join(f"{best[lib, shape]:.3g}" for lib in args.libraries)
            print(f"| {shape_name(shape)} | {rates} |")
        return 0
    return run_command(p, argv, body)


if __name__ == "__main__":
    import sys

    sys.exit(main())
