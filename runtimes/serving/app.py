"""The Ray Serve deployment: every replica serves every model of the command line, on its own
backend per model, pinned to the CPUs Ray reserved for it, behind one batch queue per model.

Routes (paths below the application's route prefix):
  GET  /v2/health/live, /v2/health/ready, /v2                     server liveness, readiness, metadata
  GET  /v2/models/{name}[/versions/1], .../ready                   model metadata (inputs/outputs), readiness
  POST /v2/models/{name}[/versions/1]/infer                        Open Inference Protocol, JSON or binary
  POST /v1/models/{name}/classify[?top_k=K]                        an image file -> top-k classes, activation
Every refused request gets a 4xx and `{"error": "<one line>"}`; a runtime failure inside a
call gets 500 and one line; the traceback goes to the replica's log, never to the client.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Awaitable, Callable

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from dyt_export import __version__

from ..base import BackendError, check_inputs, first_line
from .batching import Batcher, Work
from .images import classification, image_input, top_k_param
from .models import VERSION, ServeConfig, ServedModel
from .protocol import HEADER_LENGTH, JSON_TYPE, RequestError, decode_infer, encode_infer, error_body

APP_NAME = "dyt"
QUIET = {"log_level": "WARNING", "enable_access_log": False}
"""Serve's logging: warnings and errors reach the terminal, one line per request does not."""
logger = logging.getLogger("ray.serve")


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """How Ray places and runs the replicas of `config`."""
    return dict(
        name=APP_NAME, num_replicas=config.replicas,
        # room for a full batch queueing while one runs, per model
        max_ongoing_requests=max(16, 4 * config.max_batch * len(config.models)),
        ray_actor_options={"num_cpus": config.threads, "num_gpus": 1 if config.runtime == "ort-cuda" else 0},
        max_constructor_retry_count=2,  # a file every replica refuses will not load on a third try
        graceful_shutdown_timeout_s=30,
        logging_config=QUIET,
    )


def build_app(config: ServeConfig) -> Any:
    """The Ray Serve application for `config`, ready for `serve.run`."""
    return serve.deployment(DytServer, **deployment_options(config)).bind(config)


def replica_threads(configured: int) -> int:
    """The runtime threads of this replica: the CPUs Ray reserved for it. Ray sets
    OMP_NUM_THREADS to them, but ONNX Runtime sizes its pool to the machine's cores and
    OpenVINO to its own default, so both are told explicitly."""
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(assigned)) if assigned else configured


def _json(payload: Any) -> Response:
    return Response(json.dumps(payload).encode(), media_type=JSON_TYPE)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type=JSON_TYPE, headers=headers)


_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/v2/health/live"), "_live"),
    ("GET", re.compile(r"/v2/health/ready"), "_ready"),
    ("GET", re.compile(r"/v2"), "_server_metadata"),
    ("GET", re.compile(_MODEL), "_model_metadata"),
    ("GET", re.compile(_MODEL + r"/ready"), "_model_ready"),
    ("POST", re.compile(_MODEL + r"/infer"), "_infer"),
    ("POST", re.compile(r"/v1/models/(?P<model>[^/]+)/classify"), "_classify"),
]


