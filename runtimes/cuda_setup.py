"""`make setup-cuda`: put onnxruntime-gpu in place of the onnxruntime wheel, built for the
CUDA major version of this environment's torch; `--undo` puts the CPU wheel back.

Why the major version must match: validation imports torch before ONNX Runtime, and torch
(2.14.1+cu130 here) loads its CUDA 13 runtime, cuBLAS and cuDNN into the process on import.
ORT's CUDA provider then binds to the libraries already loaded under the names it needs.
cuDNN is `libcudnn.so.9` for CUDA 12 and 13 builds alike, so a CUDA 12 onnxruntime-gpu would
get torch's CUDA 13 cuDNN. PyPI's onnxruntime-gpu moved from CUDA 12 to 13 between releases
(1.24.4 requires nvidia-cuda-runtime-cu12~=12.0, 1.31.1 nvidia-cuda-runtime~=13.0 and
nvidia-cudnn-cu13), so the release has to be chosen, not just the newest taken.

How the wheel is picked: the newest onnxruntime-gpu from the package index between the
project's onnxruntime floor (pyproject) and the installed CPU wheel's version (GPU wheels can
lag behind; no upper bound without a CPU wheel) whose metadata requires the CUDA runtime of
torch's major version. pip is asked for
one candidate at a time (`pip install --dry-run --report`), which leaves the wheel in pip's
cache for the install that follows; at most MAX_CANDIDATES are tried.

Idempotent: with a matching onnxruntime-gpu installed and no CPU wheel, nothing changes.
When both are present (`make setup` reinstalled onnxruntime after a swap; both write the
same `onnxruntime` package, so neither is intact), both go and the GPU wheel is reinstalled.
When an install fails, the CPU wheel comes back. Exit codes: 0 done, 1 failed (one line).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

CPU_WHEEL, GPU_WHEEL = "onnxruntime", "onnxruntime-gpu"
EXTRAS = "[cuda,cudnn]"
"""The nvidia-* wheels ORT needs (already present when torch brought the same CUDA major)."""
MAX_CANDIDATES = 3
"""onnxruntime-gpu releases tried, newest first: each costs a ~250 MB download."""
PIP_TIMEOUT_S = 900


class SetupError(Exception):
    """Why the swap could not be done, in one line."""


Resolver = Callable[[str], tuple[str, list[str]]]
"""A requirement string -> (version pip would install, that release's Requires-Dist)."""


def cuda_major(requires: list[str]) -> int | None:
    """The CUDA major version an onnxruntime-gpu release is built for, from its Requires-Dist:
    `nvidia-cuda-runtime-cu12...` (CUDA <= 12 naming) or `nvidia-cuda-runtime~=13.0`."""
    for requirement in requires:
        match = re.match(r"nvidia-cuda-runtime(?:-cu(\d+))?\s*(?:[~=<>!]=?\s*(\d+))?", requirement.strip())
        if match and (match.group(1) or match.group(2)):
            return int(match.group(1) or match.group(2))
    return None


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def project_floor() -> str:
    """The project's onnxruntime requirement ('>=1.21'), read from its installed metadata."""
    for requirement in metadata.requires("dyt-export") or []:
        match = re.match(rf"{CPU_WHEEL}\s*(>=\s*[\w.]+)", requirement)
        if match:
            return match.group(1).replace(" ", "")
    return ""


def torch_cuda() -> str | None:
    """torch's CUDA version ('13.0'); None for a CPU-only torch."""
    import torch

    return torch.version.cuda


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=PIP_TIMEOUT_S)


def resolve(requirement: str) -> tuple[str, list[str]]:
    """What pip would install for `requirement` (one package, dependencies aside)."""
    done = pip("install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed", "--report", "-", requirement)
    if done.returncode != 0:
        raise SetupError(f"pip finds no {requirement}: {_last_line(done.stderr)}")
    chosen = json.loads(done.stdout)["install"][0]["metadata"]
    return chosen["version"], chosen.get("requires_dist", [])


