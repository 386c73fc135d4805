"""The validation harness: the timer, records, twins, pictures and the command end to end
(the comparator's rules are in test_compare.py)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from PIL import Image

import validation.harness
import validation.stream
import validation.pictures
from dyt_export import build_model, export_onnx, load_checkpoint, save
from dyt_export.errors import UserError
from runtimes import get_backend
from runtimes.base import Availability, Backend, TensorSpec, check_inputs
from validation.cli import main
from validation.tolerances import TOLERANCES
from validation.models import read_model, twin
from validation.pictures import draw
from validation.record import check_record, load_schema, write_record
from validation.throughput import batches_of, measure

from conftest import force_dispatcher, small_config

class _Recorder(Backend):
    """Counts calls per distinct batch; outputs masks whose activation is known."""

    name = "recorder"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True)

    def __init__(self, model=None, *, threads=None, precision="fp32", dtype=np.float32):
        self._set_common(threads, precision)
        self.calls: list[float] = []
        self.dtype = np.dtype(dtype)

    @property
    def input_specs(self):
        return [TensorSpec("pixel_values", self.dtype, (None, 1, 2, 2))]

    @property
    def output_names(self):
        return ["logits", "token_masks"]

    def run(self, inputs):
        x = check_inputs(inputs, self.input_specs)["pixel_values"]
        self.calls.append(float(x[0, 0, 0, 0]))
        masks = np.zeros((len(x), 1, 5), bool)
        masks[:, 0, :3] = True  # CLS + 2 of 4 patch tokens
        return {"logits": x.reshape(len(x), -1), "token_masks": masks}

    def info(self):
        return {}


def test_measure_warms_every_batch_then_times_whole_passes():
    images = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)
    backend = _Recorder(threads=3)
    row = measure(backend, images, 3, iters=4)
    firsts = [0.0, 3.0, 6.0]  # 10 images -> 3 full batches of 3
    assert backend.calls[:3] == firsts  # warm-up met every batch before the clock started
    assert backend.calls[3:] == firsts * 2 and row.calls == 6  # whole passes, >= iters
    assert row.batch == 3 and row.threads == 3 and row.img_per_s > 0
    assert row.p50_ms <= row.p90_ms <= row.p99_ms
    assert row.activation_rate == pytest.approx(0.5)
    given = np.zeros((10, 1, 5), bool)
    given[:, :, 0] = True
    given[:3, 0, 1] = True  # only the first batch has an active patch token
    assert measure(_Recorder(), images, 3, iters=1, masks=given).activation_rate == pytest.approx(1 / 12)
    assert [b.tolist() for b in batches_of(2, 3)] == [[0, 1, 0]]
    fp16_io = _Recorder(dtype=np.float16)  # an --fp16-io export: float32 images are fed as float16
    assert measure(fp16_io, images, 3, iters=1).calls == 3 and fp16_io.calls[:3] == firsts


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint, its dynamic export without masks (so validation builds both twins) and
    a different checkpoint to provoke a parity failure."""
    root = tmp_path_factory.mktemp("val")
    model = build_model(small_config(embed_dim=64, num_heads=2, mlp_hidden_dim=256), seed=2)
    force_dispatcher(model, 1, active=False)
    checkpoint = save(model, root / "tiny.safetensors")
    onnx_path = root / "tiny.onnx"
    export_onnx(load_checkpoint(checkpoint), onnx_path)
    export_onnx(load_checkpoint(checkpoint), root / "tiny-masks.onnx", with_masks=True)
    other = save(build_model(small_config(embed_dim=64, num_heads=2, mlp_hidden_dim=256), seed=3), root / "other.safetensors")
    return root, onnx_path, other


def _validate(*args: str, capsys: pytest.CaptureFixture | None = None) -> subprocess.CompletedProcess:
    """`python -m validation ARGS`: as a subprocess, or in this process when given capsys
    (same code path after argument parsing, without paying the imports again)."""
    if capsys is None:
        return subprocess.run([sys.executable, "-m", "validation", *args], capture_output=True, text=True, timeout=300)
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


QUICK = ["--limit", "10", "--data", "digits+scenes", "--batches", "1,4", "--threads", "1", "--iters", "2",
         "--min-seconds", "0"]


