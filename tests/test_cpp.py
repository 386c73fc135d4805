"""The C++ library (runtimes/cpp) and dyt_infer: same numbers as the Python runtimes, clean
failures, and a build that other CMake projects can embed.

The build is `make cpp` once per session into runtimes/cpp/build (kept between runs, so a
warm run only relinks nothing); pytest-xdist workers take turns through a file lock. The
Python reference calls onnxruntime and openvino directly with the settings dyt::Model uses
(f32 inference precision on OpenVINO, default threads).
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dyt_export import build_model, export_onnx

from conftest import force_dispatcher, image_batch, small_config

REPO = Path(__file__).resolve().parents[1]
CPP = REPO / "runtimes" / "cpp"
BUILD = CPP / "build"
RUNTIMES = ("ort", "openvino")
TOLERANCE = 1e-5  # max |diff| <= this x max |logit|
EMPTY_LAYER, FULL_LAYER = 1, 2


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def dyt_infer() -> Path:
    compiler = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++) on this machine")
    BUILD.mkdir(exist_ok=True)
    with open(BUILD / ".pytest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers share one build tree
        done = subprocess.run(["make", "-C", str(REPO), "cpp"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"make cpp failed:\n{_tail(done.stdout + done.stderr)}")
    return BUILD / "dyt_infer"


def _model():
    """Block 1 activates no patch token, block 2 every token, block 0 some. Narrower than
    small_config's default: each xdist worker exports it twice."""
    model = build_model(small_config(embed_dim=64, num_heads=2, mlp_hidden_dim=256), seed=0)
    force_dispatcher(model, EMPTY_LAYER, active=False)
    force_dispatcher(model, FULL_LAYER, active=True)
    return model


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cpp-models")
    model = _model()
    paths = {"masks": folder / "masks.onnx", "plain": folder / "plain.onnx"}
    export_onnx(model, paths["masks"], with_masks=True)
    export_onnx(model, paths["plain"])
    return paths


def python_outputs(runtime: str, model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    if runtime == "ort":
        import onnxruntime as ort
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, {"pixel_values": x})))
    import openvino as ov
    compiled = ov.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
    result = compiled({"pixel_values": x})
    return {port.get_any_name(): np.asarray(value) for port, value in result.items()}


def run_cli(exe: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_matches_python_runtime(dyt_infer, models, tmp_path, runtime, batch):
    x = image_batch(batch, seed=batch)
    np.save(tmp_path / "x.npy", x)
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", models["masks"],
                   "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert done.returncode == 0, done.stderr

    ref = python_outputs(runtime, models["masks"], x)
    logits, masks = np.load(tmp_path / "y.npy"), np.load(tmp_path / "y.masks.npy")
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    diff = np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert diff <= TOLERANCE, f"{runtime} batch {batch}: max|diff|/max|logit| = {diff:.2e}"
    assert masks.dtype == np.bool_
    np.testing.assert_array_equal(masks, ref["token_masks"])
    assert not masks[:, EMPTY_LAYER, 1:].any() and masks[:, FULL_LAYER].all() and masks[:, :, 0].all()

    printed = [[int(c) for c in re.findall(r"(\d+) \(logit", line)] for line in done.stdout.splitlines()
               if line.startswith("image ")]
    assert printed == np.argsort(-ref["logits"], axis=1, kind="stable")[:, :5].tolist()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_model_without_masks_writes_logits_only(dyt_infer, models, tmp_path, runtime):
    x = image_batch(2)
    np.save(tmp_path / "x.npy", x)
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", models["plain"],
                   "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "y.masks.npy").exists()
    ref = python_outputs(runtime, models["plain"], x)["logits"]
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= TOLERANCE * np.abs(ref).max()


def test_bench_prints_throughput(dyt_infer, models, tmp_path):
    np.save(tmp_path / "x.npy", image_batch(2))
    done = run_cli(dyt_infer, "--runtime", "openvino", "--model", models["masks"], "--input",
                   tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--threads", "1", "--bench", "3")
    assert done.returncode == 0, done.stderr
    match = re.search(r"bench: openvino, batch 2, 3 runs: .* ([\d.]+) img/s", done.stdout)
    assert match and float(match[1]) > 0, done.stdout


def _write_inputs(folder: Path) -> None:
    good = image_batch(1)
    np.save(folder / "good.npy", good)
    np.save(folder / "small.npy", image_batch(1, size=16))
    np.save(folder / "rank3.npy", good[0])
    np.save(folder / "double.npy", good.astype(np.float64))
    np.save(folder / "fortran.npy", np.asfortranarray(good))
    (folder / "garbage.npy").write_bytes(b"not an array")
    other = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 32, 32])]))
    onnx.save(other, folder / "other.onnx")


