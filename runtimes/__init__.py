"""Runtime backends behind one interface (`runtimes.base.Backend`).

`get_backend(name)` returns the class; `open_backend(name, model, ...)` checks that the
runtime is available here and loads the model, raising `BackendError` with one line
("ort-cuda is not available: ...") otherwise; a backend's `run` raises `RuntimeFailure`
when the runtime itself fails while running. Backends are imported lazily, so asking
for ONNX Runtime never imports OpenVINO or torch.

Owns running an ONNX file (ONNX Runtime's sessions and their options in `ort_session`,
OpenVINO, the CUDA driver and setup), the server on Ray Serve (`serving/`, `dyt-export
serve`) and the C++ library in `cpp/` (built with CMake by `make cpp`, not shipped in the
wheel). May import onnxruntime, openvino, numpy and
`dyt_export.files` / `dyt_export.errors` (file checks); only the PyTorch reference
(`torch_ref`) loads a checkpoint through `dyt_export`. Never `validation`: backends know
nothing about parity, records or DyT's dispatch.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from .base import Availability, Backend, BackendError, RuntimeFailure, TensorSpec, check_inputs

_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("runtimes.torch_ref", "TorchReference"),
    "ort-cpu": ("runtimes.ort_cpu", "OrtCpuBackend"),
    "ort-cuda": ("runtimes.ort_cuda", "OrtCudaBackend"),
    "openvino": ("runtimes.openvino_cpu", "OpenVinoCpuBackend"),
}
BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)
ONNX_RUNTIMES: tuple[str, ...] = ("ort-cpu", "ort-cuda", "openvino")
"""Backends that run an ONNX file (all but the PyTorch reference)."""
CPU_RUNTIMES: tuple[str, ...] = ("ort-cpu", "openvino")
"""The ONNX runtimes every machine here has (no GPU): the ones benchmarks and experiments time."""


def get_backend(name: str) -> type[Backend]:
    """The backend class registered under `name`."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown runtime {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def _option_names(cls: type[Backend]) -> list[str] | None:
    """The keyword options `cls` takes, its own and those its `**options` pass on to its base
    class's `__init__`; None when some `__init__` up the chain takes any keyword."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in parameters if p.kind == p.KEYWORD_ONLY and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names
    return None


def open_backend(name: str, model: Path | str, **options: Any) -> Backend:
    """Load `model` on runtime `name`, or BackendError saying why not (every backend checks
    its availability first)."""
    cls = get_backend(name)
    takes = _option_names(cls)
    if takes is not None:
        unknown = sorted(set(options) - set(takes))
        if unknown:
            raise BackendError(f"{name} takes no option {', '.join(map(repr, unknown))}; its options: {', '.join(takes)}")
    try:
        return cls(model, **options)
    except TypeError as e:  # a value of a type the backend cannot use
        raise BackendError(f"{name}: {e}") from None


__all__ = ["Availability", "Backend", "BackendError", "RuntimeFailure", "TensorSpec", "check_inputs", "BACKEND_NAMES",
           "ONNX_RUNTIMES", "CPU_RUNTIMES", "get_backend", "open_backend"]
