"""The server, end to end through HTTP: one local Ray instance and one deployed application for
the whole module (Ray takes ~10 s to start), driven by the unmodified tritonclient.http
client and by plain HTTP for what a client library would never send."""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper
from PIL import Image

from dyt_export import build_model, export_onnx, load_checkpoint, save
from dyt_export.preprocess import preprocess, read_image
from runtimes import open_backend
from runtimes.torch_ref import TorchReference

from conftest import image_batch, small_config

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from runtimes.serving.app import build_app  # noqa: E402
from runtimes.serving.ingress import default_ingress, spare_port  # noqa: E402
from runtimes.serving.launch import local_ray  # noqa: E402
from runtimes.serving.models import ModelSource, ServeConfig, read_facts  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one Ray instance per process: the modules that start Ray share a worker
MAX_BODY = 1 << 20
INGRESS = default_ingress()
"""What `dyt-export serve` puts in front (HAProxy here); test_serving_command also serves behind Ray's proxy."""


def failing_model(path: Path) -> Path:
    """A model that fails inside the runtime for inputs above 4 (an out-of-range Gather index
    taken from the input's maximum) and runs for ordinary images: a runtime failure on demand."""
    cfg = small_config(depth=1)
    pixels = cfg.in_chans * cfg.img_size ** 2
    weights = helper.make_tensor("w", TensorProto.FLOAT, [pixels, cfg.num_classes], np.zeros(pixels * cfg.num_classes))
    table = helper.make_tensor("table", TensorProto.FLOAT, [5, cfg.num_classes], np.arange(5.0 * cfg.num_classes))
    nodes = [helper.make_node("Flatten", ["pixel_values"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["product"]),
             helper.make_node("ReduceMax", ["pixel_values"], ["top"], keepdims=0),
             helper.make_node("Cast", ["top"], ["index"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "index"], ["row"]),
             helper.make_node("Add", ["product", "row"], ["logits"])]
    graph = helper.make_graph(nodes, "failing", [helper.make_tensor_value_info(
        "pixel_values", TensorProto.FLOAT, ["batch", cfg.in_chans, cfg.img_size, cfg.img_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.num_classes])], [weights, table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"dyt.config": cfg.to_json(), "dyt.outputs": '["logits"]'})
    onnx.save(model, path)
    return path


@dataclass
class Server:
    url: str
    port: int
    small: Path
    """A seeded small DyT exported with token masks, served as `small`."""
    checkpoint: Path
    demo: Path

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(f"127.0.0.1:{self.port}", network_timeout=120)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


CLOSED = 0
"""The status `outcome` gives a request whose connection closed without a whole answer."""


def outcome(call: Callable[[], tuple[int, dict[str, str], bytes]]) -> int:
    """The status of `call`'s answer, or CLOSED if the server closed the connection without one
    or partway through it."""
    try:
        return call()[0]
    except (ConnectionResetError, BrokenPipeError, http.client.IncompleteRead):  # RemoteDisconnected is a ConnectionResetError
        return CLOSED


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    from validation.demo import ensure_demo_model

    work = tmp_path_factory.mktemp("serving")
    checkpoint = save(build_model(small_config(), seed=0), work / "small.safetensors")
    small = export_onnx(load_checkpoint(checkpoint), work / "small.onnx", with_masks=True).path
    demo = ensure_demo_model().onnx
    port = spare_port()
    config = ServeConfig(models=(ModelSource("small", str(small)), ModelSource("failing", str(failing_model(work / "f.onnx"))),
                                 ModelSource("digits", str(demo))),
                         runtime="ort-cpu", replicas=1, threads=1, max_batch=8, batch_wait_s=0.03, max_body_bytes=MAX_BODY)
    with local_ray(INGRESS, num_cpus=4):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="dyt", route_prefix="/")
        yield Server(f"http://127.0.0.1:{port}", port, small, checkpoint, demo)
        serve.shutdown()


def _infer(client: triton.InferenceServerClient, model: str, x: np.ndarray, binary: bool = True) -> triton.InferResult:
    tensor = triton.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "token_masks")]
    return client.infer(model, [tensor], outputs=outputs if model != "failing" else None)


def test_the_local_instance_gives_its_front_door_time_to_start(server):
    """Ray Serve's controller reads how long a new front door may take to be ready from its
    own environment (a Ray worker's): the local instance's workers have the patient value."""
    from runtimes.serving.launch import PATIENT_START

    def environment() -> dict[str, str | None]:
        return {key: os.environ.get(key) for key in PATIENT_START}

    assert ray.get(ray.remote(num_cpus=0)(environment).remote()) == PATIENT_START


