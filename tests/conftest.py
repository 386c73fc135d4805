"""Shared fixtures: small seeded DyT models (dim 64-192, 2-4 blocks), image-like inputs, and
the command line run in-process with the one-line-error contract checked."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dyt_export import DyTConfig, build_model
from dyt_export.config import unit_module_names


def small_config(**overrides) -> DyTConfig:
    """ViT-Tiny width, 3 blocks, 32 px with patch 8 (17 tokens): exports in a few seconds."""
    base = dict(embed_dim=192, depth=3, num_heads=3, mlp_hidden_dim=768, patch_size=8, img_size=32,
                num_classes=10, bottleneck=8, adapter_scale=0.1)
    return DyTConfig(**{**base, **overrides})


def force_dispatcher(model, block: int, active: bool, unit: str | None = None) -> None:
    """Make one dispatcher activate every patch token (True) or none (False) via its bias."""
    unit = unit or model.dyt_config.units[0]
    head = getattr(model.blocks[block], unit_module_names(unit)[1]).mlp_head
    with torch.no_grad():
        head.bias.fill_(1e4 if active else -1e4)


def image_batch(batch: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth image-like inputs (blobs and gradients, normalised), not white noise: the
    activation rate, and so what the dispatch path exercises, depends on the data."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(batch):
        channels = []
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.4)]
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            channels.append(blob * rng.uniform(0.5, 2) + xx * rng.uniform(-1, 1) + rng.normal(0, 0.05, (size, size)))
        images.append(np.stack(channels))
    x = np.stack(images).astype(np.float32)
    return (x - x.mean()) / x.std()


@pytest.fixture
def small_model():
    """A seeded MLP-dispatch model whose middle layer activates roughly half the tokens."""
    return build_model(small_config(), seed=0)


@pytest.fixture
def run_cli(capsys):
    """Run `dyt-export ARGS` in-process (importing torch per call would cost seconds each)."""
    from dyt_export.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def assert_refused(result: subprocess.CompletedProcess, message: str, leftovers: Path | None = None) -> None:
    """Exit 2, exactly one line on stderr containing `message`, no traceback; with `leftovers`,
    no ONNX, partial or staging file in that directory."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dyt-export: error:"), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if leftovers is not None:
        assert [p.name for p in leftovers.iterdir() if p.suffix == ".onnx" or ".partial" in p.name] == []
