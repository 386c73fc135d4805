"""ORT-CUDA made ready for a GPU (issue 22, item 5), tested as far as a machine without one
allows: node placement read from ORT's own report and classified, strict_placement, the IO
binding path (run on the CPU provider), the NVIDIA driver query (against a fake libcuda),
the onnxruntime-gpu choice of `make setup-cuda`, and `make gpu-check` refusing at once.
Tests that need a GPU are skipped, with the reason, where ort-cuda is not available."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper
from packaging.version import Version

import runtimes.ort_cuda
import validation.bench.gpu_check as gpu_check
from conftest import image_batch, small_config
from dyt_export import build_model, export_onnx, load_checkpoint, save
from runtimes import Availability, BackendError, get_backend, open_backend
from runtimes.cuda_driver import Driver, device_label, query_driver
from runtimes.cuda_setup import SetupError, cuda_major, installed, pick, plan
from runtimes.ort_cuda import OrtCudaBackend, _native_stderr, _ort_cause, _probe_model
from runtimes.ort_placement import RECORD_KEY, classify, read_placement
from validation.cli import main as validation_main
from validation.harness import Options, validate

CUDA = get_backend("ort-cuda").availability()
needs_gpu = pytest.mark.skipif(not CUDA, reason=f"ort-cuda is not available here: {CUDA.reason}")
REAL_SESSION = onnxruntime.InferenceSession
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A saved small DyT and its dynamic export with token masks (the reference follows the
    checkpoint named in the export's metadata)."""
    root = tmp_path_factory.mktemp("cuda")
    checkpoint = save(build_model(small_config(), seed=0), root / "small.safetensors")
    path = root / "small.onnx"
    export_onnx(load_checkpoint(checkpoint), path, with_masks=True)
    return path