def pick(torch_major: int | None, floor: str, ceiling: str | None, resolver: Resolver = resolve) -> tuple[str, int | None]:
    """(version, CUDA major) of the newest onnxruntime-gpu within [floor, ceiling] built for
    `torch_major` (any build when torch has no CUDA)."""
    within = ",".join(b for b in (floor, f"<={ceiling}" if ceiling else "") if b)
    bound, tried = within, []
    for _ in range(MAX_CANDIDATES):
        try:
            version, requires = resolver(GPU_WHEEL + bound)
        except SetupError:
            if not tried:
                raise
            break  # no older release left
        major = cuda_major(requires)
        if torch_major is None or major == torch_major:
            return version, major
        tried.append(f"{version} (CUDA {major})")
        bound = ",".join(b for b in (floor, f"<{version}") if b)
    raise SetupError(f"no {GPU_WHEEL}{within} among the newest {len(tried)} is built for torch's CUDA "
                     f"{torch_major}: {', '.join(tried)}")


@dataclass(frozen=True)
class Plan:
    version: str | None
    """The onnxruntime-gpu to install; None: nothing to do."""
    why: str


def plan(torch_major: int | None, cpu: str | None, gpu: str | None, gpu_major: int | None, floor: str,
         resolver: Resolver = resolve) -> Plan:
    """What to do, given torch's CUDA major and the installed wheels."""
    matches = gpu is not None and (torch_major is None or gpu_major == torch_major)
    torch_uses = f"torch's CUDA {torch_major}" if torch_major else "torch (no CUDA)"
    if matches and cpu is None:
        return Plan(None, f"{GPU_WHEEL} {gpu} (CUDA {gpu_major}) is installed and suits {torch_uses}")
    if matches:
        return Plan(gpu, f"{CPU_WHEEL} {cpu} was installed over {GPU_WHEEL} {gpu}: reinstalling {GPU_WHEEL} {gpu}")
    version, major = pick(torch_major, floor, cpu, resolver)  # a GPU wheel may not be newer than the CPU one
    replaced = ", ".join(f"{d} {v}" for d, v in ((CPU_WHEEL, cpu), (GPU_WHEEL, gpu)) if v) or "no onnxruntime"
    return Plan(version, f"for {torch_uses}, {GPU_WHEEL} {version} (CUDA {major}) replaces {replaced}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _swap(version: str, restore: str) -> None:
    """Remove both wheels, install onnxruntime-gpu `version`; on failure reinstall `restore`."""
    pip("uninstall", "--quiet", "-y", CPU_WHEEL, GPU_WHEEL)
    done = pip("install", "--quiet", f"{GPU_WHEEL}{EXTRAS}=={version}")
    if done.returncode != 0:
        pip("install", "--quiet", restore)
        raise SetupError(f"installing {GPU_WHEEL} {version} failed ({_last_line(done.stderr)}); {restore} is back")


def undo() -> str:
    """Back to the CPU wheel the project requires."""
    pip("uninstall", "--quiet", "-y", GPU_WHEEL, CPU_WHEEL)
    requirement = CPU_WHEEL + project_floor()
    done = pip("install", "--quiet", requirement)
    if done.returncode != 0:
        raise SetupError(f"installing {requirement} failed: {_last_line(done.stderr)}")
    return f"{GPU_WHEEL} removed; {CPU_WHEEL} {installed(CPU_WHEEL)} installed"


def setup() -> str:
    cuda = torch_cuda()
    torch_major = int(cuda.split(".")[0]) if cuda else None
    gpu = installed(GPU_WHEEL)
    gpu_major = cuda_major(metadata.requires(GPU_WHEEL) or []) if gpu else None
    cpu, floor = installed(CPU_WHEEL), project_floor()
    decided = plan(torch_major, cpu, gpu, gpu_major, floor)
    print(f"setup-cuda: {decided.why}", flush=True)
    if decided.version is None:
        return "nothing to do"
    _swap(decided.version, f"{CPU_WHEEL}=={cpu}" if cpu else CPU_WHEEL + floor)
    return f"{GPU_WHEEL} {installed(GPU_WHEEL)} installed (undo: python -m runtimes.cuda_setup --undo)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtimes.cuda_setup", description=__doc__.splitlines()[0])
    parser.add_argument("--undo", action="store_true", help=f"remove {GPU_WHEEL} and reinstall {CPU_WHEEL}")
    args = parser.parse_args(argv)
    try:
        print(f"setup-cuda: {undo() if args.undo else setup()}")
    except (SetupError, subprocess.TimeoutExpired) as e:
        print(f"setup-cuda: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
