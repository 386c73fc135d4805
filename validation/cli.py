"""`python -m validation`: parity, accuracy and throughput of one ONNX model on one runtime.

Exit codes: 0 parity passed; 3 parity failed (the record is still written); 4 the runtime
failed while running the model (a kernel error, an exception from its own call: the record
is still written, holding the error, and parity did not pass); 2 bad input (missing or
unreadable model, unavailable runtime, bad option or output directory, all checked before
any work); 1 internal error. Errors are one line on stderr, bad arguments
included (the package's own argparse `Parser`, shared with `dyt-export`, and with
`python -m validation.pictures`, `validation.demo` and `validation.bench` through
`dyt_export.cli.common.run_command`); --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from dyt_export.cli.common import EXIT_OK, EXIT_PARITY, EXIT_RUNTIME_FAILURE, Parser, number, positive_ints, run_command
from dyt_export.config import parse_tome_r
from dyt_export.errors import UserError

from .data import SOURCES
from .stream import CHUNK
from .tolerances import LIMITS, TOLERANCES, check_tolerance

EPILOG = """examples:
  python -m validation --runtime openvino                 # the demo model (trained on first use)
  python -m validation --runtime ort-cpu --model m.onnx   # reference: the checkpoint in m.onnx's metadata
  python -m validation --runtime ort-cpu --model m.onnx --ref m.pth --out records/m --batches 1,8 --threads 1,2
  python -m validation --runtime openvino --option performance_hint=THROUGHPUT --option streams=2
  python -m validation --runtime openvino --option fixed_batch=8 --batches 8   # batch axis pinned to 8

parity rules (see validation/compare.py): a token-mask difference is a flip only when the
reference dispatcher logit is within --flip-logit of 0 (each flip is reported); any other
mask difference fails. With ToMe, an image whose reference merge was within --merge-tie of
another decision and whose masks (from that block on) or logits (beyond --max-rel) differ is
a merge tie (reported). Images without either are compared on logits: max|diff|/max|ref| <=
--max-rel and cosine >= --cosine-min. Images with one are compared on top-1 and cosine >=
--flip-cosine-min only. The same top-1 class is required on a --top1-min share of ALL
images, and at least a --logit-share-min share of the images must be compared on logits, or
the run fails with that reason. Defaults follow the model's precision (max-rel / cosine-min
/ flip-logit / top1-min):
{defaults};
flip-cosine-min {flip_cosine:g} (or --cosine-min when lower), logit-share-min {share:g} and merge-tie
{merge_tie:g} in every precision.
exit codes: 0 pass, 3 parity failure, 4 the runtime failed while running the model (record
written, with the error), 2 bad input or runtime not available, 1 internal error."""


def tolerance(name: str) -> Callable[[str], float]:
    """An argparse type for tolerance `name`, within the comparator's own LIMITS."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_tolerance(name, value)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


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


