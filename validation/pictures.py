"""Pictures of what the dispatchers do, after the DyT paper's Figures 5 and 6.

* `<prefix>-activation.png`: the fraction of patch tokens each dispatcher activates over
  the input images (Figure 5: rates differ per layer, and a layer at 0% is normal).
* `<prefix>-tokens.png`: input images with, per dispatcher, the tokens that skip the
  dispatched unit washed out in grey and the activated ones in full colour (Figure 6). Not
  drawn for a model with token merging (ToMe): after a merge a token is no longer one patch.

`python -m validation.pictures [MODEL]` takes an ONNX file from dyt-export (its source
checkpoint comes from the metadata) or a checkpoint; the masks are the PyTorch
reference's, which validation proves equal to every runtime's. Options are checked and
the output directory probed before the model is loaded; both PNGs are staged and renamed
into place together, so a failure leaves neither.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from dyt_export.atomic import staged_outputs
from dyt_export.cli.common import Parser, number, run_command
from dyt_export.errors import UserError
from runtimes.torch_ref import TorchReference

from .costs import activation_rates
from .data import SOURCES, ImageSet, load_inputs

WASH = 0.75
"""How far a skipped token is blended toward grey in the overlays."""
MAX_COUNT = 64
"""Rows of the overlay grid at most (each ~180 px high): more than a page can show, and far
below the 2^16 px at which matplotlib refuses to draw."""


def activation_chart(rates: np.ndarray, layers: list[str], path: Path, title: str,
                     tokens: list[int] | None = None) -> Path:
    """Bars of `rates` per dispatcher; `tokens` (after ToMe merges) labels each with the tokens it sees."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.2), dpi=120)
    positions = np.arange(len(layers))
    ax.bar(positions, rates * 100, color="#3b7dd8")
    ax.axhline(rates.mean() * 100, color="#d8503b", linestyle="--", linewidth=1, label=f"mean {rates.mean():.0%}")
    for x, rate in zip(positions, rates):
        ax.text(x, rate * 100 + 1.5, f"{rate:.0%}", ha="center", fontsize=8)
    labels = [name.replace("blocks.", "").replace(".mlp", "") for name in layers]
    ax.set_xticks(positions, labels if tokens is None else [f"{label}\n{n} tok" for label, n in zip(labels, tokens)])
    ax.set_xlabel("block (dispatcher)")
    ax.set_ylabel("activated tokens (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def overlay(image01: np.ndarray, mask: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, 3] image with the tokens where `mask` [N-1] is False washed out."""
    grid = image01.shape[0] // patch
    active = mask.reshape(grid, grid).repeat(patch, axis=0).repeat(patch, axis=1)[..., None]
    return np.where(active, image01, image01 * (1 - WASH) + 0.5 * WASH)


def token_grid(images: ImageSet, masks: np.ndarray, layers: list[str], patch: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = images.pixels01()
    rows, cols = len(pictures), len(layers) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.5 * rows + 0.4), dpi=120, squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(pictures[r], interpolation="nearest")
        for c, layer in enumerate(layers, start=1):
            axes[r, c].imshow(overlay(pictures[r], masks[r, c - 1, 1:], patch), interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(layer.replace("blocks.", "block ").replace(".mlp", ""), fontsize=8)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw(model: Path | None, out: Path, *, prefix: str | None = None, data: str = "digits",
         images_dir: Path | None = None, count: int = 6, ref: Path | None = None, overrides: dict | None = None,
         log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Both pictures (the chart alone with ToMe) for `model` (ONNX or checkpoint; None: the demo model, trained on first
    use) on the given images; returns their paths."""
    # both import torch: here, so that --help and a refused argument stay instant
    from .demo.model import ensure_demo_model
    from .harness import REFERENCE_THREADS, check_output_dir
    from .stream import run_all

    if not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise UserError(f"count must be an integer from 1 to {MAX_COUNT}, got {count!r}")
    if prefix is not None and (Path(prefix).name != prefix or prefix in ("", ".", "..")):
        raise UserError(f"prefix {prefix!r} must be a plain file name prefix, not a path")
    check_output_dir(out)
    if model is None:
        model = ensure_demo_model(log=log).onnx
    prefix = prefix or Path(model).stem
    reference = TorchReference(ref or model, threads=REFERENCE_THREADS,
                               **{k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = reference.module.dyt_config
    if not cfg.dispatcher_names:
        raise UserError(f"{model} has no token dispatchers: nothing to draw")
    inputs = load_inputs(data, cfg.img_size, cfg.in_chans, images_dir=images_dir)
    masks = run_all(reference, inputs.pixel_values, ("token_masks",))["token_masks"]
    layers = cfg.dispatcher_names
    shown = inputs.take(count)
    names = (f"{prefix}-activation.png", f"{prefix}-tokens.png")[:1 if cfg.tome_r else 2]
    if cfg.tome_r:
        log(f"{prefix}: token merging (ToMe) makes later tokens stand for several patches; activation chart only")
    out.mkdir(parents=True, exist_ok=True)
    with staged_outputs(out / names[-1]) as stage:
        activation_chart(activation_rates(masks, cfg.dispatcher_tokens), layers, stage / names[0],
                         f"{prefix}: activated patch tokens per layer\n({len(inputs)} images, {inputs.source})",
                         cfg.dispatcher_tokens if cfg.tome_r else None)
        if not cfg.tome_r:
            token_grid(shown, masks[:count], layers, cfg.patch_size, stage / names[1],
                       f"{prefix}: activated tokens in colour, skipped tokens greyed")
    return [out / name for name in names]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m validation.pictures", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, nargs="?", help="ONNX file from dyt-export, or a checkpoint (default: the demo model)")
    p.add_argument("--ref", type=Path, help="checkpoint to use instead of the ONNX file's recorded source")
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="output directory (default docs/img)")
    p.add_argument("--prefix", help="file name prefix (default: the model's name)")
    p.add_argument("--data", default="digits", choices=SOURCES)
    p.add_argument("--images", type=Path, help="a folder of images (drawn first)")
    p.add_argument("--count", type=number(int, 1, MAX_COUNT), default=6,
                   help=f"images in the overlay grid (default 6, at most {MAX_COUNT})")
    p.add_argument("--num-heads", type=number(int, 1))
    p.add_argument("--adapter-scale", type=number(float))
    p.add_argument("--debug", action="store_true")

    def body(args: argparse.Namespace) -> int:
        paths = draw(args.model, args.out, prefix=args.prefix, data=args.data, images_dir=args.images,
                     count=args.count, ref=args.ref,
                     overrides={"num_heads": args.num_heads, "adapter_scale": args.adapter_scale},
                     log=lambda line: print(line, file=sys.stderr))
        for path in paths:
            print(path)
        return 0

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