def test_health_and_model_metadata(server):
    client = server.client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("small") and not client.is_model_ready("nope")
    metadata = client.get_model_metadata("small")
    assert metadata["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                                   {"name": "token_masks", "datatype": "BOOL", "shape": [-1, 3, 17]}]
    assert client.get_model_metadata("small", model_version="1")["versions"] == ["1"]
    status, _, body = request(server.port, "GET", "/v2/models/small/versions/2")
    assert status == 404 and json.loads(body) == {"error": "model small has no version '2'; it is served as version 1"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_gives_the_backend_and_pytorch_answer(server, binary):
    x = image_batch(4, seed=1)
    result = _infer(server.client(), "small", x, binary)
    local = open_backend("ort-cpu", server.small, threads=1).run({"pixel_values": x})
    torch = TorchReference(server.checkpoint).run({"pixel_values": x})
    logits, masks = result.as_numpy("logits"), result.as_numpy("token_masks")
    assert logits.dtype == np.float32 and masks.dtype == bool
    scale = np.abs(local["logits"]).max()
    assert np.abs(logits - local["logits"]).max() <= 1e-5 * scale
    assert np.abs(logits - torch["logits"]).max() <= 1e-4 * scale
    assert np.array_equal(masks, local["token_masks"]) and np.array_equal(masks, torch["token_masks"])
    assert result.get_response()["parameters"]["batch_images"] == 4


def _spread_images(backend, count: int) -> np.ndarray:
    """`count` images from a pool, from the fewest active tokens to the most."""
    pool = image_batch(48, seed=2)
    active = backend.run({"pixel_values": pool})["token_masks"].sum(axis=(1, 2))
    order = np.argsort(active)
    picked = order[np.linspace(0, len(order) - 1, count).round().astype(int)]
    assert active[picked[-1]] >= 1.5 * active[picked[0]], active[picked]  # very different activation
    return pool[picked]


def test_a_batch_mixing_activations_gives_each_image_its_single_image_answer(server):
    """Eight images from the fewest to the most active tokens, batched within one request and
    across eight concurrent requests (in at most two batches): each gets the logits it gets
    alone (<= 1e-5 of its largest). The concurrent ones go to an application of their own
    whose batches wait 1 s for company: the first batch takes whatever has arrived when it
    finds the model idle, and the next, formed while that one runs (PIPELINE), would close on
    the module's 30 ms with whichever requests a busy machine had delivered by then."""
    backend = open_backend("ort-cpu", server.small, threads=1)
    images = _spread_images(backend, 8)
    alone = [backend.run({"pixel_values": image[None]}) for image in images]

    def check(logits: np.ndarray, masks: np.ndarray, i: int) -> None:
        assert np.abs(logits - alone[i]["logits"][0]).max() <= 1e-5 * np.abs(alone[i]["logits"]).max()
        assert np.array_equal(masks, alone[i]["token_masks"][0])

    together = _infer(server.client(), "small", images)
    for i in range(8):
        check(together.as_numpy("logits")[i], together.as_numpy("token_masks")[i], i)
    config = ServeConfig(models=(ModelSource("small", str(server.small)),), runtime="ort-cpu", replicas=1, threads=1,
                         max_batch=16, batch_wait_s=1.0)
    serve.run(build_app(config), name="mix", route_prefix="/mix")
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _infer(triton.InferenceServerClient(f"127.0.0.1:{server.port}/mix"),
                                                     "small", images[i:i + 1]), range(8)))
    finally:
        serve.delete("mix")
    for i, result in enumerate(results):
        check(result.as_numpy("logits")[0], result.as_numpy("token_masks")[0], i)
    sizes = [r.get_response()["parameters"]["batch_images"] for r in results]
    assert sum(1 / size for size in sizes) <= 2 + 1e-9, sizes  # a batch of n single-image requests adds n * 1/n


