"""Timed steps with a spinner on stderr, so long exports show life and end with a timing table."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

from rich.console import Console


@dataclass
class Steps:
    """Records how long each named step took; shows a spinner while one runs when `show`."""

    show: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    console: Console = field(default_factory=lambda: Console(stderr=True))

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.show and self.console.is_terminal:
            with self.console.status(f"{name}..."):
                yield
        else:
            yield
        self.timings[name] = time.perf_counter() - start
        if self.show:
            self.console.print(f"  {name}: {self.timings[name]:.2f} s", highlight=False)