def parser() -> Parser:
    defaults = "; ".join(f"{name} {t.max_rel:g} / {t.cosine_min:g} / {t.flip_logit:g} / {t.top1_min:g}"
                         for name, t in TOLERANCES.items())
    fp32 = TOLERANCES["fp32"]
    p = Parser(prog="python -m validation", description=__doc__.splitlines()[0],
               epilog=EPILOG.format(defaults=defaults, flip_cosine=fp32.flip_cosine_min, share=fp32.logit_share_min,
                                    merge_tie=fp32.merge_tie),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", default="ort-cpu", help="ort-cpu (default), ort-cuda or openvino")
    p.add_argument("--model", type=Path, help="ONNX file exported by dyt-export (default: the demo model)")
    p.add_argument("--ref", type=Path, help="reference checkpoint (default: the source recorded in the model)")
    p.add_argument("--out", type=Path, help="output directory (default: validation/records/<model>/)")
    p.add_argument("--data", choices=SOURCES, help="image-like inputs (default: digits test split)")
    p.add_argument("--limit", type=number(int, 1), help="use at most this many images")
    p.add_argument("--batches", type=positive_ints, default=(1, 8, 32), help="batch sizes to time (default 1,8,32)")
    p.add_argument("--threads", type=positive_ints, default=(os.cpu_count() or 1,), help="thread counts (default: all cores)")
    p.add_argument("--ref-threads", type=number(int, 1),
                   help="torch threads of the untimed reference (default 1: spinning OpenMP threads crawl on busy cores)")
    p.add_argument("--iters", type=number(int, 1), default=20, help="minimum timed calls per row (default 20)")
    p.add_argument("--min-seconds", type=number(float, 0), default=1.0, help="minimum timed seconds per row (default 1)")
    p.add_argument("--warmup", type=number(int, 0), default=0,
                   help="minimum warm-up calls (every distinct batch runs once anyway)")
    p.add_argument("--no-throughput", action="store_true", help="parity and accuracy only")
    p.add_argument("--precision", default="fp32", help="runtime precision: fp32 (default) or bf16 (OpenVINO only)")
    p.add_argument("--max-rel", type=tolerance("max_rel"), help="logit tolerance (default: by model precision)")
    p.add_argument("--cosine-min", type=tolerance("cosine_min"), help="per-image cosine (default: by model precision)")
    p.add_argument("--flip-logit", type=tolerance("flip_logit"), help="flip window on |logit| (default: by model precision)")
    p.add_argument("--top1-min", type=tolerance("top1_min"),
                   help="share of all images that keep their top-1 class (default: by model precision)")
    p.add_argument("--flip-cosine-min", type=tolerance("flip_cosine_min"),
                   help="per-image cosine of the images with a flip (default 0.95, or --cosine-min when lower)")
    p.add_argument("--logit-share-min", type=tolerance("logit_share_min"),
                   help="share of the images that must be compared on logits, i.e. have no flip (default 0.5)")
    p.add_argument("--merge-tie", type=tolerance("merge_tie"),
                   help="ToMe matching margin within which a runtime may merge otherwise (default 1e-5)")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. performance_hint=THROUGHPUT, graph_optimization=basic")
    p.add_argument("--num-heads", type=number(int, 1), help="for a reference checkpoint that cannot state it")
    p.add_argument("--adapter-scale", type=number(float), help="for a reference checkpoint that cannot state it")
    p.add_argument("--trust-checkpoint", action="store_true", help="load foreign pickle globals as inert placeholders")
    p.add_argument("--tome-r", type=parse_tome_r, metavar="R",
                   help="validate the demo model exported with token merging (ToMe), as dyt-export --tome-r R")
    dataset = p.add_argument_group("datasets (docs/validation.md)")
    dataset.add_argument("--images", type=Path, metavar="DIR",
                         help="validate on this image folder instead of --data: image files (unlabeled) or one "
                              "subfolder per class (labeled: class index = sorted folder names); read in chunks")
    dataset.add_argument("--labels", type=Path, metavar="FILE",
                         help="class folder -> class index: JSON {folder: index}, or one folder name per line")
    dataset.add_argument("--strict", action="store_true", help="an unreadable image ends the run (default: skipped, listed)")
    dataset.add_argument("--chunk", type=number(int, 1), default=CHUNK,
                         help=f"images per chunk, the unit run, saved and resumed (default {CHUNK})")
    dataset.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                         help="shard the run over Ray Data actors: on the Ray cluster at ADDRESS, or a local instance")
    dataset.add_argument("--workers", type=number(int, 1), help="Ray actors (default: as many as the CPUs hold)")
    dataset.add_argument("--worker-threads", type=number(int, 1), default=1, help="CPUs (runtime threads) per actor (default 1)")
    dataset.add_argument("--resume", action="store_true", help="reuse the shards a killed run saved under OUT/partial/")
    p.add_argument("--quiet", action="store_true", help="print only the result line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    command = parser()

    def body(args: argparse.Namespace) -> int:
        # imports torch: here, so that --help and a refused argument stay instant
        from .harness import REFERENCE_THREADS, Options, validate

        log = (lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
        if args.images is not None and args.data is not None:
            raise UserError("--images DIR and --data are two sources of images: give one")
        overrides = {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}
        opts = Options(
            runtime=args.runtime, model=args.model, ref=args.ref, out=args.out, data=args.data or "digits",
            images=args.images, labels=args.labels, strict=args.strict, chunk=args.chunk, ray=args.ray,
            workers=args.workers, worker_threads=args.worker_threads, resume=args.resume,
            limit=args.limit, batches=args.batches, threads=args.threads, iters=args.iters,
            min_seconds=args.min_seconds, warmup=args.warmup, throughput=not args.no_throughput,
            precision=args.precision, tolerance_overrides=overrides, ref_threads=args.ref_threads or REFERENCE_THREADS,
            backend_options=dict(args.option),
            loader_overrides={"num_heads": args.num_heads, "adapter_scale": args.adapter_scale,
                              "trust_checkpoint": args.trust_checkpoint or None},
            tome_r=args.tome_r, show=not args.quiet)
        outcome = validate(opts, log=log)
        p, error = outcome.parity, outcome.error
        print(f"{'PASS' if outcome.passed else 'FAIL'} {outcome.record['runtime']} {outcome.record['model']['name']}: "
              f"{'runtime failure during the ' + error['stage'] if error else p.summary()} -> {outcome.json_path}")
        if error:
            print(f"{command.prog}: runtime failure: {error['message']}", file=sys.stderr)
            return EXIT_RUNTIME_FAILURE
        for failure in p.failures:
            print(f"  parity failure: {failure}", file=sys.stderr)
        return EXIT_OK if p.passed else EXIT_PARITY

    return run_command(command, argv, body)