def _infer_body(x: np.ndarray, datatype: str = "FP32", name: str = "pixel_values") -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _bad_requests() -> dict[str, tuple[str, bytes, dict, int, str]]:
    """name -> (path, body, headers, status, message part) of requests the server must refuse."""
    x = image_batch(1, seed=3)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    inf = x.copy()
    inf[0, 1, 2, 3] = np.inf
    body, headers = _infer_body(x)
    noise = _png(np.random.default_rng(0).random((64, 64)))
    infer = "/v2/models/small/infer"
    classify = "/v1/models/digits/classify"
    return {
        "wrong-input-name": (infer, *_infer_body(x, name="image"), 400, "bad inputs (missing pixel_values"),
        "wrong-dtype": (infer, *_infer_body(x.astype(np.float64), "FP64"), 400, "has dtype float64"),
        "wrong-shape": (infer, *_infer_body(x[:, :, :16]), 400, "has shape [1, 3, 16, 32]"),
        "wrong-rank": (infer, *_infer_body(x[0]), 400, "has shape [3, 32, 32]"),
        "nan": (infer, *_infer_body(nan), 400, "holds 1 NaN/inf value(s)"),
        "inf": (infer, *_infer_body(inf), 400, "holds 1 NaN/inf value(s)"),
        "truncated-binary": (infer, body[:-100], headers, 400, "the body is cut short"),
        "malformed-json": (infer, b'{"inputs": [', {}, 400, "the request is not valid JSON"),
        "unknown-output": (infer, json.dumps({"inputs": [{"name": "pixel_values", "shape": list(x.shape),
                                                          "datatype": "FP32", "data": x.ravel().tolist()}],
                                              "outputs": [{"name": "probabilities"}]}).encode(), {}, 400,
                           "has no output probabilities"),
        "over-size-limit": (infer, bytes(MAX_BODY + 1), {}, 413, f"this server takes at most {MAX_BODY}"),
        "compressed": (infer, body, {**headers, "Content-Encoding": "gzip"}, 415, "Content-Encoding gzip"),
        "unknown-model": ("/v2/models/nope/infer", body, headers, 404, "unknown model 'nope'"),
        "unknown-route": ("/v3/everything", b"", {}, 404, "no route POST /v3/everything"),
        "not-an-image": (classify, b"GIF89a but not really", {}, 400, "not an image file"),
        "truncated-image": (classify, noise[:len(noise) // 2], {}, 400, "cannot decode image"),
        "empty-image": (classify, b"", {}, 400, "the request body is empty"),
        "bad-top-k": (classify + "?top_k=zero", _png(np.zeros((8, 8))), {}, 400, "top_k must be a positive integer"),
    }


def _png(image01: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(image01 * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(_bad_requests()))
def test_bad_requests_get_a_one_line_4xx(server, case):
    path, body, headers, status, message = _bad_requests()[case]
    got, response_headers, payload = request(server.port, "POST", path, body, headers)
    assert got == status and response_headers["content-type"] == "application/json", payload[:300]
    error = json.loads(payload)
    assert list(error) == ["error"] and message in error["error"] and "\n" not in error["error"], error


def test_a_wrong_method_is_405_with_the_allowed_one(server):
    status, headers, payload = request(server.port, "GET", "/v2/models/small/infer")
    assert status == 405 and headers["allow"] == "POST" and "use POST" in json.loads(payload)["error"]


def test_a_runtime_failure_is_a_one_line_500_and_the_model_keeps_serving(server):
    client = server.client()
    x = image_batch(1, seed=4)
    with pytest.raises(triton.InferenceServerException) as failed:
        _infer(client, "failing", np.full_like(x, 100.0))
    assert failed.value.status() == "500" and "failed to run" in failed.value.message()
    assert "\n" not in failed.value.message() and "Traceback" not in failed.value.message()
    assert _infer(client, "failing", x).as_numpy("logits").shape == (1, 10)


def test_a_flood_of_bad_requests_leaves_every_good_one_answered_right(server):
    """Six threads send good requests between every kind of bad one: each bad one is refused,
    each good one is answered with its own logits, none is dropped or mixed up."""
    bad = _bad_requests()
    images = image_batch(12, seed=5)
    expected = open_backend("ort-cpu", server.small, threads=1).run({"pixel_values": images})["logits"]
    jobs = [("bad", name) for name in sorted(bad)] * 3 + [("good", i) for i in range(len(images))] * 3
    np.random.default_rng(0).shuffle(jobs)

    def send(job):
        kind, key = job
        if kind == "bad":
            path, body, headers, status, _ = bad[key]
            return kind, key, request(server.port, "POST", path, body, headers)[0] == status
        body, headers = _infer_body(images[key:key + 1])
        status, response_headers, payload = request(server.port, "POST", "/v2/models/small/infer", body, headers)
        if status != 200:
            return kind, key, False
        assert "inference-header-content-length" not in response_headers  # no output was asked for in binary
        logits = triton.InferenceServerClient.parse_response_body(payload).as_numpy("logits")[0]
        return kind, key, bool(np.abs(logits - expected[key]).max() <= 1e-5 * np.abs(expected[key]).max())

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(send, jobs))
    assert len(outcomes) == len(jobs)
    wrong = [(kind, key) for kind, key, ok in outcomes if not ok]
    assert not wrong, wrong


@pytest.mark.slow
def test_the_image_route_gives_the_demo_accuracy_on_the_digits_test_split(server):
    """The 450 test digits as PNG files (8x8, as a user has them): the route answers each with
    the runtime's answer for the image as `preprocess` prepares it, and overall with the
    demo's accuracy on the digits split (validation's tensors) within one image in a hundred."""
    from validation.data import digits, digits_split

    images, labels = digits_split("test")
    files = [_png(image) for image in images]
    backend = open_backend("ort-cpu", server.demo, threads=1)
    spec = read_facts(ModelSource("digits", str(server.demo))).preprocess
    local = backend.run({"pixel_values": np.stack([preprocess(read_image(f), spec) for f in files])})

    def classify(data: bytes) -> dict:
        status, _, payload = request(server.port, "POST", "/v1/models/digits/classify?top_k=3", data)
        assert status == 200, payload
        return json.loads(payload)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(classify, files))
    top1 = np.array([a["top_k"][0]["class"] for a in answers])
    assert np.array_equal(top1, local["logits"].argmax(1))
    assert all(a["top_k"][0]["label"] == str(a["top_k"][0]["class"]) and len(a["top_k"]) == 3 for a in answers)
    rates = np.array([list(a["activation"].values()) for a in answers])
    assert np.allclose(rates, local["token_masks"][:, :, 1:].mean(axis=2))
    reference = digits(32)
    reference_accuracy = (backend.run({"pixel_values": reference.pixel_values})["logits"].argmax(1) == labels).mean()
    assert abs((top1 == labels).mean() - reference_accuracy) <= 0.01
    assert (top1 == labels).mean() >= 0.9


@pytest.mark.slow
def test_a_killed_replica_fails_its_requests_and_is_replaced(server, tmp_path):
    """A second application (one replica, batches held 2 s). A large request finds the model
    idle and runs at once, without waiting for company; three requests sent while it runs wait
    in the next batch, and the replica process is killed under them: they fail within seconds,
    not a hang. Ray starts a new replica and later requests are answered.
    Failing is a 5xx, or behind HAProxy also a connection closed without an answer: HAProxy
    reuses idle connections to replicas and closes the client's when one dies under its request
    (docs/serving.md), as it may for a request sent just after the kill."""
    import ray._private.state as ray_state

    config = ServeConfig(models=(ModelSource("small", str(server.small)),), runtime="ort-cpu", replicas=1, threads=1,
                         max_batch=1024, batch_wait_s=2.0)
    serve.run(build_app(config), name="kill", route_prefix="/kill")

    def replica_pids() -> set[int]:
        return {actor["Pid"] for actor in ray_state.actors().values()
                if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith("ServeReplica:kill:")}

    path = "/kill/v2/models/small/infer"
    large, large_headers = _infer_body(image_batch(512, seed=6))
    body, headers = _infer_body(image_batch(1, seed=6))
    (victim,) = replica_pids()
    try:
        with ThreadPoolExecutor(4) as pool:
            started = time.monotonic()
            alone = pool.submit(lambda: (request(server.port, "POST", path, large, large_headers, 60)[0],
                                         time.monotonic() - started))
            time.sleep(0.1)
            held = [pool.submit(request, server.port, "POST", path, body, headers, 60) for _ in range(3)]
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            statuses = [outcome(future.result) for future in held]
            assert time.monotonic() - killed < 30 and all(status == CLOSED or status >= 500 for status in statuses), statuses
        status, seconds = alone.result()
        assert status == 200 and seconds < 2.0  # ran at once: waiting for company would take the 2 s batch wait alone
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = outcome(lambda: request(server.port, "POST", path, body, headers, 60))
            if status == 200:
                break
            time.sleep(1)
        assert status == 200 and replica_pids() and victim not in replica_pids()
    finally:
        serve.delete("kill")
