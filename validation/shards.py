"""Finished shards on disk, so a run that is killed loses at most the shards in flight.

Each shard's `Partial` is written atomically (staged, then renamed: `dyt_export.atomic`) to
`OUT/partial/<runtime>/shard-NNNNN.json` as soon as it finishes, beside `job.json`, the key
of the job that made them (`stream.Job.key`: model and reference files, runtime options,
the images, the chunk size). `--resume` reuses the shards of the same job and runs only the
others; a run without it starts afresh. A resumed job whose key differs is refused in one
line, naming what changed: reusing shards of another model or dataset would mix two runs
into one record. The folder is removed once the record is written.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from dyt_export.atomic import staged_outputs
from dyt_export.errors import UserError

from .stream import Partial

KEY_FILE = "job.json"


class ShardStore:
    """Saved Partials of one job under `directory`."""

    def __init__(self, directory: Path, key: dict[str, Any], *, resume: bool) -> None:
        self.directory = Path(directory)
        self.key = key
        saved = self.directory / KEY_FILE
        if resume and saved.exists():
            try:
                before = json.loads(saved.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"--resume: cannot read {saved} ({e}); run without --resume to start over") from None
            changed = sorted(name for name in set(key) | set(before) if key.get(name) != before.get(name))
            if changed:
                raise UserError(f"--resume: the partial results in {self.directory} belong to another job "
                                f"({', '.join(changed)} changed); run without --resume to start over")
            return
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._write(saved, json.dumps(key, indent=1) + "\n")

    def finished(self) -> dict[int, Partial]:
        """Saved shards by index (a file cut short cannot exist: every write is a rename)."""
        return {int(path.stem.split("-")[1]): Partial.from_dict(json.loads(path.read_text()))
                for path in sorted(self.directory.glob("shard-*.json"))}

    def save(self, index: int, part: Partial) -> None:
        self._write(self.directory / f"shard-{index:05d}.json", json.dumps(part.to_dict(), allow_nan=False))

    def remove(self) -> None:
        """Delete the shards, and OUT/partial/ when no other runtime's are left in it."""
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.directory.parent.rmdir()

    @staticmethod
    def _write(path: Path, text: str) -> None:
        with staged_outputs(path) as stage:
            (stage / path.name).write_text(text)
