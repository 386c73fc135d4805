"""Set dispatcher biases so a model without training activates a chosen share of tokens.

Benchmarks and tests need controlled activation rates, and a freshly initialised model
has arbitrary ones. Each dispatcher's bias is chosen from the logits it actually sees on
seeded image-like inputs, in execution order (a dispatcher's input depends on the biases
of the ones before it), in a single forward pass: a pre-hook on each dispatcher sets its
bias just before it runs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .model import DyTVisionTransformer
from .model.dispatcher import TokenDispatcher

BiasRule = Callable[[int, torch.Tensor], float]
"""(dispatcher index in `cfg.dispatcher_names` order, bias-free logits [B, N-1]) -> bias."""


def image_like(count: int, *, size: int, chans: int = 3, seed: int = 0) -> torch.Tensor:
    """[count, chans, size, size] seeded smooth random images, normalised per image and channel
    to mean 0 and std 1 like ImageNet-normalised inputs.

    Octaves of upsampled noise give neighbouring patches correlated content, as in photos;
    white noise would make every patch look alike to a dispatcher.
    """
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(count, chans, size, size)
    for cells, weight in ((4, 1.0), (16, 0.5), (size, 0.25)):
        noise = torch.randn(count, chans, cells, cells, generator=generator)
        out += weight * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    mean = out.mean(dim=(2, 3), keepdim=True)
    std = out.std(dim=(2, 3), keepdim=True)
    return (out - mean) / std


def threshold_between(sorted_desc: torch.Tensor, count: int) -> float:
    """A threshold with exactly `count` of the descending values above it, halfway between
    neighbours so float rounding elsewhere cannot move a value across it."""
    values = sorted_desc.double()
    gap = max(float(values[0] - values[-1]), 1e-3)
    padded = torch.cat([values[:1] + gap, values, values[-1:] - gap])
    return float((padded[count] + padded[count + 1]) / 2)


def set_dispatcher_biases(model: DyTVisionTransformer, images: torch.Tensor, rule: BiasRule) -> torch.Tensor:
    """Run `images` once (dynamic mode), setting each dispatcher's bias by `rule` just before it
    runs. Returns the resulting masks [B, D, N]."""
    dispatchers = [m for m in model.modules() if isinstance(m, TokenDispatcher)]
    handles = []
    for index, dispatcher in enumerate(dispatchers):
        def pre_hook(module: TokenDispatcher, args: tuple, index: int = index) -> None:
            x = args[0]
            raw = F.linear(x[:, 1:, :].float(), module.mlp_head.weight.float()).squeeze(-1)
            module.mlp_head.bias.fill_(rule(index, raw))
        handles.append(dispatcher.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            return model.trace(images.to(model.io_dtype), "dynamic").masks
    finally:
        for handle in handles:
            handle.remove()


def calibrate_dispatchers(model: DyTVisionTransformer, activation: float, images: torch.Tensor) -> list[float]:
    """Bias every dispatcher so that `activation` of the patch tokens of `images` (pooled over
    images) pass it. Returns the rate each dispatcher reached on those images."""
    if not 0.0 <= activation <= 1.0:
        raise UserError(f"activation must lie in [0, 1], got {activation}")
    if not model.dyt_config.dispatcher_names:
        raise UserError("this model has no token dispatchers to calibrate")

    def quantile_bias(_: int, raw: torch.Tensor) -> float:
        flat = raw.flatten().sort(descending=True).values
        return -threshold_between(flat, round(activation * flat.numel()))

    masks = set_dispatcher_biases(model, images, quantile_bias)
    patches = torch.tensor(model.dyt_config.dispatcher_tokens) - 1  # fewer after ToMe merges; rows padded with False
    return (masks[:, :, 1:].sum(dim=(0, 2)) / (patches * masks.shape[0])).tolist()
