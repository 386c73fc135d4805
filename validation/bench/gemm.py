"""The machine's fp32 GEMM rate: the denominator of the benchmark's roofline ratio.

A large square matmul (`n`^3 multiply-adds) in each library the benchmark touches, at the
benchmark's thread count: numpy (its BLAS, OpenBLAS in the wheels), PyTorch (`torch.mm`:
MKL on x86), ONNX Runtime (one MatMul node: MLAS) and OpenVINO (one MatMul: oneDNN). The
machine's rate is the best of them, so the roofline is measured against the fastest GEMM
this machine is known to run, not against the runtime under test.

Each library keeps its own worker threads, and some spin after a call (OpenBLAS for a long
while), so libraries are timed one after the other, never interleaved with each other.
(Timing the model's own layer shapes, alone or chained, was an experiment:
docs/levers.md.)
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from runtimes.ort_session import session_options
from validation.bench.turns import ORT_IN_TURNS

LIBRARIES: tuple[str, ...] = ("numpy", "torch", "onnxruntime", "openvino")
DEFAULT_SIZE = 4096

Shape = tuple[int, int, int]
"""(m, k, n): an [m, k] x [k, n] product, m * k * n multiply-adds."""


def square(n: int) -> Shape:
    return (n, n, n)


def _operands(shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    m, k, n = shape
    a = rng.standard_normal((m, k), dtype=np.float32)
    return a, rng.standard_normal((k, n), dtype=np.float32) / np.float32(math.sqrt(k))


def _matmul_model(a: np.ndarray, b: np.ndarray) -> bytes:
    """An ONNX MatMul node with the weight as an initializer, as it is in a model."""
    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B0"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, list(a.shape))],
                              [helper.make_tensor_value_info("C", onnx.TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
                              [numpy_helper.from_array(b, "B0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def matmul_runner(library: str, shape: Shape, threads: int) -> Callable[[], np.ndarray]:
    """A zero-argument callable computing the fp32 product of `shape` in `library` into one
    product array, which it returns. Nothing is copied or allocated around the call, or that
    would be timed too: for ViT-B/16's fc1 at batch 32, ONNX Runtime's copy of the [6304, 3072]
    product out of `run` and OpenVINO's copy of the input into its request each cost 0-9 % of
    the call in four runs here."""
    a, b = _operands(shape)
    product = np.empty((len(a), b.shape[1]), np.float32)  # written in place, so no allocation is timed
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
        tb, out = torch.from_numpy(b), torch.from_numpy(product)

        def run_torch() -> np.ndarray:
            torch.mm(torch.from_numpy(a), tb, out=out)
            return product
        return run_torch
    if library == "onnxruntime":
        import onnxruntime as ort

        # also the load sensor timed in turns with ORT models
        session = ort.InferenceSession(_matmul_model(a, b), session_options(threads, session_config=ORT_IN_TURNS), providers=["CPUExecutionProvider"])
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
        compiled = core.compile_model(core.read_model(_matmul_model(a, b), b""), "CPU", {
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


def machine_gemm_rates(threads: int, n: int = DEFAULT_SIZE, reps: int = 3) -> dict[str, float]:
    """GMAC/s per library; the machine's rate is `max` of these."""
    return {library: gemm_rate(library, threads, square(n), reps) for library in LIBRARIES}
