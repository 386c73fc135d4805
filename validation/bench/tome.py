"""DyT + ToMe in `make bench` (issue 23): token merging on top of token dispatch, and alone.

Each calibrated checkpoint is loaded again with `tome_r=TOME_R` (what `dyt-export --tome-r 8`
does) and exported with dynamic dispatch. It is not recalibrated: ToMe needs no training, so
a user puts it on the checkpoint they have, and its dispatchers then see merged tokens; the
activation they reach is measured on the timed images, as the DyT exports' is. The middle
rate's ToMe model is also exported dense: ToMe alone, against the dense export.

All of them run in the same turns as the DyT and dense exports of the same checkpoints, so
each speed-up here is a paired ratio (`validation.bench.turns.paired_ratio`, the median over turns
of the slower model's call time / the faster one's): the ToMe and DyT exports differ by
only ~30 %, about as much as a burst of other load moves a total. Ideal speed-ups are ratios
of `dyt_export.flops` MACs per image, with the active tokens each model had on the images
timed at that batch size. Efficiency = measured / ideal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dyt_export.config import DyTConfig
from validation.costs import gmacs, pooled_rate
from validation.throughput import batches_of
from validation.bench.turns import paired_ratio, row

TOME_R = 8
"""Tokens merged per block: ViT-B/16 goes from 197 tokens to 101 after its last block."""
DENSE_TOME = "dense+tome"
"""The dense export with ToMe, as it is timed in `make bench`'s turns."""
TARGET_EFFICIENCY: dict[int, float] = {8: 0.9, 32: 0.9}
"""Minimum efficiency of DyT + ToMe over DyT alone per batch size, on every runtime (the
issue's target). Batch 1 has none: the merge's fixed cost per call is not amortised there."""


def contender(rate: float) -> str:
    """The name the ToMe export of the checkpoint calibrated to `rate` is timed under."""
    return f"dyt+tome@{rate:g}"


@dataclass
class ToMeModel:
    """The ToMe export of one calibrated checkpoint."""

    rate: float
    """The activation target the checkpoint was calibrated to, without ToMe."""
    config: DyTConfig
    """The checkpoint's config with `tome_r` set: what the FLOPs count merges by."""
    path: Path
    masks: np.ndarray
    """[images, dispatchers, tokens] reference token masks on the benchmark's image pool
    (each dispatcher's row padded with False beyond the merged tokens it sees)."""


@dataclass
class ToMeExports:
    models: list[ToMeModel]
    dense: Path
    """The middle rate's checkpoint with ToMe, exported dense."""

    def onnx_files(self) -> dict[str, Path]:
        return {**{contender(m.rate): m.path for m in self.models}, DENSE_TOME: self.dense}


def tome_exports(checkpoints: dict[float, Path], middle: float, work: Path, pool: Any) -> ToMeExports:
    """Each checkpoint (by calibrated rate) loaded with `tome_r=TOME_R` and exported as
    `dyt-export --tome-r` exports it, its masks traced on `pool`; the `middle` rate's also dense."""
    # these import torch: not for make bench --help
    from dyt_export import load_checkpoint
    from dyt_export.export import export_onnx

    models, dense = [], None
    for rate, checkpoint in checkpoints.items():
        model = load_checkpoint(checkpoint, tome_r=TOME_R)
        name = f"{checkpoint.stem}-tome{TOME_R}"
        path = export_onnx(model, work / f"{name}.onnx", dispatch="dynamic").path
        models.append(ToMeModel(rate, model.dyt_config, path, model.trace(pool).masks.numpy()))
        if rate == middle:
            dense = export_onnx(model, work / f"{name}-dense.onnx", dispatch="dense").path
    if dense is None:
        raise ValueError(f"no checkpoint calibrated to the middle rate {middle:g}")
    return ToMeExports(models, dense)


def _mean_gmacs(cfg: DyTConfig, masks: np.ndarray | None) -> float:
    return float(gmacs(cfg, masks).mean())


