"""ONNX Runtime on the CUDA execution provider.

Needs the `onnxruntime-gpu` wheel (`make setup-cuda` swaps it in for `onnxruntime`: both
install the same `onnxruntime` module, so only one can be present) and an NVIDIA GPU with
its driver and the CUDA/cuDNN libraries that wheel was built for. Availability asks ONNX
Runtime itself rather than guessing from device files: the provider must be compiled in,
and a one-node session must start on it, with ORT's CPU fallback disabled so that its
failure (no device, a missing libcudart or libcudnn, a driver too old) is the reason
reported. The backend also refuses to run when a session starts on any other provider, so
a CUDA figure is never a CPU run in disguise.

TF32 is switched off (the CUDA EP enables it by default on Ampere and later, which rounds
matmul inputs to 10 mantissa bits and breaks fp32 parity); the backend takes only 'fp32'.
"""
from __future__ import annotations

import functools

from .base import Availability, first_line
from .ort_session import OrtBackend

PROVIDER = "CUDAExecutionProvider"


def _probe_model() -> bytes:
    """The smallest model a session can start: y = Relu(x)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@functools.cache
def cuda_availability() -> Availability:
    """Whether a session starts on CUDA here (asked once per process: starting CUDA costs seconds)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return Availability(False, f"onnxruntime is not installed ({e})")
    if PROVIDER not in ort.get_available_providers():
        return Availability(False, f"the installed onnxruntime has no {PROVIDER} "
                                   "(install onnxruntime-gpu with `make setup-cuda`)")
    try:
        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels `make setup-cuda` installs
            ort.preload_dlls()
        session = ort.InferenceSession(_probe_model(), providers=[PROVIDER], enable_fallback=0)
    except Exception as e:  # ORT raises RuntimeError/Fail with the CUDA error text
        return Availability(False, f"ONNX Runtime cannot start {PROVIDER}: {first_line(e)}")
    started = session.get_providers()
    if not started or started[0] != PROVIDER:
        return Availability(False, f"ONNX Runtime started {started[0] if started else 'no provider'} instead of {PROVIDER}")
    return Availability(True)


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    provider = PROVIDER

    @classmethod
    def availability(cls) -> Availability:
        return cuda_availability()

    def provider_options(self) -> dict[str, str]:
        return {"use_tf32": "0"}
