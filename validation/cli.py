"""`python -m validation`: parity, accuracy and throughput of one ONNX model on one runtime.

Exit codes: 0 parity passed; 3 parity failed (the record is still written); 2 bad input
(missing or unreadable model, unavailable runtime, bad option); 1 internal error. Errors
are one line on stderr; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_PARITY = 0, 1, 2, 3

EPILOG = """examples:
  python -m validation --runtime openvino                 # the demo model (trained on first use)
  python -m validation --runtime ort-cpu --model m.onnx   # reference: the checkpoint in m.onnx's metadata
  python -m validation --runtime ort-cpu --model m.onnx --ref m.pth --out records/m --batches 1,8 --threads 1,2
  python -m validation --runtime openvino --option performance_hint=THROUGHPUT --option streams=2

parity rules (see validation/compare.py): a token-mask difference is a flip only when the
reference dispatcher logit is within --flip-logit of 0 (each flip is reported); any other
mask difference fails. Logits of images without flips must satisfy max|diff|/max|ref| <=
--max-rel and cosine >= --cosine-min, with the same top-1 class.
exit codes: 0 pass, 3 parity failure, 2 bad input or runtime not available, 1 internal error."""


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _option(text: str) -> tuple[str, Any]:
    """KEY=VALUE; VALUE is read as JSON when it parses (numbers, true/false), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parser() -> argparse.ArgumentParser:
    from .compare import COSINE_MIN, FLIP_LOGIT, MAX_REL
    from .data import SOURCES

    p = argparse.ArgumentParser(prog="python -m validation", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", default="ort-cpu", help="ort-cpu (default), ort-cuda or openvino")
    p.add_argument("--model", type=Path, help="ONNX file exported by dyt-export (default: the demo model)")
    p.add_argument("--ref", type=Path, help="reference checkpoint (default: the source recorded in the model)")
    p.add_argument("--out", type=Path, help="output directory (default: validation/records/<model>/)")
    p.add_argument("--data", default="digits", choices=SOURCES, help="image-like inputs (default: digits test split)")
    p.add_argument("--images", type=Path, help="a folder of images added to the inputs")
    p.add_argument("--limit", type=int, help="use at most this many images")
    p.add_argument("--batches", type=_ints, default=(1, 8, 32), help="batch sizes to time (default 1,8,32)")
    p.add_argument("--threads", type=_ints, default=(os.cpu_count() or 1,), help="thread counts (default: all cores)")
    p.add_argument("--iters", type=int, default=20, help="minimum timed calls per row (default 20)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds per row (default 1)")
    p.add_argument("--warmup", type=int, default=0, help="minimum warm-up calls (every distinct batch runs once anyway)")
    p.add_argument("--no-throughput", action="store_true", help="parity and accuracy only")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (OpenVINO only)")
    p.add_argument("--max-rel", type=float, default=MAX_REL, help=f"logit tolerance (default {MAX_REL:g})")
    p.add_argument("--cosine-min", type=float, default=COSINE_MIN, help=f"per-image cosine (default {COSINE_MIN})")
    p.add_argument("--flip-logit", type=float, default=FLIP_LOGIT, help=f"flip window on |logit| (default {FLIP_LOGIT:g})")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. performance_hint=THROUGHPUT, graph_optimization=basic")
    p.add_argument("--num-heads", type=int, help="for a reference checkpoint that cannot state it")
    p.add_argument("--adapter-scale", type=float, help="for a reference checkpoint that cannot state it")
    p.add_argument("--trust-checkpoint", action="store_true", help="load foreign pickle globals as inert placeholders")
    p.add_argument("--quiet", action="store_true", help="print only the result line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run_guarded(body: Callable[[], int], debug: bool) -> int:
    """Run `body`, turning the toolkit's errors into one line and an exit code."""
    from dyt_export.errors import UserError
    from runtimes.base import BackendError

    try:
        return body()
    except (UserError, BackendError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line unless asked for more
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        from .compare import Tolerances
        from .harness import Options, validate

        log = (lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
        opts = Options(
            runtime=args.runtime, model=args.model, ref=args.ref, out=args.out, data=args.data, images=args.images,
            limit=args.limit, batches=args.batches, threads=args.threads, iters=args.iters,
            min_seconds=args.min_seconds, warmup=args.warmup, throughput=not args.no_throughput,
            precision=args.precision, tolerances=Tolerances(args.max_rel, args.cosine_min, args.flip_logit),
            backend_options=dict(args.option),
            loader_overrides={"num_heads": args.num_heads, "adapter_scale": args.adapter_scale,
                              "trust_checkpoint": args.trust_checkpoint or None},
            show=not args.quiet)
        outcome = validate(opts, log=log)
        p = outcome.parity
        print(f"{'PASS' if p.passed else 'FAIL'} {outcome.record['runtime']} {outcome.record['model']['name']}: "
              f"max_rel {p.max_rel:.2e}, top-1 agreement {p.top1_agreement:.4f}, flips {len(p.flips)} "
              f"-> {outcome.json_path}")
        for failure in p.failures:
            print(f"  parity failure: {failure}", file=sys.stderr)
        return EXIT_OK if p.passed else EXIT_PARITY

    return run_guarded(body, args.debug)