@pytest.mark.parametrize("runtime", ["ort-cpu", "openvino"])
def test_validation_command_end_to_end(exported, runtime, capsys):
    root, model, _ = exported
    out = root / "records"  # shared: the second runtime reuses the twins the first exported
    in_process = capsys if runtime == "openvino" else None
    result = _validate("--runtime", runtime, "--model", str(model), "--out", str(out), *QUICK, capsys=in_process)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"PASS {runtime} tiny")
    record = json.loads((out / f"{runtime}.json").read_text())
    jsonschema.validate(record, load_schema())
    assert record["passed"] and record["runtime"] == runtime
    assert record["parity"]["top1_agreement"] == 1.0 and record["parity"]["mask_agreement"] == 1.0
    assert record["inputs"] == {"source": "sklearn-digits/test+scenes", "images": 10, "labeled": 5, "img_size": 32,
                                "listed": 10, "unreadable": 0, "unreadable_files": []}
    assert {k: v for k, v in record["execution"].items() if k not in ("seconds", "images_per_s")} == {
        "mode": "sequential", "chunk": 256, "shards": 1, "shards_resumed": 0, "workers": 1, "threads_per_worker": 1,
        "steady_images_per_s": None}  # one shard: no rate after the first
    assert not (out / "partial").exists()  # the shards of a finished run are in its record
    assert record["activation_rate"]["blocks.1.mlp"] == 0.0
    assert record["flops_g"]["dyt"] < record["flops_g"]["dense"]
    assert record["model"]["twins"]["masks"].endswith(".dynamic-masks.onnx")
    assert record["model"]["twins"]["dense"].endswith(".dense.onnx")
    assert record["reference"]["matches_model_source"] is True and record["reference"]["threads"] == 1
    assert record["tolerances"] == dataclasses.asdict(TOLERANCES["fp32"])
    assert [(r["batch"], r["threads"]) for r in record["throughput"]] == [(1, 1), (4, 1)]
    assert all(r["activation_rate"] == 1.0 for r in record["dense_baseline"])
    assert all(0 < r["activation_rate"] < 1 for r in record["throughput"])
    for s in record["speedup"]:
        assert s["flops_ideal"] > 1 and s["efficiency"] == pytest.approx(s["measured"] / s["flops_ideal"])
    assert (out / f"{runtime}.md").read_text().startswith(f"# tiny on {runtime}: PASS")


@pytest.mark.parametrize("runtime", ["ort-cpu", "openvino"])
def test_a_backend_pinned_to_one_batch_is_validated_in_calls_of_that_batch(exported, runtime, monkeypatch, capsys):
    """fixed_batch=4 over 10 images: calls of exactly 4 (the last one filled with repeats),
    the same outputs as the dynamic backend; timing at another batch is refused up front."""
    from runtimes import open_backend

    root, model, _ = exported
    images = np.random.default_rng(0).standard_normal((10, 3, 32, 32), dtype=np.float32)
    pinned = open_backend(runtime, model, fixed_batch=4)
    calls = []
    run = pinned.run
    monkeypatch.setattr(pinned, "run", lambda feed: calls.append(len(feed["pixel_values"])) or run(feed))
    got = validation.stream.run_all(pinned, images, ("logits",))["logits"]
    assert calls == [4, 4, 4]
    np.testing.assert_array_equal(got, validation.stream.run_all(open_backend(runtime, model), images, ("logits",))["logits"])
    monkeypatch.setattr(validation.stream, "run_all", lambda *a, **k: pytest.fail("work started"))
    result = _validate("--runtime", runtime, "--model", str(model), "--option", "fixed_batch=4", "--batches", "1,4",
                       "--out", str(root / "pinned"), capsys=capsys)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "fixed_batch=4 pins the batch axis: time it with --batches 4, not 1,4" in result.stderr


def test_parity_miss_exits_non_zero_and_keeps_the_record(exported, capsys):
    root, model, other = exported
    out = root / "records-miss"
    result = _validate("--runtime", "ort-cpu", "--model", str(model), "--ref", str(other), "--out", str(out),
                       "--no-throughput", "--limit", "6", "--threads", "1", capsys=capsys)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("FAIL ort-cpu tiny") and "parity failure:" in result.stderr
    record = json.loads((out / "ort-cpu.json").read_text())
    check_record(record)
    assert not record["passed"] and record["parity"]["failures"]
    assert record["reference"]["matches_model_source"] is False and record["throughput"] == []
    # A twin exported from another checkpoint would compare that checkpoint's masks with themselves.
    assert record["parity"]["mask_agreement"] is None and record["model"]["twins"]["masks"] is None
    assert "masks not compared: the reference is not the checkpoint" in (out / "ort-cpu.md").read_text()


