"""Ratios, targets and tables of `make bench` (issue 5), from the measured rows.

Definitions (never adjusted to make a number look better):
* speed-up = DyT img/s / dense img/s, same runtime, same batch, timed in turns;
* ideal = dense MACs / DyT MACs, with DyT MACs at the activation measured on the timed images
  (`dyt_export.flops`, the paper's convention: dense ViT-B/16 = 17.58 G plus adapters);
* efficiency = speed-up / ideal (also shown with the paired speed-up: the median over turns of
  dense call time / DyT call time on the same batch, the robust figure on a busy machine);
* roofline = DyT useful MACs per second (img/s x MACs per image) / the machine's fp32 GEMM
  rate (best library, `validation.bench.gemm`);
* vs eager = DyT ONNX img/s / eager PyTorch DyT img/s (the public code's path);
* memory: peak resident set of the DyT export vs the dense export, one process each;
* DyT + ToMe: paired speed-ups over DyT alone and over dense, each against its MACs ratio
  (`validation.bench.tome`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from validation.bench.int8 import int8_table
from validation.bench.memory import SINGLE_FILE
from validation.bench.tome import TOME_R, tome_table

TARGETS: dict[str, dict[int, float]] = {
    "efficiency": {1: 0.95, 8: 0.95, 32: 0.95},
    "roofline": {1: 0.85, 8: 0.95, 32: 0.95},
    "vs_eager": {1: 1.5, 8: 1.15},
}
"""Minimum ratio per batch size; a batch size not listed has no target for that ratio."""

DOCS_BEGIN = "<!-- bench:begin (written by `make bench`; edit outside these markers) -->"
DOCS_END = "<!-- bench:end -->"


@dataclass(frozen=True)
class Result:
    """One DyT export at one rate, runtime and batch, with its baselines from the same turns."""

    runtime: str
    threads: int
    batch: int
    rate: float
    activation: float
    dyt_gmacs: float
    dense_gmacs: float
    dyt_img_s: float
    dense_img_s: float
    eager_img_s: float | None
    masked_img_s: float | None
    gemm_gmac_s: float
    group_gemm_gmac_s: float | None
    """The runtime's own GEMM, timed in the same turns: tells how busy the machine was."""
    paired_speedup: float | None = None
    """Median over turns of dense call time / DyT call time (`validation.bench.turns.paired_ratio`)."""

    @property
    def speedup(self) -> float:
        return self.dyt_img_s / self.dense_img_s

    @property
    def ideal(self) -> float:
        return self.dense_gmacs / self.dyt_gmacs

    @property
    def efficiency(self) -> float:
        return self.speedup / self.ideal

    @property
    def paired_efficiency(self) -> float | None:
        return None if self.paired_speedup is None else self.paired_speedup / self.ideal

    @property
    def roofline(self) -> float:
        return self.dyt_img_s * self.dyt_gmacs / self.gemm_gmac_s

    @property
    def dense_roofline(self) -> float:
        return self.dense_img_s * self.dense_gmacs / self.gemm_gmac_s

    @property
    def vs_eager(self) -> float | None:
        return None if self.eager_img_s is None else self.dyt_img_s / self.eager_img_s

    def to_dict(self) -> dict[str, Any]:
        ratios = {k: getattr(self, k) for k in ("speedup", "ideal", "efficiency", "paired_efficiency", "roofline",
                                                "dense_roofline", "vs_eager")}
        return {**asdict(self), **ratios}


def _memory_setup(m: dict[str, Any]) -> tuple[str, str, str, int]:
    """(runtime, allocator, weights layout, batch); records before the layout was measured
    had every model in a single file."""
    return m["runtime"], m.get("allocator", ""), m.get("weights", SINGLE_FILE), m["batch"]


