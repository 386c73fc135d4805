"""ONNX Runtime on the CPU execution provider: the default runtime and the parity yardstick
(it matches PyTorch to ~1e-7 in fp32)."""
from __future__ import annotations

from .base import Availability
from .ort_session import OrtBackend


class OrtCpuBackend(OrtBackend):
    name = "ort-cpu"
    provider = "CPUExecutionProvider"

    @classmethod
    def availability(cls) -> Availability:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return Availability(False, f"onnxruntime is not installed ({e})")
        if cls.provider not in ort.get_available_providers():
            return Availability(False, f"this onnxruntime build has no {cls.provider}")
        return Availability(True)
