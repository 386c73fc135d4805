"""The wheel works on its own: `pip wheel .` and that wheel installed (not editable) into a
fresh venv give working commands, and it ships the three packages without tests or data.

The fresh venv sees this environment's dependencies (torch, onnxruntime...) through a .pth
line, so nothing is downloaded; a .pth path line does not run the editable install's own
.pth finder, so `dyt_export`, `runtimes` and `validation` can only come from the wheel,
which the test checks by where they were imported from.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # 15-30 s: a wheel build, a venv and three commands that import torch


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the fresh venv's python) with the wheel installed into that venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"  # a copy: building in the checkout would leave build/ and *.egg-info in it
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "records"))
    built = _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                  "--no-index", "-w", str(tmp / "dist"), "-q"], cwd=source)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp / "dist").glob("dyt_export-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
                .stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                 "-q", str(wheel)], cwd=tmp)
    assert done.returncode == 0, done.stderr
    return wheel, python


def test_the_wheel_holds_the_three_packages_and_no_tests(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.startswith("dyt_export-")}
    assert top == {"dyt_export", "runtimes", "validation"}, top
    assert "validation/record.schema.json" in names  # package data: records are checked against it
    assert "validation/bench/cli.py" in names  # the benchmark ships with validation: python -m validation.bench
    assert not [name for name in names if "/tests/" in name or name.endswith(".onnx") or "/cpp/" in name]


def test_the_installed_commands_run_from_the_wheel(installed, tmp_path):
    _, python = installed
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = _run([str(python), "-c", "import dyt_export, runtimes, validation; "
                  "print(dyt_export.__file__, runtimes.__file__, validation.__file__)"], cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    assert all(path.startswith(str(python.parents[1])) for path in where.stdout.split()), where.stdout
    for command, expected in [([str(python.parent / "dyt-export"), "--help"], "usage: dyt-export"),
                              ([str(python.parent / "dyt-export"), "serve", "--help"], "usage: dyt-export serve"),
                              ([str(python), "-m", "validation", "--help"], "usage: python -m validation"),
                              ([str(python), "-m", "runtimes", "--help"], "usage: python -m runtimes")]:
        result = _run(command, cwd=tmp_path, env=env)
        assert result.returncode == 0 and expected in result.stdout, (command, result.stdout, result.stderr)
    checked = _run([str(python), "-m", "runtimes", "ort-cpu"], cwd=tmp_path, env=env)
    assert checked.returncode == 0 and checked.stdout == "ort-cpu: available\n", checked.stdout + checked.stderr
