"""Running a job's shards, here or on Ray, with each finished one on disk, so a run that is
killed loses at most the shards in flight.

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
import time
from pathlib import Path
from typing import Any, Callable

from dyt_export.atomic import staged_outputs
from dyt_export.errors import UserError

from .stream import Evaluator, Job, Partial, progress_bar, run_chunks

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


def run_job(job: Job, store: ShardStore, local: Evaluator | None, *, ray: str | None, workers: int | None,
            worker_threads: int, show: bool, log: Callable[[str], None]) -> tuple[Partial, dict[str, Any]]:
    """The merged Partial of every shard of `job`, saved ones reused, run here by `local` or,
    when it is None, on Ray (`ray`: '' a local instance, else a cluster's address); and how it
    ran (the record's `execution`), with its rate over the whole run and after the first shard."""
    finished = store.finished()
    todo = [shard for shard in job.shards() if shard[0] not in finished]
    if finished:
        log(f"resuming: {len(finished)} of {len(job.shards())} shards already done in {store.directory}")
    threads = local.backend.threads if local is not None else worker_threads
    execution: dict[str, Any] = {"mode": "sequential" if local is not None else "ray", "chunk": job.chunk,
                                 "shards": len(job.shards()), "shards_resumed": len(finished), "workers": 1,
                                 "threads_per_worker": threads}
    done = sum(stop - start for index, start, stop in job.shards() if index in finished)
    arrivals: list[tuple[float, int]] = []  # (time, images) of each shard as it finished
    started = time.perf_counter()
    with progress_bar(show) as bar:
        task = bar.add_task(f"{job.runtime} vs torch", total=len(job.source), completed=done)

        def advance(images: int) -> None:
            arrivals.append((time.perf_counter(), images))
            bar.advance(task, images)

        if local is not None:
            part = run_chunks(job, local, todo, store.save, advance)
        else:
            from .on_ray import default_workers, ray_session, run_on_ray  # Ray is an extra: imported when asked for

            with ray_session(ray or None):
                execution["workers"] = workers = workers or default_workers(worker_threads)
                part = run_on_ray(job, todo, workers=workers, threads=worker_threads, save=store.save,
                                  advance=advance) if todo else Partial()
    for saved in finished.values():
        part = part.merge(saved)
    seconds = time.perf_counter() - started
    ran = sum(images for _, images in arrivals)
    steady = ((ran - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0])
              if len(arrivals) > 1 and arrivals[-1][0] > arrivals[0][0] else None)
    execution.update(seconds=seconds, images_per_s=ran / seconds if ran else None, steady_images_per_s=steady)
    return part, execution