RUNTIME_CALLS = {"ort-cpu": ("onnxruntime", "InferenceSession", "run"), "openvino": ("openvino", "InferRequest", "infer")}
"""Where each runtime's own inference call lives, to make it fail as a kernel error would."""


def _fail_runtime_call(monkeypatch: pytest.MonkeyPatch, runtime: str, at: int) -> None:
    """From now on, the `at`-th call of the runtime's own inference call raises, with a
    multi-line message as runtimes write them."""
    import importlib

    module, cls, method = RUNTIME_CALLS[runtime]
    owner = getattr(importlib.import_module(module), cls)
    real, calls = getattr(owner, method), []

    def failing(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == at:
            raise RuntimeError("Non-zero status code returned while running Gather node 'gather_7'\n  at some frame")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(owner, method, failing)


@pytest.mark.parametrize("runtime, at, stage", [("ort-cpu", 2, "parity run"), ("openvino", 3, "throughput")])
def test_a_runtime_failure_mid_run_exits_4_with_one_line_and_a_record_holding_it(exported, runtime, at, stage,
                                                                               monkeypatch, capsys):
    """Not bad input (2), not a parity miss (3): the runtime itself failed. Calls: 1 the model,
    2 its mask twin (the parity run), 3 the first timed warm-up (throughput)."""
    root, model, _ = exported
    out = root / f"failure-{runtime}"
    _fail_runtime_call(monkeypatch, runtime, at)
    result = _validate("--runtime", runtime, "--model", str(model), "--out", str(out), *QUICK, "--quiet", capsys=capsys)
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith(f"python -m validation: runtime failure: {runtime} failed to run tiny")
    assert result.stderr.endswith("Non-zero status code returned while running Gather node 'gather_7'\n")
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout.startswith(f"FAIL {runtime} tiny: runtime failure during the {stage} -> {out}")
    record = json.loads((out / f"{runtime}.json").read_text())
    check_record(record)
    assert not record["passed"] and record["error"] == {"stage": stage, "message": result.stderr.split(": ", 2)[2].strip()}
    assert record["throughput"] == [] and record["dense_baseline"] == []
    parity = record["parity"]
    if stage == "parity run":  # nothing to compare: every figure null, none a stand-in
        assert not parity["passed"] and parity["failures"][0].startswith("not compared: the runtime failed")
        assert all(parity[k] is None for k in ("max_abs", "max_rel", "cosine_min", "top1_agreement", "mask_agreement"))
        assert parity["images_compared_on_logits"] == 0 and record["accuracy"]["runtime"] is None
    else:  # parity was measured before the runtime failed
        assert parity["passed"] and parity["images_compared_on_logits"] == 10 and record["accuracy"]["runtime"] >= 0
    assert f"RUNTIME FAILURE during the {stage}: {runtime} failed to run" in (out / f"{runtime}.md").read_text()


def test_the_demo_exits_4_when_a_runtime_fails_and_the_others_still_run(exported, monkeypatch, capsys):
    import validation.demo.cli
    import validation.demo.model

    root, model, _ = exported
    monkeypatch.setattr(validation.demo.model, "ensure_demo_model",
                        lambda **_: validation.demo.model.DemoModel(root / "tiny.safetensors", model, {}))
    _fail_runtime_call(monkeypatch, "ort-cpu", 1)
    code = validation.demo.cli.main(["--runtimes", "ort-cpu,openvino", "--out", str(root / "demo"), "--no-throughput"])
    out = capsys.readouterr().out
    assert code == 4, out
    assert "ort-cpu: runtime failure: ort-cpu failed to run tiny.onnx" in out and "ERROR" in out
    assert json.loads((root / "demo" / "openvino.json").read_text())["passed"]
    assert not json.loads((root / "demo" / "ort-cpu.json").read_text())["passed"]


def test_commands_on_run_command_exit_4_on_a_runtime_failure(capsys):
    from dyt_export.cli.common import Parser, run_command
    from runtimes import RuntimeFailure

    def body(_):
        raise RuntimeFailure("openvino failed to run m.onnx: out of memory")

    assert run_command(Parser(prog="python -m validation.bench"), [], body) == 4
    assert capsys.readouterr().err == "python -m validation.bench: runtime failure: openvino failed to run m.onnx: out of memory\n"


@pytest.mark.parametrize("args, message", [
    (["--runtime", "ort-cuda"], "ort-cuda is not available: "),
    (["--runtime", "tensorrt"], "cannot validate on 'tensorrt'"),
    (["--model", "{root}/missing.onnx"], "does not exist"),
    (["--model", "{root}/tiny.safetensors"], "is not a readable ONNX model"),
    (["--model", "{model}", "--images", "{root}/no-such-dir"], "image folder"),
    (["--model", "{model}", "--precision", "bf16"], "ort-cpu takes precision fp32, not 'bf16'"),
    (["--model", "{model}", "--option", "bogus=1"], "ort-cpu takes no option 'bogus'; its options: threads,"),
    (["--model", "{model}", "--out", "{root}/a-file"], "exists and is not a directory"),
    (["--model", "{model}", "--out", "{root}/a-file/records"], "a-file is not a directory"),
    (["--model", "{model}", "--out", "/proc/dyt-records"], "cannot be written"),
    (["--model", "{model}", "--ref", "{root}/seven.safetensors"],
     "reference seven.safetensors and model tiny.onnx disagree on num_classes 7 vs 10"),
])
def test_bad_requests_exit_2_with_one_line_before_any_work(exported, args, message, monkeypatch, capsys):
    if "ort-cuda" in args and get_backend("ort-cuda").availability():
        pytest.skip("ort-cuda is available here, so it cannot be refused")
    root, model, _ = exported
    (root / "a-file").write_text("")
    save(build_model(small_config(embed_dim=64, num_heads=2, mlp_hidden_dim=256, num_classes=7)), root / "seven.safetensors")
    monkeypatch.setattr(validation.stream, "run_all", lambda *a, **k: pytest.fail("work started"))
    args = [a.format(root=root, model=model) for a in args]
    result = _validate(*args, *(["--out", str(root / "bad")] * ("--out" not in args)), "--no-throughput", capsys=capsys)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (root / "bad").exists() and (root / "a-file").read_text() == ""


@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "argument --iters: expected a finite integer >= 1, got '0'"),
    (["--min-seconds", "-1"], "argument --min-seconds: expected a finite number >= 0, got '-1'"),
    (["--warmup", "-1"], "argument --warmup: expected a finite integer >= 0"),
    (["--limit", "0"], "argument --limit: expected a finite integer >= 1"),
    (["--threads", "0"], "argument --threads: expected positive integers"),
    (["--max-rel", "nan"], "argument --max-rel: tolerance max_rel must be a finite number >= 0, got nan"),
    (["--cosine-min", "nan"], "argument --cosine-min: tolerance cosine_min must be a finite number in [-1, 1]"),
    (["--flip-logit", "inf"], "argument --flip-logit: tolerance flip_logit must be a finite number >= 0"),
    (["--top1-min", "1.5"], "argument --top1-min: tolerance top1_min must be a finite number in [0, 1]"),
    (["--logit-share-min", "1.5"], "argument --logit-share-min: tolerance logit_share_min must be a finite number in [0, 1]"),
    (["--logit-share-min", "nan"], "argument --logit-share-min: tolerance logit_share_min must be a finite number"),
    (["--flip-cosine-min", "-2"], "argument --flip-cosine-min: tolerance flip_cosine_min must be a finite number in [-1, 1]"),
    (["--merge-tie", "3"], "argument --merge-tie: tolerance merge_tie must be a finite number in [0, 2]"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_not_a_usage_block(args, message, capsys):
    result = _validate(*args, capsys=capsys)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"python -m validation: error: {message}")
    assert result.stderr.endswith(" (see python -m validation --help)\n")


