"""Validation records: one JSON document per (model, runtime), plus a Markdown summary.

The JSON layout is described by `record.schema.json` (JSON Schema 2020-12) beside this
file and versioned by `schema_version` (major.minor: a minor bump only adds fields; a
major bump renames or removes some). Every record is checked against the schema before it
is written, so a record on disk is always schema-valid, and it holds no NaN or infinity
(which JSON does not have): figures that cannot be measured are null. The JSON and Markdown
files are staged and renamed into place together, so an interrupted write leaves the
previous record, never half of one.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from dyt_export.atomic import staged_outputs

from .parity import Parity, fmt
from .throughput import ThroughputRow
from .tolerances import Tolerances

SCHEMA_VERSION = "1.5"
SCHEMA_PATH = Path(__file__).with_name("record.schema.json")
FLOPS_CONVENTION = "G multiply-adds per image (the DyT paper's 'FLOPs'; dense ViT-B/16 = 17.58)"
MASKS_NOT_COMPARED = ("the reference is not the checkpoint the model was exported from (sha256 differs), so a mask "
                      "twin exported from it would compare the reference with itself; export the model with "
                      "--with-masks to compare its own masks")
"""Why a record without a mask agreement has none, in its report and the log."""


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def check_record(record: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when `record` does not follow the schema."""
    import jsonschema

    jsonschema.validate(record, load_schema())