BAD_INPUTS = [  # (runtime, model, input, what stderr must say)
    ("ort", "missing.onnx", "good.npy", "model file not found"),
    ("openvino", "missing.onnx", "good.npy", "model file not found"),
    ("ort", "MODEL", "small.npy", "input shape [1,3,16,16] does not fit the model, which takes [?,3,32,32]"),
    ("openvino", "MODEL", "small.npy", "input shape [1,3,16,16] does not fit the model, which takes [?,3,32,32]"),
    ("ort", "MODEL", "rank3.npy", "expected 4 dimensions"),
    ("ort", "MODEL", "double.npy", "is not little-endian float32"),
    ("ort", "MODEL", "fortran.npy", "Fortran-order"),
    ("openvino", "MODEL", "garbage.npy", "not a .npy file"),
    ("ort", "MODEL", "missing.npy", "cannot open"),
    ("tensorrt", "MODEL", "good.npy", "unknown runtime 'tensorrt'"),
    ("ort", "other.onnx", "good.npy", "not a DyT export"),
    ("openvino", "other.onnx", "good.npy", "not a DyT export"),
    ("openvino", "garbage.npy", "good.npy", "not an ONNX model"),
]


@pytest.mark.parametrize("runtime, model, image, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_nonzero_exit(dyt_infer, models, tmp_path, runtime, model, image, message):
    _write_inputs(tmp_path)
    model_path = models["masks"] if model == "MODEL" else tmp_path / model
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", model_path,
                   "--input", tmp_path / image, "--output", tmp_path / "y.npy")
    assert done.returncode > 0  # an error exit, not a signal
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "y.npy").exists()


def _configure(source: Path, build: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                           f"-DDYT_PYTHON={sys.executable}", *flags], capture_output=True, text=True)


@pytest.mark.slow
def test_embedding_example_builds_and_classifies(dyt_infer, models, tmp_path):
    """examples/embed is the README's snippet: add_subdirectory + dyt::model. Built here with
    -DONNXRUNTIME_ROOT pointing at the release-archive layout the main build assembled, which
    also covers that option."""
    done = _configure(CPP / "examples" / "embed", tmp_path, f"-DONNXRUNTIME_ROOT={BUILD / 'onnxruntime'}")
    assert done.returncode == 0, _tail(done.stdout + done.stderr)
    done = subprocess.run(["cmake", "--build", str(tmp_path), "--parallel", "2"], capture_output=True, text=True)
    assert done.returncode == 0, _tail(done.stdout + done.stderr)

    grey = np.full((1, 3, 32, 32), 0.5, np.float32)
    for runtime in RUNTIMES:
        ref = python_outputs(runtime, models["masks"], grey)["logits"][0]
        done = subprocess.run([str(tmp_path / "classify"), runtime, str(models["masks"])],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        cls, logit = re.fullmatch(r"class (\d+) logit (\S+)\n", done.stdout).groups()
        assert int(cls) == int(np.argmax(ref)) and abs(float(logit) - ref.max()) <= 1e-4 * np.abs(ref).max()


def test_configure_refuses_headers_newer_than_library(dyt_infer, tmp_path):
    """ORT_API_VERSION above the library's: configuration stops and says why."""
    root = tmp_path / "onnxruntime"
    shutil.copytree(BUILD / "onnxruntime" / "include", root / "include")
    shutil.copytree(BUILD / "onnxruntime" / "lib", root / "lib", symlinks=True)
    header = root / "include" / "onnxruntime_c_api.h"
    header.write_text(re.sub(r"#define ORT_API_VERSION \d+", "#define ORT_API_VERSION 999", header.read_text()))
    done = _configure(CPP, tmp_path / "build", f"-DONNXRUNTIME_ROOT={root}", "-DDYT_WITH_OPENVINO=OFF")
    assert done.returncode != 0
    assert "declare ORT_API_VERSION 999, newer than the library" in " ".join(done.stderr.split())
