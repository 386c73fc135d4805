"""The command line: every bad input is one line on stderr, exit 2, and no output file."""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dyt_export import __version__, build_model, save, write_public_checkpoint

from conftest import assert_refused, small_config

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = build_model(small_config(depth=2), seed=0)
    return write_public_checkpoint(model, tmp_path_factory.mktemp("c") / "model.pt")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    """`checkpoint` exported once by the command, for the tests that read an ONNX file."""
    from dyt_export.cli import main
    out = tmp_path_factory.mktemp("e") / "model.onnx"
    assert main([str(checkpoint), "-o", str(out)]) == 0
    return out


def _seeded_bytes(count: int) -> bytes:
    """Noise that is the same on every run; its first byte is no format's magic."""
    data = random.Random(0).randbytes(count)
    assert data[0] not in (0x80, 0x08, ord("P"))
    return data


def _bad_file(tmp_path: Path, kind: str, checkpoint: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(_seeded_bytes(4096))
    elif kind == "random-0x80":  # a pickle protocol byte, then noise (1 in 256 random files)
        path.write_bytes(b"\x80" + _seeded_bytes(4095))
    elif kind == "legacy-header-then-noise":  # a legacy torch.save header, then garbage
        path.write_bytes(_TORCH_LEGACY_MAGIC + b"." + _seeded_bytes(4000))
    elif kind == "truncated-safetensors":
        full = save(build_model(small_config(depth=2), seed=0), tmp_path / "full.safetensors")
        data = full.read_bytes()
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[: len(data) - 1000])
        full.unlink()
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "list":
        torch.save([torch.ones(1)], path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("empty", "is empty"),
    ("truncated", "truncated or corrupt"),
    ("random", "is not a checkpoint"),
    ("random-0x80", "is not a checkpoint"),
    ("legacy-header-then-noise", "is not a readable PyTorch checkpoint (corrupt pickle data"),
    ("truncated-safetensors", "is a truncated or corrupt safetensors file"),
    ("text", "is not a checkpoint"),
    ("list", "holds a list"),
])
def test_unreadable_files(run_cli, tmp_path, checkpoint, kind, message):
    path = _bad_file(tmp_path, kind, checkpoint)
    assert_refused(run_cli(path, "-o", tmp_path / "out.onnx"), message, tmp_path)


def test_missing_file_and_directory(run_cli, tmp_path):
    assert_refused(run_cli(tmp_path / "nope.pt"), "no such file", tmp_path)
    assert_refused(run_cli(tmp_path, "-o", tmp_path / "x.onnx"), "is a directory", tmp_path)


