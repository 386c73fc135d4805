"""What machine a record was measured on: numbers mean little without it."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("dyt-export", "torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
"""The flags that change which kernels (and which default precision) runtimes pick."""


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            fields.setdefault(key, value)
    return fields


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, the CPU flags that matter, OS and library versions."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu.get("model name") or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_flags": sorted(f for f in _CPU_FLAGS if f in flags),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": {name: v for name in LIBRARIES if (v := _version(name)) is not None},
    }
