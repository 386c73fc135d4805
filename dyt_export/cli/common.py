"""What every command of the toolkit shares: one-line errors and exit codes, running a
command (`run_command`), argument parsing and number types, checkpoint override flags.

The one module of command-line helpers: `dyt-export`, `python -m validation` (and its demo,
pictures and benchmark) and `python -m runtimes` take them from here. It imports nothing of
any command, so no command imports another to reach them."""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

from ..atomic import FULL_DISK
from ..config import DyTConfig
from ..errors import RuntimeFailed, UserError, first_line

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_PARITY, EXIT_RUNTIME_FAILURE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141
"""The exit codes of every command of the toolkit, defined here only: 0 success, 1 a bug, 2 bad
input or a full disk (both the user's to change), 3 a parity failure (validation: the
runtime's answers are not PyTorch's; the exporter never returns it), 4 a runtime that failed
while running a model (the runtime's fault: neither the input's nor a bug here; only the
commands that run runtimes raise it); 130 and 141 as a shell reports SIGINT and SIGPIPE
(128 + signal)."""


def run_guarded(body: Callable[[], int], *, debug: bool, prog: str) -> int:
    """`body()`'s exit code, or one line on stderr and the code for what went wrong; with
    `debug` the traceback comes first. A `RuntimeFailed` is checked before `UserError`: the
    runtimes' failure is also one of their `BackendError`s, which are UserErrors. A reader that leaves early (`... | head`) is not an error
    worth a line: the exit code says it, and stdout is pointed at /dev/null so that Python's
    last flush at exit does not fail again."""
    try:
        return body()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except RuntimeFailed as e:
        error, message, code = e, f"runtime failure: {e}", EXIT_RUNTIME_FAILURE
    except UserError as e:
        error, message, code = e, f"error: {e}", EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        error, message, code = e, "interrupted", EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so, in one line unless --debug
        if isinstance(e, OSError) and e.errno in FULL_DISK:  # outputs are staged, so nothing half-written stays
            where = f" writing {e.filename}" if e.filename else ""
            error, message, code = e, f"error: {e.strerror}{where}; free some space and run again", EXIT_BAD_INPUT
        else:
            more = " [...]" if len(str(e).strip().splitlines()) > 1 else ""  # --debug shows the rest
            error, message, code = e, f"internal error: {type(e).__name__}: {first_line(e)}{more} (rerun with --debug for the traceback)", EXIT_INTERNAL
    if debug:
        traceback.print_exception(error)
    print(f"{prog}: {message}", file=sys.stderr)
    return code


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError (one line, exit 2), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def run_command(parser: Parser, argv: list[str] | None, body: Callable[[argparse.Namespace], int]) -> int:
    """Parse `argv` (default: sys.argv) and run `body(args)`, bad arguments included in the
    one-line errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda: body(parser.parse_args(argv)), debug="--debug" in argv, prog=parser.prog)


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


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".ckpt", ".safetensors")
ONNX_SUFFIXES = (".onnx", ".data")


def output_file(text: str) -> Path:
    """`-o`'s type. A path ending in a separator names a directory, and `Path` would drop the
    separator and write a file of the directory's name instead."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a directory; give the output file's path")
    return Path(text)


def _output_refusing(suffixes: tuple[str, ...], writes: str, wanted: str) -> Callable[[str], Path]:
    """An `-o` type that refuses the other format's suffixes: `-o best.pth` on the exporter is
    most likely a typo that would overwrite a checkpoint with ONNX (and `init -o m.onnx` a
    belief that init exports), while inputs are judged by content whatever their name."""
    def parse(text: str) -> Path:
        path = output_file(text)
        if path.suffix.lower() in suffixes:
            raise argparse.ArgumentTypeError(f"{text} names a {path.suffix} file, but this command writes {writes}; "
                                             f"give a {wanted} path")
        return path
    return parse


onnx_output = _output_refusing(CHECKPOINT_SUFFIXES, "ONNX", ".onnx")
checkpoint_output = _output_refusing(ONNX_SUFFIXES, "a checkpoint (safetensors)", ".safetensors")


def add_checkpoint_overrides(parser: argparse.ArgumentParser) -> None:
    """Flags that say what a checkpoint cannot say about itself (see `load_checkpoint`)."""
    group = parser.add_argument_group("checkpoint reading")
    group.add_argument("--num-heads", type=int, metavar="H",
                       help="attention heads of a public DyT checkpoint (default: ViT convention, 192->3, 384->6, "
                            "768->12, 1024/1280->16); a dyt-export file records its own, and a different H is refused")
    group.add_argument("--adapter-scale", type=float, metavar="S",
                       help="adapter scalar s, a finite number (default: args.scale in the checkpoint, or the "
                            "dyt-export file's; required for public checkpoints without args.scale)")
    group.add_argument("--img-size", type=int, metavar="P",
                       help="serve at P x P pixels, resampling the position embedding (default: trained size)")
    group.add_argument("--trust-checkpoint", action="store_true",
                       help="load pickle globals outside the allow-list as inert placeholders (code never runs)")


def checkpoint_overrides(args: argparse.Namespace) -> dict:
    """load_checkpoint keywords from parsed flags; plain timm ViTs pass only with --dispatch dense."""
    dense = getattr(args, "dispatch", None) == "dense"  # export's other modes read the checkpoint as DyT
    return dict(num_heads=args.num_heads, adapter_scale=args.adapter_scale, img_size=args.img_size,
                dispatch="dense" if dense else None, trust_checkpoint=args.trust_checkpoint)


def merging_summary(cfg: DyTConfig) -> str:
    """One line on a model's token merging (ToMe): r per block and the tokens after each block,
    as `dyt-export` and `inspect` print it."""
    requested = cfg.tome_r or (0,)
    r = f"{requested[0]} per block" if len(set(requested)) == 1 else ",".join(map(str, requested))
    tokens = [cfg.num_tokens] + [entering - merged for entering, merged in cfg.merge_schedule]
    return f"r {r}; tokens {' -> '.join(map(str, tokens))}"
