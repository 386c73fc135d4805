"""A DyT model from a timm ViT architecture name: what `dyt-export init` builds.

The geometry comes from timm's own constructor run on the meta device (no weights
allocated, nothing downloaded), so every timm name of a plain ViT works without a table
here. Backbone weights come from a local timm safetensors file or from a seeded random
initialisation; adapters, routers and dispatchers are always seeded random. With an
activation target the dispatcher biases are calibrated on seeded image-like inputs. The
config's `extra` records all of this, so the checkpoint (and any ONNX exported from it)
says it was calibrated, not trained.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from .calibrate import calibrate_dispatchers, image_like
from .checkpoint import file_sha256
from .checkpoint.layout import strip_prefix
from .checkpoint.native import load_tensors, read_header
from .config import DyTConfig
from .errors import UserError
from .files import check_input_file
from .model import DyTVisionTransformer, build_model

MAX_CLASSES = 100_000
"""`init` allocates the head from nothing, so a typo in --num-classes would exhaust memory
(ImageNet-21k has 21,843 classes). Experts and bottleneck are bounded in DyTConfig."""

CALIBRATION_IMAGES = 16
"""Seeded images the dispatcher biases are calibrated on: 16 x 196 patch tokens per
dispatcher for ViT-B/16 put the reached rate within 1/3136 of the target."""


def _timm_vit(name: str) -> VisionTransformer:
    """timm's model for `name`, on the meta device (shapes only)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
        raise UserError(f"unknown timm architecture {name!r}{hint}") from None
    if type(model) is not VisionTransformer:
        raise UserError(f"{name} is a timm {type(model).__name__}, not a VisionTransformer; DyT adapts plain ViTs")
    return model


def _unsupported_features(vit: VisionTransformer) -> list[str]:
    """What makes a timm ViT differ from the pre-norm CLS-token ViT that DyT adapts."""
    block = vit.blocks[0]
    if type(block) is not Block:
        return [f"{type(block).__name__} blocks"]
    checks = {
        "pooling other than the CLS token": vit.global_pool != "token" or getattr(vit, "attn_pool", None) is not None,
        "register tokens or no CLS token": vit.num_prefix_tokens != 1 or not vit.has_class_token,
        "position embedding without CLS": vit.no_embed_class,
        "dynamic image size": vit.dynamic_img_size,
        "a pre-norm before the blocks": not isinstance(vit.norm_pre, torch.nn.Identity),
        "an fc-norm head": not isinstance(vit.fc_norm, torch.nn.Identity),
        "layer scale": not isinstance(block.ls1, torch.nn.Identity),
        "q/k norm": not isinstance(block.attn.q_norm, torch.nn.Identity),
        "qkv without bias": block.attn.qkv.bias is None,
        "LayerNorm eps other than 1e-6": not isinstance(vit.norm, torch.nn.LayerNorm) or vit.norm.eps != 1e-6,
        "an MLP other than fc1-GELU-fc2": not isinstance(getattr(block.mlp, "act", None), torch.nn.GELU)
        or block.mlp.act.approximate != "none",
        "a non-square patch or image": len(set(vit.patch_embed.patch_size)) != 1 or len(set(vit.patch_embed.img_size)) != 1,
    }
    return [what for what, present in checks.items() if present]


def backbone_config(name: str, *, variant: str = "mlp", experts: int = 0, bottleneck: int = 64,
                    adapter_scale: float = 1.0, num_classes: int | None = None,
                    tome_r: int | tuple[int, ...] | None = None) -> DyTConfig:
    """DyTConfig of timm architecture `name` with DyT units; `num_classes` None keeps timm's;
    `tome_r` adds token merging (ToMe)."""
    vit = _timm_vit(name)
    unsupported = _unsupported_features(vit)
    if unsupported:
        raise UserError(f"{name} has {', '.join(unsupported)}: not the plain ViT DyT adapts")
    if bottleneck < 1:
        raise UserError(f"--bottleneck must be >= 1 (a DyT model has adapters), got {bottleneck}")
    if num_classes is None and vit.num_classes == 0:
        raise UserError(f"{name} has no classifier in timm (num_classes 0); pass --num-classes K")
    if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"--num-classes must lie in 1..{MAX_CLASSES}, got {num_classes}")
    return DyTConfig(
        embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=vit.blocks[0].attn.num_heads,
        mlp_hidden_dim=vit.blocks[0].mlp.fc1.out_features, patch_size=vit.patch_embed.patch_size[0],
        img_size=vit.patch_embed.img_size[0], in_chans=vit.patch_embed.proj.in_channels,
        num_classes=vit.num_classes if num_classes is None else num_classes, variant=variant,
        bottleneck=bottleneck, adapter_scale=adapter_scale, experts=experts, tome_r=tome_r,
    )


