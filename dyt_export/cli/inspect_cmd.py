"""`dyt-export inspect FILE`: what a checkpoint or an exported ONNX file holds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import DyTConfig
from .common import add_checkpoint_overrides, checkpoint_overrides

DESCRIPTION = "Describe a DyT checkpoint or an exported ONNX file."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="checkpoint (.pt/.pth/.safetensors) or ONNX file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--dispatch", choices=["dense"], help="accept a plain timm ViT (no DyT parts)")
    add_checkpoint_overrides(parser)


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _dispatcher_facts(cfg: DyTConfig, model: Any = None) -> list[dict[str, Any]]:
    """One entry per dispatcher: where it sits, its bias (checkpoints; ONNX initializer names
    are the exporter's) and, for `dyt-export init` models, the rate it was calibrated to."""
    from ..config import unit_module_names
    rates = cfg.extra.get("init", {}).get("calibration", {}).get("rates")
    facts = []
    for index, name in enumerate(cfg.dispatcher_names):
        _, block, unit = name.split(".")
        entry: dict[str, Any] = {"name": name, "block": int(block), "unit": unit}
        if model is not None:
            head = getattr(model.blocks[int(block)], unit_module_names(unit)[1]).mlp_head
            entry["bias"] = round(float(head.bias.detach()), 6)
        if rates:
            entry["calibrated_rate"] = rates[index]
        facts.append(entry)
    return facts


def _config_facts(cfg: DyTConfig, model: Any = None) -> dict[str, Any]:
    facts = {
        "geometry": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                     "mlp_hidden_dim": cfg.mlp_hidden_dim, "patch_size": cfg.patch_size,
                     "img_size": cfg.img_size, "tokens": cfg.num_tokens, "num_classes": cfg.num_classes},
        "variant": cfg.variant,
        "dispatched_units": f"{', '.join(cfg.units)} per block; a token is active iff its logit > 0",
        "adapter": {"kind": f"MoE-adapter, {cfg.experts} experts" if cfg.experts else "adapter" if cfg.bottleneck else "none",
                    "bottleneck": cfg.bottleneck, "scale": cfg.adapter_scale, "experts": cfg.experts},
        "dispatchers": _dispatcher_facts(cfg, model),
    }
    if "init" in cfg.extra:  # made by `dyt-export init`: say what is random and what was calibrated
        facts["origin"] = {k: v for k, v in cfg.extra["init"].items() if k != "calibration"}
    return facts


def describe_checkpoint(path: Path, overrides: dict) -> dict[str, Any]:
    from ..checkpoint import load_checkpoint
    model = load_checkpoint(path, **overrides)
    total = sum(p.numel() for p in model.parameters())
    # DyT trains adapters and dispatchers (the head too, counted apart as PEFT papers do).
    dyt = sum(p.numel() for n, p in model.named_parameters() if ".adapt" in n or "_token_select." in n)
    head = sum(p.numel() for p in model.head.parameters())
    return {"file": str(path), "kind": "checkpoint", "format": model.provenance["format"],
            "sha256": model.provenance["sha256"], **_config_facts(model.dyt_config, model),
            "parameters": {"total": total, "trainable_adapters_dispatchers": dyt, "head": head}}


def describe_onnx(path: Path) -> dict[str, Any]:
    from ..export import config_from_metadata, summarize
    from ..export.metadata import PREFIX
    summary = summarize(path)
    facts: dict[str, Any] = {"file": str(path), "kind": "onnx", "opset": summary.opset,
                             "inputs": summary.inputs, "outputs": summary.outputs,
                             "dispatch_ops": summary.dispatch_op_counts,
                             "parameters": {"initializers": summary.initializer_params}}
    if PREFIX + "config" in summary.metadata:
        facts.update(_config_facts(config_from_metadata(summary.metadata, path)))
        facts["dispatch"] = summary.metadata.get(PREFIX + "dispatch", "")
    facts["metadata"] = summary.metadata
    return facts


def _print_text(facts: dict[str, Any]) -> None:
    for key, value in facts.items():
        if isinstance(value, dict) and value:
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key}: {len(value)}")
            for entry in value:
                print("  " + "  ".join(f"{k}={v}" for k, v in entry.items()))
        elif isinstance(value, list):
            print(f"{key}: {len(value)}" + (f" ({', '.join(map(str, value[:4]))}{', ...' if len(value) > 4 else ''})" if value else ""))
        else:
            print(f"{key}: {value}")


def run(args: argparse.Namespace) -> int:
    facts = describe_onnx(args.file) if _is_onnx(args.file) else describe_checkpoint(args.file, checkpoint_overrides(args))
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        _print_text(facts)
    return 0
