"""Runtime backends: PyTorch's answers on every CPU runtime, one-line errors for bad input."""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime
import pytest

import runtimes
from conftest import image_batch
from dyt_export import build_model, export_onnx, load_checkpoint, save
from runtimes import CPU_RUNTIMES, BackendError, get_backend, open_backend
from runtimes.__main__ import main as runtimes_main
from runtimes.base import first_line
from runtimes.cuda_driver import Driver
from runtimes.ort_cuda import cuda_availability
from runtimes.torch_ref import TorchReference
from validation.compare import compare
from validation.data import load_inputs

from conftest import force_dispatcher, small_config

NONE_BLOCK, ALL_BLOCK = 1, 2


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """A saved checkpoint and its dynamic export with masks; block 1 activates no patch token,
    block 2 every one, block 0 a data-dependent share."""
    root = tmp_path_factory.mktemp("rt")
    model = build_model(small_config(embed_dim=64, num_heads=2, mlp_hidden_dim=256), seed=1)
    force_dispatcher(model, NONE_BLOCK, active=False)
    force_dispatcher(model, ALL_BLOCK, active=True)
    checkpoint = save(model, root / "edge.safetensors")
    loaded = load_checkpoint(checkpoint)
    onnx_path = root / "edge.onnx"
    export_onnx(loaded, onnx_path, with_masks=True)
    images = load_inputs("digits+scenes", 32, limit=8).pixel_values
    return loaded, onnx_path, images


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
@pytest.mark.parametrize("batch", [1, 5])
def test_cpu_backend_gives_pytorch_answers(edge, runtime, batch):
    model, path, images = edge
    backend = open_backend(runtime, path, threads=1)
    assert backend.input_names == ["pixel_values"]
    assert backend.output_names == ["logits", "token_masks"]
    x = images[:batch]
    got = backend.run({"pixel_values": x})
    ref = TorchReference.from_module(model).run({"pixel_values": x})
    assert got["logits"].dtype == np.float32 and got["token_masks"].dtype == np.bool_
    parity = compare(ref, got["logits"], got["token_masks"], model.dyt_config.dispatcher_names)
    assert parity.passed, parity.failures
    assert parity.max_rel < 1e-5  # fp32 end to end; OpenVINO would be ~1e-3 in its default bf16
    masks = got["token_masks"]
    assert not masks[:, NONE_BLOCK, 1:].any() and masks[:, NONE_BLOCK, 0].all()  # only CLS runs the MLP
    assert masks[:, ALL_BLOCK].all()
    partial = masks[:, 0, 1:].mean()
    assert 0 < partial < 1 or batch == 1


