"""`dyt-export CKPT`: checkpoint -> ONNX with the token dispatch kept data-dependent."""
from __future__ import annotations

import argparse
import math
import resource
from pathlib import Path

from ..atomic import check_output_path
from ..config import DEFAULT_OPSET, DISPATCH_MODES, INT8_ACTIVATIONS, OPSETS, parse_tome_r
from ..errors import UserError
from ..files import check_input_file
from ..preprocess import INTERPOLATIONS, read_labels, resolve_spec
from ..progress import Steps
from .common import add_checkpoint_overrides, checkpoint_overrides, merging_summary, onnx_output

DESCRIPTION = "Export a DyT checkpoint to ONNX with data-dependent token dispatch."
EXAMPLES = """\
examples:
  dyt-export model.pt                         # -> model.onnx, opset 18, real token skipping
  dyt-export model.pt -o vit.onnx --with-masks --opset 17
  dyt-export model.pt --dispatch dense        # all tokens active: the baseline to compare speed with
  dyt-export model.pt --external-data         # weights in model.onnx.data: lower peak memory on ONNX Runtime
  dyt-export model.pt --tome-r 8              # + token merging (ToMe): 8 tokens merged per block
  dyt-export checkpoint.pth --adapter-scale 0.1 --num-heads 12
  dyt-export model.pt --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --crop-pct 0.875 --labels classes.txt
  dyt-export inspect model.onnx               # what a checkpoint or ONNX file holds

other commands: inspect FILE, init, serve MODEL.onnx (see dyt-export <command> --help)
exit status: 0 success, 2 bad input (one line on stderr; --debug shows the traceback), 1 internal error
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="DyT checkpoint: public DyT layout (.pt/.pth) or dyt-export safetensors")
    parser.add_argument("-o", "--output", type=onnx_output, help="output ONNX path (default: CKPT with .onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=OPSETS, metavar="N",
                        help=f"ONNX opset, one of {', '.join(map(str, OPSETS))} (default {DEFAULT_OPSET})")
    parser.add_argument("--dispatch", choices=DISPATCH_MODES, default="dynamic",
                        help="dynamic: skipped tokens cost nothing (default); masked: training-time dense "
                             "multiply, for runtimes without data-dependent shapes; dense: every token active")
    parser.add_argument("--with-masks", action="store_true", help="add output token_masks [batch, dispatchers, tokens]")
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 weights and compute; LayerNorm, softmax and dispatcher logits stay fp32")
    parser.add_argument("--fp16-io", action="store_true", help="with --fp16: fp16 input and logits too")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weights and activations (ONNX Runtime quantization, static QDQ unless "
                             "--int8-activations dynamic); dispatchers stay float")
    parser.add_argument("--int8-activations", choices=INT8_ACTIVATIONS, default="static",
                        help="with --int8: static scales from calibration (default; one file for ONNX Runtime and "
                             "OpenVINO), or dynamic: scaled on every call, no calibration (faster and closer to fp32 "
                             "on ONNX Runtime without VNNI, slower on OpenVINO; docs/performance.md)")
    parser.add_argument("--external-data", action="store_true",
                        help="weights in OUTPUT.data beside the model (automatic above 1.8 GB); ONNX Runtime then "
                             "maps them from the file: lower peak memory (docs/performance.md)")
    parser.add_argument("--calibration-images", type=Path, metavar="NPY",
                        help="with --int8: preprocessed images [N, C, H, W] (.npy) to calibrate on "
                             "(default: 64 seeded image-like inputs)")
    parser.add_argument("--tome-r", type=parse_tome_r, metavar="R",
                        help="token merging (ToMe, no training needed): R tokens merged in every block, or a comma "
                             "list with one R per block; MLP dispatch only (docs/tome.md)")
    add_checkpoint_overrides(parser)
    add_preprocess_flags(parser)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or comma-separated numbers") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


def add_preprocess_flags(parser: argparse.ArgumentParser) -> None:
    """How images become inputs, recorded as dyt.preprocess for `dyt-export serve` and
    validation's image folders; the checkpoint's training args win where they say."""
    group = parser.add_argument_group("image preprocessing (recorded in the ONNX file as dyt.preprocess)")
    group.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                       help="per-channel mean of [0,1] pixels (default: the checkpoint's training args, else 0.5)")
    group.add_argument("--std", type=_floats, metavar="S[,S,S]",
                       help="per-channel std (default: the checkpoint's training args, else 0.5)")
    group.add_argument("--crop-pct", type=_fraction, metavar="F",
                       help="resize the short side to size/F, then crop the centre (default: training args, else 1.0)")
    group.add_argument("--interpolation", choices=INTERPOLATIONS,
                       help="resize filter (default: training args, else bicubic)")
    group.add_argument("--labels", type=Path, metavar="FILE", help="class names, one per line (dyt.labels)")


def preprocess_flags(args: argparse.Namespace) -> dict:
    return dict(mean=args.mean, std=args.std, crop_pct=args.crop_pct, interpolation=args.interpolation)


def run(args: argparse.Namespace) -> int:
    if args.fp16_io and not args.fp16:
        raise UserError("--fp16-io needs --fp16")
    if args.int8 and args.fp16:
        raise UserError("--int8 quantizes the fp32 export; drop --fp16")
    if args.int8 and args.external_data:
        raise UserError("--external-data is not supported with --int8 (the int8 model is a quarter of the size)")
    if args.calibration_images and not args.int8:
        raise UserError("--calibration-images needs --int8")
    if args.int8_activations != "static" and not args.int8:
        raise UserError("--int8-activations needs --int8")
    if args.calibration_images and args.int8_activations == "dynamic":
        raise UserError("--calibration-images has no use with --int8-activations dynamic (it takes no calibration)")
    # Everything checkable without torch first: importing it takes seconds.
    check_input_file(args.checkpoint)
    if args.labels:
        check_input_file(args.labels, "--labels")
    out: Path = args.output or args.checkpoint.with_suffix(".onnx")
    check_output_path(out, args.checkpoint)
    calibration = None
    if args.calibration_images:
        from ..quantize import load_calibration_file
        calibration = load_calibration_file(args.calibration_images)

    steps = Steps(show=True)
    with steps.step("import torch"):
        from ..checkpoint import load_checkpoint
        from ..export import export_onnx, summarize
    with steps.step("load checkpoint"):
        model = load_checkpoint(args.checkpoint, **checkpoint_overrides(args), tome_r=args.tome_r)
    cfg = model.dyt_config
    preprocess = resolve_spec(cfg, model.provenance.get("preprocess"), preprocess_flags(args))
    labels = read_labels(args.labels, cfg.num_classes) if args.labels else None
    options = dict(opset=args.opset, dispatch=args.dispatch, with_masks=args.with_masks, fp16=args.fp16,
                   fp16_io=args.fp16_io, preprocess=preprocess, labels=labels, steps=steps)
    external = None
    if args.int8:
        from ..quantize import calibration_images, check_calibration_shape, export_int8
        images = None  # dynamic activations take no calibration
        if args.int8_activations == "static":
            images = (calibration_images(cfg) if calibration is None
                      else check_calibration_shape(calibration, cfg, f"--calibration-images {args.calibration_images}"))
        export_int8(model, out, images, activations=args.int8_activations, **options)
    else:
        external = export_onnx(model, out, external_data=args.external_data, **options).external_data
    summary = summarize(out)
    ops = ", ".join(f"{k} {v}" for k, v in summary.dispatch_op_counts.items()) or "none"
    size_mb = (out.stat().st_size + (external.stat().st_size if external else 0)) / 1e6
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {out} ({size_mb:.1f} MB{', weights in ' + external.name if external else ''})")
    precision = f"int8 ({args.int8_activations} activations)" if args.int8 else "fp16" if args.fp16 else "fp32"
    print(f"  {cfg.variant} dispatch, {args.dispatch} mode, {precision}, "
          f"opset {summary.opset}, {len(cfg.dispatcher_names)} dispatchers, dispatch ops: {ops}")
    if cfg.tome_r is not None:
        print(f"  token merging (ToMe): {merging_summary(cfg)}")
    print(f"  images: {preprocess.describe()}{f'; {len(labels)} class names' if labels else ''}")
    print(steps.report())
    print(f"  peak memory {peak_mb:.0f} MB (resident, whole process)")
    return 0
