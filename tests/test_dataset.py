"""Dataset-scale validation (issue 24): labeled folders, the chunked run whose tallies merge
exactly, shards saved and resumed after a SIGKILL, the run sharded on Ray Data, and peak
memory flat in the dataset's size."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dyt_export import build_model, export_onnx, load_checkpoint, save
from dyt_export.preprocess import PreprocessSpec
from runtimes.torch_ref import TorchReference
from validation.accuracy import AccuracyTally
from validation.cli import main
from validation.compare import ParityTally, compare
from validation.tolerances import Tolerances
from validation.data import write_digits_folder
from validation.dataset import list_folder
from validation.record import check_record
from validation.stream import Partial, run_all

from conftest import small_config

pytestmark = pytest.mark.xdist_group("ray")  # one Ray instance per process: the modules that start Ray share a worker

LAYERS = ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
SPEC = PreprocessSpec(32)
VARIES = ("created", "timings_s", "execution")
"""What differs between two runs of one job by design: when, how long, and how it was spread."""


def _outputs(images: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A reference and a runtime answer with every kind of event: flips (with differences
    after them), merge ties (ToMe: one block per dispatcher, blocks 0-2) with and without
    differences after them, a real mask difference, NaN logits on both sides, a changed top-1."""
    rng = np.random.default_rng(seed)
    dispatch = rng.normal(0, 1, (images, 3, 8)).astype(np.float32)
    ref_masks = np.concatenate([np.ones((images, 3, 1), bool), dispatch > 0], axis=2)
    ref = {"logits": rng.normal(0, 3, (images, 7)).astype(np.float32), "token_masks": ref_masks, "dispatch_logits": dispatch,
           "merge_margins": rng.uniform(1e-3, 1, (images, 3)).astype(np.float32)}
    logits = ref["logits"] + rng.normal(0, 1e-5, ref["logits"].shape).astype(np.float32)
    masks = ref_masks.copy()
    for image in rng.choice(images, images // 5, replace=False):  # flips, each followed by a consequence
        dispatch[image, 0, 2] = 1e-6
        ref_masks[image, 0, 3] = True
        masks[image, 0, 3] = False
        masks[image, 2, 5] = ~masks[image, 2, 5]
        logits[image] *= 1.01
    flipped = masks[:, 0] != ref_masks[:, 0]
    for image in np.flatnonzero(~flipped.any(axis=1))[::9]:  # merge ties, every other one showing
        ref["merge_margins"][image, 1] = 1e-7
        if image % 2:
            masks[image, 1:, 2] = ~masks[image, 1:, 2]
            logits[image] *= 1.01
    masks[images - 3, 1, 4] = ~masks[images - 3, 1, 4]  # a real difference
    logits[7, 0] = np.nan
    ref["logits"][11, 2] = np.inf
    logits[13] = logits[13][::-1].copy()
    return ref, logits, masks


def test_tallies_merge_exactly_in_any_cut_and_order():
    """One pass, chunks of any sizes merged in any order, and a JSON round trip (a saved
    shard) give the same verdict, failures and flips word for word."""
    ref, logits, masks = _outputs(120, seed=4)
    tolerances = Tolerances(top1_min=0.9)
    whole = compare(ref, logits, masks, LAYERS, tolerances, (9, 9, 9), blocks=(0, 1, 2))
    assert whole.flips and whole.after_flip and whole.merge_ties and whole.after_merge_tie
    assert len(whole.failures) == 4, whole.failures
    labels = np.random.default_rng(1).integers(-1, 7, 120)
    accuracy = AccuracyTally().add(ref["logits"], logits, labels)
    rng = random.Random(0)
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, 120), 6))
        parts = []
        for start, stop in zip([0, *cuts], [*cuts, 120]):
            part = Partial(parity=ParityTally().add({k: v[start:stop] for k, v in ref.items()}, logits[start:stop],
                                                    masks[start:stop], LAYERS, tolerances.flip_logit, (9, 9, 9),
                                                    np.arange(start, stop), blocks=(0, 1, 2)),
                           accuracy=AccuracyTally().add(ref["logits"][start:stop], logits[start:stop], labels[start:stop]))
            parts.append(Partial.from_dict(json.loads(json.dumps(part.to_dict()))))
        rng.shuffle(parts)
        merged = Partial()
        for part in parts:
            merged = merged.merge(part)
        assert merged.parity.verdict(tolerances).to_dict() == whole.to_dict()
        assert merged.accuracy == accuracy
    summary = accuracy.summary(7, {0: "zero"})
    known = labels >= 0
    assert summary["reference"] == (ref["logits"][known].argmax(1) == labels[known]).mean()
    differ = logits[known].argmax(1) != ref["logits"][known].argmax(1)
    assert sum(summary["disagreement_by_class"].values()) == differ.sum() > 0


