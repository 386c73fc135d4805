"""The `dyt-export` command. `dyt-export CKPT ...` exports; `dyt-export <command> ...` runs a
subcommand. Bad input exits 2 with one line on stderr, a bug exits 1; --debug shows tracebacks.

Owns the command line and, in `common`, what every command of the toolkit shares: the exit
codes, one-line errors (`run_guarded`, `run_command`), the argparse `Parser` and the number
and name argument types (validation's and the benchmarks' commands take them from here too).
May import everything in `dyt_export`; never `validation` or `runtimes`. Subcommands that
live elsewhere (`serve`, in `runtimes.serving.command`) are entry points of the group
`dyt_export.commands`, loaded by name only when chosen.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from types import ModuleType

from .. import __version__
from . import export_cmd, init_cmd, inspect_cmd
from .common import Parser, run_guarded

SUBCOMMANDS: dict[str, ModuleType] = {"init": init_cmd, "inspect": inspect_cmd}
"""Each module has DESCRIPTION, add_arguments(parser) and run(args) -> exit code."""
COMMAND_GROUP = "dyt_export.commands"
"""Entry points naming more such modules: the server's command line lives beside the server."""


def _command(name: str) -> ModuleType | None:
    """The subcommand called `name`, built in or an entry point; None: `name` is no command
    (then it is the export's checkpoint argument)."""
    if name in SUBCOMMANDS:
        return SUBCOMMANDS[name]
    points = entry_points(group=COMMAND_GROUP, name=name)
    return next(iter(points)).load() if points else None


def _parser(name: str | None, module: ModuleType) -> Parser:
    prog = f"dyt-export {name}" if name else "dyt-export"
    parser = Parser(prog=prog, description=module.DESCRIPTION, epilog=getattr(module, "EXAMPLES", None),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dyt-export {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        command = _command(argv[0]) if argv else None
        name = argv[0] if command else None
        module = command or export_cmd
        args = _parser(name, module).parse_args(argv[1:] if name else argv)
        return module.run(args)

    return run_guarded(body, debug="--debug" in argv, prog="dyt-export")
