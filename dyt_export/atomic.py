"""Write outputs so that a failure never leaves a half-written file at the target path.

Files are written into a temporary directory beside the target (same filesystem, so the
final rename is atomic) and moved into place only when the whole job succeeded.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
FULL_BELOW_BYTES = 1 << 20
"""Free space under which a failed write is taken for a full disk."""


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
    target's directory (the file named like target last), on failure delete it. A failure on
    a full disk becomes OSError(ENOSPC) naming `target`, not the staging file."""
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
    except Exception as e:
        if not isinstance(e, UserError) and _disk_full(e, stage):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from e
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _disk_full(error: Exception, directory: Path) -> bool:
    """Whether `error` came from a full disk. Writers say so each their own way: OSError's
    errno, Rust's "(os error 28)" (safetensors), or nothing to the point (torch.save:
    "unexpected pos"), so the disk itself is asked last."""
    if isinstance(error, OSError) and error.errno in FULL_DISK:
        return True
    if any(f"(os error {n})" in str(error) or os.strerror(n) in str(error) for n in FULL_DISK):
        return True
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW_BYTES
    except OSError:
        return False
