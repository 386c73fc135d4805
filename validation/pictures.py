"""Pictures of what the dispatchers do, after the DyT paper's Figures 5 and 6.

* `<prefix>-activation.png`: the fraction of patch tokens each dispatcher activates over
  the input images (Figure 5: rates differ per layer, and a layer at 0% is normal).
* `<prefix>-tokens.png`: input images with, per dispatcher, the tokens that skip the
  dispatched unit washed out in grey and the activated ones in full colour (Figure 6).

`python -m validation.pictures [MODEL]` takes an ONNX file from dyt-export (its source
checkpoint comes from the metadata) or a checkpoint; the masks are the PyTorch
reference's, which validation proves equal to every runtime's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .data import SOURCES, ImageSet, load_inputs

WASH = 0.75
"""How far a skipped token is blended toward grey in the overlays."""


def activation_chart(rates: np.ndarray, layers: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.2), dpi=120)
    positions = np.arange(len(layers))
    ax.bar(positions, rates * 100, color="#3b7dd8")
    ax.axhline(rates.mean() * 100, color="#d8503b", linestyle="--", linewidth=1, label=f"mean {rates.mean():.0%}")
    for x, rate in zip(positions, rates):
        ax.text(x, rate * 100 + 1.5, f"{rate:.0%}", ha="center", fontsize=8)
    ax.set_xticks(positions, [name.replace("blocks.", "").replace(".mlp", "") for name in layers])
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


def draw(model: Path, out: Path, *, prefix: str | None = None, data: str = "digits", images_dir: Path | None = None,
         count: int = 6, ref: Path | None = None, overrides: dict | None = None) -> list[Path]:
    """Both pictures for `model` (ONNX or checkpoint) on the given images; returns their paths."""
    from runtimes.torch_ref import TorchReference

    from .costs import activation_rates
    from .harness import RUN_CHUNK

    reference = TorchReference(ref or model, **{k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = reference.module.dyt_config
    if not cfg.dispatcher_names:
        from dyt_export.errors import UserError

        raise UserError(f"{model} has no token dispatchers: nothing to draw")
    inputs = load_inputs(data, cfg.img_size, cfg.in_chans, images_dir=images_dir)
    masks = np.concatenate([reference.run({"pixel_values": inputs.pixel_values[i:i + RUN_CHUNK]})["token_masks"]
                            for i in range(0, len(inputs), RUN_CHUNK)])
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or Path(model).stem
    layers = cfg.dispatcher_names
    rates = activation_rates(masks)
    shown = inputs.take(count)
    return [
        activation_chart(rates, layers, out / f"{prefix}-activation.png",
                         f"{prefix}: activated patch tokens per layer\n({len(inputs)} images, {inputs.source})"),
        token_grid(shown, masks[:count], layers, cfg.patch_size, out / f"{prefix}-tokens.png",
                   f"{prefix}: activated tokens in colour, skipped tokens greyed"),
    ]


def main(argv: list[str] | None = None) -> int:
    from .cli import run_guarded

    p = argparse.ArgumentParser(prog="python -m validation.pictures", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, nargs="?", help="ONNX file from dyt-export, or a checkpoint (default: the demo model)")
    p.add_argument("--ref", type=Path, help="checkpoint to use instead of the ONNX file's recorded source")
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="output directory (default docs/img)")
    p.add_argument("--prefix", help="file name prefix (default: the model's name)")
    p.add_argument("--data", default="digits", choices=SOURCES)
    p.add_argument("--images", type=Path, help="a folder of images (drawn first)")
    p.add_argument("--count", type=int, default=6, help="images in the overlay grid (default 6)")
    p.add_argument("--num-heads", type=int)
    p.add_argument("--adapter-scale", type=float)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    def body() -> int:
        if args.model is None:
            from .demo import ensure_demo_model

            args.model = ensure_demo_model(log=lambda line: print(line, file=sys.stderr)).onnx
        paths = draw(args.model, args.out, prefix=args.prefix, data=args.data, images_dir=args.images,
                     count=args.count, ref=args.ref,
                     overrides={"num_heads": args.num_heads, "adapter_scale": args.adapter_scale})
        for path in paths:
            print(path)
        return 0

    return run_guarded(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
