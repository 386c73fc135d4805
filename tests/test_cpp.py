"""The C++ library (runtimes/cpp) and dyt_infer: same numbers as the Python runtimes, clean
failures, and a build that other CMake projects can embed.

The build is `make cpp` once per session into runtimes/cpp/build (kept between runs, so a
warm run only relinks nothing); pytest-xdist workers take turns through a file lock. The
reference is the Python backend of the same runtime (runtimes.open_backend) at the same
thread setting.
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
from runtimes import open_backend

from conftest import force_dispatcher, image_batch, small_config

REPO = Path(__file__).resolve().parents[1]
CPP = REPO / "runtimes" / "cpp"
BUILD = CPP / "build"
PYTHON_BACKENDS = {"ort": "ort-cpu", "openvino": "openvino"}  # dyt_infer --runtime -> runtimes name
RUNTIMES = tuple(PYTHON_BACKENDS)
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
        # -o: the tests already run in the installed .venv; cpp's `setup` prerequisite would
        # reinstall the package whenever pyproject.toml is newer than the install stamp.
        done = subprocess.run(["make", "-C", str(REPO), "-o", ".venv/.dyt-installed", "cpp"],
                              capture_output=True, text=True)
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
    paths = {"masks": folder / "masks.onnx", "plain": folder / "plain.onnx", "external": folder / "external.onnx"}
    export_onnx(model, paths["masks"], with_masks=True)
    export_onnx(model, paths["plain"])
    export_onnx(model, paths["external"], external_data=True)
    return paths


def python_outputs(runtime: str, model: Path, x: np.ndarray, threads: int | None = None) -> dict[str, np.ndarray]:
    """The Python backend's outputs; threads None is the runtime's default, as dyt_infer without --threads."""
    return open_backend(PYTHON_BACKENDS[runtime], model, threads=threads).run({"pixel_values": x})


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
    """Also removes the masks an earlier run with a masks model wrote beside the same --output."""
    x = image_batch(2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.masks.npy", np.ones((2, 3, 5), np.bool_))  # stale
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", models["plain"],
                   "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "y.masks.npy").exists()
    ref = python_outputs(runtime, models["plain"], x)["logits"]
    assert np.abs(np.load(tmp_path / "y.npy") - ref).max() <= TOLERANCE * np.abs(ref).max()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_input_output_pairs_run_in_one_launch_as_in_separate_ones(dyt_infer, models, tmp_path, runtime):
    """Repeated --input/--output pairs: one model load, each input's own outputs and top-5 block
    under its name, the same numbers as one launch per input; a bad input anywhere stops the
    run before any output is written."""
    pairs = []
    for i, batch in enumerate((3, 1)):
        np.save(tmp_path / f"x{i}.npy", image_batch(batch, seed=i))
        pairs += ["--input", tmp_path / f"x{i}.npy", "--output", tmp_path / f"y{i}.npy"]
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", models["masks"], "--threads", "1", *pairs)
    assert done.returncode == 0, done.stderr
    names = [line for line in done.stdout.splitlines() if line.endswith(".npy:")]
    assert names == [f"{tmp_path / 'x0.npy'}:", f"{tmp_path / 'x1.npy'}:"], done.stdout
    for i in range(2):
        alone = run_cli(dyt_infer, "--runtime", runtime, "--model", models["masks"], "--threads", "1",
                        "--input", tmp_path / f"x{i}.npy", "--output", tmp_path / "alone.npy")
        assert alone.returncode == 0, alone.stderr
        for suffix in (".npy", ".masks.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / f"y{i}{suffix}"), np.load(tmp_path / f"alone{suffix}"))

    done = run_cli(dyt_infer, "--runtime", runtime, "--model", models["masks"], "--input", tmp_path / "x0.npy",
                   "--input", tmp_path / "x1.npy", "--output", tmp_path / "z.npy")
    assert done.returncode == 2 and "give one --output per --input (got 2 --input, 1 --output)" in done.stderr
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", models["masks"], "--input", tmp_path / "x0.npy",
                   "--output", tmp_path / "z0.npy", "--input", tmp_path / "missing.npy", "--output", tmp_path / "z1.npy")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and "missing.npy" in done.stderr
    assert not list(tmp_path.glob("z*"))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_weights_in_external_data_give_the_single_file_logits(dyt_infer, models, tmp_path, runtime):
    """`dyt-export --external-data` writes the weights beside the model; the C++ runtimes find
    them relative to the model file, wherever the program runs from, and name that file when
    the model travelled without it."""
    x = image_batch(2)
    np.save(tmp_path / "x.npy", x)
    for name in ("plain", "external"):
        done = subprocess.run([str(dyt_infer), "--runtime", runtime, "--model", str(models[name]),
                               "--input", str(tmp_path / "x.npy"), "--output", f"{name}.npy"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "external.npy"), np.load(tmp_path / "plain.npy"))
    assert models["external"].with_name("external.onnx.data").stat().st_size > models["external"].stat().st_size

    # The model copied without its weights file: one line that names the missing file.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(models["external"], alone / "external.onnx")
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", alone / "external.onnx",
                   "--input", tmp_path / "x.npy", "--output", tmp_path / "alone.npy")
    assert done.returncode > 0 and len(done.stderr.splitlines()) == 1, done.stderr
    assert f"its weights are kept in {alone / 'external.onnx.data'}, which is missing" in done.stderr

    # ... or with a weights file cut short (an interrupted copy): one line that says so. The
    # copy carries metadata keys "offset" and "length", which must not be read as a tensor's.
    whole = models["external"].with_name("external.onnx.data").read_bytes()
    (alone / "external.onnx.data").write_bytes(whole[:len(whole) // 3])
    proto = onnx.load(str(models["external"]), load_external_data=False)
    onnx.helper.set_model_props(proto, {"offset": "7", "length": str(10 * len(whole))})
    onnx.save(proto, str(alone / "external.onnx"))
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", alone / "external.onnx",
                   "--input", tmp_path / "x.npy", "--output", tmp_path / "alone.npy")
    assert done.returncode > 0 and len(done.stderr.splitlines()) == 1, done.stderr
    assert (f"its weights file {alone / 'external.onnx.data'} is cut short ({len(whole) // 3} bytes where the model "
            f"needs {len(whole)}; copy it again)") in done.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_threads_take_effect_and_bench_prints_throughput(dyt_infer, models, tmp_path, runtime):
    """The thread count printed is OpenVINO's compiled INFERENCE_NUM_THREADS (its default is
    the core count, so 1 is a visible change); ONNX Runtime has no getter, so there it is the value
    set in the session options."""
    np.save(tmp_path / "x.npy", image_batch(2))
    done = run_cli(dyt_infer, "--runtime", runtime, "--model", models["masks"], "--input",
                   tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--threads", "1", "--bench", "3")
    assert done.returncode == 0, done.stderr
    name = "onnxruntime" if runtime == "ort" else runtime
    assert f"runtime: {name}, threads: 1\n" in done.stdout, done.stdout
    match = re.search(rf"bench: {name}, batch 2, 3 runs: .* ([\d.]+) img/s", done.stdout)
    assert match and float(match[1]) > 0, done.stdout


def _write_inputs(folder: Path) -> None:
    good = image_batch(1)
    np.save(folder / "good.npy", good)
    np.save(folder / "small.npy", image_batch(1, size=16))
    np.save(folder / "rank3.npy", good[0])
    np.save(folder / "double.npy", good.astype(np.float64))
    np.save(folder / "fortran.npy", np.asfortranarray(good))
    (folder / "garbage.npy").write_bytes(b"not an array")
    T = onnx.TensorProto
    _cast_model(folder / "other.onnx", "x", {"y": T.FLOAT})
    _cast_model(folder / "int_logits.onnx", "pixel_values", {"logits": T.INT64})
    _cast_model(folder / "byte_masks.onnx", "pixel_values", {"logits": T.FLOAT, "token_masks": T.UINT8})


def _cast_model(path: Path, x: str, outputs: dict[str, int]) -> None:
    """A graph from float32 input `x` [1,3,32,32] to `outputs` (name: ONNX element type), each a Cast of x."""
    info = onnx.helper.make_tensor_value_info
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", [x], [name], to=type_) for name, type_ in outputs.items()], path.stem,
        [info(x, onnx.TensorProto.FLOAT, [1, 3, 32, 32])],
        [info(name, type_, [1, 3, 32, 32]) for name, type_ in outputs.items()])), path)


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
    ("ort", "int_logits.onnx", "good.npy", "'logits' is not float32"),
    ("openvino", "int_logits.onnx", "good.npy", "'logits' is not float32"),
    ("ort", "byte_masks.onnx", "good.npy", "'token_masks' is not bool"),
    ("openvino", "byte_masks.onnx", "good.npy", "'token_masks' is not bool"),
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
        ref = python_outputs(runtime, models["masks"], grey, threads=1)["logits"][0]  # classify's setting
        done = subprocess.run([str(tmp_path / "classify"), runtime, str(models["masks"])],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        cls, logit = re.fullmatch(r"class (\d+) logit (\S+)\n", done.stdout).groups()
        assert int(cls) == int(np.argmax(ref)) and abs(float(logit) - ref.max()) <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("layout", ["release-archive", "debian-headers"])
def test_configure_refuses_headers_newer_than_library(dyt_infer, tmp_path, layout):
    """ORT_API_VERSION above the library's: configuration stops, says why and names a fix that
    works for that layout. The Debian headers are put where the default build unpacks the
    package, so nothing is fetched."""
    build = tmp_path / "build"
    if layout == "release-archive":
        include = tmp_path / "onnxruntime" / "include"
        shutil.copytree(BUILD / "onnxruntime" / "lib", tmp_path / "onnxruntime" / "lib", symlinks=True)
        flags, fix = [f"-DONNXRUNTIME_ROOT={tmp_path / 'onnxruntime'}"], "unmodified release archive"
    else:
        include = build / "onnxruntime" / "debian" / "usr" / "include" / "onnxruntime"
        flags, fix = [], "pip install -U 'onnxruntime>=1.999'"
    shutil.copytree(BUILD / "onnxruntime" / "include", include)
    header = include / "onnxruntime_c_api.h"
    header.write_text(re.sub(r"#define ORT_API_VERSION \d+", "#define ORT_API_VERSION 999", header.read_text()))
    done = _configure(CPP, build, *flags, "-DDYT_WITH_OPENVINO=OFF")
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "declare ORT_API_VERSION 999, newer than the library" in message and fix in message, message