def _png(path: Path, data: bytes | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        Image.new("RGB", (10, 12), (200, 30, 30)).save(path)
    else:
        path.write_bytes(data)


def test_folders_are_listed_by_layout_and_labels(tmp_path):
    for name in ("cat/b.png", "cat/sub/a.png", "dog/c.png", "emu/d.png", ".hidden/e.png"):
        _png(tmp_path / "classes" / name)
    _png(tmp_path / "classes" / "emu" / "notes.txt", b"not listed")
    source = list_folder(tmp_path / "classes", SPEC, num_classes=3)
    assert source.layout == "imagefolder" and source.files == ["cat/b.png", "cat/sub/a.png", "dog/c.png", "emu/d.png"]
    assert source.labels.tolist() == [0, 0, 1, 2] and source.class_names == {0: "cat", 1: "dog", 2: "emu"}
    (tmp_path / "map.txt").write_text("emu a large bird\ndog\n\ncat\n")  # synset-list style: first word per line
    (tmp_path / "map.json").write_text('{"cat": 1, "dog": 0, "emu": 1}')
    assert list_folder(tmp_path / "classes", SPEC, 3, labels_file=tmp_path / "map.txt").labels.tolist() == [2, 2, 1, 0]
    assert list_folder(tmp_path / "classes", SPEC, 3, labels_file=tmp_path / "map.json").labels.tolist() == [1, 1, 0, 1]
    for name in ("x.png", "y.jpg"):
        _png(tmp_path / "flat" / name)
    flat = list_folder(tmp_path / "flat", SPEC, 3)
    assert flat.layout == "flat" and flat.labels is None and len(flat) == 2
    _png(tmp_path / "classes" / "dog" / "broken.png", b"\x89PNG\r\n\x1a\n cut short")
    chunk = list_folder(tmp_path / "classes", SPEC, 3).chunk(0, 10)
    assert chunk.ids.tolist() == [0, 1, 3, 4] and chunk.labels.tolist() == [0, 0, 1, 2]
    assert [file for file, _ in chunk.unreadable] == ["dog/broken.png"] and chunk.pixel_values.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("setup, args, message", [
    (lambda root: _png(root / "loose.png"), [], "holds both image files and class folders"),
    (lambda root: None, ["--labels", "{root}/missing.txt"], "labels file {root}/missing.txt does not exist"),
    (lambda root: (root / "m.txt").write_text("x\n"), ["--labels", "{root}/m.txt"], "/m.txt has no index for class folder "),
    (lambda root: (root / "m.json").write_text(json.dumps({d.name: 99 for d in root.iterdir()})),
     ["--labels", "{root}/m.json"], "has index 99, and the model has 10 classes"),
    (lambda root: _png(root / "1" / "bad.png", b"junk"), ["--strict"], "cannot read image"),
    (lambda root: None, ["--data", "scenes"], "--images DIR and --data are two sources of images: give one"),
    (lambda root: None, ["--workers", "2"], "--workers and --worker-threads size the Ray workers: add --ray"),
    (lambda root: None, ["--resume"], "--resume: the partial results in {root}/../out/partial/ort-cpu belong to another job ("),
])
def test_bad_dataset_requests_exit_2_with_one_line_and_no_record(exported, tmp_path, setup, args, message, capsys):
    root = tmp_path / "digits"
    write_digits_folder(root, 12)
    setup(root)
    out = tmp_path / "out"
    if "--resume" in args:  # shards of another job
        (out / "partial" / "ort-cpu").mkdir(parents=True)
        (out / "partial" / "ort-cpu" / "job.json").write_text(json.dumps({"chunk": 5}))
    code, _, err = _validate(exported.masks, root, out, *[a.format(root=root) for a in args], capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message.format(root=root).replace(f"{root}/../", f"{tmp_path}/") in err
    assert not (out / "ort-cpu.json").exists()


class Exported:
    def __init__(self, root: Path) -> None:
        model = build_model(small_config(embed_dim=64, num_heads=2, mlp_hidden_dim=256), seed=5)
        self.checkpoint = save(model, root / "tiny.safetensors")
        self.masks = root / "tiny-masks.onnx"
        export_onnx(load_checkpoint(self.checkpoint), self.masks, with_masks=True)
        self.folder = write_digits_folder(root / "digits", 2000)
        self.small = write_digits_folder(root / "digits-small", 200)
        _png(self.small / "4" / "unreadable.png", b"not an image")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    """A small model with masks (no twin to export), 2,000 labeled digits and 200 with one unreadable file."""
    return Exported(tmp_path_factory.mktemp("dataset"))


def _validate(model: Path, images: Path, out: Path, *args: str, capsys) -> tuple[int, dict | None, str]:
    """`python -m validation` in this process on a folder: (exit code, record, stderr)."""
    capsys.readouterr()
    code = main(["--model", str(model), "--images", str(images), "--out", str(out), "--no-throughput",
                 "--threads", "1", "--quiet", *args])
    err = capsys.readouterr().err
    path = out / "ort-cpu.json"
    return code, json.loads(path.read_text()) if path.exists() else None, err


def _same(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k not in VARIES} == {k: v for k, v in b.items() if k not in VARIES}


def test_a_labeled_folder_validates_with_accuracy_per_runtime_and_lists_unreadable_files(exported, tmp_path, capsys):
    code, record, _ = _validate(exported.masks, exported.small, tmp_path / "out", "--chunk", "32", capsys=capsys)
    assert code == 0 and record["passed"]
    check_record(record)
    inputs = record["inputs"]
    assert (inputs["listed"], inputs["images"], inputs["labeled"], inputs["layout"], inputs["classes"]) == \
        (201, 200, 200, "imagefolder", 10)
    assert inputs["unreadable"] == 1 and inputs["unreadable_files"][0]["file"] == "4/unreadable.png"
    assert record["execution"]["shards"] == 7 and not (tmp_path / "out" / "partial").exists()
    # accuracy as torch itself gives it on the same files, prepared the same way
    source = list_folder(exported.small, PreprocessSpec(32, interpolation="bicubic"), 10)
    chunk = source.chunk(0, len(source))
    logits = run_all(TorchReference(exported.checkpoint, threads=1), chunk.pixel_values, ("logits",))["logits"]
    accuracy = record["accuracy"]
    assert accuracy["reference"] == pytest.approx((logits.argmax(1) == chunk.labels).mean())
    assert accuracy["runtime"] == accuracy["reference"] and accuracy["disagreement_by_class"] == {}
    rank = (logits > logits[np.arange(len(logits)), chunk.labels][:, None]).sum(1)
    assert accuracy["reference_top5"] == pytest.approx((rank < 5).mean()) and accuracy["runtime_top5"] is not None


def _peak_rss_mb(exported: Exported, limit: int, out: Path) -> float:
    code = ("import resource, sys; from validation.cli import main; code = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, "--model", str(exported.masks), "--images", str(exported.folder),
                             "--limit", str(limit), "--out", str(out), "--no-throughput", "--threads", "1", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.strip().splitlines()[-1]) / 1024


def test_peak_memory_does_not_grow_with_the_dataset(exported, tmp_path):
    small, large = (_peak_rss_mb(exported, n, tmp_path / str(n)) for n in (200, 2000))
    assert large <= small * 1.1 + 50, (small, large)
    assert json.loads((tmp_path / "2000" / "ort-cpu.json").read_text())["inputs"]["images"] == 2000


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module: `--ray` runs in this process use it."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def test_sharded_on_ray_the_record_is_the_sequential_one(exported, local_ray, tmp_path, capsys):
    out = tmp_path / "out"  # shared, so both runs name the same files
    code, sequential, _ = _validate(exported.masks, exported.small, out, "--chunk", "32", capsys=capsys)
    assert code == 0
    code, sharded, _ = _validate(exported.masks, exported.small, out, "--chunk", "32", "--ray", "--workers", "2",
                                 capsys=capsys)
    assert code == 0, sharded
    assert {k: sharded["execution"][k] for k in ("mode", "chunk", "shards", "shards_resumed", "workers",
                                                 "threads_per_worker")} == {
        "mode": "ray", "chunk": 32, "shards": 7, "shards_resumed": 0, "workers": 2, "threads_per_worker": 1}
    assert sharded["execution"]["steady_images_per_s"] > 0
    _same(sequential, sharded)
    assert sharded["runtime_info"]["intra_op_num_threads"] == 1


def test_a_killed_run_resumes_to_the_uninterrupted_record(exported, local_ray, tmp_path, capsys):
    """SIGKILL part-way through a run of 125 shards; --resume (on Ray workers: the shards are
    the same wherever they ran) finishes it, and the record is the uninterrupted run's."""
    args = ["--chunk", "16", "--limit", "2000"]
    killed = tmp_path / "killed"
    shards = killed / "partial" / "ort-cpu"
    with subprocess.Popen([sys.executable, "-m", "validation", "--model", str(exported.masks), "--images",
                           str(exported.folder), "--out", str(killed), "--no-throughput", "--threads", "1", "--quiet",
                           *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as run:
        deadline = time.monotonic() + 120
        while len(list(shards.glob("shard-*.json"))) < 3 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert run.returncode == -signal.SIGKILL, run.stderr.read()
    saved = len(list(shards.glob("shard-*.json")))
    assert 3 <= saved < 125 and not (killed / "ort-cpu.json").exists()
    assert not [p for p in shards.iterdir() if ".partial" in p.name or p.suffix != ".json"]  # nothing half-written
    code, resumed, _ = _validate(exported.masks, exported.folder, killed, *args, "--resume", "--ray", capsys=capsys)
    assert code == 0 and resumed["execution"]["shards_resumed"] >= saved
    code, uninterrupted, _ = _validate(exported.masks, exported.folder, tmp_path / "whole", *args, capsys=capsys)
    assert code == 0 and uninterrupted["execution"]["shards_resumed"] == 0
    _same(resumed, uninterrupted)


def test_the_progress_bar_shows_images_per_second_and_eta():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from validation.stream import progress_bar

    assert progress_bar(True).disable and progress_bar(False).disable  # not a terminal: no redraws in logs
    screen = io.StringIO()
    with Progress(*progress_bar(True).columns, console=Console(file=screen, force_terminal=True, width=120)) as bar:
        task = bar.add_task("ort-cpu vs torch", total=1000)
        for _ in range(3):
            time.sleep(0.02)
            bar.advance(task, 100)
        bar.refresh()
    shown = screen.getvalue()
    assert "300/1000" in shown and " img/s" in shown and "ETA" in shown and "- img/s" not in shown.splitlines()[-1]


def _failing_copy(model: Path, path: Path) -> Path:
    """`model` with its logits offset by a Gather whose index (5, computed from the input so no
    optimiser folds it at load) is out of range: it loads, then fails on every run inside the
    runtime; its dyt.* metadata still names the same reference."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(model)
    graph = proto.graph
    producer = next(node for node in graph.node if "logits" in node.output)
    producer.output[list(producer.output).index("logits")] = "logits_raw"
    classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    graph.initializer.extend([helper.make_tensor("fail_table", TensorProto.FLOAT, [1, classes], [0.0] * classes),
                              helper.make_tensor("fail_zero", TensorProto.FLOAT, [], [0.0]),
                              helper.make_tensor("fail_five", TensorProto.FLOAT, [], [5.0])])
    graph.node.extend([helper.make_node("ReduceMax", ["pixel_values"], ["fail_max"], keepdims=0),
                       helper.make_node("Mul", ["fail_max", "fail_zero"], ["fail_nought"]),
                       helper.make_node("Add", ["fail_nought", "fail_five"], ["fail_float"]),
                       helper.make_node("Cast", ["fail_float"], ["fail_index"], to=TensorProto.INT64),
                       helper.make_node("Gather", ["fail_table", "fail_index"], ["fail_row"]),
                       helper.make_node("Add", ["logits_raw", "fail_row"], ["logits"])])
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("ray_args", [(), ("--ray", "--workers", "2")], ids=["sequential", "ray"])
def test_a_runtime_failure_on_a_shard_exits_4_with_the_record_holding_it(exported, local_ray, tmp_path, capsys,
                                                                          ray_args):
    """A kernel error while a shard runs (on a Ray worker or here) is the runtime's failure, not
    bad input: exit 4, one line, and a record that says so with nothing compared."""
    model = _failing_copy(exported.masks, tmp_path / "failing.onnx")
    code, record, err = _validate(model, exported.small, tmp_path / "out", "--chunk", "32", *ray_args, capsys=capsys)
    assert code == 4, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "Gather" in err, err
    check_record(record)
    assert not record["passed"] and record["error"]["stage"] == "parity run" and "Gather" in record["error"]["message"]
    assert record["parity"]["images_compared_on_logits"] == 0 and record["parity"]["max_rel"] is None
    assert record["execution"]["mode"] == ("ray" if ray_args else "sequential")
