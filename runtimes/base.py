"""One small interface over every runtime, in the spirit of Polygraphy's runners.

A backend loads one model and runs numpy inputs; it knows nothing about DyT. Comparing
outputs, tolerances and reports belong to `validation`, not here.

Every backend checks its inputs against the model's declared inputs before running them
(`check_inputs`): a runtime fed a wrong dtype or shape fails deep inside with a message
about some internal node, and NaN/inf inputs would make a parity check pass or fail for
reasons that have nothing to do with the runtime.
"""
from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from dyt_export import errors
from dyt_export.errors import RuntimeFailed, UserError
from dyt_export.files import external_data_problem


class BackendError(UserError):
    """The runtime cannot do what was asked (unavailable, cannot load, bad input): one line,
    exit 2 from any command."""


class RuntimeFailure(BackendError, RuntimeFailed):
    """The runtime failed while running valid inputs on a loaded model (a kernel error, an
    exception from its own call): the runtime's fault, not the caller's. A BackendError, so
    callers that handle every backend problem alike keep doing so; callers that tell them
    apart catch it first (validation writes its record and exits 4, not 2)."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class TensorSpec:
    """A model input as the runtime declares it; None in `shape` is a dynamic axis."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


def check_inputs(inputs: Mapping[str, Any], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """`inputs` as contiguous numpy arrays, or BackendError naming the first thing wrong."""
    if not isinstance(inputs, Mapping):
        raise BackendError(f"inputs must be a dict of input name -> numpy array, got {type(inputs).__name__}; "
                           f"the model takes {', '.join(s.describe() for s in specs)}")
    expected = {s.name for s in specs}
    missing = sorted(expected - set(inputs))
    unexpected = sorted(set(inputs) - expected)
    if missing or unexpected:
        want = ", ".join(s.describe() for s in specs)
        detail = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(unexpected)}"
        raise BackendError(f"bad inputs ({detail}); the model takes {want}")
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise BackendError(f"input {spec.name} must be a numpy array, got {type(value).__name__}")
        if value.dtype != spec.dtype:
            raise BackendError(f"input {spec.name} has dtype {value.dtype}; the model takes {spec.describe()}")
        if value.ndim != len(spec.shape) or any(d is not None and d != v for d, v in zip(spec.shape, value.shape)):
            raise BackendError(f"input {spec.name} has shape {list(value.shape)}; the model takes {spec.describe()}")
        if 0 in value.shape:
            raise BackendError(f"input {spec.name} is empty (shape {list(value.shape)})")
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise BackendError(f"input {spec.name} holds {bad} NaN/inf value(s)")
        checked[spec.name] = np.ascontiguousarray(value)
    return checked


def check_fixed_batch(value: Any, backend: str) -> int | None:
    """The `fixed_batch` option of the ONNX backends: None (a dynamic batch) or a batch size.
    JSON options arrive as any type, and True would pass as the integer 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BackendError(f"{backend}: fixed_batch must be a positive integer, got {value!r}")
    return value


def require_file(model: Path | str, backend: str) -> Path:
    """The model path, or BackendError when there is no file to load."""
    path = Path(model)
    if not path.exists():
        raise BackendError(f"{backend}: model file {path} does not exist")
    if not path.is_file():
        raise BackendError(f"{backend}: {path} is not a file")
    return path


def load_failure(backend: str, path: Path, error: BaseException) -> BackendError:
    """The one-line error for a model the runtime could not load. A model whose weights sit in
    a separate file (`dyt-export --external-data`, or any model over 2 GB) that did not travel
    with it, or travelled cut short, makes both runtimes fail with a message about some tensor
    or offset (OpenVINO's names neither); name the file instead."""
    problem = external_data_problem(path)
    return BackendError(f"{backend} cannot load {path}: {problem or first_line(error)}")


_FRAME = re.compile(r"^Exception from \S+:\d+:?$")
"""OpenVINO's C++ frame lines ("Exception from src/inference/src/cpp/core.cpp:84:"), which
come before the cause."""


def first_line(error: BaseException) -> str:
    """The cause in one line. Runtimes raise multi-line messages: OpenVINO's start with one
    C++ frame line per call level and state the cause only after them, so the first line
    that is neither empty nor a frame is the one a user needs."""
    return errors.first_line(error, _FRAME) or type(error).__name__


class Backend(abc.ABC):
    """Load once in __init__, then `run` any number of times, from any number of threads at
    once (each backend's docstring says how it keeps concurrent calls apart).

    Options common to all: `threads` (None: the runtime's default) and `precision`
    ('fp32' runs the graph in the precision it was exported in, lowering nothing on the
    runtime's own initiative; OpenVINO's CPU plugin picks bf16 by default on CPUs with
    AVX512-BF16 or AMX, which breaks parity. 'bf16' lets OpenVINO lower on purpose; the
    precisions a backend takes are its `precisions`). Backend-specific options are keyword
    arguments of each subclass; unknown ones are an error, not ignored.

    Every `__init__` starts with `_set_common`, which checks availability before the
    backend imports its library: a missing library is a BackendError naming it, never a
    ModuleNotFoundError.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    threads: int | None
    precision: str

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> Availability:
        """Whether this backend can run here; the reason when not."""

    @abc.abstractmethod
    def __init__(self, model: Path, *, threads: int | None = None, precision: str = "fp32",
                 **options: Any) -> None: ...

    @property
    @abc.abstractmethod
    def input_specs(self) -> list[TensorSpec]:
        """The model's inputs as this runtime sees them."""

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs]

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name. Raises BackendError for inputs of the wrong name, dtype or shape,
        or with NaN/inf values, and RuntimeFailure when the runtime fails while running them."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Device and library versions, for records."""

    def notes(self) -> list[str]:
        """Lines a user should read about how the runtime took the model (e.g. compute it
        left on the CPU instead of the device asked for); validation logs them."""
        return []

    def _set_common(self, threads: int | None, precision: str) -> None:
        """Check that the runtime is available, then validate and store the options every backend takes."""
        available = self.availability()
        if not available:
            raise BackendError(f"{self.name} is not available: {available.reason}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise BackendError(f"{self.name}: threads must be a positive integer, got {threads!r}")
        if precision not in self.precisions:
            raise BackendError(f"{self.name}: precision {precision!r} is not supported; choose {', '.join(self.precisions)}")
        self.threads = threads
        self.precision = precision