def test_cheap_checks_come_before_importing_torch(tmp_path):
    """A missing or empty file, a directory or an unwritable output is refused before the
    seconds-long torch import (a fresh process, so torch is not imported already)."""
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "noise.pt").write_bytes(_seeded_bytes(64))
    cases = [["nope.pt"], ["empty.pt"], ["."], ["noise.pt", "-o", "no/such/dir.onnx"],
             ["inspect", "nope.onnx"], ["inspect", "noise.pt"], ["init", "--backbone", "x", "--weights", ".", "-o", "m.st"]]
    script = ("import sys, json; from dyt_export.cli import main; "
              f"codes = [main(a) for a in {cases!r}]; print(json.dumps([codes, 'torch' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    codes, torch_imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(cases) and not torch_imported, done.stderr
    assert len(done.stderr.strip().splitlines()) == len(cases)


def test_onnx_file_passed_as_checkpoint(run_cli, tmp_path, exported):
    named_pt = tmp_path / "model.pt"
    named_pt.write_bytes(exported.read_bytes())
    for path in (exported, named_pt):  # recognised by content, whatever its name
        assert_refused(run_cli(path, "-o", tmp_path / "again.onnx"), "is an ONNX model, not a checkpoint")
    assert not (tmp_path / "again.onnx").exists()


def test_output_equal_to_input_is_refused(run_cli, checkpoint, tmp_path):
    unsuffixed = tmp_path / "checkpoint"  # a .pt path is refused for its suffix already
    unsuffixed.write_bytes(checkpoint.read_bytes())
    assert_refused(run_cli(unsuffixed, "-o", unsuffixed), "is the input file")
    assert unsuffixed.read_bytes() == checkpoint.read_bytes()


def test_output_directory_not_writable(run_cli, checkpoint, tmp_path):
    if os.geteuid() == 0:  # root ignores mode bits; procfs refuses new files to everyone
        target = Path("/proc/dyt-export-test.onnx")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "m.onnx"
    assert_refused(run_cli(checkpoint, "-o", target), "is not writable")
    assert not target.exists()
    assert_refused(run_cli(checkpoint, "-o", tmp_path / "no" / "such" / "dir.onnx"), "does not exist")


def test_output_ending_in_a_separator_is_refused(run_cli, checkpoint, tmp_path):
    """`-o out/` means a directory; writing a file called `out` instead would surprise."""
    assert_refused(run_cli(checkpoint, "-o", f"{tmp_path / 'out'}{os.sep}"), "out/ names a directory")
    assert_refused(run_cli("init", "--backbone", "vit_tiny_patch16_224", "-o", f"{tmp_path / 'm'}{os.sep}"),
                   "names a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_named_as_the_other_format_is_refused(run_cli, checkpoint, tmp_path):
    """`-o other.pth` would overwrite a checkpoint with ONNX; `init -o m.onnx` would write a
    checkpoint that looks like an export."""
    other = tmp_path / "other.pth"
    other.write_bytes(b"a checkpoint")
    for name in ("other.pth", "best.PT", "m.pth.tar", "w.safetensors"):
        assert_refused(run_cli(checkpoint, "-o", tmp_path / name), "but this command writes ONNX; give a .onnx path")
    assert_refused(run_cli("init", "--backbone", "vit_tiny_patch16_224", "-o", tmp_path / "m.onnx"),
                   "writes a checkpoint (safetensors); give a .safetensors path")
    assert other.read_bytes() == b"a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pth"]


def _only_target_left(directory: Path, target: Path, before: bytes) -> None:
    """The pre-existing target is byte for byte what it was, and nothing else was left."""
    assert target.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == [target.name]


def test_failed_export_leaves_no_file(run_cli, checkpoint, tmp_path, monkeypatch):
    """Failures before anything is written, and one after the graph was staged (the checker
    step): no temporary or target file appears, and an existing target is left as it was."""
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8)
    torch.save(vit.state_dict(), tmp_path / "timm.pt")
    assert_refused(run_cli(tmp_path / "timm.pt", "-o", tmp_path / "t.onnx"), "not a DyT model", tmp_path)
    assert_refused(run_cli(tmp_path / "timm.pt", "--dispatch", "dense", "--with-masks", "-o", tmp_path / "t.onnx"),
                   "no token dispatchers", tmp_path)

    import onnx.checker
    staged = []

    def failing_check(path, **kwargs):
        staged.append((Path(path), Path(path).is_file()))
        raise onnx.checker.ValidationError("injected failure")
    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "m.onnx"
    target.write_bytes(b"previous export")
    result = run_cli(checkpoint, "-o", target)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "injected failure" in result.stderr
    (path, existed), = staged  # the graph was written, beside the target, before the failure
    assert existed and path.parent.parent == out_dir.resolve() and path.name == target.name
    _only_target_left(out_dir, target, b"previous export")


def test_bad_flags(run_cli, checkpoint, tmp_path):
    assert_refused(run_cli(checkpoint, "--opset", "12"), "invalid choice")
    assert_refused(run_cli(checkpoint, "--dispatch", "sparse"), "invalid choice")
    assert_refused(run_cli(checkpoint, "--fp16-io"), "--fp16-io needs --fp16")
    assert_refused(run_cli(checkpoint, "--int8", "--external-data", "-o", tmp_path / "m.onnx"),
                   "--external-data is not supported with --int8", tmp_path)
    assert_refused(run_cli(checkpoint, "--img-size", "33"), "multiple of the patch size")
    assert_refused(run_cli(checkpoint, "--num-heads", "0", "-o", tmp_path / "m.onnx"),
                   "--num-heads must be a positive integer, got 0", tmp_path)
    for scale in ("nan", "inf", "-inf"):
        assert_refused(run_cli(checkpoint, f"--adapter-scale={scale}", "-o", tmp_path / "m.onnx"),
                       "adapter scale must be a finite number", tmp_path)


def test_external_data_export_gives_the_single_file_answers(run_cli, checkpoint, exported, tmp_path):
    """--external-data moves the weights to OUT.data, the graph stays the same, both CPU
    runtimes load the pair and answer bit for bit as with the single file; a later
    single-file export to the same path removes the weights file it no longer uses."""
    from runtimes import open_backend
    out = tmp_path / "split.onnx"
    data = tmp_path / "split.onnx.data"
    result = run_cli(checkpoint, "-o", out, "--external-data")
    assert result.returncode == 0, result.stderr
    assert "weights in split.onnx.data" in result.stdout
    assert data.stat().st_size > 4 * out.stat().st_size
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    for runtime in ("ort-cpu", "openvino"):
        single = open_backend(runtime, exported, threads=1).run({"pixel_values": images})["logits"]
        split = open_backend(runtime, out, threads=1).run({"pixel_values": images})["logits"]
        np.testing.assert_array_equal(split, single, err_msg=runtime)
    # inspect says where the weights are, and whether that file travelled whole.
    whole = data.read_bytes()
    for size, says in ((len(whole), f"weights: external data in split.onnx.data ({len(whole)} bytes)"),
                       (100, f"weights: external data, but its weights file {data} is cut short (100 bytes where "
                             f"the model needs {len(whole)}; copy it again)")):
        data.write_bytes(whole[:size])
        result = run_cli("inspect", out)
        assert result.returncode == 0 and says in result.stdout, result.stdout + result.stderr
    assert "weights: in the file" in run_cli("inspect", exported).stdout
    data.write_bytes(whole)
    assert run_cli(checkpoint, "-o", out).returncode == 0
    assert out.is_file() and not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.onnx"]


