"""The Open Inference Protocol (KServe v2) over HTTP as Triton speaks it, with Triton's binary
tensor data extension, so that unmodified clients (`tritonclient.http`, KServe's) work.

Requests become numpy arrays and responses bytes here; nothing here knows a model. Whether
the arrays suit the model (names, dtype, shape, NaN/inf) is checked by the caller with the
backends' own `check_inputs`. Every malformed request raises `RequestError`, whose message
is one line and whose status is a 4xx: the body a client gets is `{"error": "<message>"}`.

Binary extension: the header `Inference-Header-Content-Length: N` says the body's first N
bytes are the JSON request; each input with `"parameters": {"binary_data_size": S}` takes
the next S bytes, in input order, raw and little-endian. Outputs asked for with
`binary_data` (or all, with the request parameter `binary_data_output`) come back the same
way, after a JSON header whose length the response's header of the same name gives.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.items()}
"""The protocol's tensor datatypes that map onto numpy (BYTES, strings, is not one a vision model takes)."""
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


class RequestError(Exception):
    """A request the server refuses: one line, and the HTTP status (4xx) that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    """Output names asked for, in order; None: every output."""
    binary: dict[str, bool]
    """Per output asked for by name: whether it wants binary data."""
    binary_default: bool
    """The request parameter `binary_data_output`, for outputs not asked for by name."""
    id: str | None

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def datatype_name(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype (ValueError for one it has no name for)."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no Open Inference Protocol datatype for {dtype}") from None


def tensor_metadata(name: str, dtype: np.dtype, shape: tuple[int | None, ...]) -> dict[str, Any]:
    """A tensor as `GET /v2/models/{name}` describes it: dynamic axes are -1."""
    return {"name": name, "datatype": datatype_name(dtype), "shape": [-1 if d is None else int(d) for d in shape]}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _fail(message: str) -> RequestError:
    return RequestError(" ".join(message.split()))


def _json_header(body: bytes | memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(body))
    except UnicodeDecodeError:
        raise _fail("the request's JSON is not UTF-8 text (binary tensors need the Inference-Header-Content-Length "
                    "header)") from None
    except ValueError as e:
        raise _fail(f"the request is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _fail(f"the request must be a JSON object, got {type(header).__name__}")
    return header


def _header_length(value: str | None, size: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if not 0 < length <= size:
        raise _fail(f"Inference-Header-Content-Length {value!r} is not a byte count within the body ({size} bytes)")
    return length


def _shape(entry: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(f"input {name}: shape must be a list of non-negative integers, got {json.dumps(shape)[:80]}")
    return tuple(shape)


def _datatype(entry: dict[str, Any], name: str) -> np.dtype:
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise _fail(f"input {name}: datatype {json.dumps(datatype)[:40]} is not one of {', '.join(DATATYPES)}")
    return DATATYPES[datatype]


def _from_json_data(data: Any, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    if not isinstance(data, list):
        raise _fail(f"input {name}: data must be a list, got {type(data).__name__}")
    try:
        array = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise _fail(f"input {name}: data is not a (nested) list of {_NAMES[dtype]} values") from None
    if array.size != math.prod(shape):
        raise _fail(f"input {name}: data holds {array.size} values; shape {list(shape)} needs {math.prod(shape)}")
    return array.reshape(shape)


def decode_infer(body: bytes, header_length: str | None) -> InferRequest:
    """A `POST /v2/models/{name}/infer` body (and its Inference-Header-Content-Length header,
    None when absent) as arrays, or RequestError."""
    length = _header_length(header_length, len(body))
    view = memoryview(body)
    header = _json_header(view if length is None else view[:length])
    binary = view[length:] if length is not None else view[len(body):]
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _fail("the request has no inputs (expected \"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}])")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in inputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _fail("every input must be an object with a string \"name\"")
        name = entry["name"]
        if name in arrays:
            raise _fail(f"input {name} is given twice")
        shape, dtype = _shape(entry, name), _datatype(entry, name)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _fail(f"input {name}: parameters must be an object")
        if "shared_memory_region" in parameters:
            raise _fail(f"input {name}: shared memory is not supported by this server; send the data in the request")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            needed = math.prod(shape) * dtype.itemsize
            if not isinstance(size, int) or isinstance(size, bool) or size != needed:
                raise _fail(f"input {name}: binary_data_size {size!r} does not match shape {list(shape)} of "
                            f"{_NAMES[dtype]} ({needed} bytes)")
            if offset + size > len(binary):
                raise _fail(f"input {name}: the body is cut short: {max(0, len(binary) - offset)} of its {size} "
                            "binary bytes arrived")
            arrays[name] = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
            offset += size
        elif "data" in entry:
            arrays[name] = _from_json_data(entry["data"], dtype, shape, name)
        else:
            raise _fail(f"input {name} has neither \"data\" nor parameters.binary_data_size")
    if offset != len(binary):
        raise _fail(f"the body has {len(binary) - offset} bytes after the inputs' binary data")
    outputs, wanted = _requested_outputs(header.get("outputs"))
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _fail("the request's parameters must be an object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail("the request id must be a string")
    return InferRequest(arrays, outputs, wanted, bool(parameters.get("binary_data_output", False)), request_id)


def _requested_outputs(outputs: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if outputs is None:
        return None, {}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise _fail("outputs must be a list of objects with a string \"name\"")
    wanted: dict[str, bool] = {}
    for output in outputs:
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _fail(f"output {output['name']}: parameters must be an object")
        if "classification" in parameters:
            raise _fail(f"output {output['name']}: the classification extension is not supported; "
                        "use POST /v1/models/{name}/classify for top-k classes")
        wanted[output["name"]] = bool(parameters.get("binary_data", False))
    return list(wanted), wanted


def encode_infer(model: str, version: str, outputs: dict[str, np.ndarray], request: InferRequest,
                 parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, followed by the binary outputs when any is
    asked for in binary."""
    entries, blobs = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_name(array.dtype), "shape": list(array.shape)}
        if request.wants_binary(name):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    text = json.dumps(response).encode()
    if not blobs:
        return text, {"content-type": JSON_TYPE}
    return text + b"".join(blobs), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(text))}
