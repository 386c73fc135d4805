"""`make loadtest`: serve the demo model and ViT-B/16 DyT on ORT-CPU and OpenVINO and load
them with bounded closed-loop clients on localhost, beside the in-process backend at the
same threads; prints the tables and writes OUT/loadtest.json and .md.

Per model, runtime and thread setting (`--threads`; default all the machine's cores, and all
but one, which leaves a core to the front door and the clients): the in-process backend at
each batch (no server running); then one replica with that many runtime threads and its batch
cap at the backend's best batch, behind each of Ray Serve's front doors (`runtimes.serving.ingress`):
HAProxy, the command's default, loaded at 1, 8 and 32 clients on the binary protocol and the
image route, and at 32 with batching off; its HTTP proxy, the same on the binary route. The demo model gets one more row
at 32 clients whose requests carry 16 images each (`Workload.many`). A benchmark, not a test: run it
alone, `flock -x /tmp/dyt-bench.lock make loadtest` on shared cores. About 45 minutes on 2
cores (a few more the first time, to build ViT-B/16).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dyt_export.atomic import staged_outputs
from dyt_export.cli.common import Parser, names_from, positive_ints, run_command
from dyt_export.errors import UserError

from .clients import Point, closed_loop
from .report import CAP, OFF, checks, markdown
from .workloads import Workload, demo, vitb16

RUNTIMES = ("ort-cpu", "openvino")
MODELS = ("demo", "vitb16")
CLIENTS = (1, 8, 32)
DEFAULT_OUT = Path("validation/records/loadtest")


def in_process(workload: Workload, runtime: str, threads: int) -> list[dict[str, Any]]:
    """The backend alone at each batch, over the tensors the binary route sends."""
    from runtimes import open_backend
    from validation.throughput import measure

    backend = open_backend(runtime, workload.onnx, threads=threads)
    rows = []
    for batch in workload.batches:
        row = measure(backend, workload.pixels, batch, iters=max(3, 64 // batch), min_seconds=8.0)
        rows.append({"model": workload.name, "runtime": runtime, **row.to_dict()})
        print(f"  in-process {workload.name} {runtime} batch {batch}: {row.img_per_s:.1f} img/s, p50 {row.p50_ms:.1f} ms",
              flush=True)
    return rows


def served(workload: Workload, runtime: str, threads: int, rows: list[dict[str, Any]], port: int,
           ingress: str) -> list[Point]:
    """Every served point of one model on one runtime behind `ingress` (Ray Serve is running):
    HAProxy, the default front door, with both routes and batching on or off; Ray's proxy on
    the binary route."""
    from ray import serve

    from runtimes.serving.app import APP_NAME, build_app
    from runtimes.serving.models import ModelSource, ServeConfig

    best = max(rows, key=lambda r: r["img_per_s"])["batch"]
    one = next(r for r in rows if r["batch"] == 1)
    one_call = one["p50_ms"] / 1e3
    window = max(10.0, 150 * one_call)
    source = ModelSource(workload.name, str(workload.onnx))
    config = ServeConfig(models=(source,), runtime=runtime, replicas=1, threads=threads, max_batch=best)
    binary, images = workload.binary_requests(), workload.image_requests()
    routes = (("binary", binary), ("image", images)) if ingress == "haproxy" else (("binary", binary),)
    capped = [(route, requests, clients, 1) for route, requests in routes for clients in CLIENTS]
    if workload.many:
        capped.append(("binary", workload.binary_requests(workload.many), 32, workload.many))
    plans = [
        (CAP, f"{best} images", build_app(config), capped),
        (OFF, "1 image", build_app(replace(config, max_batch=1)), [("binary", binary, 32, 1)]),
    ]
    points = []
    for batching, cap, app, loads in plans:
        serve.run(app, name=APP_NAME, route_prefix="/")
        for route, requests, clients, per_request in loads:
            # warm-up: every image seen once (OpenVINO prepares kernels per new shape), and the queue in steady state
            warmup = max(3.0, 1.5 * clients * per_request * one_call, len(requests) * per_request * one_call / threads)
            point = Point(workload.name, runtime, threads, ingress, route, batching, cap, clients, per_request,
                          **closed_loop("127.0.0.1", port, requests, clients, warmup_s=warmup, seconds=window,
                                        images_per_request=per_request))
            points.append(point)
            print(f"  served {workload.name} {runtime} x{threads} {ingress} {route} {cap}, {clients} clients x {per_request} "
                  f"image(s): {point.img_per_s:.1f} img/s, p50 {point.p50_ms:.1f} p99 {point.p99_ms:.1f} ms, "
                  f"{point.errors} errors, mean batch {point.mean_batch or 0:.2f}", flush=True)
        serve.delete(APP_NAME)
    return points


PROG = "python -m validation.bench.loadtest"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--runtimes", type=names_from(RUNTIMES, "runtime"), default=list(RUNTIMES),
                   help="comma-separated (default both)")
    p.add_argument("--models", type=names_from(MODELS, "model"), default=list(MODELS), help="comma-separated (default both)")
    p.add_argument("--threads", type=positive_ints, metavar="T[,T...]",
                   help="runtime threads of the replica, one setting after another (default: all cores, and all "
                        "but one)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"record directory (default {DEFAULT_OUT})")
    p.add_argument("--debug", action="store_true")

    def body(args) -> int:
        from ray import serve

        from runtimes import get_backend
        from runtimes.serving.ingress import INGRESSES, spare_port
        from runtimes.serving.launch import local_ray, start_serve
        from validation.machine import machine_info

        for runtime in args.runtimes:
            if not get_backend(runtime).availability():
                raise UserError(f"{runtime} is not available here")
        args.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        cores = len(os.sched_getaffinity(0))
        settings = args.threads or tuple(dict.fromkeys((cores, max(1, cores - 1))))
        if max(settings) > cores:
            raise UserError(f"--threads {max(settings)} is more than the {cores} core(s) this process may use")
        workloads = [demo() if name == "demo" else vitb16(args.out / "work") for name in args.models]
        rows = {(w.name, rt, t): in_process(w, rt, t) for t in settings for w in workloads for rt in args.runtimes}
        points = []
        for ingress in INGRESSES:
            port = spare_port()
            with local_ray(ingress):
                start_serve("127.0.0.1", port)
                points += [point for t in settings for w in workloads for rt in args.runtimes
                           for point in served(w, rt, t, rows[w.name, rt, t], port, ingress)]
                serve.shutdown()
        in_process_rows = [row for key in rows for row in rows[key]]
        record = {"command": shlex.join([*PROG.split(), *argv]), "machine": machine_info(), "threads": list(settings),
                  "minutes": (time.perf_counter() - started) / 60, "in_process": in_process_rows,
                  "served": [point.to_dict() for point in points], "checks": checks(in_process_rows, points)}
        text = markdown(record, points)
        with staged_outputs(args.out / "loadtest.json") as stage:
            (stage / "loadtest.json").write_text(json.dumps(record, indent=1, default=float))
            (stage / "loadtest.md").write_text(text + "\n")
        print(text)
        print(f"wrote {args.out / 'loadtest.json'} and loadtest.md")
        return 0

    return run_command(p, argv, body)


if __name__ == "__main__":
    sys.exit(main())
