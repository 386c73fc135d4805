"""Start a server, say where it is, stop it cleanly.

Without an address, a local Ray instance is started in this process (nothing to install or
start by hand) and shut down at the end; with one, the application is deployed onto that
cluster and only the application is removed at the end (the cluster, and Serve on it, may
be serving others). Ctrl-C or SIGTERM stops: the application is deleted, which lets every
replica finish the requests it holds (Ray Serve's graceful shutdown), then Ray, with Serve's
controller and proxies, is shut down if this process started it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import serve

from dyt_export.errors import UserError

from ..base import first_line
from .app import APP_NAME, QUIET, build_app
from .ingress import ingress_environment
from .models import ModelFacts, ServeConfig


class StopSignal:
    """SIGINT and SIGTERM set an event the main thread waits on; a second one interrupts at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_port(host: str, port: int) -> None:
    """Refuse a port this machine cannot listen on before starting Ray (whose proxy would
    otherwise fail in its own process, with its own log)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pass another --port or --host") from None


def check_resources(config: ServeConfig) -> None:
    """Refuse a deployment the cluster cannot place (Serve would wait for it forever)."""
    need = config.replicas * config.threads
    total = ray.cluster_resources().get("CPU", 0)
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
    if need > total or config.threads > largest:
        raise UserError(f"{config.replicas} replica(s) x {config.threads} thread(s) need {need} CPUs, {config.threads} "
                        f"on one node; this Ray cluster has {total:g} CPUs, at most {largest:g} on a node "
                        "(lower --replicas or --threads)")
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.runtime == "ort-cuda" and gpus < config.replicas:
        raise UserError(f"ort-cuda replicas take one GPU each; this Ray cluster has {gpus:g} for {config.replicas}")


def start_serve(host: str, port: int) -> None:
    """Serve's controller and front door. HAProxy that cannot start (a port taken, a broken
    binary) fails inside Ray's manager actor with HAProxy's whole output in the message; its
    first ALERT line is the reason a user needs."""
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    except ray.exceptions.RayTaskError as e:
        alert = next((line.split("[ALERT]", 1)[1].split(" : ", 1)[-1].strip()
                      for line in str(e).splitlines() if "[ALERT]" in line), None)
        if alert is None:
            raise
        raise UserError(f"HAProxy, the front door, could not start: {alert[:300]} (--ingress proxy runs without it)") from None


def _check_http(host: str, port: int) -> None:
    """Serve already running on a cluster keeps its own HTTP options and ignores ours: say so
    instead of printing a URL nobody listens on."""
    from ray.serve.context import _get_global_client  # Serve has no public getter for its HTTP options

    http = _get_global_client().http_config
    if (http.host, http.port) != (host, port):
        raise UserError(f"Ray Serve already runs on this cluster at {http.host}:{http.port}; "
                        f"pass --host {http.host} --port {http.port}")


PATIENT_START = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}
"""Ray Serve kills a front door (proxy or HAProxy manager) that is not ready 5 s after it was
created, and `serve.start` then fails with ActorDiedError: on a machine whose cores are busy
a new Ray worker can take that long just to import Serve (seen with the serving tests beside
two busy cores, which pass with 60 s)."""


@contextlib.contextmanager
def local_ray(ingress: str, num_cpus: int | None = None) -> Iterator[None]:
    """A Ray instance of this process with `ingress` in front (and `num_cpus` CPUs to place
    replicas on, default this machine's), shut down at the end."""
    with tempfile.TemporaryDirectory(prefix="dyt-serve-") as workdir:
        environment = {**PATIENT_START, **ingress_environment(ingress, Path(workdir))}
        saved = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)  # read by the processes Ray starts
        try:
            # "local": a new instance even when RAY_ADDRESS is set or a `ray start` cluster (alive or
            # dead) is recorded on this machine, which address=None would join
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
            yield
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def cluster_ray(address: str) -> Iterator[None]:
    """This process connected to the Ray cluster at `address`, disconnected at the end."""
    ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def serve_models(config: ServeConfig, facts: list[ModelFacts], *, address: str | None, host: str, port: int,
                 ingress: str, out: Callable[[str], None] = print) -> int:
    """Serve until SIGINT or SIGTERM; 0 after a clean stop."""
    local = address is None
    if local:
        check_port(host, port)
    with local_ray(ingress) if local else cluster_ray(address):
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        stop = StopSignal()  # after ray.init, which installs a SIGTERM handler of its own
        deployed = False
        try:
            check_resources(config)
            start_serve(host, port)
            _check_http(host, port)
            deployed = True
            try:
                serve.run(build_app(config), name=APP_NAME, route_prefix="/")
            except RuntimeError as e:  # a replica that could not start: Ray's message holds the replica's traceback
                raise UserError(f"the models could not be deployed: {first_line(e)}") from None
            url = f"http://{host}:{port}"
            where = f"a local Ray instance, {ingress} ingress" if local else f"the Ray cluster at {address}"
            out(f"serving {len(facts)} model(s) with {config.runtime} on {url} ({where}; {config.replicas} replica(s) x "
                f"{config.threads} thread(s), batches of up to {config.max_batch} images, "
                f"wait {config.batch_wait_s * 1e3:g} ms)")
            for fact in facts:
                out(f"  {fact.describe()}")
                out(f"    POST {url}/v2/models/{fact.name}/infer     (Open Inference Protocol, JSON or binary tensors)")
                out(f"    POST {url}/v1/models/{fact.name}/classify  (an image file; ?top_k=K)")
            out("Ctrl-C or SIGTERM stops the server.")
            while not stop.event.wait(0.5):
                pass
            out("stopping: finishing the requests in flight...")
            return 0
        finally:
            try:
                if deployed:
                    serve.delete(APP_NAME)  # waits while the replicas finish what they hold
            finally:
                stop.restore()