def build_record(*, runtime: str, runtime_info: dict[str, Any], model: Any, twins: dict[str, str | None],
                 reference: dict[str, Any], machine: dict[str, Any], inputs: dict[str, Any],
                 tolerances: Tolerances, parity: Parity, accuracy: dict[str, Any] | None,
                 activation_rate: dict[str, float], flops_g: dict[str, float], throughput: list[ThroughputRow],
                 dense_baseline: list[ThroughputRow], speedup: list[dict[str, Any]],
                 timings: dict[str, float], error: dict[str, str] | None = None,
                 execution: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record as a JSON-ready dict (see record.schema.json for every field). `error`:
    the runtime failed while running ({"stage", "message"}); the record then does not pass.
    `execution`: how the parity run was spread (sequential or Ray workers, shards)."""
    rates = list(activation_rate.values())
    return {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "passed": parity.passed and error is None,
        "error": error,
        "runtime": runtime,
        "runtime_info": runtime_info,
        "model": {
            "path": str(model.path), "name": model.path.stem, "dispatch": model.dispatch,
            "precision": model.precision, "opset": model.opset, "outputs": model.outputs,
            "dispatchers": model.cfg.dispatcher_names, "config": model.cfg.to_dict(),
            "source": model.source, "source_sha256": model.source_sha256, "twins": twins,
        },
        "reference": reference,
        "machine": machine,
        "inputs": inputs,
        "tolerances": dataclasses.asdict(tolerances),
        "parity": parity.to_dict(),
        "accuracy": accuracy,
        "activation_rate": activation_rate,
        "activation_rate_mean": float(sum(rates) / len(rates)) if rates else 1.0,
        "flops_g": {**flops_g, "convention": FLOPS_CONVENTION},
        "throughput": [r.to_dict() for r in throughput],
        "dense_baseline": [r.to_dict() for r in dense_baseline],
        "speedup": speedup,
        "timings_s": timings,
        "execution": execution,
    }


def markdown(record: dict[str, Any]) -> str:
    """A human summary of one record."""
    p, m, t = record["parity"], record["model"], record["tolerances"]
    lines = [
        f"# {m['name']} on {record['runtime']}: {'PASS' if record['passed'] else 'FAIL'}",
        "",
        f"Model `{m['path']}` (dispatch {m['dispatch']}, {m['precision']}, opset {m['opset']}); reference: torch "
        f"from `{record['reference']['checkpoint']}`. Machine: {record['machine']['cpu']}, "
        f"{record['machine']['logical_cores']} cores. Inputs: {record['inputs']['images']} images ({record['inputs']['source']}).",
        "",
        "## Parity",
        "",
    ]
    ties = f", merge ties at a matching margin <= {t['merge_tie']:g}" if m["config"].get("tome_r") else ""
    if record["error"]:
        e = record["error"]
        lines += [f"RUNTIME FAILURE during the {e['stage']}: {e['message']}", ""]
    lines += [
        f"Compared on logits: {p['images_compared_on_logits']} of {p['images']} images; on top-1 and cosine only "
        f"(they carry a flip or merge tie): {p['images_compared_on_top1_cosine']}; top-1 agreement is over all "
        f"{p['images']}.",
        "",
        "| max abs | max rel | cosine min | cosine min (flips) | top-1 agreement | mask agreement | flips |",
        "|---|---|---|---|---|---|---|",
        f"| {fmt(p['max_abs'], '.3g')} | {fmt(p['max_rel'], '.3g')} | {fmt(p['cosine_min'], '.7f')} | "
        f"{fmt(p['flip_cosine_min'], '.7f')} | {fmt(p['top1_agreement'], '.4f')} | {fmt(p['mask_agreement'], '.6f')} | "
        f"{len(p['flips'])} |",
        "",
        f"Tolerances ({m['precision']} defaults unless overridden): max rel <= {t['max_rel']:g}, "
        f"cosine >= {t['cosine_min']} (images with a flip: >= {min(t['cosine_min'], t['flip_cosine_min']):g}), "
        f"same top-1 on >= {t['top1_min']:.2%} of all images, >= {t['logit_share_min']:.0%} of the images "
        f"compared on logits, flip window |logit| <= {t['flip_logit']:g}{ties}.",
    ]
    lines += [f"- FAIL: {f}" for f in p["failures"]]
    if p["mask_agreement"] is None and record["reference"]["matches_model_source"] is False:
        lines.append(f"- masks not compared: {MASKS_NOT_COMPARED}")
    lines += [f"- flip: image {f['image']}, {f['layer']} token {f['token']}, reference logit {f['logit']:.2e}"
              for f in p["flips"][:20]]
    lines += [f"- merge tie: image {tie['image']}, block {tie['block']}, reference matching margin {tie['margin']:.2e}"
              for tie in p["merge_ties"][:20]]
    if record["inputs"].get("unreadable"):
        files = record["inputs"]["unreadable_files"]
        lines += ["", f"Unreadable images, skipped: {len(files)}."] + [f"- `{u['file']}`: {u['reason']}" for u in files[:20]]
    if record["accuracy"]:
        a = record["accuracy"]
        lines += ["", f"Accuracy on {a['images']} labeled images: torch {a['reference']:.4f}, "
                      f"{record['runtime']} {fmt(a['runtime'], '.4f')} (top-1); torch {fmt(a.get('reference_top5'), '.4f')}, "
                      f"{record['runtime']} {fmt(a.get('runtime_top5'), '.4f')} (top-5)."]
        if a.get("disagreement_by_class"):
            lines.append("Images whose top-1 differs from torch's, by class: "
                         + ", ".join(f"{k} {v}" for k, v in a["disagreement_by_class"].items()) + ".")
    rates = ", ".join(f"{k} {v:.3f}" for k, v in record["activation_rate"].items())
    f = record["flops_g"]
    lines += ["", "## Activation and cost", "", f"Activation rate per dispatcher: {rates or 'none'}.",
              f"GMACs per image: dense {f['dense']:.4g}, DyT {f['dyt']:.4g} (ideal speedup {f['dense'] / f['dyt']:.3f}x)."]
    if record["throughput"]:
        dense = {(r["batch"], r["threads"]): r for r in record["dense_baseline"]}
        speed = {(s["batch"], s["threads"]): s for s in record["speedup"]}
        lines += ["", "## Throughput", "",
                  "| batch | threads | DyT img/s | p50 ms | p90 ms | p99 ms | activation | dense img/s | speedup | FLOPs-ideal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in record["throughput"]:
            key = (r["batch"], r["threads"])
            d, s = dense.get(key), speed.get(key)
            lines.append(f"| {r['batch']} | {r['threads']} | {r['img_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {fmt(r['activation_rate'], '.3f')} | {fmt(d and d['img_per_s'], '.1f')} | "
                         f"{fmt(s and s['measured'], '.3f')} | {fmt(s and s['flops_ideal'], '.3f')} |")
    return "\n".join(lines) + "\n"


def write_record(record: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Check `record` against the schema, then write OUT/<runtime>.json and OUT/<runtime>.md
    (both staged, then renamed into place)."""
    check_record(record)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"  # a NaN that slipped through is a bug: no file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{record['runtime']}.json"
    markdown_path = out / f"{record['runtime']}.md"
    with staged_outputs(json_path) as stage:
        (stage / json_path.name).write_text(text)
        (stage / markdown_path.name).write_text(markdown(record))
    return json_path, markdown_path
