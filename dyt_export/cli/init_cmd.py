"""`dyt-export init`: a DyT checkpoint in the toolkit's format from a timm architecture name."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import VARIANTS, parse_tome_r
from .common import checkpoint_output, merging_summary

DESCRIPTION = ("Create a DyT checkpoint (toolkit safetensors) from a timm ViT architecture name, with seeded "
               "random or given backbone weights; --activation calibrates the dispatchers (not trained).")
EXAMPLES = """\
examples:
  dyt-export init --backbone vit_base_patch16_224 --activation 0.5 -o vitb.safetensors
  dyt-export init --backbone vit_base_patch16_224 --variant attn_mlp --experts 4 --bottleneck 16 \\
      --adapter-scale 1.0 --num-classes 100 --seed 0 --weights timm_vitb.safetensors -o model.safetensors

--activation R biases every dispatcher so it passes about R of the patch tokens of seeded
image-like inputs; the file's metadata says so (calibrated, not trained). Nothing is downloaded.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, metavar="NAME",
                        help="timm ViT architecture, e.g. vit_base_patch16_224, vit_small_patch16_224")
    parser.add_argument("--variant", choices=VARIANTS, default="mlp", help="where tokens are dispatched (default mlp)")
    parser.add_argument("--experts", type=int, default=0, metavar="E",
                        help="0: plain adapter (default); E >= 1: MoE-adapter with E experts")
    parser.add_argument("--bottleneck", type=int, default=64, metavar="R", help="adapter bottleneck (default 64)")
    parser.add_argument("--adapter-scale", type=float, default=1.0, metavar="S", help="adapter scalar s (default 1.0)")
    parser.add_argument("--num-classes", type=int, metavar="K", help="classifier classes (default: the timm model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random tensor and calibration image (default 0)")
    parser.add_argument("--weights", type=Path, metavar="FILE",
                        help="timm ViT weights (safetensors) for the backbone; the head too if its class count fits")
    parser.add_argument("--activation", type=float, metavar="R",
                        help="calibrate dispatcher biases to activate about R in [0, 1] of the patch tokens")
    parser.add_argument("--tome-r", type=parse_tome_r, metavar="R",
                        help="record token merging (ToMe) in the checkpoint: R tokens merged per block, or one R per "
                             "block; exports then merge without --tome-r (MLP dispatch only; docs/tome.md)")
    parser.add_argument("-o", "--output", type=checkpoint_output, required=True, help="output checkpoint (.safetensors)")


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_output_path
    from ..files import check_input_file
    from ..progress import Steps

    # Paths first: importing torch and timm takes seconds.
    if args.weights is not None:
        check_input_file(args.weights, "--weights")
    check_output_path(args.output, *([args.weights] if args.weights else []))
    steps = Steps(show=True)
    with steps.step("import torch and timm"):
        from ..checkpoint import save
        from ..init_model import init_model
    with steps.step("build model" + (" and calibrate dispatchers" if args.activation is not None else "")):
        model = init_model(args.backbone, variant=args.variant, experts=args.experts, bottleneck=args.bottleneck,
                           adapter_scale=args.adapter_scale, num_classes=args.num_classes, seed=args.seed,
                           weights=args.weights, activation=args.activation, tome_r=args.tome_r)
    with steps.step("save"):
        save(model, args.output)
    cfg = model.dyt_config
    record = cfg.extra["init"]
    adapter = f"MoE-adapter E={cfg.experts}" if cfg.experts else "adapter"
    print(f"wrote {args.output}: {args.backbone}, {cfg.variant} dispatch, {adapter} r={cfg.bottleneck}, "
          f"{len(cfg.dispatcher_names)} dispatchers, {cfg.num_classes} classes")
    print(f"  backbone weights: {record['backbone_weights'] if isinstance(record['backbone_weights'], str) else args.weights}")
    print(f"  dispatchers: {record['dispatchers']}")
    if cfg.tome_r is not None:
        print(f"  token merging (ToMe): {merging_summary(cfg)}")
    print(steps.report())
    return 0
