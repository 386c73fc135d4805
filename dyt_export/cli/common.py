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
                       help="attention heads (default: ViT convention, 192->3, 384->6, 768->12, 1024/1280->16)")
    group.add_argument("--adapter-scale", type=float, metavar="S",
                       help="adapter scalar s (default: args.scale in the checkpoint; required without it)")
    group.add_argument("--img-size", type=int, metavar="P",
                       help="serve at P x P pixels, resampling the position embedding (default: trained size)")
    group.add_argument("--trust-checkpoint", action="store_true",
                       help="load pickle globals outside the allow-list as inert placeholders (code never runs)")


def checkpoint_overrides(args: argparse.Namespace) -> dict:
    """load_checkpoint keywords from parsed flags; plain timm ViTs pass only with --dispatch dense."""
    return dict(num_heads=args.num_heads, adapter_scale=args.adapter_scale, img_size=args.img_size,
                dispatch=getattr(args, "dispatch", None), trust_checkpoint=args.trust_checkpoint)
