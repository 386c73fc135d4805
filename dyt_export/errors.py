"""Errors the user can act on.

The command line turns a `UserError` into one line on stderr and exit code 2, a
`RuntimeFailed` into exit 4; anything else is a bug in the toolkit (exit 1). Raising UserError is a promise that the message
alone tells the user what to change.
"""
from __future__ import annotations

import re


class UserError(Exception):
    """Bad input: a file, flag or model the toolkit refuses, with a one-line reason."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not describe a model the toolkit can build."""


class RuntimeFailed(Exception):
    """A runtime failed while running valid inputs: neither the user's input nor a bug here
    (exit 4). `runtimes` raises it (as its `RuntimeFailure`); it is defined here so that every
    command maps it alike without the exporter importing the runtimes."""


def first_line(error: BaseException, skip: re.Pattern[str] | None = None) -> str:
    """The first line of `error`'s message that says anything and is not `skip`, at most 300
    characters ("" if none): Ray's and the runtimes' messages run to many lines, a traceback or
    C++ frames, and a one-line error needs the line that states the cause."""
    lines = (line.strip() for line in str(error).splitlines())
    return next((line for line in lines if line and not (skip and skip.match(line))), "")[:300]
