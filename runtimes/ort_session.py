"""What ONNX Runtime backends share: session options, input specs, running, errors.

The CPU and CUDA backends differ in their execution provider, its options and how inputs
and outputs reach the device; both are thin subclasses of `OrtBackend`. A session on any
provider but the CPU records where ORT placed each node (`runtimes.ort_placement`): nodes
left on the CPU are reported in `info()["placement"]` and `notes()`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import (Backend, BackendError, RuntimeFailure, TensorSpec, check_fixed_batch, check_inputs, first_line,
                   load_failure, require_file)
from .ort_placement import CPU, RECORD_KEY, Placement, read_placement

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64), "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32), "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint8)": np.dtype(np.uint8), "tensor(int8)": np.dtype(np.int8),
}

BATCH_AXIS = "batch"
"""The exporter's name for the dynamic batch axis of `pixel_values`."""
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(threads: int | None, *, graph_optimization: str = "all", session_config: dict[str, str] | None = None,
                    optimized_model_path: str | Path | None = None, fixed_batch: int | None = None,
                    memory_arena: bool = True, record_placement: bool = False) -> Any:
    """The one builder of `onnxruntime.SessionOptions` (the backends' and the benchmark's bare
    sessions): `threads` intra-op threads (None: ORT's default), inter-op parallelism off and
    sequential execution, ORT's logger silenced but for fatal messages (every error reaches
    the caller as an exception, reported in one line; ORT's logger would also print some of
    them on stderr, multi-line and coloured). The other options are `OrtBackend`'s."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[graph_optimization])
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = bool(memory_arena)
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if fixed_batch is not None:
        options.add_free_dimension_override_by_name(BATCH_AXIS, fixed_batch)
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, str(value))
    if record_placement:
        options.add_session_config_entry(RECORD_KEY, "1")
    return options


class OrtBackend(Backend):
    """An `InferenceSession` on one execution provider.

    Options: `graph_optimization` (one of OPTIMIZATION_LEVELS, default 'all'),
    `session_config` (extra `add_session_config_entry` pairs, e.g.
    {'session.intra_op.allow_spinning': '0'}), `optimized_model_path` (where ORT saves the
    graph it optimized), `fixed_batch` (pin the exporter's symbolic `batch` axis to one size,
    so ORT plans every shape ahead for a service that always sends that batch),
    `memory_arena` (False: tensors come from malloc instead of ORT's growing CPU arena, which
    keeps the high-water mark of every shape a data-dependent graph has produced; a
    provider with a device arena of its own says in `provider_options` what it does).
    Threads: `intra_op_num_threads` is set explicitly whenever
    `threads` is given (ORT then does not pin threads; the calling thread counts as one),
    inter-op parallelism is off, so a call runs its nodes one after another. `run` may be
    called from several threads at once: ORT's Run is thread-safe, and concurrent calls
    share the session's intra-op threads.

    `binding_device` (None: `InferenceSession.run`) is the ORT device name ('cuda') a
    subclass binds inputs and outputs on, at `device_id`, with one IO binding per call.
    """

    provider: ClassVar[str]
    binding_device: ClassVar[str | None] = None
    device_id: int = 0

    def __init__(self, model: Path | str, *, threads: int | None = None, precision: str = "fp32",
                 graph_optimization: str = "all", session_config: dict[str, str] | None = None,
                 optimized_model_path: str | Path | None = None, fixed_batch: int | None = None,
                 memory_arena: bool = True) -> None:
        self._set_common(threads, precision)
        import onnxruntime as ort

        self.path = require_file(model, self.name)
        if graph_optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(f"{self.name}: graph_optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}")
        options = session_options(threads, graph_optimization=graph_optimization, session_config=session_config,
                                  optimized_model_path=optimized_model_path,
                                  fixed_batch=check_fixed_batch(fixed_batch, self.name),
                                  memory_arena=memory_arena, record_placement=self.provider != CPU)
        self.memory_arena = bool(memory_arena)
        self.graph_optimization = graph_optimization
        self.session_config = dict(session_config or {})
        self.fixed_batch = fixed_batch
        try:  # enable_fallback=0: ORT would print a banner on stdout and retry on the CPU
            self._session = ort.InferenceSession(
                str(self.path), options, providers=[(self.provider, self.provider_options())], enable_fallback=0)
        except Exception as e:  # ORT raises InvalidProtobuf, Fail, NotImplemented, RuntimeError...
            raise load_failure(self.name, self.path, e) from None
        active = self._session.get_providers()
        if not active or active[0] != self.provider:
            # ORT silently falls back to CPU when a provider cannot start; never report that as this backend.
            raise BackendError(f"{self.name} is not available: ONNX Runtime started {active[0] if active else 'no provider'} instead of {self.provider}")
        self._inputs = [TensorSpec(i.name, self._dtype(i.type), tuple(d if isinstance(d, int) else None for d in i.shape))
                        for i in self._session.get_inputs()]  # a fixed_batch override shows here as an int
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._run_options = self.run_options()
        self.placement: Placement | None = None
        if self.provider != CPU:
            self.placement = read_placement(self._session, self.path, self.provider)

    def provider_options(self) -> dict[str, str]:
        """Options of the execution provider; subclasses add theirs."""
        return {}

    def run_options(self) -> Any:
        """The `onnxruntime.RunOptions` of every call (None: the defaults); read-only once
        made, so concurrent calls share them."""
        return None

    def device(self) -> str:
        """The device the provider computes on, for records."""
        return "CPU"

    def notes(self) -> list[str]:
        """Nodes ORT left on the CPU, when the provider is not the CPU."""
        if self.provider == CPU:
            return []
        if self.placement is None:
            return [f"{self.name}: {self.placement_unknown()}"]
        return [f"{self.name}: {self.placement.summary()}"] if self.placement.off_provider else []

    @staticmethod
    def placement_unknown() -> str:
        import onnxruntime as ort

        return (f"onnxruntime {ort.__version__} cannot report which nodes run on the CPU "
                "(get_provider_graph_assignment_info needs 1.24 or later)")

    def _dtype(self, ort_type: str) -> np.dtype:
        if ort_type not in _ORT_TYPES:
            raise BackendError(f"{self.name}: model input type {ort_type} is not supported")
        return _ORT_TYPES[ort_type]

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = check_inputs(inputs, self._inputs)
        try:
            outputs = self._run_bound(feed) if self.binding_device else self._session.run(self._outputs, feed)
        except Exception as e:  # a failure inside a kernel: report it, do not crash the caller
            raise RuntimeFailure(f"{self.name} failed to run {self.path.name}: {first_line(e)}") from None
        return dict(zip(self._outputs, outputs))

    def _run_bound(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One call through an IOBinding made for it (a shared binding would mix concurrent
        callers' tensors): each input is copied to the device once, each output stays where
        the provider wrote it until one copy back. Outputs are bound by device, not shape:
        a data-dependent graph's output sizes are known only after the run."""
        import onnxruntime as ort

        binding = self._session.io_binding()
        for name, value in feed.items():  # `feed` keeps the host arrays alive through the call
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.binding_device, self.device_id))
        for name in self._outputs:
            binding.bind_output(name, self.binding_device, self.device_id)
        self._session.run_with_iobinding(binding, self._run_options)
        return binding.copy_outputs_to_cpu()

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        options = self._session.get_session_options()
        return {
            "backend": self.name,
            "library": "onnxruntime",
            "version": ort.__version__,
            "provider": self.provider,
            "provider_options": self._session.get_provider_options().get(self.provider, {}),
            "device": self.device(),
            "precision": self.precision,
            "threads": self.threads,
            "intra_op_num_threads": options.intra_op_num_threads,
            "graph_optimization": self.graph_optimization,
            "session_config": self.session_config,
            "fixed_batch": self.fixed_batch,
            "memory_arena": self.memory_arena,
            "io_binding": self.binding_device,
            "placement": self.placement.to_dict() if self.placement is not None else None,
        }
