"""OpenVINO on its CPU plugin: one compiled model, an infer request per call in flight, dynamic batch.

Facts this backend is built around (runtime notes, measured here):
* The CPU plugin picks bf16 inference on CPUs with AVX512-BF16 or AMX, so logits move by
  ~2e-3 against PyTorch. Precision 'fp32' pins `INFERENCE_PRECISION_HINT=f32`; 'bf16' is
  available on purpose, and refused on a CPU without bf16 (the plugin would quietly run
  f32 and the caller would believe it measured bf16).
* NonZero and everything after it run "internally dynamic": a new active-token count makes
  each node redo shape inference and kernel preparation once (cached per shape). Callers
  that time this backend must warm up over the inputs they will time
  (`validation.throughput.measure` does).
* `max_batch` bounds the batch axis (1..max_batch) instead of leaving it unbounded; the
  plugin treats a bounded axis as unknown when it plans memory, so this changes little.
* `fixed_batch` makes the batch axis static, for a service that always sends one batch size.
  The plugin then plans every tensor whose shape the batch alone decides in one workspace.
  With a dynamic batch all tensors share grow-only blocks that are assigned without regard
  to size, and a data-dependent graph's shape-inferring nodes stretch their lifetimes. For
  attention-dispatching models the fixed batch cuts peak memory by 16-33 % at batch 32; for
  the MLP dispatch it raises it. Speed moves by -5 to +7 %, logits not at all (docs/variants.md).
* An infer request serves one call at a time (a second thread's call on a busy one fails
  with "Infer Request is busy"). `run` therefore takes an idle request from a pool (creating
  one when all are busy, so the pool never holds more requests than calls were ever in
  flight at once) and copies the outputs out before giving it back. Requests are cheap: the
  plugin keeps one graph, with its intermediate buffers, per stream, and a call's request
  waits for its stream's graph. So with one stream (the LATENCY default) concurrent calls
  are correct but run one after the other on INFERENCE_NUM_THREADS threads; only
  NUM_STREAMS=N runs N calls at once, each on INFERENCE_NUM_THREADS/N threads.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .base import (Availability, Backend, BackendError, RuntimeFailure, TensorSpec, check_fixed_batch, check_inputs,
                   first_line, load_failure, require_file)

_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")


class OpenVinoCpuBackend(Backend):
    """Options: `performance_hint` (default LATENCY: one stream, the fair setting for
    comparisons), `streams` (NUM_STREAMS, default 1), `pinning` (ENABLE_CPU_PINNING; None
    leaves the plugin's default), `max_batch` or `fixed_batch`, `cache_dir` (compiled-model
    cache), `config` (any further plugin properties, applied last)."""

    name = "openvino"
    precisions = tuple(_PRECISION_HINTS)

    @classmethod
    def availability(cls) -> Availability:
        try:
            import openvino as ov
        except ImportError as e:
            return Availability(False, f"openvino is not installed ({e})")
        try:
            devices = ov.Core().available_devices
        except Exception as e:  # a broken plugin install
            return Availability(False, f"OpenVINO cannot list devices: {first_line(e)}")
        if "CPU" not in devices:
            return Availability(False, f"OpenVINO has no CPU device (found {', '.join(devices) or 'none'})")
        return Availability(True)

    def __init__(self, model: Path | str, *, threads: int | None = None, precision: str = "fp32",
                 performance_hint: str = "LATENCY", streams: int | None = 1, pinning: bool | None = None,
                 max_batch: int | None = None, fixed_batch: int | None = None, cache_dir: str | Path | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self._set_common(threads, precision)
        import openvino as ov

        if performance_hint not in PERFORMANCE_HINTS:
            raise BackendError(f"{self.name}: performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}")
        if max_batch is not None and max_batch < 1:
            raise BackendError(f"{self.name}: max_batch must be >= 1, got {max_batch}")
        if check_fixed_batch(fixed_batch, self.name) is not None and max_batch is not None:
            raise BackendError(f"{self.name}: give max_batch or fixed_batch, not both")
        batch = (ov.Dimension(fixed_batch) if fixed_batch is not None
                 else ov.Dimension(1, max_batch) if max_batch is not None else None)
        self.path = require_file(model, self.name)
        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in capabilities:
            raise BackendError(f"{self.name}: precision 'bf16' is not supported by this CPU "
                               f"(OpenVINO reports {', '.join(capabilities)})")
        try:
            graph = core.read_model(str(self.path))
            if batch is not None:
                graph.reshape({port.get_any_name(): self._with_batch(port.get_partial_shape(), batch)
                               for port in graph.inputs})
        except Exception as e:  # read_model raises RuntimeError with the frontend's message
            raise load_failure(self.name, self.path, e) from None
        plugin: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
                                  "PERFORMANCE_HINT": performance_hint}
        if streams is not None:
            plugin["NUM_STREAMS"] = streams
        if threads is not None:
            plugin["INFERENCE_NUM_THREADS"] = threads
        if pinning is not None:
            plugin["ENABLE_CPU_PINNING"] = pinning
        if cache_dir is not None:
            plugin["CACHE_DIR"] = str(cache_dir)
        plugin.update(config or {})
        try:
            self._compiled = core.compile_model(graph, "CPU", plugin)
        except Exception as e:
            raise BackendError(f"{self.name} cannot compile {self.path}: {first_line(e)}") from None
        self._idle = [self._compiled.create_infer_request()]  # requests no call holds; see _request
        self._idle_lock = threading.Lock()
        # Compilation can fuse a graph input or output with the tensor next to it (an fp16 export's
        # input Cast, its last Linear), and `get_any_name` then returns the fused tensor's name
        # ('_to_copy', 'linear_28'): keep the names the ONNX file declares.
        declared = {name for port in (*graph.inputs, *graph.outputs) for name in port.get_names()}
        self._inputs = [self._spec(port, declared) for port in self._compiled.inputs]
        self._outputs = [self._name(port, declared) for port in self._compiled.outputs]
        self._device = core.get_property("CPU", "FULL_DEVICE_NAME")
        self.max_batch = max_batch
        self.fixed_batch = fixed_batch

    @staticmethod
    def _with_batch(shape: Any, batch: Any) -> Any:
        import openvino as ov

        return ov.PartialShape([batch] + [shape[i] for i in range(1, shape.rank.get_length())])

    @staticmethod
    def _name(port: Any, declared: set[str]) -> str:
        return min((name for name in port.get_names() if name in declared), default=port.get_any_name())

    def _spec(self, port: Any, declared: set[str]) -> TensorSpec:
        name = self._name(port, declared)
        shape = port.get_partial_shape()
        dims = tuple(d.get_length() if d.is_static else None for d in shape)
        try:
            dtype = np.dtype(port.get_element_type().to_dtype())
        except Exception as e:
            raise BackendError(f"{self.name}: model input {name} has an unsupported type") from e
        return TensorSpec(name, dtype, dims)

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = check_inputs(inputs, self._inputs)
        if self.max_batch is not None:
            for name, value in feed.items():
                if value.shape[0] > self.max_batch:
                    raise BackendError(f"input {name} has batch {value.shape[0]}; this backend was compiled for at most {self.max_batch}")
        with self._request() as request:
            try:
                result = request.infer(feed)
            except Exception as e:
                raise RuntimeFailure(f"{self.name} failed to run {self.path.name}: {first_line(e)}") from None
            # infer() copies outputs out of the request's tensors (share_outputs=False), so the
            # arrays stay valid after another call reuses the request.
            return {name: np.asarray(result[port]) for name, port in zip(self._outputs, self._compiled.outputs)}

    @contextmanager
    def _request(self) -> Iterator[Any]:
        """An infer request no other call holds, for the duration of one call."""
        with self._idle_lock:
            request = self._idle.pop() if self._idle else self._compiled.create_infer_request()
        try:
            yield request
        finally:
            with self._idle_lock:
                self._idle.append(request)

    def info(self) -> dict[str, Any]:
        import openvino as ov

        def prop(key: str) -> Any:
            value = self._compiled.get_property(key)
            if hasattr(value, "get_type_name"):  # an ov.Type such as f32
                return value.get_type_name()
            return value if isinstance(value, (bool, int, float, str)) else str(value)

        return {
            "backend": self.name,
            "library": "openvino",
            "version": ov.get_version(),
            "device": f"CPU ({self._device})",
            "precision": self.precision,
            "threads": self.threads,
            "max_batch": self.max_batch,
            "fixed_batch": self.fixed_batch,
            "compiled": {key: prop(key) for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS",
                                                    "PERFORMANCE_HINT", "ENABLE_CPU_PINNING")},
        }
