"""The PyTorch reference: the source checkpoint run in eager PyTorch.

This is the one backend that knows it runs DyT, because the reference must answer what
the ONNX file cannot: the token masks and each dispatcher's logits (`dispatch_logits`,
[B, D, N-1] float32), which tell a near-threshold flip from a real mask error, and each
block's token-merging margin (`merge_margins`, [B, depth], inf without ToMe), which tells a
merge decided on float noise from a wrong one.

`model` is a checkpoint (any format `dyt_export.load_checkpoint` reads) or an ONNX file
exported by dyt-export, whose metadata names its source checkpoint and carries the
geometry a public-layout checkpoint cannot state (heads, adapter scale, image size) and the
export's token merging (ToMe), which the reference then runs too.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .base import Availability, Backend, BackendError, TensorSpec, check_inputs, first_line, require_file

OUTPUTS = ["logits", "token_masks", "dispatch_logits", "merge_margins"]

_THREADS_LOCK = threading.Lock()
"""Held by every call that sets torch's thread count: torch has no per-call setting, and
`torch.set_num_threads` also changes process state (MKL's count, and the count of every
thread that has not run torch yet), so two such calls must not overlap."""


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on `threads` intra-op threads, then give the calling thread back the
    count it had; None runs it as it is, without the lock."""
    if threads is None:
        yield
        return
    import torch

    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def source_of_onnx(path: Path) -> tuple[Path, dict[str, Any]]:
    """(source checkpoint, loader overrides) recorded in an ONNX file's dyt metadata."""
    from dyt_export.errors import UserError
    from dyt_export.export import config_from_metadata, read_metadata

    try:
        props = read_metadata(path)
        cfg = config_from_metadata(props, path)
    except UserError as e:
        raise BackendError(f"torch: {e}") from None
    source = props.get("dyt.source_path", "")
    if not source:
        raise BackendError(f"torch: {path} does not record its source checkpoint; pass the checkpoint itself")
    overrides = {"num_heads": cfg.num_heads, "adapter_scale": cfg.adapter_scale, "img_size": cfg.img_size,
                 "tome_r": cfg.tome_r or 0}  # 0: the export turned off a setting its checkpoint records
    return Path(source), overrides


class TorchReference(Backend):
    """Options: `dispatch` ('dynamic', 'masked' or 'dense'; default 'dynamic'), and the
    checkpoint loader's overrides (`num_heads`, `adapter_scale`, `img_size`,
    `trust_checkpoint`).

    Safe to call from several threads at once: a forward pass keeps its state in local
    variables, never on the module. `threads` applies to each call and the caller's thread
    count is restored after it (`_torch_threads`), so calls with `threads` run one at a time;
    calls without it run concurrently on the caller's own torch setting."""

    name = "torch"

    @classmethod
    def availability(cls) -> Availability:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            return Availability(False, f"torch is not installed ({e})")
        return Availability(True)

    def __init__(self, model: Path | str, *, threads: int | None = None, precision: str = "fp32",
                 dispatch: str = "dynamic", **overrides: Any) -> None:
        self._set_common(threads, precision)
        from dyt_export import load_checkpoint
        from dyt_export.errors import UserError

        path = require_file(model, self.name)
        if path.suffix == ".onnx":
            path, recorded = source_of_onnx(path)
            overrides = {**recorded, **{k: v for k, v in overrides.items() if v is not None}}
            if not path.exists():
                raise BackendError(f"torch: the source checkpoint {path} recorded in {model} is missing; pass it explicitly")
        self.path = path
        try:
            module = load_checkpoint(path, **overrides)
        except UserError as e:
            raise BackendError(f"torch: {e}") from None
        except TypeError as e:  # an override the loader does not take
            raise BackendError(f"torch: {first_line(e)}") from None
        self._adopt(module, dispatch)

    @classmethod
    def from_module(cls, module: Any, *, threads: int | None = None, dispatch: str = "dynamic") -> "TorchReference":
        """Wrap a DyT model already in memory (the demo trains one; tests build them)."""
        self = cls.__new__(cls)
        self._set_common(threads, "fp32")
        self.path = Path(getattr(module, "provenance", {}).get("path", "<in memory>"))
        self._adopt(module, dispatch)
        return self

    def _adopt(self, module: Any, dispatch: str) -> None:
        from dyt_export.config import DISPATCH_MODES

        if dispatch not in DISPATCH_MODES:
            raise BackendError(f"torch: dispatch must be one of {', '.join(DISPATCH_MODES)}")
        self.module = module.eval()
        self.dispatch = dispatch
        cfg = module.dyt_config
        self._inputs = [TensorSpec("pixel_values", np.dtype(np.float32), (None, cfg.in_chans, cfg.img_size, cfg.img_size))]

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(OUTPUTS)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        feed = check_inputs(inputs, self._inputs)
        with _torch_threads(self.threads), torch.inference_mode():
            trace = self.module.trace(torch.from_numpy(feed["pixel_values"]), mode=self.dispatch)
        return {"logits": trace.logits.float().numpy(), "token_masks": trace.masks.numpy(),
                "dispatch_logits": trace.dispatch_logits.float().numpy(), "merge_margins": trace.merge_margins.numpy()}

    def info(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "library": "torch", "version": torch.__version__, "device": "cpu",
                "precision": self.precision, "threads": self.threads or torch.get_num_threads(),
                "dispatch": self.dispatch, "checkpoint": str(self.path),
                "format": getattr(self.module, "provenance", {}).get("format", "in memory")}