def tome_rows(timed: dict[tuple[str, int, int], dict[str, list[float]]], ex: ToMeExports,
              dyt_masks: dict[float, np.ndarray], dyt_config: DyTConfig, middle: float) -> list[dict[str, Any]]:
    """Per runtime, threads, batch and rate: DyT + ToMe against DyT alone and against dense,
    and (at the `middle` rate's rows) dense + ToMe against dense, measured and ideal.
    `dyt_masks`: the DyT exports' masks on the pool by rate; `dyt_config`: their config."""
    dense_gmacs = _mean_gmacs(dyt_config, None)
    rows = []
    for (runtime, threads, batch), lat in timed.items():
        if DENSE_TOME not in lat:  # eager PyTorch groups have no ToMe
            continue
        covered = np.concatenate(batches_of(len(ex.models[0].masks), batch))
        for m in ex.models:
            dyt, tome = lat[f"dyt@{m.rate:g}"], lat[contender(m.rate)]
            work = {"dyt": _mean_gmacs(dyt_config, dyt_masks[m.rate][covered]),
                    "dyt_tome": _mean_gmacs(m.config, m.masks[covered]), "dense": dense_gmacs}
            ratios = {"over_dyt": (paired_ratio(dyt, tome), work["dyt"] / work["dyt_tome"]),
                      "over_dense": (paired_ratio(lat["dense"], tome), dense_gmacs / work["dyt_tome"])}
            img_s = {"dyt": dyt, "dyt_tome": tome, "dense": lat["dense"]}
            if m.rate == middle:
                work["dense_tome"] = _mean_gmacs(m.config, None)
                ratios["dense_tome_over_dense"] = (paired_ratio(lat["dense"], lat[DENSE_TOME]),
                                                   dense_gmacs / work["dense_tome"])
                img_s["dense_tome"] = lat[DENSE_TOME]
            rows.append({"runtime": runtime, "threads": threads, "batch": batch, "rate": m.rate, "tome_r": TOME_R,
                         "activation_dyt": pooled_rate(dyt_masks[m.rate][covered]),
                         "activation_dyt_tome": pooled_rate(m.masks[covered], m.config.dispatcher_tokens),
                         "gmacs": work,
                         "img_s": {k: row(v, batch, threads, None).img_per_s for k, v in img_s.items()},
                         **{k: {"speedup": s, "ideal": i, "efficiency": s / i} for k, (s, i) in ratios.items()}})
    return rows


def tome_checks(rows: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """The ToMe target in `report.target_checks`' shape: per runtime and batch, the worst rate's
    efficiency of DyT + ToMe over DyT alone against `TARGET_EFFICIENCY`."""
    checks = []
    for runtime, batch in sorted({(r["runtime"], r["batch"]) for r in rows if r["threads"] == threads}):
        if batch not in TARGET_EFFICIENCY:
            continue
        worst = min(r["over_dyt"]["efficiency"] for r in rows
                    if (r["runtime"], r["batch"], r["threads"]) == (runtime, batch, threads))
        checks.append({"target": f"ToMe r={TOME_R} efficiency over DyT", "runtime": runtime, "batch": batch,
                       "measured": worst, "needed": TARGET_EFFICIENCY[batch], "met": worst >= TARGET_EFFICIENCY[batch]})
    return checks


def _ratio(r: dict[str, Any], key: str) -> str:
    """'1.29x (1.34) | 0.96': a measured paired speed-up with its FLOPs-ideal, then the
    efficiency; dashes where the pair was not timed (dense + ToMe: the middle rate only)."""
    if key not in r:
        return "- | -"
    return f"{r[key]['speedup']:.2f}x ({r[key]['ideal']:.2f}) | {r[key]['efficiency']:.3f}"


def tome_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| runtime | threads | batch | rate | activation DyT / +ToMe | GMACs DyT / +ToMe | "
             "img/s DyT / +ToMe / dense / dense+ToMe | DyT+ToMe over DyT (ideal) | efficiency | "
             "DyT+ToMe over dense (ideal) | efficiency | dense+ToMe over dense (ideal) | efficiency |",
             "|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ips, work = r["img_s"], r["gmacs"]
        img_s = " / ".join(f"{ips[k]:.2f}" if k in ips else "-" for k in ("dyt", "dyt_tome", "dense", "dense_tome"))
        lines.append(f"| {r['runtime']} | {r['threads']} | {r['batch']} | {r['rate']:g} | "
                     f"{r['activation_dyt']:.3f} / {r['activation_dyt_tome']:.3f} | "
                     f"{work['dyt']:.2f} / {work['dyt_tome']:.2f} | {img_s} | {_ratio(r, 'over_dyt')} | "
                     f"{_ratio(r, 'over_dense')} | {_ratio(r, 'dense_tome_over_dense')} |")
    return "\n".join(lines)
