"""ONNX Runtime on the CUDA execution provider.

Needs the `onnxruntime-gpu` wheel (`make setup-cuda` swaps it in for `onnxruntime`: both
install the same `onnxruntime` module, so only one can be present) and an NVIDIA GPU with
its driver. Availability checks both before any session is made, and the backend refuses
to run when ORT falls back to CPU, so a CUDA figure is never a CPU run in disguise.

TF32 is switched off (the CUDA EP enables it by default on Ampere and later, which rounds
matmul inputs to 10 mantissa bits and breaks fp32 parity); the backend takes only 'fp32'.
"""
from __future__ import annotations

from pathlib import Path

from .base import Availability
from .ort_session import OrtBackend

_NVIDIA_DEVICE = Path("/dev/nvidia0")


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    provider = "CUDAExecutionProvider"

    @classmethod
    def availability(cls) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return Availability(False, f"onnxruntime is not installed ({e})")
        if cls.provider not in ort.get_available_providers():
            return Availability(False, "the installed onnxruntime has no CUDAExecutionProvider "
                                       "(install onnxruntime-gpu with `make setup-cuda`)")
        if not _NVIDIA_DEVICE.exists():
            return Availability(False, f"no NVIDIA GPU found ({_NVIDIA_DEVICE} is missing)")
        return Availability(True)

    def _before_session(self) -> None:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels `make setup-cuda` installs
            ort.preload_dlls()

    def provider_options(self) -> dict[str, str]:
        return {"use_tf32": "0"}