def test_num_heads_of_a_self_describing_checkpoint(run_cli, tmp_path):
    """A dyt-export file records its head count: a different --num-heads is refused, the same
    one is harmless (checked through the loader; the export itself is tested elsewhere)."""
    from dyt_export import load_checkpoint
    path = save(build_model(small_config(depth=1), seed=0), tmp_path / "m.safetensors")
    assert_refused(run_cli(path, "--num-heads", "5", "-o", tmp_path / "m.onnx"), "records num_heads 3", tmp_path)
    assert load_checkpoint(path, num_heads=3).dyt_config.num_heads == 3


def test_default_output_is_checkpoint_with_onnx_suffix(run_cli, checkpoint, tmp_path):
    local = tmp_path / "ck.pt"
    local.write_bytes(checkpoint.read_bytes())
    result = run_cli(local, "--opset", "18")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ck.onnx").is_file() and "wrote" in result.stdout
    assert "import torch" in result.stdout  # the import is a timed step of its own
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_int8_calibration_file_is_checked_before_anything_is_written(run_cli, checkpoint, tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    cases = {"objects.npy": (np.array([{"a": 1}], dtype=object), "pickled Python objects, refused"),
             "ints.npy": (np.zeros((2, 3, 32, 32), dtype=np.int64), "holds int64 data"),
             "flat.npy": (np.zeros((2, 3, 32), dtype=np.float32), "need images [N, C, H, W]"),
             "nan.npy": (np.full((1, 3, 32, 32), np.nan, dtype=np.float32), "NaN or infinite"),
             "small.npy": (np.zeros((2, 3, 16, 16), dtype=np.float32), "the model takes [3, 32, 32]")}
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array, allow_pickle=True)
    with open(tmp_path / "pickle.npy", "wb") as f:  # not .npy at all: a plain pickle
        pickle.dump([1, 2], f)
    cases["pickle.npy"] = (None, "pickled Python objects, refused")
    np.savez(tmp_path / "arrays.npz", images=np.zeros((2, 3, 32, 32), dtype=np.float32))
    cases["arrays.npz"] = (None, "is an .npz archive; save one array")
    cases[checkpoint.name] = (None, "is a zip archive, not .npy (a torch.save checkpoint?)")
    for name, (_, message) in cases.items():
        source = checkpoint if name == checkpoint.name else tmp_path / name
        assert_refused(run_cli(checkpoint, "--int8", "--calibration-images", source, "-o", target), message)
        assert target.read_bytes() == b"previous export"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_int8_failure_after_the_fp32_export_leaves_the_target_alone(run_cli, checkpoint, tmp_path, monkeypatch):
    """The fp32 graph is staged, never written at the target: if quantization then fails,
    the existing target and the directory are exactly as before."""
    import dyt_export.quantize
    from dyt_export.errors import UserError
    seen = []

    def failing_quantize(fp32, out, images, activations):
        seen.append(Path(fp32))
        assert Path(fp32).is_file() and Path(fp32) != Path(out)
        raise UserError("int8: injected failure")
    monkeypatch.setattr(dyt_export.quantize, "quantize_int8", failing_quantize)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "m.onnx"
    target.write_bytes(b"previous export")
    assert_refused(run_cli(checkpoint, "--int8", "-o", target), "injected failure")
    assert seen and not seen[0].exists()
    _only_target_left(out_dir, target, b"previous export")


def test_entry_point_help_version_and_exit_codes(tmp_path):
    """The installed entry point itself (a real process): help, version, exit 2 on bad input."""
    exe = [sys.executable, "-m", "dyt_export"]
    help_text = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0 and "examples:" in help_text.stdout and "--dispatch" in help_text.stdout
    inspect_help = subprocess.run([*exe, "inspect", "--help"], capture_output=True, text=True, timeout=300)
    assert inspect_help.returncode == 0 and "examples:" in inspect_help.stdout and "trainable" in inspect_help.stdout
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True, timeout=300)
    assert version.returncode == 0 and __version__ in version.stdout
    assert_refused(subprocess.run([*exe, str(tmp_path / "nope.pt")], capture_output=True, text=True, timeout=300),
                   "no such file")