def target_checks(results: list[Result], memory: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target as {target, runtime, batch, measured (worst over rates), needed, met}."""
    checks = []
    for (runtime, batch) in sorted({(r.runtime, r.batch) for r in results}):
        group = [r for r in results if r.runtime == runtime and r.batch == batch]
        for name, needed in TARGETS.items():
            values = [getattr(r, name) for r in group]
            if batch not in needed or any(v is None for v in values):
                continue
            worst = min(values)
            checks.append({"target": name, "runtime": runtime, "batch": batch, "measured": worst,
                           "needed": needed[batch], "met": worst >= needed[batch]})
    for key in sorted({_memory_setup(m) for m in memory}):
        group = [m for m in memory if _memory_setup(m) == key]
        dense = next((m for m in group if m["model"] == "dense"), None)
        dyt = [m for m in group if m["model"] != "dense"]
        if dense is None or not dyt:
            continue
        runtime, allocator, weights, batch = key
        label = ", ".join(part for part in (allocator, "" if weights == SINGLE_FILE else weights) if part)
        worst = max(m["peak_mb"] for m in dyt) / dense["peak_mb"]
        checks.append({"target": f"memory DyT/dense ({label})" if label else "memory DyT/dense", "runtime": runtime,
                       "batch": batch, "measured": worst, "needed": 1.0, "met": worst <= 1.0})
    return checks


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(results: list[Result]) -> str:
    lines = ["| runtime | batch | target rate | measured rate | GMACs DyT / dense | img/s DyT | img/s dense | "
             "img/s masked | img/s eager | speed-up (paired) | ideal | efficiency (paired) | roofline (dense) | vs eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r.runtime} | {r.batch} | {r.rate:g} | {r.activation:.3f} | {r.dyt_gmacs:.2f} / {r.dense_gmacs:.2f} | "
            f"{r.dyt_img_s:.2f} | {r.dense_img_s:.2f} | {_f(r.masked_img_s)} | {_f(r.eager_img_s)} | "
            f"{r.speedup:.3f}x ({_f(r.paired_speedup, 3)}) | {r.ideal:.3f}x | {r.efficiency:.3f} ({_f(r.paired_efficiency, 3)}) | "
            f"{r.roofline:.3f} ({r.dense_roofline:.3f}) | "
            f"{_f(r.vs_eager, 2)}{'x' if r.vs_eager is not None else ''} |")
    return "\n".join(lines)


def memory_table(memory: list[dict[str, Any]]) -> str:
    if not memory:
        return "Peak memory: not measured (`--memory-batches ''`, or `--only` without `memory`)."
    lines = ["| runtime | allocator | weights | batch | model | peak RSS MB | baseline MB | peak - baseline MB |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for m in memory:
        lines.append(f"| {m['runtime']} | {m.get('allocator', '')} | {m.get('weights', SINGLE_FILE)} | {m['batch']} | "
                     f"{m['model']} | {m['peak_mb']:.0f} | "
                     f"{m['baseline_mb']:.0f} | {m['peak_over_baseline_mb']:.0f} |")
    return "\n".join(lines)


def targets_table(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | runtime | batch | measured (worst rate) | needed | met |", "|---|---|---:|---:|---:|---|"]
    for c in checks:
        sign = "<=" if c["target"].startswith("memory") else ">="
        gap = "" if c["met"] else f" (missed by {abs(c['measured'] - c['needed']) / c['needed']:.1%})"
        batch = c["batch"] or "-"  # 0: a target of the model, not of a batch size (int8 agreement)
        lines.append(f"| {c['target']} | {c['runtime']} | {batch} | {c['measured']:.3f} | {sign} {c['needed']:g} | "
                     f"{'yes' if c['met'] else 'no' + gap} |")
    return "\n".join(lines)


def markdown(record: dict[str, Any], results: list[Result], checks: list[dict[str, Any]]) -> str:
    """The section `docs/performance.md` holds between its bench markers."""
    machine = record["machine"]
    gemm = record["gemm"]
    load = record["load_average"]
    by_runtime: dict[str, list[float]] = {}
    for key, rate in gemm["in_turns"].items():  # key: runtime/threads/batch
        by_runtime.setdefault(key.split("/")[0], []).append(rate)
    sensor = ", ".join(f"{name} {min(v):.1f}-{max(v):.1f}" for name, v in by_runtime.items())
    rates = ", ".join(f"{k} {v:.1f}" for k, v in gemm["by_library"].items())
    calls: dict[int, int] = {}  # the fewest timed calls of any contender, per batch size
    for r in record["rows"]:
        calls[r["batch"]] = min(calls.get(r["batch"], r["calls"]), r["calls"])
    return "\n".join([
        f"Command: `{record['command']}`  ",
        f"Measured {record['finished']} on {machine['cpu']} ({machine['usable_cores']} usable cores, "
        f"flags {', '.join(machine['cpu_flags'])}), {record['threads']} threads "
        f"({'all cores' if record['threads'] == machine['usable_cores'] else 'not all cores'}); "
        f"load average {load['start'][0]:.2f} at start (includes whatever ran just before), "
        f"{load['end'][0]:.2f} at end (includes the benchmark itself).  ",
        f"Load sensor: each runtime's own 2048^3 GEMM, timed in turns with its groups, ran at {sensor} GMAC/s "
        f"(a spread well beyond a few % means some groups shared the cores).  ",
        f"ONNX Runtime sessions: {record.get('ort_sessions', 'dynamic batch')}; OpenVINO: one compiled model, dynamic batch.  ",
        f"Timed calls per contender over the {record['images']} images: "
        f"{', '.join(f'{n} at batch {b}' for b, n in sorted(calls.items()))}.  ",
        f"fp32 GEMM rate ({gemm['size']}^3, GMAC/s): {rates}; best **{gemm['best']:.1f}** ({gemm['library']}).  ",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in machine['libraries'].items())}. Wall time {record['wall_s'] / 60:.1f} min.",
        "",
        "### Targets",
        "",
        targets_table(checks),
        "",
        "### Throughput (img/s), ratios",
        "",
        results_table(results),
        "",
        "### Peak memory (one process per row)",
        "",
        memory_table(record["memory"]),
        "",
        *[line for title, table in section_tables(record).items() for line in (f"### {title}", "", table, "")],
    ])


def section_tables(record: dict[str, Any]) -> dict[str, str]:
    """By title, the tables of the sections `--only` can leave out that this record measured:
    a section not measured has no table rather than an empty one."""
    tables = {}
    if record["int8"]["rows"] or record["int8"]["demo"]:
        tables["int8 (`dyt-export --int8 [--int8-activations dynamic]`)"] = \
            int8_table(record["int8"]["rows"], record["int8"]["demo"])
    if record.get("tome", {}).get("rows"):  # records from before ToMe have no key
        tables[f"DyT + ToMe (`dyt-export --tome-r {TOME_R}`, docs/tome.md)"] = tome_table(record["tome"]["rows"])
    return tables


def results_from_record(record: dict[str, Any]) -> list[Result]:
    """The `Result`s a bench.json holds, to re-render its tables without measuring again."""
    names = {f.name for f in fields(Result)}
    return [Result(**{k: v for k, v in r.items() if k in names}) for r in record["results"]]


def write_docs(path: Path, section: str) -> None:
    """Replace the text between the bench markers of `path` (created when missing)."""
    block = f"{DOCS_BEGIN}\n{section}\n{DOCS_END}"
    text = path.read_text() if path.exists() else f"# Performance\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
    if DOCS_BEGIN not in text or DOCS_END not in text:
        text = text.rstrip() + f"\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
    head, rest = text.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + block + tail)
