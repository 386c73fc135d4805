"""The `dyt-export` command. `dyt-export CKPT ...` exports; `dyt-export <command> ...` runs a
subcommand. Bad input exits 2 with one line on stderr, a bug exits 1; --debug shows tracebacks.

Owns the command line and, in `common`, what every command of the toolkit shares: the exit
codes, one-line errors (`run_guarded`, `run_command`), the argparse `Parser` and the number
and name argument types (validation's and the benchmarks' commands take them from here too).
May import everything in `dyt_export`; never `validation`, and `runtimes` only from
`serve_cmd`, when `dyt-export serve` runs (the server lives in `runtimes.serving`; nothing in
`runtimes` imports this package, so no circle).
"""
from __future__ import annotations

import argparse
import sys
from types import ModuleType

from .. import __version__
from . import export_cmd, init_cmd, inspect_cmd, serve_cmd
from .common import Parser, run_guarded

SUBCOMMANDS: dict[str, ModuleType] = {"init": init_cmd, "inspect": inspect_cmd, "serve": serve_cmd}
"""Each module has DESCRIPTION, add_arguments(parser) and run(args) -> exit code."""


def _parser(name: str | None) -> Parser:
    module = SUBCOMMANDS[name] if name else export_cmd
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
        name = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        args = _parser(name).parse_args(argv[1:] if name else argv)
        return (SUBCOMMANDS[name] if name else export_cmd).run(args)

    return run_guarded(body, debug="--debug" in argv, prog="dyt-export")