def _load_backbone(model: DyTVisionTransformer, path: Path) -> str:
    """Copy a timm ViT's weights from a safetensors file; returns what happened to the head."""
    check_input_file(path, "--weights")
    if read_header(path) is None:
        raise UserError(f"--weights {path} is not a safetensors file (timm's model.safetensors is)")
    weights = strip_prefix(load_tensors(path))
    own = {k: v for k, v in model.state_dict().items() if ".adapt" not in k and "_token_select." not in k}
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise UserError(f"--weights {path} is not a plain timm ViT of this architecture: unexpected keys "
                        f"{', '.join(unexpected[:5])}")
    head = {"head.weight", "head.bias"}
    missing = sorted(set(own) - set(weights) - head)
    if missing:
        raise UserError(f"--weights {path} lacks {len(missing)} backbone tensors, e.g. {', '.join(missing[:5])}")
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
             if k in weights and k not in head and weights[k].shape != v.shape]
    if wrong:
        raise UserError(f"--weights {path} does not fit this architecture: {'; '.join(wrong[:3])}")
    keep_head = all(k in weights and weights[k].shape == own[k].shape for k in head)
    loaded = {k: v.float() for k, v in weights.items() if keep_head or k not in head}
    model.load_state_dict(loaded, strict=False)
    return "from weights" if keep_head else "seeded random (weights have another class count)"


def init_model(backbone: str, *, variant: str = "mlp", experts: int = 0, bottleneck: int = 64,
               adapter_scale: float = 1.0, num_classes: int | None = None, seed: int = 0,
               weights: str | Path | None = None, activation: float | None = None,
               calibration_images: int = CALIBRATION_IMAGES,
               tome_r: int | tuple[int, ...] | None = None) -> DyTVisionTransformer:
    """A DyT model of timm architecture `backbone`, ready to save or export.

    Everything random is drawn from `seed`. `activation` (in [0, 1]) calibrates every
    dispatcher to pass about that share of patch tokens on seeded image-like inputs; the
    rates reached there are recorded in `dyt_config.extra['init']`. With `tome_r` (token
    merging, recorded in the config) the dispatchers are calibrated on the merged tokens they see.
    """
    if activation is not None and not 0.0 <= activation <= 1.0:
        raise UserError(f"--activation must lie in [0, 1], got {activation}")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must lie in 0..{2**32 - 1}, got {seed}")
    cfg = backbone_config(backbone, variant=variant, experts=experts, bottleneck=bottleneck,
                          adapter_scale=adapter_scale, num_classes=num_classes, tome_r=tome_r)
    model = build_model(cfg, seed=seed)
    record: dict[str, Any] = {"backbone": backbone, "seed": seed, "trained": False,
                              "adapters": "seeded random"}
    if weights is not None:
        path = Path(weights)
        record["head"] = _load_backbone(model, path)
        record["backbone_weights"] = {"path": str(path), "sha256": file_sha256(path)}
    else:
        record["backbone_weights"] = "seeded random"
    if activation is None:
        record["dispatchers"] = "seeded random, not calibrated, not trained"
    else:
        images = image_like(calibration_images, size=cfg.img_size, chans=cfg.in_chans, seed=seed)
        rates = calibrate_dispatchers(model, activation, images)
        record["dispatchers"] = (f"bias calibrated to activation {activation} on {calibration_images} seeded "
                                 f"image-like inputs, not trained")
        record["calibration"] = {"target": activation, "images": calibration_images,
                                 "rates": [round(r, 4) for r in rates]}
    model.dyt_config = cfg.replace(extra={**cfg.extra, "init": record})
    return model
