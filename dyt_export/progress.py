"""Timed steps: a transient spinner on a terminal while a step runs, a timing table at the end.

Nothing is printed per step, so a failure leaves exactly one line on stderr: the error; and
`quiet_logs` keeps the libraries' own log lines (exporter, quantizer) off the terminal.
"""
from __future__ import annotations

import contextlib
import logging
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

    def report(self) -> str:
        """One line per step with its duration, then the total."""
        lines = [f"  {name:<28} {seconds:7.2f} s" for name, seconds in self.timings.items()]
        lines.append(f"  {'total':<28} {sum(self.timings.values()):7.2f} s")
        return "\n".join(lines)


@contextlib.contextmanager
def quiet_logs(*names: str) -> Iterator[None]:
    """Drop records below CRITICAL from the named loggers ("" is the root) while the block runs.
    torch.onnx and onnxscript log advice and opset notes at WARNING through their own handlers
    (the "W1125 ... Setting ONNX exporter to use operator set version 18" lines); what matters
    to the user is in the result or in the one-line error."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
