"""The loadtest's requests and its verdict: what the server parses from a request carrying
several images, and which measured points and in-process rows each target is judged on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtimes.serving.protocol import HEADER_LENGTH, decode_infer
from validation.bench.loadtest.clients import Point
from validation.bench.loadtest.report import CAP, OFF, checks, markdown
from validation.bench.loadtest.workloads import Workload


def _workload(n: int = 10) -> Workload:
    pixels = np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)
    return Workload("m", Path("m.onnx"), pixels, [], (1, 8), many=4)


@pytest.mark.parametrize("images", [1, 4])
def test_binary_requests_carry_consecutive_images_and_wrap(images: int) -> None:
    workload = _workload()
    requests = workload.binary_requests(images)
    assert len(requests) == -(-10 // images)
    seen = []
    for path, body, headers in requests:
        assert path == "/v2/models/m/infer"
        tensor = decode_infer(body, headers[HEADER_LENGTH]).inputs["pixel_values"]
        assert tensor.shape == (images, 3, 8, 8)
        seen.append(tensor)
    expected = workload.pixels[np.arange(len(requests) * images) % 10]  # the last request wraps to the first images
    np.testing.assert_array_equal(np.concatenate(seen), expected)


def _point(threads: int, batching: str, clients: int, images: int, img_per_s: float, p99: float = 10.0,
           errors: int = 0) -> Point:
    return Point("vitb16", "ort-cpu", threads, "haproxy", "binary", batching, "8 images", clients, images, requests=100,
                 errors=errors, seconds=10.0, req_per_s=img_per_s / images, img_per_s=img_per_s, p50_ms=5.0, p90_ms=8.0,
                 p99_ms=p99, mean_batch=2.0)


def _row(threads: int, batch: int, img_per_s: float, p50: float) -> dict:
    return {"model": "vitb16", "runtime": "ort-cpu", "threads": threads, "batch": batch, "img_per_s": img_per_s,
            "p50_ms": p50, "p99_ms": p50 * 1.25, "activation_rate": 0.5}


def test_checks_judge_each_thread_setting_and_the_many_image_row_apart() -> None:
    in_process = [_row(2, 1, 50.0, 20.0), _row(2, 8, 100.0, 80.0), _row(1, 1, 30.0, 33.0), _row(1, 8, 30.0, 260.0)]
    points = [_point(2, CAP, 1, 1, 40.0, p99=27.0), _point(2, CAP, 32, 1, 60.0), _point(2, CAP, 32, 4, 90.0, errors=1),
              _point(2, OFF, 32, 1, 50.0), _point(1, CAP, 1, 1, 28.0, p99=36.0), _point(1, CAP, 32, 1, 27.0)]
    rows = {(r["threads"], r["target"].split(" (")[0].split(" /")[0]): r for r in checks(in_process, points)}
    one = rows[2, "served img/s at 32 clients, 1 image(s) a request"]
    many = rows[2, "served img/s at 32 clients, 4 image(s) a request"]
    assert (one["value"], one["met"]) == (pytest.approx(0.6), False)
    assert (many["value"], many["met"]) == (pytest.approx(0.9), True)
    # batching gain from the one-image rows only: (60 / 50 - 1) / (100 / 50 - 1)
    assert rows[2, "batching gain realised at 32 clients"]["value"] == pytest.approx(0.2)
    assert rows[2, "errors, all points"]["value"] == 1 and not rows[2, "errors, all points"]["met"]
    assert rows[2, "p99 at 1 client"]["value"] == pytest.approx(27.0 / 20.0)
    # one thread: judged against the one-thread in-process rows, whose best is 30 img/s at batch 1
    assert rows[1, "served img/s at 32 clients, 1 image(s) a request"]["value"] == pytest.approx(0.9)
    assert rows[1, "p99 at 1 client"]["value"] == pytest.approx(36.0 / 33.0) and rows[1, "p99 at 1 client"]["met"]
    assert rows[1, "errors, all points"]["value"] == 0
    assert (1, "served img/s at 32 clients, 4 image(s) a request") not in rows
    record = {"command": "x", "minutes": 1.0, "threads": [2, 1], "machine": {"cpu": "c", "usable_cores": 2},
              "in_process": in_process, "checks": checks(in_process, points)}
    table = markdown(record, points)
    assert "| vitb16 | ort-cpu | 2 | haproxy | binary | 8 images | 32 | 4 | 22.5 | 90.0 |" in table