class FakeCudaSession:
    """A CPU session that claims CUDA started: ORT's real placement report then puts every
    node on the CPU, which is what a CUDA session with no usable kernels would report."""

    def __init__(self, path, options, providers, **_):
        self.requested = providers
        self._real = REAL_SESSION(path, options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CUDAExecutionProvider": dict(self.requested[0][1])}

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def fake_cuda(monkeypatch):
    """ort-cuda 'available', its sessions FakeCudaSession; yields the sessions made."""
    made = []

    def factory(*args, **kwargs):
        made.append(FakeCudaSession(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(runtimes.ort_cuda, "cuda_availability", lambda: Availability(True))
    monkeypatch.setattr(onnxruntime, "InferenceSession", factory)
    return made


# --- node placement -------------------------------------------------------------------

def _shape_graph() -> onnx.ModelProto:
    """x [batch, 4] float -> MatMul; a shape sub-graph (Shape -> Gather -> Unsqueeze ->
    Concat -> Reshape's shape input); a mask (Greater) and NonZero on it."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"], name="unsq"),
        helper.make_node("Concat", ["b1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["y", "target"], ["z"], name="reshape"),
        helper.make_node("Greater", ["z", "thr"], ["mask"], name="greater"),
        helper.make_node("NonZero", ["mask"], ["idx"], name="nonzero"),
    ]
    inits = [helper.make_tensor("w", f, [4, 4], np.ones(16, np.float32)),
             helper.make_tensor("zero", i64, [], [0]), helper.make_tensor("axes", i64, [1], [0]),
             helper.make_tensor("minus1", i64, [1], [-1]), helper.make_tensor("thr", f, [], [0.5])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["batch", 4])],
                              [helper.make_tensor_value_info("idx", i64, [2, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_placement_tells_compute_from_shape_nodes():
    """Only the nodes off the provider count; Shape reads no data; a node ORT made itself
    (absent from the file) is compute, since its tensors cannot be seen."""
    assigned = [("CUDAExecutionProvider", "mm", "MatMul"), ("CUDAExecutionProvider", "shape", "Shape"),
                ("CPUExecutionProvider", "gather", "Gather"), ("CPUExecutionProvider", "unsq", "Unsqueeze"),
                ("CPUExecutionProvider", "concat", "Concat"), ("CPUExecutionProvider", "reshape", "Reshape"),
                ("CPUExecutionProvider", "greater", "Greater"), ("CPUExecutionProvider", "nonzero", "NonZero"),
                ("CPUExecutionProvider", "MatMulAddFusion_1", "Gemm")]
    placement = classify(assigned, _shape_graph(), "CUDAExecutionProvider")
    assert placement.nodes == 9 and placement.off_provider == 7
    assert placement.cpu_compute == {"Reshape": 1, "Greater": 1, "Gemm": 1}  # they read float data
    assert placement.cpu_shape == {"Gather": 1, "Unsqueeze": 1, "Concat": 1, "NonZero": 1}
    on_cpu = classify([("CPUExecutionProvider", "shape", "Shape")], _shape_graph(), "CUDAExecutionProvider")
    assert on_cpu.cpu_shape == {"Shape": 1} and not on_cpu.cpu_compute
    assert placement.summary() == ("2 of 9 nodes on CUDAExecutionProvider; on the CPU: compute Reshape x1, Greater x1, "
                                   "Gemm x1; shape/index Gather x1, Unsqueeze x1, Concat x1, NonZero x1")


def test_placement_comes_from_onnx_runtimes_own_report(small):
    """The same mechanism the CUDA backend uses, on a real CPU session: asked for CUDA, every
    node is off the provider and the DyT dispatch splits into compute and index work."""
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry(RECORD_KEY, "1")
    session = REAL_SESSION(str(small), options, providers=["CPUExecutionProvider"])
    placement = read_placement(session, small, "CUDAExecutionProvider")
    assert placement.off_provider == placement.nodes > 0
    assert {"MatMul", "ScatterND", "Gather"} <= set(placement.cpu_compute)  # activations and the dispatch's data
    assert {"NonZero", "Or"} <= set(placement.cpu_shape)  # token masks and their indices
    assert read_placement(session, small, "CPUExecutionProvider").off_provider == 0
    unrecorded = REAL_SESSION(str(small), providers=["CPUExecutionProvider"])
    assert read_placement(unrecorded, small, "CUDAExecutionProvider") is None


def test_cuda_backend_reports_cpu_nodes_and_strict_placement_refuses_them(small, fake_cuda):
    backend = open_backend("ort-cuda", small, threads=1)
    placement = backend.info()["placement"]
    assert placement["provider"] == "CUDAExecutionProvider" and placement["on_provider"] == 0
    assert placement["cpu_compute"]["MatMul"] > 0 and placement["cpu_shape"]["NonZero"] > 0
    [note] = backend.notes()
    assert note.startswith("ort-cuda: 0 of ") and "on the CPU: compute " in note and "MatMul x" in note
    with pytest.raises(BackendError) as refused:
        open_backend("ort-cuda", small, strict_placement=1)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"ort-cuda: strict_placement: {sum(placement['cpu_compute'].values())} "
                                                      f"compute node(s) of small.onnx run on the CPU, not CUDAExecutionProvider: ")
    assert "MatMul x" in message and "NonZero" not in message  # index work on the CPU is allowed


def test_strict_placement_without_a_placement_report_is_refused(small, fake_cuda, monkeypatch):
    monkeypatch.setattr(runtimes.ort_session, "read_placement", lambda *_: None)
    assert "cannot report which nodes run on the CPU" in open_backend("ort-cuda", small).notes()[0]
    with pytest.raises(BackendError, match="strict_placement cannot be checked: onnxruntime .* cannot report"):
        open_backend("ort-cuda", small, strict_placement=True)


@pytest.mark.parametrize("option, message", [
    ({"device_id": -1}, "device_id must be a CUDA device number >= 0, got -1"),
    ({"device_id": True}, "device_id must be a CUDA device number >= 0, got True"),
    ({"strict_placement": 2}, "strict_placement must be 0 or 1, got 2"),
    ({"bogus": 1}, "ort-cuda takes no option 'bogus'; its options: device_id, strict_placement, threads,"),
])
def test_cuda_options_are_checked(small, fake_cuda, option, message):
    with pytest.raises(BackendError, match=message.replace("(", r"\(")):
        open_backend("ort-cuda", small, **option)


def test_memory_arena_reaches_the_gpu_arena(small, fake_cuda):
    """memory_arena=False: the CUDA arena grows by what is asked and shrinks after each call
    (the CPU arena flag alone does not touch the GPU's)."""
    arena = open_backend("ort-cuda", small, device_id=0, memory_arena=False)
    assert fake_cuda[-1].requested == [("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0",
                                                                  "arena_extend_strategy": "kSameAsRequested"})]
    assert arena._run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "gpu:0"
    info = arena.info()
    assert info["memory_arena"] is False and info["device"].startswith("CUDA:0") and info["io_binding"] == "cuda"
    default = open_backend("ort-cuda", small)
    assert fake_cuda[-1].requested[0][1]["arena_extend_strategy"] == "kNextPowerOfTwo" and default._run_options is None


def test_io_binding_path_gives_the_sessions_answers(small, fake_cuda):
    """The CUDA backend's run path (an IOBinding per call, outputs bound by device without a
    shape) on the CPU device, which ORT also binds: same answers as a plain ort-cpu run."""
    backend = open_backend("ort-cuda", small, threads=1)
    backend.binding_device = "cpu"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    reference = REAL_SESSION(str(small), options, providers=["CPUExecutionProvider"])
    images = image_batch(7)
    for batch in (1, 2, 7):
        got = backend.run({"pixel_values": images[:batch]})
        logits, masks = reference.run(["logits", "token_masks"], {"pixel_values": images[:batch]})
        np.testing.assert_array_equal(got["logits"], logits)
        np.testing.assert_array_equal(got["token_masks"], masks)


def test_validation_records_and_logs_the_placement(small, fake_cuda, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(OrtCudaBackend, "binding_device", "cpu")
    lines: list[str] = []
    outcome = validate(Options(runtime="ort-cuda", model=small, out=tmp_path, limit=16, throughput=False,
                               threads=(1,)), log=lines.append)
    assert outcome.parity.passed
    info = outcome.record["runtime_info"]  # the record passed the schema when it was written
    assert info["placement"]["cpu_compute"] and info["device"].startswith("CUDA:0")
    assert any(line.startswith("ort-cuda: 0 of ") and "MatMul x" in line for line in lines)
    code = validation_main(["--runtime", "ort-cuda", "--model", str(small), "--out", str(tmp_path / "strict"),
                            "--no-throughput", "--option", "strict_placement=1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("python -m validation: error: ort-cuda: strict_placement: ") and not (tmp_path / "strict").exists()


# --- availability ---------------------------------------------------------------------

def test_probe_model_is_readable_by_every_supported_onnxruntime():
    """onnx stamps its own newest IR version (14 with onnx 1.23), which onnxruntime-gpu 1.31
    refuses; the probe must load on the project's oldest onnxruntime too (1.21: IR <= 10)."""
    assert onnx.IR_VERSION > 10 and onnx.load_from_string(_probe_model()).ir_version <= 10


def test_availability_stops_at_the_driver_before_any_session(monkeypatch):
    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: pytest.fail("a session was started"))
    monkeypatch.setattr(runtimes.ort_cuda, "query_driver", lambda: Driver(None, (), "no NVIDIA driver (test)"))
    assert runtimes.ort_cuda.cuda_availability.__wrapped__() == Availability(False, "no NVIDIA driver (test)")
    monkeypatch.setattr(runtimes.ort_cuda, "query_driver", lambda: Driver((12, 4), ("GPU",)))
    monkeypatch.setattr(onnxruntime, "cuda_version", "13.0", raising=False)
    reason = runtimes.ort_cuda.cuda_availability.__wrapped__().reason
    assert reason == f"the NVIDIA driver supports CUDA 12.4, onnxruntime-gpu {onnxruntime.__version__} is built for CUDA 13.0: update the driver"


def test_availability_is_checked_with_torch_loaded():
    """As validation runs it: torch first, its CUDA libraries in the process."""
    code = "import sys; from runtimes.ort_cuda import cuda_availability; cuda_availability(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "True", done.stderr


def test_onnx_runtimes_reason_is_taken_from_its_native_log(capfd):
    """ORT says why the CUDA provider did not load only in its coloured log on fd 2 (text
    from onnxruntime-gpu 1.31.1 without libcuda); the probe captures it for the reason."""
    logged = ("\x1b[1;31m2026-12-02 11:28:59.783553519 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
              "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
              "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
              "libonnxruntime_providers_cuda.so with error: libcuda.so.1: cannot open shared object file\x1b[m\n"
              "\x1b[0;93m2026-12-02 11:28:59.783686788 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
              "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider.\x1b[m\n")
    with _native_stderr() as lines:
        os.write(2, logged.encode())
    assert capfd.readouterr().err == ""
    assert _ort_cause(lines) == "Failed to load library libonnxruntime_providers_cuda.so with error: libcuda.so.1: cannot open shared object file"
    assert _ort_cause(["2026-12-02 11:28:59 [W:onnxruntime:Default, x.cc:1] only a warning"]) == ""


# --- the NVIDIA driver ----------------------------------------------------------------

FAKE_LIBCUDA = r"""
#include <string.h>
int cuDriverGetVersion(int *v) { *v = 13020; return 0; }
int cuInit(unsigned int flags) { return INIT_RESULT; }
int cuDeviceGetCount(int *n) { *n = 2; return 0; }
int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
int cuDeviceGetName(char *name, int len, int device) { strncpy(name, device ? "Fake GPU B" : "Fake GPU A", len); return 0; }
int cuGetErrorName(int code, const char **text) { *text = code == 100 ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_UNKNOWN"; return 0; }
"""


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory):
    """Two fake driver libraries: one with two GPUs, one whose cuInit finds none."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build a fake libcuda")
    root = tmp_path_factory.mktemp("libcuda")
    (root / "fake.c").write_text(FAKE_LIBCUDA)
    built = {}
    for name, init in (("gpus", 0), ("none", 100)):
        built[name] = str(root / f"libcuda-{name}.so")
        subprocess.run(["cc", "-shared", "-fPIC", f"-DINIT_RESULT={init}", str(root / "fake.c"), "-o", built[name]], check=True)
    return built


def test_driver_query_names_devices_as_cuda_numbers_them(fake_libcuda):
    assert query_driver(fake_libcuda["gpus"]) == Driver((13, 2), ("Fake GPU A", "Fake GPU B"))
    assert device_label(1, fake_libcuda["gpus"]) == "CUDA:1 (Fake GPU B)"
    assert device_label(2, fake_libcuda["gpus"]) == "CUDA:2"
    none = query_driver(fake_libcuda["none"])
    assert none.devices == () and none.problem == "the NVIDIA driver found no usable GPU (cuInit: CUDA_ERROR_NO_DEVICE)"
    missing = query_driver("libcuda-missing.so.1")
    assert missing.cuda_version is None and missing.problem.startswith("no NVIDIA driver (libcuda-missing.so.1 cannot be loaded")


# --- make setup-cuda ------------------------------------------------------------------

GPU_1_31_1 = ['flatbuffers', 'numpy>=1.21.6', 'packaging', 'protobuf>=4.25.8', 'sympy; extra == "symbolic"',
              'nvidia-cuda-nvrtc~=13.0; extra == "cuda"', 'nvidia-cuda-runtime~=13.0; extra == "cuda"',
              'nvidia-cufft~=12.0; extra == "cuda"', 'nvidia-curand~=10.0; extra == "cuda"',
              'nvidia-cudnn-cu13~=9.0; extra == "cudnn"']
GPU_1_24_4 = ['flatbuffers', 'numpy>=1.21.6', 'packaging', 'protobuf', 'sympy',
              'nvidia-cuda-nvrtc-cu12~=12.0; extra == "cuda"', 'nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"',
              'nvidia-cufft-cu12~=11.0; extra == "cuda"', 'nvidia-curand-cu12~=10.0; extra == "cuda"',
              'nvidia-cudnn-cu12~=9.0; extra == "cudnn"']
"""Requires-Dist of two onnxruntime-gpu releases on PyPI, as pip reported them."""


def test_cuda_major_of_a_release_comes_from_its_metadata():
    assert cuda_major(GPU_1_31_1) == 13 and cuda_major(GPU_1_24_4) == 12
    assert cuda_major(["numpy", "nvidia-cuda-nvrtc~=13.0"]) is None


def index(*releases: tuple[str, list[str]]):
    """A fake package index (releases newest first): what pip picks for 'onnxruntime-gpu>=F',
    '...,<=V' or '...,<V'; SetupError, as `resolve` raises, when nothing fits."""
    def resolve(requirement: str) -> tuple[str, list[str]]:
        bound = requirement.rsplit(",", 1)[-1]
        for version, requires in releases:
            if bound.startswith("<="):
                fits = Version(version) <= Version(bound[2:])
            else:
                fits = not bound.startswith("<") or Version(version) < Version(bound[1:])
            if fits:
                return version, requires
        raise SetupError(f"pip finds no {requirement}")
    return resolve


def test_setup_cuda_picks_a_release_built_for_torchs_cuda():
    pypi = index(("1.31.1", GPU_1_31_1), ("1.30.0", GPU_1_24_4), ("1.24.4", GPU_1_24_4), ("1.23.2", GPU_1_24_4),
                 ("1.22.0", GPU_1_24_4))
    fresh = plan(13, cpu="1.32.0", gpu=None, gpu_major=None, floor=">=1.21", resolver=pypi)
    assert fresh.version == "1.31.1" and "onnxruntime-gpu 1.31.1 (CUDA 13) replaces onnxruntime 1.32.0" in fresh.why
    assert plan(12, cpu="1.32.0", gpu=None, gpu_major=None, floor=">=1.21", resolver=pypi).version == "1.30.0"  # stepped down
    assert plan(None, cpu="1.32.0", gpu=None, gpu_major=None, floor=">=1.21", resolver=pypi).version == "1.31.1"  # CPU torch
    with pytest.raises(SetupError, match=r"^no onnxruntime-gpu>=1.21,<=1.24.4 among the newest 3 is built for torch's "
                                         r"CUDA 13: 1.24.4 \(CUDA 12\), 1.23.2 \(CUDA 12\), 1.22.0 \(CUDA 12\)$"):
        pick(13, ">=1.21", "1.24.4", pypi)
    with pytest.raises(SetupError, match=r"^no onnxruntime-gpu>=1.23,<=1.24.4 among the newest 2 is built"):
        pick(13, ">=1.23", "1.24.4", index(("1.24.4", GPU_1_24_4), ("1.23.2", GPU_1_24_4)))
    with pytest.raises(SetupError, match="pip finds no onnxruntime-gpu>=1.21,<=1.0"):  # nothing at all: pip's word
        pick(13, ">=1.21", "1.0", pypi)


def test_setup_cuda_is_idempotent_and_repairs_a_reinstalled_cpu_wheel():
    """A second run changes nothing (it used to compute an empty version once the CPU wheel
    was gone); `make setup` reinstalling onnxruntime over the GPU wheel is undone."""
    untouchable = index()  # any look-up fails
    assert plan(13, cpu=None, gpu="1.31.1", gpu_major=13, floor=">=1.21", resolver=untouchable).version is None
    repaired = plan(13, cpu="1.32.0", gpu="1.31.1", gpu_major=13, floor=">=1.21", resolver=untouchable)
    assert repaired.version == "1.31.1" and "was installed over onnxruntime-gpu 1.31.1" in repaired.why
    pypi = index(("1.31.1", GPU_1_31_1), ("1.24.4", GPU_1_24_4))
    wrong = plan(13, cpu=None, gpu="1.24.4", gpu_major=12, floor=">=1.21", resolver=pypi)
    assert wrong.version == "1.31.1" and "replaces onnxruntime-gpu 1.24.4" in wrong.why  # CUDA 12 wheel, CUDA 13 torch


def test_setup_cuda_failure_is_one_line(monkeypatch, capsys):
    import runtimes.cuda_setup as cuda_setup

    monkeypatch.setattr(cuda_setup, "setup", lambda: (_ for _ in ()).throw(SetupError("no wheel for CUDA 13")))
    assert cuda_setup.main([]) == 1
    assert capsys.readouterr().err == "setup-cuda: error: no wheel for CUDA 13\n"


# --- make gpu-check -------------------------------------------------------------------

no_gpu_here = pytest.mark.skipif(not query_driver().problem, reason="a GPU is present: gpu-check would install onnxruntime-gpu")


@no_gpu_here
def test_gpu_check_without_a_gpu_exits_2_at_once_and_installs_nothing(monkeypatch, capsys):
    wheels = {d: installed(d) for d in ("onnxruntime", "onnxruntime-gpu")}
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"gpu-check ran {a[0]}"))
    monkeypatch.setattr(gpu_check, "check", lambda run: pytest.fail("gpu-check went past the GPU check"))
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err == f"gpu-check: no GPU to check here: {query_driver().problem}; nothing was installed or run\n"
    assert {d: installed(d) for d in wheels} == wheels


@no_gpu_here
def test_gpu_check_command_refuses_within_seconds():
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "validation.bench.gpu_check"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("gpu-check: no GPU to check here: ") and len(done.stderr.splitlines()) == 1
    assert time.monotonic() - began < 20  # no torch import, no install, no training


def test_gpu_check_refuses_a_driver_older_than_torchs_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(gpu_check, "query_driver", lambda: Driver((12, 4), ("Tesla T4",)))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert gpu_check.gpu_problem() == (f"the NVIDIA driver supports CUDA 12.4; torch {torch.__version__} and the "
                                       "onnxruntime-gpu matched to it need CUDA 13: update the driver")


def test_gpu_check_exit_codes():
    run = gpu_check.Run(Path("out"))
    assert gpu_check.exit_code(run) == 0
    run.steps.append(gpu_check.Step("demo fp16", False, "max_rel 3e-2", 1.0, parity_failed=True))
    assert gpu_check.exit_code(run) == 3
    run.steps.append(gpu_check.Step("ViT-B/16", False, "RuntimeError: CUDA out of memory", 1.0))
    assert gpu_check.exit_code(run) == 1


@pytest.mark.slow
def test_gpu_check_runs_its_steps_end_to_end_on_the_cpu(small, monkeypatch, tmp_path, capsys):
    """Everything gpu-check does after the GPU check and the setup, on ort-cpu with the small
    model standing in for the demo (its fp16 export too: an untrained model's fp16 logits
    change class on some images) and for ViT-B/16: the steps, the records, the table of DyT
    against dense beside the paper's figures, the exit code."""
    from validation.demo import DemoModel
    from validation.models import read_model

    checkpoint = small.with_name("small.safetensors")
    assert read_model(gpu_check._demo_fp16(checkpoint, tmp_path / "fp16")).precision == "fp16"
    monkeypatch.setattr(gpu_check, "_demo_fp16", lambda checkpoint, out: small)
    monkeypatch.setattr(gpu_check, "RUNTIME", "ort-cpu")
    monkeypatch.setattr(gpu_check, "gpu_problem", lambda: "")
    monkeypatch.setattr(gpu_check, "_setup", lambda: (True, "skipped"))
    monkeypatch.setattr("validation.demo.model.ensure_demo_model", lambda **_: DemoModel(checkpoint, small, {}))
    monkeypatch.setattr(gpu_check, "_vit", lambda out: small)
    monkeypatch.setattr(gpu_check, "VIT_IMAGES", 16)
    monkeypatch.setattr(gpu_check, "BATCHES", (1, 4))
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [" ".join(line.split()[:3]) for line in out[1:8]] == [
        "PASS setup-cuda 0", "PASS ort-cpu starts", "PASS demo model", "PASS demo fp32", "PASS demo fp16",
        "PASS ViT-B/16 DyT", "PASS ViT-B/16 (16"]
    assert out[8].split()[-2:] == ["batch", "4"] and out[9].split()[0] == "dense"
    assert out[10].startswith("  DyT (activation ") and out[11].startswith("  speed-up (FLOPs-ideal)") and "x (" in out[11]
    assert out[12] == "  paper (ViT-B/16, dense -> DyT): V100 806 -> 912 img/s = 1.13x / T4 435 -> 525 img/s = 1.21x"
    assert out[-1] == f"gpu-check: PASS (records under {tmp_path})"
    assert {p.name for p in tmp_path.iterdir()} >= {"demo-fp32", "demo-fp16", "vitb16"}
    assert all((tmp_path / name / "ort-cpu.json").is_file() for name in ("demo-fp32", "demo-fp16", "vitb16"))


# --- on a GPU -------------------------------------------------------------------------

@needs_gpu
def test_ort_cuda_on_a_gpu(small):
    """The real thing: named device, binding on the GPU, PyTorch's answers, arena option and
    strict_placement consistent with the placement ORT reports."""
    backend = open_backend("ort-cuda", small, threads=1, memory_arena=False)
    info = backend.info()
    assert info["device"].startswith("CUDA:0 (") and info["provider_options"]["use_tf32"] == "0"
    assert info["provider_options"]["arena_extend_strategy"] == "kSameAsRequested"
    images = image_batch(5)
    want = open_backend("torch", small, threads=1).run({"pixel_values": images})
    for batch in (1, 5):
        got = backend.run({"pixel_values": images[:batch]})
        scale = float(np.abs(want["logits"][:batch]).max())
        np.testing.assert_allclose(got["logits"], want["logits"][:batch], rtol=0, atol=1e-4 * scale)
        np.testing.assert_array_equal(got["token_masks"], want["token_masks"][:batch])
    placement = info["placement"]
    assert placement is not None and placement["nodes"] > placement["on_provider"] >= 0
    if placement["cpu_compute"]:
        with pytest.raises(BackendError, match="strict_placement"):
            open_backend("ort-cuda", small, strict_placement=1)
    else:
        open_backend("ort-cuda", small, strict_placement=1)
