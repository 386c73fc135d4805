"""The demo model: a small DyT trained on first use, exported, and cached for the demo
command (validation/demo/cli.py), `python -m validation` and the pictures without `--model`,
and the benchmark's int8 accuracy check.

The demo model is a small DyT trained here on scikit-learn's digits (validation/demo/train.py),
saved in the public DyT training code's checkpoint layout (full training checkpoint with
`args`) and cached with its ONNX export under `.cache/demo/` (override with DYT_CACHE_DIR).
The cache is keyed by the training recipe (the ONNX file also by the checkpoint's hash and the
exporter's graph form); `--retrain` ignores it. The export carries its token masks, the digit
names and how its images were prepared (bilinear upscaling), so `make serve` serves it with
activation rates on its image route, and validation compares its own masks (no mask twin).

Geometry (validation/demo/train.py `Recipe`): 32x32 inputs (8x8 digits upscaled 4x), patch 4,
so each token is one digit pixel and the 64 patch tokens split cleanly into strokes and
empty background, which is what a token dispatcher should learn to tell apart; width 96,
4 blocks, 3 heads, MLP 384, adapter bottleneck 16: the largest model whose two training
phases fit ~1-2 minutes on 2 CPU cores. Width 96 has no conventional head count, so the
checkpoint needs `--num-heads 3` when given to dyt-export alone (the ONNX metadata carries it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dyt_export.preprocess import PreprocessSpec

from .train import Recipe

CHECKPOINT_NAME = "dyt_digits.pth"
ONNX_NAME = "dyt_digits.onnx"
DIGIT_LABELS = [str(digit) for digit in range(10)]


def demo_preprocess(recipe: Recipe) -> PreprocessSpec:
    """How the demo saw its images in training (`data.normalize`: the 8x8 digits upscaled
    bilinearly, mean and std 0.5), recorded in its export for the image route."""
    return PreprocessSpec(recipe.img_size, interpolation="bilinear", source="demo training: digits upscaled bilinearly")


def cache_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / ".cache"
    return Path(os.environ.get("DYT_CACHE_DIR", default)) / "demo"


@dataclass
class DemoModel:
    checkpoint: Path
    onnx: Path
    export_timings: dict[str, float]
    """Step timings of the export, empty when the cached ONNX file was reused."""


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time trains or exports the demo model (tests run in parallel)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train(recipe: Recipe, path: Path, log: Callable[[str], None]) -> None:
    from dyt_export import write_public_checkpoint

    from .train import train_demo

    log(f"training the demo DyT on sklearn digits (dim {recipe.embed_dim}, depth {recipe.depth}, "
        f"target activation {recipe.target_rate}); about 1-2 minutes on 2 cores...")
    result = train_demo(recipe, log=log)
    write_public_checkpoint(result.model, path, shape="training", epoch=recipe.pretrain_epochs + recipe.tune_epochs - 1,
                            args={"model": "dyt_digits", "token_target_ratio": recipe.target_rate,
                                  "epochs": recipe.tune_epochs, "lr": recipe.tune_lr, "batch_size": recipe.batch})
    log(f"trained in {result.seconds:.0f} s -> {path}")


def onnx_name(tome_r: int | tuple[int, ...] | None) -> str:
    """The demo export's file name; with token merging (ToMe) it names r: `dyt_digits-tome2.onnx`
    for 2 per block, `dyt_digits-tome2-0-1-1.onnx` for one r per block."""
    if not tome_r:
        return ONNX_NAME
    values = (tome_r,) if isinstance(tome_r, int) else tuple(tome_r)
    r = str(values[0]) if len(set(values)) == 1 else "-".join(map(str, values))
    return ONNX_NAME.replace(".onnx", f"-tome{r}.onnx")


def ensure_demo_model(recipe: Recipe = Recipe(), *, retrain: bool = False, show_steps: bool = False,
                      log: Callable[[str], None] = lambda _: None,
                      tome_r: int | tuple[int, ...] | None = None) -> DemoModel:
    """The cached demo checkpoint and its dynamic ONNX export, made when missing or stale;
    `tome_r`: the export merges tokens (ToMe) as `dyt-export --tome-r` does."""
    from dyt_export import export_onnx, load_checkpoint
    from dyt_export.checkpoint import file_sha256
    from dyt_export.export import current_graph_form, read_metadata
    from dyt_export.progress import Steps

    directory = cache_dir()
    checkpoint, onnx_path, stamp = directory / CHECKPOINT_NAME, directory / onnx_name(tome_r), directory / "recipe.json"
    wanted = json.dumps(recipe.to_dict(), sort_keys=True)
    with _locked(directory):
        fresh = retrain or not checkpoint.exists() or not stamp.exists() or stamp.read_text() != wanted
        if fresh:
            for stale in (checkpoint, onnx_path, stamp):
                stale.unlink(missing_ok=True)
            _train(recipe, checkpoint, log)
            stamp.write_text(wanted)
        timings: dict[str, float] = {}
        sha256 = file_sha256(checkpoint)
        cached = read_metadata(onnx_path) if onnx_path.exists() else {}
        if cached.get("dyt.source_sha256") != sha256 or not current_graph_form(cached):
            onnx_path.unlink(missing_ok=True)
            steps = Steps(show=show_steps)
            with steps.step("load checkpoint"):
                model = load_checkpoint(checkpoint, num_heads=recipe.num_heads, tome_r=tome_r)
            export_onnx(model, onnx_path, dispatch="dynamic", with_masks=True, preprocess=demo_preprocess(recipe),
                        labels=DIGIT_LABELS, steps=steps)
            timings = dict(steps.timings)
        return DemoModel(checkpoint, onnx_path, timings)