class DytServer:
    """One replica. Its event loop only parses, queues and answers; parsing and image decoding
    run on worker threads, each model's batches on that model's one runtime thread."""

    def __init__(self, config: ServeConfig) -> None:
        threads = replica_threads(config.threads)
        self.config = config
        self.models = {source.name: ServedModel(source, config.runtime, threads) for source in config.models}
        self.batchers = {name: Batcher(model, config.max_batch, config.batch_wait_s) for name, model in self.models.items()}
        for model in self.models.values():  # the first call of a runtime prepares kernels: not a client's wait
            model.backend.run({model.input.name: np.zeros((1, *model.input.shape[1:]), model.input.dtype)})

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except RequestError as e:
            return _error(e.status, str(e))
        except BackendError as e:  # inputs were checked before batching: this is the runtime failing
            logger.warning("runtime failure: %s", e)
            return _error(500, first_line(e))
        except Exception as e:  # a bug: one line for the client, the traceback for the log
            logger.exception("internal error on %s %s", request.method, request.url.path)
            return _error(500, f"internal error: {type(e).__name__}: {first_line(e)}")

    async def _route(self, request: Request) -> Response:
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/") or "/"
        allowed = []
        for method, pattern, handler in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if request.method != method:
                allowed.append(method)
                continue
            call: Callable[..., Awaitable[Response]] = getattr(self, handler)
            return await call(request, **{k: v for k, v in match.groupdict().items()})
        if allowed:
            return _error(405, f"{request.method} is not allowed on {path}; use {', '.join(allowed)}",
                          {"allow": ", ".join(allowed)})
        raise RequestError(f"no route {request.method} {path}; see GET /v2 and /v2/models/{{name}}", 404)

    def _model(self, name: str, version: str | None = None) -> ServedModel:
        if name not in self.models:
            raise RequestError(f"unknown model {name!r}; this server serves {', '.join(self.models)}", 404)
        if version is not None and version != VERSION:
            raise RequestError(f"model {name} has no version {version!r}; it is served as version {VERSION}", 404)
        return self.models[name]

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 past the size limit without reading it all."""
        limit = self.config.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise RequestError(f"Content-Encoding {encoding} is not supported; send the body uncompressed", 415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the body is {int(declared)} bytes; this server takes at most {limit} (--max-body)", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"the body is over {limit} bytes, the most this server takes (--max-body)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _live(self, request: Request) -> Response:
        return _json({"live": True})

    async def _ready(self, request: Request) -> Response:
        return _json({"ready": True})  # a replica takes requests only once every model is loaded

    async def _server_metadata(self, request: Request) -> Response:
        return _json({"name": "dyt-export", "version": __version__, "extensions": ["binary_tensor_data"],
                      "models": list(self.models)})

    async def _model_metadata(self, request: Request, model: str, version: str | None) -> Response:
        return _json(self._model(model, version).metadata())

    async def _model_ready(self, request: Request, model: str, version: str | None) -> Response:
        return _json({"name": self._model(model, version).name, "ready": True})

    async def _infer(self, request: Request, model: str, version: str | None) -> Response:
        served = self._model(model, version)
        body = await self._body(request)
        parsed, work = await asyncio.to_thread(self._decode, served, body, request.headers.get(HEADER_LENGTH))
        done = await self.batchers[served.name].submit(work)
        wanted = parsed.outputs or list(done.outputs)
        payload, headers = encode_infer(served.name, VERSION, {name: done.outputs[name] for name in wanted}, parsed,
                                        {"batch_images": done.batch_images})
        return Response(payload, headers=headers)

    @staticmethod
    def _decode(served: ServedModel, body: bytes, header_length: str | None) -> tuple[Any, Work]:
        parsed = decode_infer(body, header_length)
        try:
            checked = check_inputs(parsed.inputs, served.backend.input_specs)
        except BackendError as e:
            raise RequestError(str(e)) from None
        unknown = [name for name in parsed.outputs or [] if name not in served.facts.outputs]
        if unknown:
            raise RequestError(f"model {served.name} has no output {unknown[0]}; its outputs: "
                               f"{', '.join(served.facts.outputs)}")
        return parsed, Work(checked[served.input.name])

    async def _classify(self, request: Request, model: str) -> Response:
        served = self._model(model)
        top_k = top_k_param(request.query_params.get("top_k"), served.facts.cfg.num_classes)
        body = await self._body(request)
        pixels = await asyncio.to_thread(image_input, body, served.facts)
        done = await self.batchers[served.name].submit(Work(pixels.astype(served.input.dtype, copy=False)))
        return _json({**classification(served.facts, done.outputs, top_k), "batch_images": done.batch_images})
