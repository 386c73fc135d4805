"""Argument parsing shared by the subcommands: one-line errors, checkpoint override flags."""
from __future__ import annotations

import argparse
from typing import NoReturn

from ..errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError (one line, exit 2), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


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