def test_fp16_io_exports_validate_with_fp16_twins_and_tolerances(exported, capsys):
    """The model takes float16 pixels: validation feeds them, builds its twins in fp16 with
    fp16 input, and judges with the documented fp16 tolerances."""
    root, _, _ = exported
    path = root / "tiny-fp16io.onnx"
    export_onnx(load_checkpoint(root / "tiny.safetensors"), path, fp16=True, fp16_io=True)
    out = root / "fp16"
    result = _validate("--runtime", "openvino", "--model", str(path), "--out", str(out), "--no-throughput",
                       "--limit", "10", "--data", "digits+scenes", capsys=capsys)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "openvino.json").read_text())
    assert record["model"]["precision"] == "fp16" and record["tolerances"] == dataclasses.asdict(TOLERANCES["fp16"])
    assert 1e-6 < record["parity"]["max_rel"] < 5e-3  # fp16 arithmetic really ran
    made = read_model(Path(record["model"]["twins"]["masks"]))
    assert (made.precision, made.fp16_io) == ("fp16", True)


def test_int8_twins_are_quantized_like_the_model_and_reused(exported, tmp_path):
    root, model_path, _ = exported
    reference = load_checkpoint(root / "tiny.safetensors")
    model = dataclasses.replace(read_model(model_path), precision="int8")  # what an int8 export declares
    path, reused = twin(reference, model, tmp_path, dispatch="dynamic", with_masks=True)
    made = read_model(path)
    assert not reused and made.precision == "int8" and made.has_masks and "dyt.int8" in made.props
    assert twin(reference, model, tmp_path, dispatch="dynamic", with_masks=True) == (path, True)
    assert ".int8." in path.name  # an fp32 model's twin never takes this file's place
    assert made.int8_activations == "static"
    dynamic = dataclasses.replace(model, props={**model.props, "dyt.int8_activations": "dynamic"})
    dynamic_path, reused = twin(reference, dynamic, tmp_path, dispatch="dynamic", with_masks=True)
    assert not reused and dynamic_path != path  # a static twin never stands in for a dynamic model's
    assert read_model(dynamic_path).int8_activations == "dynamic" and ".int8-dynamic." in dynamic_path.name


