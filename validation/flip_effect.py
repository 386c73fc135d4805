"""What one near-threshold flip does to a model's logits (docs/validation.md): the measured
reason why the comparator holds an image with a flip to top-1 and a cosine of 0.95, not to
`max_rel` and `cosine_min`.

For each dispatcher in turn, the token whose dispatcher logit is nearest the threshold in
each image (the token most likely to flip legitimately in another runtime) is sent the other
way in the fp32 PyTorch model, and the logits are compared with the unforced run's.
Usage: python -m validation.flip_effect [--model m.onnx] [--limit N]   (default: the demo model)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from dyt_export.cli.common import Parser
from dyt_export.config import unit_module_names
from runtimes.torch_ref import TorchReference

from .cli import number, run_command
from .compare import row_cosines
from .data import SOURCES, load_inputs
from .demo import ensure_demo_model


def forced_flip(model: Any, pixels: torch.Tensor, dispatcher: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, |logit| of the forced token per image) with the token nearest the threshold
    at `dispatcher` ('blocks.{i}.{unit}') decided the other way in every image."""
    _, index, unit = dispatcher.split(".")
    select = getattr(model.blocks[int(index)], unit_module_names(unit)[1])
    decide = select.forward
    nearest: list[torch.Tensor] = []

    def flipped(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, logits = decide(x)
        token = logits.abs().argmin(dim=1)
        nearest.append(logits.abs().min(dim=1).values)
        rows = torch.arange(len(mask))
        mask = mask.clone()
        mask[rows, token + 1] = ~mask[rows, token + 1]  # +1: the logits skip CLS
        return mask, logits

    with mock.patch.object(select, "forward", flipped), torch.inference_mode():
        logits = model.trace(pixels, mode="dynamic").logits.float().numpy()
    return logits, nearest[0].numpy()


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m validation.flip_effect", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="ONNX model whose source checkpoint to use (default: the demo model)")
    p.add_argument("--data", default="digits", choices=SOURCES, help="image-like inputs (default: digits test split)")
    p.add_argument("--limit", type=number(int, 1), help="use at most this many images")
    p.add_argument("--debug", action="store_true")

    def body(args: argparse.Namespace) -> int:
        reference = TorchReference(args.model or ensure_demo_model().onnx, threads=1)
        model, cfg = reference.module, reference.module.dyt_config
        pixels = torch.from_numpy(load_inputs(args.data, cfg.img_size, cfg.in_chans, limit=args.limit).pixel_values)
        with torch.inference_mode():
            base = model.trace(pixels, mode="dynamic").logits.float().numpy()
        print(f"{len(pixels)} images; per dispatcher, the token nearest the threshold forced the other way:")
        print("| dispatcher | median nearest abs(logit) | cosine min | share below 0.9999 | max_rel max | top-1 kept |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in cfg.dispatcher_names:
            logits, nearest = forced_flip(model, pixels, name)
            cosine = row_cosines(logits, base)
            rel = np.abs(logits - base).max(axis=1) / np.abs(base).max()
            kept = (logits.argmax(axis=1) == base.argmax(axis=1)).mean()
            print(f"| {name} | {np.median(nearest):.3g} | {cosine.min():.6f} | {(cosine < 0.9999).mean():.3f} | "
                  f"{rel.max():.3g} | {kept:.4f} |")
        return 0

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
