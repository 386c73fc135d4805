"""ONNX Runtime on the CUDA execution provider.

Needs the `onnxruntime-gpu` wheel (`make setup-cuda` swaps it in for `onnxruntime`: both
install the same `onnxruntime` module, so only one can be present) built for the CUDA major
version of the torch in this environment, and an NVIDIA GPU with a driver for it.
Availability asks ONNX Runtime itself rather than guessing from device files: the provider
must be compiled in, and a one-node session must start on it, with ORT's CPU fallback
disabled so that its failure (no device, a missing libcudart or libcudnn, a driver too old)
is the reason reported. The backend also refuses to run when a session starts on any other
provider, so a CUDA figure is never a CPU run in disguise.

The check runs with torch imported, as validation always does (it runs the reference):
torch loads its own CUDA and cuDNN libraries on import, and ORT's provider then binds to
those already in the process. A check without torch could pass where validation fails.

Options on top of `OrtBackend`'s: `device_id` (the GPU, as CUDA numbers them) and
`strict_placement` (1: refuse a model any of whose compute nodes ORT put on the CPU; shape
and index nodes it moves there on purpose are allowed, see `runtimes.ort_placement`).
`memory_arena=False` also applies to the GPU: the CUDA provider always allocates from an
arena, so the arena then grows by exactly what is asked (`kSameAsRequested`, not the next
power of two) and is shrunk back after every call, instead of keeping the high-water mark
of every shape the data-dependent graph has produced.

Inputs and outputs go through an IOBinding on the GPU (`OrtBackend._run_bound`).
TF32 is switched off (the CUDA EP enables it by default on Ampere and later, which rounds
matmul inputs to 10 mantissa bits and breaks fp32 parity); the backend takes only 'fp32'.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .base import Availability, BackendError, first_line
from .cuda_driver import device_label, query_driver
from .ort_session import OrtBackend

PROVIDER = "CUDAExecutionProvider"
PROBE_IR_VERSION = 8
"""The probe's IR version, below what every supported onnxruntime reads: onnx stamps its own
newest (IR 14 with onnx 1.23), which onnxruntime-gpu 1.31 refuses ("max supported IR version: 13")."""


def _probe_model() -> bytes:
    """The smallest model a session can start: y = Relu(x)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=PROBE_IR_VERSION).SerializeToString()


def _preload_cuda_libraries(ort: Any) -> str:
    """Let ORT load CUDA and cuDNN from the nvidia-* wheels (what the `[cuda,cudnn]` extras
    install; a no-op for libraries torch already loaded). ORT prints what it could not load
    on stdout; that text comes back here, for the reason when the session fails."""
    if not hasattr(ort, "preload_dlls"):
        return ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ort.preload_dlls()
    return " ".join(line.strip() for line in printed.getvalue().splitlines() if line.startswith("Failed to load"))


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 (ORT's logger reports why the
    CUDA provider did not load there, in colour, and nowhere else); the lines, without
    terminal colour codes, land in the yielded list when the block ends."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = re.sub(r"\x1b\[[0-9;]*m", "", sink.read().decode(errors="replace"))
            lines += [line.strip() for line in text.splitlines() if line.strip()]


def _ort_cause(lines: list[str]) -> str:
    """ORT's own words on why the provider did not start: the message of its first error line."""
    errors = [line for line in lines if re.match(r"^\S+ \S+ \[E:", line)]
    if not errors:
        return ""
    message = errors[0].split("] ", 1)[-1]
    status = re.search(r"\[ONNXRuntimeError\] : \d+ : \w+ : (.*)", message)
    return (status.group(1) if status else message)[:300]


@functools.cache
def cuda_availability() -> Availability:
    """Whether a session starts on CUDA here (asked once per process: starting CUDA costs seconds)."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401  (see the module docstring)
    try:
        import onnxruntime as ort
    except ImportError as e:
        return Availability(False, f"onnxruntime is not installed ({e})")
    if PROVIDER not in ort.get_available_providers():
        return Availability(False, f"the installed onnxruntime has no {PROVIDER} "
                                   "(install onnxruntime-gpu with `make setup-cuda`)")
    driver = query_driver()
    if driver.problem:
        return Availability(False, driver.problem)
    built_for = getattr(ort, "cuda_version", "") or ""  # "13.0" in onnxruntime-gpu
    major = built_for.split(".")[0]
    if driver.cuda_version and major.isdigit() and driver.cuda_version[0] < int(major):
        return Availability(False, f"the NVIDIA driver supports CUDA {driver.cuda_version[0]}.{driver.cuda_version[1]}, "
                                   f"onnxruntime-gpu {ort.__version__} is built for CUDA {built_for}: update the driver")
    missing = _preload_cuda_libraries(ort)
    with _native_stderr() as logged:
        try:
            session = ort.InferenceSession(_probe_model(), providers=[PROVIDER], enable_fallback=0)
        except Exception as e:  # ORT raises RuntimeError/Fail with the CUDA error text
            session, error = None, first_line(e)
    cause = _ort_cause(logged) or missing[:300]
    if session is None:
        return Availability(False, f"ONNX Runtime cannot start {PROVIDER}: {error}" + (f" ({cause})" if cause else ""))
    started = session.get_providers()
    if not started or started[0] != PROVIDER:
        return Availability(False, f"ONNX Runtime started {started[0] if started else 'no provider'} instead of {PROVIDER}"
                                   + (f": {cause}" if cause else ""))
    return Availability(True)


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    provider = PROVIDER
    binding_device = "cuda"

    @classmethod
    def availability(cls) -> Availability:
        return cuda_availability()

    def __init__(self, model: Path | str, *, device_id: int = 0, strict_placement: bool = False, **options: Any) -> None:
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise BackendError(f"{self.name}: device_id must be a CUDA device number >= 0, got {device_id!r}")
        if strict_placement not in (0, 1):  # JSON options arrive as 0/1 or true/false
            raise BackendError(f"{self.name}: strict_placement must be 0 or 1, got {strict_placement!r}")
        self.device_id = device_id
        self.strict_placement = bool(strict_placement)
        super().__init__(model, **options)
        if self.strict_placement:
            self._require_placement()

    def _require_placement(self) -> None:
        """BackendError in one line unless every compute node runs on CUDA."""
        if self.placement is None:
            raise BackendError(f"{self.name}: strict_placement cannot be checked: {self.placement_unknown()}")
        if self.placement.cpu_compute:
            ops = ", ".join(f"{op} x{n}" for op, n in self.placement.cpu_compute.items())
            raise BackendError(f"{self.name}: strict_placement: {sum(self.placement.cpu_compute.values())} compute "
                               f"node(s) of {self.path.name} run on the CPU, not {PROVIDER}: {ops}")

    def provider_options(self) -> dict[str, str]:
        return {"device_id": str(self.device_id), "use_tf32": "0",
                "arena_extend_strategy": "kNextPowerOfTwo" if self.memory_arena else "kSameAsRequested"}

    def run_options(self) -> Any:
        if self.memory_arena:
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{self.device_id}")
        return options

    def device(self) -> str:
        return device_label(self.device_id)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "strict_placement": self.strict_placement}