def _inspect(run_cli, path, *flags) -> dict:
    described = run_cli("inspect", path, "--json", *flags)
    assert described.returncode == 0, described.stderr
    return json.loads(described.stdout)


def test_inspect_checkpoint_and_its_onnx_export_agree(run_cli, checkpoint, exported, tmp_path):
    facts = _inspect(run_cli, checkpoint)
    assert facts["kind"] == "checkpoint" and facts["geometry"]["depth"] == 2 and facts["adapter"]["bottleneck"] == 8
    adapters_and_dispatchers = 2 * (2 * 192 * 8 + 8 + 192 + 192 + 1)
    assert facts["parameters"]["trainable"] == adapters_and_dispatchers and facts["parameters"]["head"] == 192 * 10 + 10
    renamed = tmp_path / "exported.pt"  # an ONNX file is recognised by content, not by suffix
    renamed.write_bytes(exported.read_bytes())
    for onnx_path in (exported, renamed):
        onnx_facts = _inspect(run_cli, onnx_path)
        assert onnx_facts["kind"] == "onnx" and onnx_facts["opset"] == 18
        assert {k: v for k, v in onnx_facts["parameters"].items() if k != "graph_initializer_values"} == facts["parameters"]
        assert onnx_facts["dispatchers"] == facts["dispatchers"] and all("bias" in d for d in facts["dispatchers"])


def test_inspect_public_checkpoint_without_scale(run_cli, tmp_path):
    model = build_model(small_config(depth=2), seed=0)
    for shape in ("bare", "model"):
        path = write_public_checkpoint(model, tmp_path / f"{shape}.pt", shape=shape)
        facts = _inspect(run_cli, path)
        assert "not recorded" in facts["adapter"]["scale"] and facts["geometry"]["depth"] == 2
        assert _inspect(run_cli, path, "--adapter-scale", "0.1")["adapter"]["scale"] == 0.1


def test_inspect_refuses_what_is_not_a_model(run_cli, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "noise.onnx").write_bytes(_seeded_bytes(256))
    (tmp_path / "cut.onnx").write_bytes(b"\x08\x08\x3a\xff\xff\xff\x0f")  # ONNX's start, then a cut graph
    assert_refused(run_cli("inspect", tmp_path / "missing.onnx"), "no such file")
    assert_refused(run_cli("inspect", tmp_path / "empty.onnx"), "is empty")
    assert_refused(run_cli("inspect", tmp_path / "noise.onnx"), "neither an ONNX model nor a checkpoint")
    assert_refused(run_cli("inspect", tmp_path / "cut.onnx"), "not a readable ONNX model")


def test_a_reader_that_leaves_early_is_no_error(checkpoint):
    """`dyt-export inspect m.pt | head -1`: the pipe closes before the command writes; it exits
    141 (128 + SIGPIPE, what a shell reports) with nothing on stderr, not "internal error"."""
    proc = subprocess.Popen([sys.executable, "-m", "dyt_export", "inspect", str(checkpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


def test_internal_errors_exit_1_without_traceback(monkeypatch, checkpoint, capsys, tmp_path):
    from dyt_export import cli, export
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: 1 / 0)
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "Traceback" not in err
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err

    def remote_failure(*args, **kwargs):  # as Ray reports an actor's failure: its traceback in the message
        raise RuntimeError("\nray::Manager.ready() (pid=1)\n  File \"x.py\", line 1, in ready\nRuntimeError: crashed")

    monkeypatch.setattr(export, "export_onnx", remote_failure)
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: ray::Manager.ready() (pid=1) [...]" in err


@pytest.mark.parametrize("failure", ["errno", "rust", "silent"])
def test_a_full_disk_is_one_line_and_leaves_nothing(failure, monkeypatch, run_cli, checkpoint, tmp_path):
    """The disk fills while the weights are written: exit 2 naming the output, not "internal
    error" or the staging file, and neither the half-written file nor its staging directory
    stays. Writers say it with errno (OSError), in Rust's words (safetensors) or not at all
    (torch.save's "unexpected pos"), so the disk is asked; with room there that stays a bug."""
    import collections
    import errno
    import shutil

    from onnxscript import ir

    def save_half(model, path, **kwargs):
        Path(path).write_bytes(b"\x08\x08" * 1024)
        if failure == "errno":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if failure == "rust":
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ir, "save", save_half)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(run_cli(checkpoint, "-o", out / "x.onnx"), f"No space left on device writing {out / 'x.onnx'}",
                   leftovers=out)
    assert list(out.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    result = run_cli(checkpoint, "-o", out / "x.onnx")
    if failure == "silent":
        assert result.returncode == 1 and "internal error: RuntimeError: [enforce fail" in result.stderr
    else:
        assert_refused(result, "No space left on device writing", leftovers=out)
    assert list(out.iterdir()) == []
