"""Open `torch.save` pickles without ever running code from the file.

Always `weights_only=True`. Beyond what torch itself allows (tensors, containers, numbers)
only data-only globals are allowed: `argparse.Namespace` (the public DyT code saves its
`args`) and numpy scalars and dtypes (metrics stored next to them). Any other global is
refused by name. With `trust=True` those globals are still never imported or called: each
is replaced by an inert placeholder, so the tensors load and the file's code does not run.
"""
from __future__ import annotations

import argparse
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

_NUMPY_SCALAR = getattr(np, "_core", np.core).multiarray.scalar  # numpy 2 moved it to numpy._core
_NUMPY_DTYPES = sorted({type(np.dtype(code)) for code in "?bhilqBHILQefdFD"}, key=str)  # Float64DType, ...
ALLOWED_GLOBALS: list[Any] = [argparse.Namespace, _NUMPY_SCALAR, np.dtype, *_NUMPY_DTYPES]
ALLOWED_NAMES = {"argparse.Namespace", "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype"}
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_BLOCKED = re.compile(r"GLOBAL ([\w.]+) whose module (\w+) is blocked")
_MAX_PLACEHOLDERS = 64


class Opaque:
    """Stands in for a global the file asked for; keeps its arguments, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return "<opaque object from checkpoint>"


def _foreign_globals(path: Path) -> list[str]:
    """Globals the file names that are outside the allow-list (zip format: all at once)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return [n for n in names if n not in ALLOWED_NAMES]


def _load(path: Path, placeholders: list[str]) -> Any:
    """torch.load with the allow-list; torch's own warnings about a damaged file ("Detected
    pickle protocol ...") are dropped, since the error this raises is reported in one line."""
    allowed = ALLOWED_GLOBALS + [(Opaque, name) for name in placeholders]
    with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)


def load_pickle(path: Path, *, trust: bool = False) -> Any:
    """The unpickled object, or CheckpointError naming what was refused and why."""
    is_zip = zipfile.is_zipfile(path)
    placeholders: list[str] = []
    if is_zip:
        try:
            foreign = _foreign_globals(path)
        except Exception:  # a damaged archive: torch.load below reports it properly
            foreign = []
        if foreign and not trust:
            raise CheckpointError(
                f"{path} needs globals outside the allow-list: {', '.join(foreign[:5])}; "
                "pass --trust-checkpoint to load them as inert placeholders (no code from the file runs)")
        placeholders = foreign
    for _ in range(_MAX_PLACEHOLDERS):
        try:
            return _load(path, placeholders)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            message = str(e)
            blocked = _BLOCKED.search(message)
            if blocked:  # torch never lets these modules load, allow-listed or not
                raise CheckpointError(f"{path} calls {blocked.group(1)} (module {blocked.group(2)} can run commands); "
                                      "refused even with --trust-checkpoint") from None
            found = _UNSUPPORTED.search(message)
            if found and found.group(1) not in placeholders:
                if not trust:
                    raise CheckpointError(
                        f"{path} needs a global outside the allow-list: {found.group(1)}; pass "
                        "--trust-checkpoint to load it as an inert placeholder (no code from the file runs)") from None
                placeholders.append(found.group(1))
                continue
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_reason(message, is_zip)})") from None
    raise CheckpointError(f"{path} names more than {_MAX_PLACEHOLDERS} foreign globals; refusing it")


def _reason(message: str, is_zip: bool) -> str:
    """The part of torch's error that says what is wrong with the file, in a few words; torch's
    advice about `weights_only=False` would be wrong here (that runs code from the file)."""
    lowered = message.lower()
    if "central directory" in lowered or "ran out of input" in lowered or "eof" in lowered or "truncated" in lowered:
        return "truncated or corrupt"
    if not is_zip and ("invalid load key" in lowered or "magic number" in lowered):
        return "not a torch.save file"
    marker = "WeightsUnpickler error:"
    if marker in message:
        detail = next((line.strip() for line in message.split(marker, 1)[1].splitlines() if line.strip()), "")
        return f"corrupt pickle data: {detail[:120]}" if detail else "corrupt pickle data"
    return message.splitlines()[0][:160] if message else "unreadable"
