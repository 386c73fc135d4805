"""The command line: every bad input is one line on stderr, exit 2, and no output file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyt_export import __version__, build_model, export_onnx, write_public_checkpoint

from conftest import small_config

from dyt_export.cli import main


@pytest.fixture
def run_cli(capsys):
    """Run the command in-process (importing torch per call would cost seconds each)."""
    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = build_model(small_config(depth=2), seed=0)
    return write_public_checkpoint(model, tmp_path_factory.mktemp("c") / "model.pt")


def _assert_refused(result: subprocess.CompletedProcess, message: str, leftovers: Path | None = None) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dyt-export: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if leftovers is not None:  # nothing written, not even a partial or staging file
        assert sorted(p.name for p in leftovers.iterdir() if p.suffix in (".onnx", ".partial") or ".partial" in p.name) == []


def _bad_file(tmp_path: Path, kind: str, checkpoint: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated-safetensors":
        from dyt_export import save
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
    ("truncated-safetensors", "is not a checkpoint"),
    ("text", "is not a checkpoint"),
    ("list", "holds a list"),
])
def test_unreadable_files(run_cli, tmp_path, checkpoint, kind, message):
    path = _bad_file(tmp_path, kind, checkpoint)
    _assert_refused(run_cli(path, "-o", tmp_path / "out.onnx"), message, tmp_path)


def test_missing_file_and_directory(run_cli, tmp_path):
    _assert_refused(run_cli(tmp_path / "nope.pt"), "no such file", tmp_path)
    _assert_refused(run_cli(tmp_path, "-o", tmp_path / "x.onnx"), "is a directory", tmp_path)


def test_onnx_file_passed_as_checkpoint(run_cli, tmp_path):
    onnx_path = export_onnx(build_model(small_config(depth=2), seed=0), tmp_path / "m.onnx").path
    _assert_refused(run_cli(onnx_path, "-o", tmp_path / "again.onnx"), "is an ONNX model, not a checkpoint")
    assert not (tmp_path / "again.onnx").exists()


def test_output_equal_to_input_is_refused(run_cli, checkpoint):
    before = checkpoint.read_bytes()
    _assert_refused(run_cli(checkpoint, "-o", checkpoint), "is the input file")
    assert checkpoint.read_bytes() == before


def test_output_directory_not_writable(run_cli, checkpoint, tmp_path):
    if os.geteuid() == 0:  # root ignores mode bits; procfs refuses new files to everyone
        target = Path("/proc/dyt-export-test.onnx")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "m.onnx"
    _assert_refused(run_cli(checkpoint, "-o", target), "is not writable")
    assert not target.exists()
    _assert_refused(run_cli(checkpoint, "-o", tmp_path / "no" / "such" / "dir.onnx"), "does not exist")


def test_failed_export_leaves_no_file(run_cli, checkpoint, tmp_path):
    """A plain timm checkpoint fails after parsing: nothing appears at the target."""
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8)
    torch.save(vit.state_dict(), tmp_path / "timm.pt")
    _assert_refused(run_cli(tmp_path / "timm.pt", "-o", tmp_path / "t.onnx"), "not a DyT model", tmp_path)
    _assert_refused(run_cli(tmp_path / "timm.pt", "--dispatch", "dense", "--with-masks", "-o", tmp_path / "t.onnx"),
                    "no token dispatchers", tmp_path)


def test_bad_flags(run_cli, checkpoint):
    _assert_refused(run_cli(checkpoint, "--opset", "12"), "invalid choice")
    _assert_refused(run_cli(checkpoint, "--dispatch", "sparse"), "invalid choice")
    _assert_refused(run_cli(checkpoint, "--fp16-io"), "--fp16-io needs --fp16")
    _assert_refused(run_cli(checkpoint, "--img-size", "33"), "multiple of the patch size")


def test_default_output_is_checkpoint_with_onnx_suffix(run_cli, checkpoint, tmp_path):
    local = tmp_path / "ck.pt"
    local.write_bytes(checkpoint.read_bytes())
    result = run_cli(local, "--opset", "18")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ck.onnx").is_file() and "wrote" in result.stdout
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_entry_point_help_version_and_exit_codes(tmp_path):
    """The installed entry point itself (a real process): help, version, exit 2 on bad input."""
    exe = [sys.executable, "-m", "dyt_export"]
    help_text = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0 and "examples:" in help_text.stdout and "--dispatch" in help_text.stdout
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True, timeout=300)
    assert version.returncode == 0 and __version__ in version.stdout
    _assert_refused(subprocess.run([*exe, str(tmp_path / "nope.pt")], capture_output=True, text=True, timeout=300),
                    "no such file")


def test_inspect(run_cli, checkpoint, tmp_path):
    described = run_cli("inspect", checkpoint, "--json")
    assert described.returncode == 0, described.stderr
    import json
    facts = json.loads(described.stdout)
    assert facts["geometry"]["depth"] == 2 and facts["adapter"]["bottleneck"] == 8
    assert facts["parameters"]["trainable_adapters_dispatchers"] == 2 * (2 * 192 * 8 + 8 + 192 + 192 + 1)
    _assert_refused(run_cli("inspect", tmp_path / "missing.onnx"), "not a readable ONNX model")


def test_internal_errors_exit_1_without_traceback(monkeypatch, checkpoint, capsys, tmp_path):
    from dyt_export import cli, export
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: 1 / 0)
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "Traceback" not in err
    assert cli.main([str(checkpoint), "-o", str(tmp_path / "x.onnx"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
