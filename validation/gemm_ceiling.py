"""How high the benchmark's roofline ratio could go on this machine, from the GEMMs alone.

`make bench`'s roofline divides a model's useful MACs per second by the best square fp32
GEMM this machine runs (4096^3). But a ViT's linear layers are not square: at batch 1 the
MLP of a DyT block at activation 0.3 multiplies ~60 rows, and a runtime's GEMM kernel may
run those shapes slower than the big square one. This tool times each linear layer of the
benchmark's model (ViT-B/16, MLP Dispatch, adapter bottleneck 64) alone, on its own shape,
in each runtime's GEMM library, and turns the rates into a ceiling: the roofline the model
would reach if every linear layer ran at its measured rate and everything else (attention's
softmax core, LayerNorm, GELU, adds, the dispatch) were free, attention's two batched
products and the remaining MACs counted at the best rate. A measured roofline below its
ceiling is the graph's cost; the ceiling below the target is the GEMM kernels'.

    python -m validation.gemm_ceiling --batches 1,8,32 --rate 0.3
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dyt_export.config import DyTConfig
from dyt_export.flops import count_macs
from validation.gemm import DEFAULT_SIZE, LIBRARIES, Shape, add_timing_options, best_rates, shape_name, square

RUNTIME_LIBRARIES: tuple[str, ...] = ("onnxruntime", "openvino")


def bench_config() -> DyTConfig:
    """The geometry `make bench` times (validation.bench_models), without building it."""
    from dyt_export.init_model import backbone_config
    from validation.bench_models import ADAPTER_SCALE, BACKBONE, BOTTLENECK, NUM_CLASSES

    return backbone_config(BACKBONE, bottleneck=BOTTLENECK, adapter_scale=ADAPTER_SCALE, num_classes=NUM_CLASSES)


def active_tokens(cfg: DyTConfig, rate: float) -> int:
    """Tokens an MLP unit takes at activation `rate` of the patch tokens, CLS included."""
    return 1 + round(rate * cfg.num_patches)


@dataclass(frozen=True)
class Layer:
    """One kind of linear layer in every block: its GEMM shape at a batch, and the MAC term
    (`dyt_export.flops`) it belongs to."""

    name: str
    shape: Shape
    term: str


def block_layers(cfg: DyTConfig, batch: int, mlp_tokens: int) -> list[Layer]:
    """The linear layers of one MLP Dispatch block at `batch`: the MLP's on `mlp_tokens` rows
    per image, the others on every token."""
    if cfg.variant != "mlp":
        raise ValueError(f"only the benchmark's MLP Dispatch is laid out here, not {cfg.variant!r}")
    rows, mlp_rows = batch * cfg.num_tokens, batch * mlp_tokens
    c, h, r = cfg.embed_dim, cfg.mlp_hidden_dim, cfg.bottleneck
    layers = [Layer("qkv", (rows, c, 3 * c), "qkv"), Layer("proj", (rows, c, c), "attn_proj"),
              Layer("fc1", (mlp_rows, c, h), "mlp"), Layer("fc2", (mlp_rows, h, c), "mlp")]
    if r:
        layers += [Layer("adapter down", (rows, c, r), "adapter"), Layer("adapter up", (rows, r, c), "adapter")]
    return layers


def linear_bound(cfg: DyTConfig, batch: int, mlp_tokens: int, rates: dict[Shape, float], best: float) -> float:
    """Useful GMAC/s of one image's pass if each block linear layer ran at `rates[shape]`
    GMAC/s, all other MACs at `best`, and everything without MACs were free: the rate the
    model's graph cannot beat with these GEMM kernels. Over `best` it is the roofline's ceiling."""
    counts = None if mlp_tokens == cfg.num_tokens else np.full((1, len(cfg.dispatcher_names)), mlp_tokens)
    macs = count_macs(cfg, counts)
    terms = {t: float(v[0]) for t, v in macs.by_term().items()}
    seconds = 0.0
    for layer in block_layers(cfg, batch, mlp_tokens):
        layer_macs = cfg.depth * math.prod(layer.shape) / batch
        seconds += layer_macs / rates[layer.shape]
        terms[layer.term] -= layer_macs
    if min(terms.values()) < -1e-6 * sum(terms.values()):
        raise AssertionError(f"block layers count more MACs than dyt_export.flops: {terms}")
    seconds += sum(terms.values()) / best
    return float(macs.per_image()[0]) / seconds


def measure(cfg: DyTConfig, batches: list[int], rate: float, libraries: list[str], threads: int, reps: int,
            rounds: int, size: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rates of every block layer shape per library and batch and of the square GEMM in every
    library (`gemm.best_rates`), and the dense and DyT bounds built from them."""
    k = active_tokens(cfg, rate)
    shapes = {(library, batch): [layer.shape for tokens in (cfg.num_tokens, k)
                                 for layer in block_layers(cfg, batch, tokens)]
              for library in libraries for batch in batches}
    rates = best_rates([(library, square(size)) for library in LIBRARIES]
                       + [(library, shape) for (library, _), layer_shapes in shapes.items() for shape in layer_shapes],
                       threads, reps, rounds, log)
    best_by_library = {library: rates[library, square(size)] for library in LIBRARIES}
    best = max(best_by_library.values())
    rows = []
    for library, batch in shapes:
        by_shape = {shape: rates[library, shape] for shape in shapes[library, batch]}
        dense, dyt = (linear_bound(cfg, batch, tokens, by_shape, best) for tokens in (cfg.num_tokens, k))
        rows.append({"library": library, "batch": batch, "gmac_per_s": {shape_name(s): v for s, v in by_shape.items()},
                     "bound_dense": dense, "bound_dyt": dyt, "ceiling_dense": dense / best, "ceiling_dyt": dyt / best})
    return {"threads": threads, "rate": rate, "mlp_tokens": k, "size": size, "reps": reps, "rounds": rounds,
            "best_by_library": best_by_library, "best": best, "rows": rows}


