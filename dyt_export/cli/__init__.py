"""The `dyt-export` command. `dyt-export CKPT ...` exports; `dyt-export <command> ...` runs a
subcommand. Bad input exits 2 with one line on stderr, a bug exits 1; --debug shows tracebacks."""
from __future__ import annotations

import argparse
import sys
import traceback
from types import ModuleType

from .. import __version__
from ..errors import UserError
from . import export_cmd, init_cmd, inspect_cmd
from .common import Parser

SUBCOMMANDS: dict[str, ModuleType] = {"init": init_cmd, "inspect": inspect_cmd}
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
    debug = "--debug" in argv
    try:
        name = argv[0] if argv and argv[0] in SUBCOMMANDS else None
        args = _parser(name).parse_args(argv[1:] if name else argv)
        module = SUBCOMMANDS[name] if name else export_cmd
        return module.run(args)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"dyt-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dyt-export: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so, in one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"dyt-export: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
