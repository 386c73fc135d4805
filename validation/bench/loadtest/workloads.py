"""The models the loadtest serves and the requests it sends them.

* `demo`: the demo DyT (`make demo`'s, exported with token masks); binary requests carry the
  450 digits of the test split as the image route prepares them (one a request, and 16 a
  request in one extra row), the image route gets them as 8x8 PNG files.
* `vitb16`: ViT-B/16 DyT built as `make bench` builds it (seeded, dispatchers calibrated to
  activation 0.5 on its seeded image-like pool, public checkpoint layout), exported with token
  masks; binary requests carry that pool (the activation the model was calibrated to), the
  image route gets 32 procedural photo-like scenes as 320x320 JPEG files.
The in-process rows time the same tensors the binary route sends.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dyt_export.preprocess import preprocess, read_image
from runtimes.serving.models import ModelSource, read_facts
from runtimes.serving.protocol import HEADER_LENGTH

from .clients import Request

VITB_RATE = 0.5
VITB_POOL = 32
SCENE_SIZE = 320


@dataclass
class Workload:
    name: str
    onnx: Path
    pixels: np.ndarray
    """[N, C, H, W] float32: what the binary route sends, one image a request."""
    files: list[bytes]
    """Image files for the image route."""
    batches: tuple[int, ...]
    """In-process batch sizes timed."""
    many: int = 0
    """Images per request of the extra row whose requests carry several (0: no such row). For a
    model that runs an image faster than a server handles a request, it shows what the server
    gives when clients send small batches instead of single images."""

    def binary_requests(self, images: int = 1) -> list[Request]:
        """Open Inference Protocol requests of `images` consecutive pictures each, binary tensors
        both ways."""
        requests = []
        for first in range(0, len(self.pixels), images):
            tensor = np.take(self.pixels, range(first, first + images), axis=0, mode="wrap")
            header = json.dumps({"inputs": [{"name": "pixel_values", "shape": list(tensor.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": tensor.nbytes}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            requests.append((f"/v2/models/{self.name}/infer", header + tensor.tobytes(),
                             {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}))
        return requests

    def image_requests(self) -> list[Request]:
        return [(f"/v1/models/{self.name}/classify?top_k=5", data, {"Content-Type": "application/octet-stream"})
                for data in self.files]


def _encode(pictures01: np.ndarray, kind: str) -> list[bytes]:
    files = []
    for picture in pictures01:
        buffer = io.BytesIO()
        Image.fromarray(np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8)).save(buffer, kind, quality=90)
        files.append(buffer.getvalue())
    return files


def demo() -> Workload:
    from validation.data import digits_split
    from validation.demo import ensure_demo_model

    path = ensure_demo_model(log=print).onnx
    spec = read_facts(ModelSource("demo", str(path))).preprocess
    files = _encode(digits_split("test")[0], "PNG")
    pixels = np.stack([preprocess(read_image(data), spec) for data in files])
    return Workload("demo", path, pixels, files, (1, 8, 32, 64), many=16)


def vitb16(work: Path) -> Workload:
    """ViT-B/16 DyT at activation 0.5, built and exported once into `work` (a few minutes),
    then reused while the exporter that wrote it is the one installed."""
    from dyt_export.calibrate import image_like
    from dyt_export.export import current_graph_form, export_onnx, read_metadata
    from validation.bench.models import base_model, calibrated
    from validation.data import scenes

    path = work / f"vitb16-r{VITB_RATE:g}-masks.onnx"
    pool_file = work / "pool.npy"
    if not (path.exists() and pool_file.exists() and current_graph_form(read_metadata(path))):
        work.mkdir(parents=True, exist_ok=True)
        print(f"building ViT-B/16 DyT at activation {VITB_RATE} as make bench does, into {work} (a few minutes)...")
        base = base_model(seed=0)
        pool = image_like(VITB_POOL, size=base.dyt_config.img_size, seed=1)
        model = calibrated(base, VITB_RATE, work, pool, seed=0).model
        export_onnx(model, path, with_masks=True)
        np.save(pool_file, pool.numpy())
    files = _encode(scenes(VITB_POOL, SCENE_SIZE).pixels01(), "JPEG")
    return Workload("vitb16", path, np.load(pool_file), files, (1, 4, 8, 16))