def test_batch_results_equal_one_by_one(edge):
    """Gathering the whole batch's active tokens must not mix images."""
    _, path, images = edge
    backend = open_backend("openvino", path, threads=1)
    together = backend.run({"pixel_values": images[:4]})["logits"]
    alone = np.concatenate([backend.run({"pixel_values": images[i:i + 1]})["logits"] for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_openvino_pins_fp32_and_gives_bf16_only_where_the_cpu_has_it(edge):
    import openvino as ov

    _, path, images = edge
    fp32 = open_backend("openvino", path, threads=1)
    assert fp32.info()["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        bf16 = open_backend("openvino", path, threads=1, precision="bf16")
        assert bf16.info()["compiled"]["INFERENCE_PRECISION_HINT"] == "bf16"
        assert bf16.run({"pixel_values": images[:2]})["logits"].shape == (2, 10)
    else:  # the plugin would silently compile f32: the backend must say so instead
        with pytest.raises(BackendError, match="'bf16' is not supported by this CPU"):
            open_backend("openvino", path, precision="bf16")
    with pytest.raises(BackendError, match="precision 'fp16' is not supported"):
        open_backend("openvino", path, precision="fp16")


def test_backend_options_reach_the_runtime(edge):
    _, path, _ = edge
    ort_backend = open_backend("ort-cpu", path, threads=2, graph_optimization="basic",
                               session_config={"session.intra_op.allow_spinning": "0"})
    info = ort_backend.info()
    assert info["intra_op_num_threads"] == 2 and info["graph_optimization"] == "basic"
    ov_backend = open_backend("openvino", path, threads=1, performance_hint="THROUGHPUT", streams=1, max_batch=4)
    assert ov_backend.info()["compiled"]["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert ov_backend.info()["compiled"]["INFERENCE_NUM_THREADS"] == 1
    with pytest.raises(BackendError, match="at most 4"):
        ov_backend.run({"pixel_values": np.zeros((5, 3, 32, 32), np.float32)})
    x = image_batch(3, seed=4)
    for runtime in CPU_RUNTIMES:
        fixed = open_backend(runtime, path, fixed_batch=3)
        assert fixed.input_specs[0].shape[0] == 3 and fixed.info()["fixed_batch"] == 3
        np.testing.assert_array_equal(fixed.run({"pixel_values": x})["logits"],
                                      open_backend(runtime, path).run({"pixel_values": x})["logits"])
        with pytest.raises(BackendError, match=r"float32 \[3,3,32,32\]"):
            fixed.run({"pixel_values": x[:1]})
        for bad in (0, True, "4"):  # options from JSON or the command line arrive as any type
            with pytest.raises(BackendError, match="fixed_batch must be a positive integer"):
                open_backend(runtime, path, fixed_batch=bad)
    with pytest.raises(BackendError, match="give max_batch or fixed_batch, not both"):
        open_backend("openvino", path, fixed_batch=3, max_batch=4)
    with pytest.raises(BackendError, match="^ort-cpu takes no option 'bogus'; its options: threads, precision, "
                                           "graph_optimization, .*memory_arena$"):
        open_backend("ort-cpu", path, bogus=1)
    with pytest.raises(BackendError, match="^openvino takes no option 'bogus'; its options: .*performance_hint"):
        open_backend("openvino", path, bogus=1)


BAD_INPUTS = {
    "float64": ({"pixel_values": np.zeros((1, 3, 32, 32))}, "dtype float64"),
    "rank": ({"pixel_values": np.zeros((3, 32, 32), np.float32)}, r"shape \[3, 32, 32\]"),
    "size": ({"pixel_values": np.zeros((1, 3, 64, 64), np.float32)}, r"shape \[1, 3, 64, 64\]"),
    "channels": ({"pixel_values": np.zeros((1, 1, 32, 32), np.float32)}, r"shape \[1, 1, 32, 32\]"),
    "empty": ({"pixel_values": np.zeros((0, 3, 32, 32), np.float32)}, "empty"),
    "nan": ({"pixel_values": np.full((2, 3, 32, 32), np.nan, np.float32)}, "NaN/inf"),
    "name": ({"images": np.zeros((1, 3, 32, 32), np.float32)}, "missing pixel_values"),
    "extra": ({"pixel_values": np.zeros((1, 3, 32, 32), np.float32), "x": np.zeros(1)}, "unexpected x"),
    "list": ({"pixel_values": [[0.0]]}, "numpy array"),
    "not a dict": (np.zeros((1, 3, 32, 32), np.float32), r"inputs must be a dict .* got ndarray"),
}


@pytest.mark.parametrize("runtime", [*CPU_RUNTIMES, "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused_with_one_line(edge, runtime, case):
    model, path, _ = edge
    backend = TorchReference.from_module(model) if runtime == "torch" else open_backend(runtime, path)
    feed, message = BAD_INPUTS[case]
    with pytest.raises(BackendError, match=message) as error:
        backend.run(feed)
    assert "\n" not in str(error.value)


CANNOT_LOAD = {"ort-cpu": "Protobuf parsing failed", "openvino": "Unable to read the model"}
"""The cause each runtime gives for a file that is not an ONNX model."""


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_models_the_runtime_cannot_load(tmp_path, runtime):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model at all" * 10)
    with pytest.raises(BackendError, match=f"{runtime} cannot load .*garbage.onnx: .*{CANNOT_LOAD[runtime]}") as error:
        open_backend(runtime, garbage)
    assert "\n" not in str(error.value) and "Exception from" not in str(error.value)
    with pytest.raises(BackendError, match="does not exist"):
        open_backend(runtime, tmp_path / "missing.onnx")
    with pytest.raises(BackendError, match="is not a file"):
        open_backend(runtime, tmp_path)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_a_model_without_its_external_data_file_names_that_file(edge, tmp_path, runtime, capfd):
    model, _, images = edge
    path = export_onnx(model, tmp_path / "m.onnx", external_data=True).path
    (tmp_path / "m.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(BackendError, match=f"{runtime} cannot load .*m.onnx: its weights are kept in .*m.onnx.data, "
                                           "which is missing") as error:
        open_backend(runtime, path)
    assert "\n" not in str(error.value)
    whole = (tmp_path / "elsewhere.data").read_bytes()
    for size in (0, len(whole) // 2, len(whole) - 1):  # a copy cut short: OpenVINO's own message names no file
        (tmp_path / "m.onnx.data").write_bytes(whole[:size])
        with pytest.raises(BackendError, match=f"{runtime} cannot load .*m.onnx: its weights file .*m.onnx.data is cut "
                                               rf"short \({size} bytes where the model needs {len(whole)}; copy it again\)"):
            open_backend(runtime, path)
    assert capfd.readouterr().err == ""  # the runtime's own logger repeats nothing on stderr
    (tmp_path / "elsewhere.data").rename(tmp_path / "m.onnx.data")
    assert open_backend(runtime, path).run({"pixel_values": images[:2]})["logits"].shape[0] == 2


def test_registry_names_every_runtime_and_refuses_others():
    assert set(runtimes.BACKEND_NAMES) == {"torch", "ort-cpu", "ort-cuda", "openvino"}
    for name in runtimes.BACKEND_NAMES:
        assert get_backend(name).name == name
    with pytest.raises(BackendError, match="unknown runtime 'tensorrt'"):
        get_backend("tensorrt")


def test_ort_cuda_says_why_it_cannot_run_here(edge):
    """Without a usable GPU, opening ort-cuda fails with the reason: never a silent CPU fallback."""
    _, path, _ = edge
    available = get_backend("ort-cuda").availability()
    if available:
        pytest.skip("ort-cuda is available here, so its refusal cannot be seen")
    assert available.reason
    with pytest.raises(BackendError, match="ort-cuda is not available: ") as error:
        open_backend("ort-cuda", path)
    assert available.reason in str(error.value)


def test_ort_cuda_gives_pytorch_answers(edge):
    model, path, images = edge
    available = get_backend("ort-cuda").availability()
    if not available:
        pytest.skip(f"ort-cuda is not available here: {available.reason}")
    backend = open_backend("ort-cuda", path)
    assert backend.info()["provider"] == "CUDAExecutionProvider"
    ref = TorchReference.from_module(model).run({"pixel_values": images})
    got = backend.run({"pixel_values": images})
    assert compare(ref, got["logits"], got["token_masks"], model.dyt_config.dispatcher_names).passed


def test_torch_reference_follows_the_onnx_metadata(edge):
    model, path, images = edge
    reference = TorchReference(path)
    assert reference.path.name == "edge.safetensors"
    out = reference.run({"pixel_values": images[:3]})
    assert set(out) == {"logits", "token_masks", "dispatch_logits", "merge_margins"}
    assert out["dispatch_logits"].shape == (3, 3, 16)
    np.testing.assert_array_equal(out["logits"], TorchReference.from_module(model).run({"pixel_values": images[:3]})["logits"])


def test_first_line_is_the_cause_not_a_cpp_frame():
    openvino_style = RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\n"
                                  "Exception from src/inference/src/model_reader.cpp:148:\n\n"
                                  "Unable to read the model: x.onnx\n")
    assert first_line(openvino_style) == "Unable to read the model: x.onnx"
    assert first_line(RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : bad\nmore")).endswith("bad")
    assert first_line(RuntimeError("\n  \n")) == "RuntimeError"


@pytest.mark.parametrize("runtime, library", [("openvino", "openvino"), ("ort-cpu", "onnxruntime"), ("torch", "torch")])
def test_a_missing_library_is_a_backend_error_even_for_the_class_itself(edge, monkeypatch, runtime, library):
    """Constructing a backend class directly must check availability before importing its library."""
    _, path, _ = edge
    cls = get_backend(runtime)
    monkeypatch.setitem(sys.modules, library, None)  # `import library` now raises ImportError
    with pytest.raises(BackendError, match=f"{runtime} is not available: {library} is not installed"):
        cls(path)


def test_fp16_exports_keep_their_declared_input_and_output_names(edge, tmp_path):
    """OpenVINO fuses an fp16 graph's input Cast and last Linear into the graph's ports and
    would name them '_to_copy' and 'linear_N'."""
    model, _, images = edge
    path = tmp_path / "fp16.onnx"
    export_onnx(model, path, with_masks=True, fp16=True)
    for runtime in CPU_RUNTIMES:
        backend = open_backend(runtime, path, threads=1)
        assert backend.input_names == ["pixel_values"] and backend.output_names == ["logits", "token_masks"]
        assert set(backend.run({"pixel_values": images[:2]})) == {"logits", "token_masks"}


def test_ort_cuda_availability_is_asked_of_onnx_runtime(monkeypatch):
    """Even when the provider is listed, CUDA is available only if a session really starts on it."""
    listed = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in listed:
        pytest.skip("onnxruntime-gpu is installed: a CPU build that lists CUDA cannot be simulated (tests/test_cuda.py)")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    monkeypatch.setattr(runtimes.ort_cuda, "query_driver", lambda: Driver((13, 0), ("a GPU",)))  # past the driver check
    with pytest.warns(UserWarning):  # this CPU build warns that it has no such provider, then runs on the CPU
        available = cuda_availability.__wrapped__()
    assert not available and "started CPUExecutionProvider instead of CUDAExecutionProvider" in available.reason


def test_runtimes_command_says_available_or_why_not(capsys):
    assert runtimes_main(["ort-cpu"]) == 0
    assert capsys.readouterr().out == "ort-cpu: available\n"
    expected = 0 if get_backend("ort-cuda").availability() else 2
    assert runtimes_main(["ort-cuda"]) == expected
    out = capsys.readouterr().out
    assert out == "ort-cuda: available\n" if expected == 0 else out.startswith("ort-cuda: not available: ")
    assert runtimes_main(["bogus"]) == 2
    assert "unknown runtime 'bogus'" in capsys.readouterr().err
