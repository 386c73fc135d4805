"""The machine's fp32 GEMM rate: the denominator of the benchmark's roofline ratio.

A large square matmul (`n`^3 multiply-adds) in each library the benchmark touches, at the
benchmark's thread count: numpy (its BLAS, OpenBLAS in the wheels), PyTorch (`torch.mm`:
MKL on x86), ONNX Runtime (one MatMul node: MLAS) and OpenVINO (one MatMul: oneDNN). The
machine's rate is the best of them, so the roofline is measured against the fastest GEMM
this machine is known to run, not against the runtime under test.

Each library keeps its own worker threads, and some spin after a call (OpenBLAS for a long
while), so libraries are timed one after the other, never interleaved with each other.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from validation.turns import ort_options_in_turns

LIBRARIES: tuple[str, ...] = ("numpy", "torch", "onnxruntime", "openvino")
DEFAULT_SIZE = 4096


def _operands(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)


def _matmul_model(b: np.ndarray) -> bytes:
    """A one-node ONNX MatMul with B as an initializer, as weights are in a model."""
    import onnx
    from onnx import helper, numpy_helper

    n = b.shape[0]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("C", onnx.TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def matmul_runner(library: str, n: int, threads: int) -> Callable[[], np.ndarray]:
    """A zero-argument callable computing one n x n x n fp32 matmul in `library` and returning
    the product (without a copy: a copy of the output would be timed too)."""
    a, b = _operands(n)
    if library == "numpy":
        from threadpoolctl import threadpool_limits

        def run_numpy() -> np.ndarray:
            with threadpool_limits(limits=threads, user_api="blas"):
                return a @ b
        return run_numpy
    if library == "torch":
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        return lambda: torch.mm(ta, tb).numpy()
    if library == "onnxruntime":
        import onnxruntime as ort

        # also the load sensor timed in turns with ORT models
        session = ort.InferenceSession(_matmul_model(b), ort_options_in_turns(threads), providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"A": a})[0]
    if library == "openvino":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(_matmul_model(b), b""), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        return lambda: request.infer({0: a}, share_outputs=True)[0]
    raise ValueError(f"unknown library {library!r}; choose one of {', '.join(LIBRARIES)}")


def gemm_rate(library: str, threads: int, n: int = DEFAULT_SIZE, reps: int = 3) -> float:
    """GMAC/s of the fastest of `reps` timed calls, after one untimed call."""
    run = matmul_runner(library, n, threads)
    run()
    best = min(_timed(run) for _ in range(reps))
    return n ** 3 / best / 1e9


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def machine_gemm_rates(threads: int, n: int = DEFAULT_SIZE, reps: int = 3) -> dict[str, float]:
    """GMAC/s per library; the machine's rate is `max` of these."""
    return {library: gemm_rate(library, threads, n, reps) for library in LIBRARIES}
