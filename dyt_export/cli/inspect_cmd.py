"""`dyt-export inspect FILE`: what a checkpoint or an exported ONNX file holds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import DyTConfig, unit_module_names
from ..errors import UserError
from ..files import check_input_file, file_kind
from .common import add_checkpoint_overrides, checkpoint_overrides, merging_summary

DESCRIPTION = "Describe a DyT checkpoint or an exported ONNX file (recognised by content, not by name)."
EXAMPLES = """\
examples:
  dyt-export inspect model.onnx              # opset, dynamic axes, dispatch ops, dispatchers and biases, weights file, metadata
  dyt-export inspect model.safetensors       # a dyt-export checkpoint: everything it records
  dyt-export inspect checkpoint.pth --json   # public DyT layout, as one JSON object
  dyt-export inspect bare.pt --num-heads 12  # flags as for export, for what a file cannot say

Parameters: total; trainable = what DyT trains and its paper counts (adapters, MoE routers,
token dispatchers); the classifier head, also trained, is reported apart. A public
checkpoint without args.scale is described with its scale marked as not recorded.
"""

TRAINABLE_MEANS = "adapters (MoE experts and routers included) + token dispatchers, as the DyT paper counts; head apart"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="checkpoint (.pt/.pth/.safetensors) or ONNX file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--dispatch", choices=["dense"], help="accept a plain timm ViT (no DyT parts)")
    add_checkpoint_overrides(parser)


def _dispatcher_facts(cfg: DyTConfig, biases: dict[str, float]) -> list[dict[str, Any]]:
    """One entry per dispatcher: where it sits, its bias when known, and, for `dyt-export init`
    models, the rate it was calibrated to."""
    rates = cfg.extra.get("init", {}).get("calibration", {}).get("rates")
    facts = []
    for index, name in enumerate(cfg.dispatcher_names):
        _, block, unit = name.split(".")
        entry: dict[str, Any] = {"name": name, "block": int(block), "unit": unit}
        if cfg.tome_r is not None:  # fewer tokens after merging; its token_masks row is padded
            entry["tokens"] = cfg.dispatcher_tokens[index]
        if name in biases:
            entry["bias"] = round(biases[name], 6)
        if rates:
            entry["calibrated_rate"] = rates[index]
        facts.append(entry)
    return facts


def _bias_key(name: str) -> str:
    """The state-dict (and ONNX initializer) name of dispatcher `blocks.{i}.{unit}`'s bias."""
    _, block, unit = name.split(".")
    return f"blocks.{block}.{unit_module_names(unit)[1]}.mlp_head.bias"


def _config_facts(cfg: DyTConfig, biases: dict[str, float], parameters: dict[str, int] | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "geometry": {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                     "mlp_hidden_dim": cfg.mlp_hidden_dim, "patch_size": cfg.patch_size,
                     "img_size": cfg.img_size, "tokens": cfg.num_tokens, "num_classes": cfg.num_classes},
        "variant": cfg.variant,
        "dispatched_units": f"{', '.join(cfg.units)} per block; a token is active iff its logit > 0",
        "adapter": {"kind": f"MoE-adapter, {cfg.experts} experts" if cfg.experts else "adapter" if cfg.bottleneck else "none",
                    "bottleneck": cfg.bottleneck, "scale": cfg.adapter_scale, "experts": cfg.experts},
        "dispatchers": _dispatcher_facts(cfg, biases),
    }
    if cfg.tome_r is not None:
        facts["token_merging"] = f"ToMe, {merging_summary(cfg)}"
    if parameters:
        facts["parameters"] = {**parameters, "trainable_means": TRAINABLE_MEANS}
    if "init" in cfg.extra:  # made by `dyt-export init`: say what is random and what was calibrated
        facts["origin"] = {k: v for k, v in cfg.extra["init"].items() if k != "calibration"}
    return facts


def describe_checkpoint(path: Path, overrides: dict) -> dict[str, Any]:
    from ..checkpoint import load_checkpoint
    from ..checkpoint.layout import AdapterScaleMissing
    try:
        model, scale_known = load_checkpoint(path, **overrides), True
    except AdapterScaleMissing:  # describe the rest; any scale gives the same shapes and counts
        model, scale_known = load_checkpoint(path, **{**overrides, "adapter_scale": 1.0}), False
    cfg = model.dyt_config
    state = model.state_dict()
    biases = {name: float(state[_bias_key(name)]) for name in cfg.dispatcher_names}
    facts = {"file": str(path), "kind": "checkpoint", "format": model.provenance["format"],
             "sha256": model.provenance["sha256"], **_config_facts(cfg, biases, model.parameter_counts())}
    if not scale_known:
        facts["adapter"]["scale"] = "not recorded in the checkpoint (no args.scale); export needs --adapter-scale S"
    return facts


def _onnx_biases(model: Any, cfg: DyTConfig) -> dict[str, float]:
    """Dispatcher biases stored in the graph (the exporter keeps their state-dict names);
    weights in external data are not read."""
    from onnx import numpy_helper
    wanted = {_bias_key(name): name for name in cfg.dispatcher_names}
    return {wanted[init.name]: float(numpy_helper.to_array(init).reshape(-1)[0])
            for init in model.graph.initializer if init.name in wanted and init.data_location != init.EXTERNAL}


def _weights(model: Any, path: Path) -> str:
    """Where the weights are, and whether a file they need is missing or cut short: a model
    shipped without its weights file otherwise looks whole until a runtime refuses it."""
    from ..files import external_data, external_data_problem
    files = external_data(model, path)
    if not files:
        return "in the file"
    problem = external_data_problem(path, model)
    if problem:
        return f"external data, but {problem}"
    return "external data in " + ", ".join(f"{p.name} ({p.stat().st_size} bytes)" for p in files)


def describe_onnx(path: Path) -> dict[str, Any]:
    from ..export.graph import load_onnx, summarize
    from ..export.metadata import PREFIX, config_from_metadata
    model = load_onnx(path)
    summary = summarize(model)
    facts: dict[str, Any] = {"file": str(path), "kind": "onnx", "opset": summary.opset,
                             "inputs": summary.inputs, "outputs": summary.outputs,
                             "dispatch_ops": summary.dispatch_op_counts}
    if PREFIX + "config" in summary.metadata:
        cfg = config_from_metadata(summary.metadata, path)
        parameters = json.loads(summary.metadata.get(PREFIX + "parameters", "{}")) or None
        facts.update(_config_facts(cfg, _onnx_biases(model, cfg), parameters))
        facts["dispatch"] = summary.metadata.get(PREFIX + "dispatch", "")
    facts.setdefault("parameters", {})["graph_initializer_values"] = summary.initializer_params
    facts["weights"] = _weights(model, path)
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
    from ..progress import Steps

    check_input_file(args.file)
    kind = file_kind(args.file)
    if kind is None:
        raise UserError(f"{args.file} is neither an ONNX model nor a checkpoint (torch.save or safetensors)")
    with Steps(show=True).step(f"reading {args.file.name}"):
        facts = describe_onnx(args.file) if kind == "onnx" else describe_checkpoint(args.file, checkpoint_overrides(args))
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        _print_text(facts)
    return 0