def report(cfg: DyTConfig, record: dict[str, Any]) -> str:
    """A markdown table: each runtime's GEMM rates on the block layers and the resulting bounds."""
    names = [layer.name for layer in block_layers(cfg, 1, cfg.num_tokens)]
    lines = [f"Best {record['size']}^3 GEMM: {record['best']:.1f} GMAC/s ("
             + ", ".join(f"{lib} {v:.1f}" for lib, v in record["best_by_library"].items())
             + f"); MLP rows at activation {record['rate']:g}: {record['mlp_tokens']} of {cfg.num_tokens} per image.",
             "",
             "| library | batch | " + " | ".join(names)
             + " | fc1 / fc2 DyT | bound dense (ceiling) | bound DyT (ceiling) |",
             "|---|---:|" + "---:|" * (len(names) + 3)]
    for row in record["rows"]:
        gmacs = row["gmac_per_s"]
        dense = [gmacs[shape_name(layer.shape)] for layer in block_layers(cfg, row["batch"], cfg.num_tokens)]
        dyt = [gmacs[shape_name(layer.shape)] for layer in block_layers(cfg, row["batch"], record["mlp_tokens"])
               if layer.term == "mlp"]
        lines.append(f"| {row['library']} | {row['batch']} | " + " | ".join(f"{v:.1f}" for v in dense)
                     + f" | {dyt[0]:.1f} / {dyt[1]:.1f} | {row['bound_dense']:.1f} ({row['ceiling_dense']:.3f}) | "
                     f"{row['bound_dyt']:.1f} ({row['ceiling_dyt']:.3f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dyt_export.cli.common import Parser
    from validation.cli import names_from, number, positive_ints, run_command

    p = Parser(prog="python -m validation.gemm_ceiling", description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=positive_ints, default=(1, 8, 32))
    p.add_argument("--rate", type=number(float, 0.0, 1.0), default=0.3,
                   help="activation of the MLP dispatchers (share of patch tokens)")
    p.add_argument("--libraries", type=names_from(LIBRARIES, "library"), default=list(RUNTIME_LIBRARIES),
                   help="whose GEMMs run the layers: onnxruntime,openvino (default; the runtimes' own)")
    p.add_argument("--size", type=number(int, 1), default=DEFAULT_SIZE, help="the square GEMM of the best rate")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    add_timing_options(p)
    return run_command(p, argv, _run)


def _run(args: argparse.Namespace) -> int:
    from validation.harness import check_output_file, write_json

    if args.out:
        check_output_file(args.out)
    cfg = bench_config()
    record = measure(cfg, list(args.batches), args.rate, args.libraries, args.threads, args.reps, args.rounds,
                     args.size, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report(cfg, record))
    if args.out:
        write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
