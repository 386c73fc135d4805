"""The Open Inference Protocol codec, against the unmodified tritonclient's own encoder and
decoder (no server, no Ray): requests it builds decode to its arrays, responses we build
decode in it to ours, and every malformed request is one 4xx line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from runtimes.serving.protocol import HEADER_LENGTH, RequestError, decode_infer, encode_infer

Client = triton.InferenceServerClient


def _request(x: np.ndarray, *, binary: bool, outputs: list[tuple[str, bool]] | None = None,
             request_id: str = "") -> tuple[bytes, str | None]:
    tensor = triton.InferInput("pixel_values", list(x.shape), {np.float32: "FP32", np.float16: "FP16"}[x.dtype.type])
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton.InferRequestedOutput(name, binary_data=b) for name, b in outputs] if outputs else None
    body, json_size = Client.generate_request_body([tensor], outputs=wanted, request_id=request_id)
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tritonclient_requests_decode_to_its_arrays(binary, dtype):
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(dtype)
    body, length = _request(x, binary=binary, outputs=[("logits", binary), ("token_masks", not binary)],
                            request_id="r1")
    request = decode_infer(body, length)
    got = request.inputs["pixel_values"]
    assert got.dtype == dtype and np.array_equal(got, x)
    assert request.outputs == ["logits", "token_masks"] and request.id == "r1"
    assert request.wants_binary("logits") is binary and request.wants_binary("token_masks") is not binary


@pytest.mark.parametrize("binary", [True, False])
def test_responses_decode_in_tritonclient_to_our_arrays(binary):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 10)).astype(np.float32)
    masks = rng.random((2, 4, 17)) > 0.5
    request = decode_infer(*_request(np.zeros((2, 3, 8, 8), np.float32), binary=True,
                                     outputs=[("logits", binary), ("token_masks", binary)], request_id="abc"))
    payload, headers = encode_infer("m", "1", {"logits": logits, "token_masks": masks}, request, {"batch_images": 2})
    assert (HEADER_LENGTH in headers) is binary
    result = Client.parse_response_body(payload, header_length=headers.get(HEADER_LENGTH) and int(headers[HEADER_LENGTH]))
    assert np.array_equal(result.as_numpy("logits"), logits) and result.as_numpy("logits").dtype == np.float32
    assert np.array_equal(result.as_numpy("token_masks"), masks) and result.as_numpy("token_masks").dtype == bool
    response = result.get_response()
    assert response["id"] == "abc" and response["model_name"] == "m" and response["parameters"] == {"batch_images": 2}


def test_all_outputs_come_back_binary_when_none_is_named():
    """tritonclient names no outputs by default and asks for all in binary instead."""
    request = decode_infer(*_request(np.zeros((1, 3, 8, 8), np.float32), binary=True))
    assert request.outputs is None and request.wants_binary("logits") and request.wants_binary("token_masks")


def test_json_data_may_be_nested_as_the_protocol_allows():
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 2, 3, 4], "datatype": "FP32", "data": x.tolist()}]})
    assert np.array_equal(decode_infer(body.encode(), None).inputs["x"], x)


def _json(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


_GOOD = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
_BINARY_HEAD = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 8}}]}).encode()
_MALFORMED = {
    "not-json": (b"{inputs: nope", None, "the request is not valid JSON"),
    "not-an-object": (b"[1, 2]", None, "must be a JSON object, got list"),
    "no-inputs": (_json([]), None, "the request has no inputs"),
    "unnamed-input": (_json([{"shape": [1]}]), None, "every input must be an object with a string \"name\""),
    "twice": (_json([_GOOD, _GOOD]), None, "input x is given twice"),
    "bad-datatype": (_json([{**_GOOD, "datatype": "FLOAT"}]), None, "datatype \"FLOAT\" is not one of"),
    "bytes-datatype": (_json([{**_GOOD, "datatype": "BYTES"}]), None, "is not one of BOOL"),
    "negative-dim": (_json([{**_GOOD, "shape": [1, -2]}]), None, "shape must be a list of non-negative integers"),
    "count": (_json([{**_GOOD, "shape": [1, 3]}]), None, "data holds 2 values; shape [1, 3] needs 3"),
    "strings": (_json([{**_GOOD, "data": ["a", "b"]}]), None, "data is not a (nested) list of FP32 values"),
    "ragged": (_json([{**_GOOD, "data": [[1.0], [2.0, 3.0]]}]), None, "data is not a (nested) list of FP32 values"),
    "no-data": (_json([{"name": "x", "shape": [1, 2], "datatype": "FP32"}]), None, "has neither \"data\" nor"),
    "shared-memory": (_json([{**_GOOD, "parameters": {"shared_memory_region": "r"}}]), None, "shared memory"),
    "classification": (_json([_GOOD], outputs=[{"name": "logits", "parameters": {"classification": 3}}]), None,
                       "the classification extension is not supported"),
    "bad-id": (_json([_GOOD], id=7), None, "the request id must be a string"),
    "header-length-words": (_BINARY_HEAD + bytes(8), "lots", "Inference-Header-Content-Length 'lots'"),
    "header-length-past-body": (_BINARY_HEAD, "99999", "is not a byte count within the body"),
    "truncated": (_BINARY_HEAD + bytes(5), str(len(_BINARY_HEAD)), "the body is cut short: 5 of its 8 binary bytes"),
    "trailing": (_BINARY_HEAD + bytes(12), str(len(_BINARY_HEAD)), "4 bytes after the inputs' binary data"),
    "binary-size": (_BINARY_HEAD.replace(b": 8", b": 6") + bytes(6), str(len(_BINARY_HEAD)),
                    "binary_data_size 6 does not match shape [1, 2] of FP32 (8 bytes)"),
    "binary-without-header": (b"\x00\xff" + _BINARY_HEAD, None, "not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_requests_are_one_line_400s(case):
    body, length, message = _MALFORMED[case]
    with pytest.raises(RequestError) as refused:
        decode_infer(body, length)
    assert refused.value.status == 400 and message in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value)
