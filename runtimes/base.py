"""One small interface over every runtime, in the spirit of Polygraphy's runners.

A backend loads one model and runs numpy inputs; it knows nothing about DyT. Comparing
outputs, tolerances and reports belong to `validation`, not here.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class BackendError(Exception):
    """The runtime cannot do what was asked (unavailable, cannot load, bad input): one line."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


class Backend(abc.ABC):
    """Load once in __init__, then `run` any number of times.

    Options common to all: `threads` (None: the runtime's default) and `precision`
    ('fp32' asks the runtime not to lower precision on its own; OpenVINO's CPU plugin picks
    bf16 by default on CPUs with AVX512-BF16 or AMX, which breaks parity).
    """

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def availability(cls) -> Availability:
        """Whether this backend can run here; the reason when not."""

    @abc.abstractmethod
    def __init__(self, model: Path, *, threads: int | None = None, precision: str = "fp32",
                 **options: Any) -> None: ...

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name. Raises BackendError for inputs of the wrong name, dtype or shape,
        or with NaN/inf values."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Device and library versions, for records."""
