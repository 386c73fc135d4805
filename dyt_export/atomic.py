"""Write outputs so that a failure never leaves a half-written file at the target path.

Files are written into a temporary directory beside the target (same filesystem, so the
final rename is atomic) and moved into place only when the whole job succeeded.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def check_output_path(out: Path, *inputs: Path) -> None:
    """Refuse outputs that would overwrite an input or cannot be written, before any work."""
    out_resolved = out.resolve()
    for path in inputs:
        if path is not None and path.exists() and out_resolved == path.resolve():
            raise UserError(f"output path {out} is the input file; choose another -o")
    if out.exists() and out.is_dir():
        raise UserError(f"output path {out} is a directory")
    parent = out_resolved.parent
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist")
    probe_writable(parent, f"output directory {parent} is not writable")


def probe_writable(directory: Path, message: str) -> None:
    """Raise UserError(`message (reason)`) unless a file can be created in `directory`.
    A real probe: os.access says yes to root even on read-only filesystems."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UserError(f"{message} ({e.strerror or e})") from None


@contextlib.contextmanager
def staged_outputs(target: Path) -> Iterator[Path]:
    """Yield a staging directory beside `target`; on success move every file in it into
    target's directory (the file named like target last), on failure delete it."""
    target = target.resolve()
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise UserError(f"cannot write in {target.parent}: {e.strerror}") from None
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        names.sort(key=lambda name: name == target.name)  # the main file appears last
        for name in names:
            os.replace(stage / name, target.parent / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