def test_a_twin_from_another_graph_form_is_exported_again(exported, tmp_path):
    """A cached twin written by other graph code (an older checkout) may run at another speed
    than a fresh one, so it is never reused."""
    root, model_path, _ = exported
    reference = load_checkpoint(root / "tiny.safetensors")
    model = read_model(model_path)
    path, reused = twin(reference, model, tmp_path, dispatch="dense", with_masks=False)
    assert not reused and twin(reference, model, tmp_path, dispatch="dense", with_masks=False) == (path, True)
    current = read_model(path).props["dyt.graph_source"]
    stale = onnx.load(str(path))
    for prop in stale.metadata_props:
        if prop.key == "dyt.graph_source":
            prop.value = "0" * len(current)
    onnx.save(stale, str(path))
    assert twin(reference, model, tmp_path, dispatch="dense", with_masks=False) == (path, False)
    assert read_model(path).props["dyt.graph_source"] == current


def test_a_model_with_masks_is_its_own_mask_twin_and_records_follow_the_schema(exported, capsys, tmp_path):
    root, _, _ = exported
    result = _validate("--runtime", "ort-cpu", "--model", str(root / "tiny-masks.onnx"), "--out", str(root / "schema"),
                       "--no-throughput", "--limit", "4", "--threads", "1", capsys=capsys)
    assert result.returncode == 0, result.stderr
    record = json.loads((root / "schema" / "ort-cpu.json").read_text())
    assert record["model"]["twins"] == {"masks": None, "dense": None}
    assert record["parity"]["mask_agreement"] == 1.0
    for broken in ({k: v for k, v in record.items() if k != "parity"},
                   {**record, "schema_version": "2.0"},
                   {**record, "parity": {**record["parity"], "top1_agreement": 1.5}},
                   {**record, "runtime": "torch"}):
        with pytest.raises(jsonschema.ValidationError):
            check_record(broken)
    check_record({**record, "parity": {**record["parity"], "max_abs": None, "max_rel": None, "cosine_min": None}})
    with pytest.raises(ValueError, match="not JSON compliant"):  # NaN is schema-valid, but never written
        write_record({**record, "parity": {**record["parity"], "max_rel": float("nan")}}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing, not even half a record


def test_pictures_for_any_model_and_images(exported, tmp_path):
    root, model, _ = exported
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    paths = draw(model, tmp_path / "img", data="scenes", images_dir=folder, count=3)
    assert [p.name for p in paths] == ["tiny-activation.png", "tiny-tokens.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_pictures_refuse_bad_requests_before_work_and_never_leave_half(exported, tmp_path, monkeypatch, capsys):
    root, model, _ = exported
    (tmp_path / "a-file").write_text("")
    for args, message in ((["--count", "0"], "argument --count: expected a finite integer from 1 to 64, got '0'"),
                          (["--count", "-3"], "argument --count"),
                          (["--out", str(tmp_path / "a-file")], "exists and is not a directory"),
                          (["--prefix", "../up"], "must be a plain file name prefix")):
        assert validation.pictures.main([str(model), "--out", str(tmp_path / "img"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="count must be an integer from 1 to 64"):
        draw(model, tmp_path / "img", count=0)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(validation.pictures, "token_grid", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        draw(model, tmp_path / "img", count=2)
    assert list((tmp_path / "img").iterdir()) == []  # not the activation chart alone
