"""The NVIDIA driver asked directly (`libcuda.so.1` through ctypes).

Two questions need an answer that neither torch.cuda nor onnxruntime-gpu may give: whether
this machine has a CUDA GPU at all, asked by `make gpu-check` before it installs anything,
and which GPU a CUDA session runs on, for records. The driver library is what every CUDA
program loads (ORT's CUDA provider links it), it numbers devices as the CUDA runtime does
(CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER included), and it can be asked without
creating a CUDA context.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

LIBRARY = "libcuda.so.1"


@dataclass(frozen=True)
class Driver:
    """What the driver says: the CUDA version it supports and its devices' names, or the
    reason it cannot say (`problem`; then `devices` is empty)."""

    cuda_version: tuple[int, int] | None
    devices: tuple[str, ...]
    problem: str = ""


def _error_name(lib: ctypes.CDLL, code: int) -> str:
    name = ctypes.c_char_p()
    if lib.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
        return name.value.decode(errors="replace")
    return f"CUresult {code}"


@functools.cache
def query_driver(library: str = LIBRARY) -> Driver:
    """The driver's CUDA version and devices (asked once per process and library)."""
    try:
        lib = ctypes.CDLL(library)
    except OSError as e:
        return Driver(None, (), f"no NVIDIA driver ({library} cannot be loaded: {e})")
    version = ctypes.c_int()
    cuda = (version.value // 1000, version.value % 1000 // 10) if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    code = lib.cuInit(0)
    if code != 0:
        return Driver(cuda, (), f"the NVIDIA driver found no usable GPU (cuInit: {_error_name(lib, code)})")
    count = ctypes.c_int()
    code = lib.cuDeviceGetCount(ctypes.byref(count))
    if code != 0 or count.value == 0:
        return Driver(cuda, (), f"the NVIDIA driver lists no GPU ({_error_name(lib, code) if code else '0 devices'})")
    names = []
    for ordinal in range(count.value):
        device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
        ok = lib.cuDeviceGet(ctypes.byref(device), ordinal) == 0 and lib.cuDeviceGetName(name, len(name), device) == 0
        names.append(name.value.decode(errors="replace") if ok else f"device {ordinal}")
    return Driver(cuda, tuple(names))


def device_label(ordinal: int, library: str = LIBRARY) -> str:
    """'CUDA:<ordinal> (<GPU name>)', or 'CUDA:<ordinal>' when the driver cannot name it."""
    devices = query_driver(library).devices
    return f"CUDA:{ordinal} ({devices[ordinal]})" if 0 <= ordinal < len(devices) else f"CUDA:{ordinal}"
