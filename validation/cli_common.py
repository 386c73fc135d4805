"""What the validation package's commands share: argument types and running a command body
with one-line errors.

One small module that imports nothing of the commands (`validation.cli`, `validation.demo`,
`validation.pictures`, `validation.bench`), so each of them imports it and none imports
another to reach it. Exit codes and the argparse `Parser` come from `dyt_export.cli.common`,
the one place every command of the toolkit takes them from; this module adds what only
commands that run runtimes need: a `RuntimeFailure` is exit 4, a `BackendError` bad input.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable

from dyt_export.cli.common import Parser, run_guarded
from dyt_export.errors import UserError
from runtimes.base import BackendError, RuntimeFailure


def number(cast: type, low: float = -math.inf, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: `cast(text)`, finite and within [low, high]. float('nan') parses,
    and a NaN count or duration would switch a check off silently."""
    kind = "integer" if cast is int else "number"

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if cast is int else 'a'} {kind}, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            bounds = (f" from {low:g} to {high:g}" if -math.inf < low and high < math.inf
                      else f" >= {low:g}" if low > -math.inf else f" <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"expected a finite {kind}{bounds}, got {text!r}")
        return value
    return parse


def names_from(allowed: tuple[str, ...], noun: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of `allowed` (a `noun`, for the message)."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"unknown {noun}(s) {', '.join(unknown) or repr(text)}; "
                                             f"choose from {', '.join(allowed)}")
        return names
    return parse


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers, each >= 1."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def run_command(parser: Parser, argv: list[str] | None, body: Callable[[argparse.Namespace], int]) -> int:
    """Parse `argv` and run `body(args)`, bad arguments included in the one-line errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: body(parser.parse_args(argv)), debug="--debug" in argv, prog=parser.prog,
                       bad_input=(UserError, BackendError), runtime_failure=(RuntimeFailure,))
