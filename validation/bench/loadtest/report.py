"""The loadtest's tables and its verdict on the issue's targets (docs/serving.md).

Targets, per model, runtime, front door and runtime threads, on this machine (the in-process
rows compared are those at the same threads):
* served throughput at concurrency 32 (binary route, batching on, one image a request) >=
  0.85 x the in-process backend at its best batch, same threads; the same ratio for the row
  whose requests carry several images, where there is one;
* batching realises >= 0.8 of the backend's own batching gain at concurrency 32:
  (served img/s batching on / off - 1) / (in-process best-batch img/s / batch-1 img/s - 1);
* zero errors, warm-up included;
* ViT-B/16: p99 at concurrency 1 <= 1.3 x the in-process batch-1 latency (p50; the p99 ratio
  is shown beside it).
"""
from __future__ import annotations

from typing import Any

from .clients import Point

CAP = "images"
OFF = "off"


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def served_table(points: list[Point]) -> str:
    lines = ["| model | runtime | threads | ingress | route | batch cap | clients | images/request | req/s | img/s | p50 ms | "
             "p90 ms | p99 ms | errors | mean batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.model} | {p.runtime} | {p.threads} | {p.ingress} | {p.route} | {p.cap} | {p.concurrency} | "
                     f"{p.images} | {_f(p.req_per_s)} | {_f(p.img_per_s)} | {_f(p.p50_ms)} | {_f(p.p90_ms)} | "
                     f"{_f(p.p99_ms)} | {p.errors} | {_f(p.mean_batch, 2)} |")
    return "\n".join(lines)


def in_process_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | runtime | batch | threads | img/s | p50 ms/call | p99 ms/call | activation |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['threads']} | {_f(r['img_per_s'])} | "
                     f"{_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {_f(r['activation_rate'], 3)} |")
    return "\n".join(lines)


Setup = tuple[str, str, str, int]
"""(model, runtime, ingress, threads): what one group of targets is judged on."""


def _point(points: list[Point], setup: Setup, batching: str, clients: int, many: bool = False) -> Point | None:
    """The binary route's point of that setup: one image a request, or several."""
    return next((p for p in points if ((p.model, p.runtime, p.ingress, p.threads), p.route, p.batching, p.concurrency,
                                       p.images > 1) == (setup, "binary", batching, clients, many)), None)


def checks(in_process: list[dict[str, Any]], points: list[Point]) -> list[dict[str, Any]]:
    """One row per target and setup (model, runtime, ingress, threads): the measured value, the
    goal, met or not."""
    result = []
    for setup in dict.fromkeys((p.model, p.runtime, p.ingress, p.threads) for p in points):
        model, runtime, ingress, threads = setup
        rows = [r for r in in_process if (r["model"], r["runtime"], r["threads"]) == (model, runtime, threads)]
        best = max(rows, key=lambda r: r["img_per_s"])
        one = next(r for r in rows if r["batch"] == 1)
        on, off, single = _point(points, setup, CAP, 32), _point(points, setup, OFF, 32), _point(points, setup, CAP, 1)

        def row(target: str, value: float | None, goal: str, met: bool) -> None:
            result.append({"model": model, "runtime": runtime, "ingress": ingress, "threads": threads, "target": target,
                           "value": value, "goal": goal, "met": met})

        for point in (on, _point(points, setup, CAP, 32, many=True)):
            if point:
                ratio = point.img_per_s / best["img_per_s"]
                row(f"served img/s at 32 clients, {point.images} image(s) a request / in-process best (batch "
                    f"{best['batch']})", ratio, ">= 0.85", ratio >= 0.85)
        gain = best["img_per_s"] / one["img_per_s"] - 1
        if on and off and gain > 0:
            realised = (on.img_per_s / off.img_per_s - 1) / gain
            row(f"batching gain realised at 32 clients (backend's own: {gain + 1:.2f}x)", realised, ">= 0.8",
                realised >= 0.8)
        errors = sum(p.errors for p in points if (p.model, p.runtime, p.ingress, p.threads) == setup)
        row("errors, all points", errors, "0", errors == 0)
        if single and model.startswith("vitb"):
            ratio = single.p99_ms / one["p50_ms"]
            row(f"p99 at 1 client / in-process batch-1 p50 (p99 ratio {single.p99_ms / one['p99_ms']:.2f})", ratio,
                "<= 1.3", ratio <= 1.3)
    return result


def checks_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | runtime | threads | ingress | target | measured | goal | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "yes" if r["met"] else "**no**"
        value = r["value"] if isinstance(r["value"], int) else _f(r["value"], 2)
        lines.append(f"| {r['model']} | {r['runtime']} | {r['threads']} | {r['ingress']} | {r['target']} | {value} | "
                     f"{r['goal']} | {met} |")
    return "\n".join(lines)


def markdown(record: dict[str, Any], points: list[Point]) -> str:
    machine = record["machine"]
    return "\n\n".join([
        f"Command: `{record['command']}` ({record['minutes']:.0f} min, {machine['cpu']}, "
        f"{machine['usable_cores']} cores; server: 1 replica with {' or '.join(map(str, record['threads']))} runtime "
        "thread(s); clients on the same cores)",
        "In-process backend (same threads, no server):", in_process_table(record["in_process"]),
        "Served (closed-loop clients on localhost):", served_table(points),
        "Targets:", checks_table(record["checks"]),
    ])
