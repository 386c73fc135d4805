"""`POST /v1/models/{name}/classify`: an image file in, the top-k classes and the activation
rate of each token dispatcher out.

The image is prepared by `dyt_export.preprocess.preprocess` with the spec the model records
(`dyt.preprocess`), the function validation's image folders use, so the route's answer for
an image is the one validation computes for it. Activation is the fraction of patch tokens
(the class token is always active) each dispatcher let through, read from the model's
`token_masks` output; a model exported without `--with-masks` has none to report.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dyt_export.errors import UserError
from dyt_export.preprocess import preprocess, read_image

from .models import ModelFacts
from .protocol import RequestError

MAX_PIXELS = 50_000_000
"""Larger images are refused before decoding: the route resizes to the model's size anyway,
and a small compressed file can decode to gigabytes."""
DEFAULT_TOP_K = 5


def image_input(body: bytes, facts: ModelFacts) -> np.ndarray:
    """The model input [1, C, H, W] for an image file body, or RequestError."""
    if not body:
        raise RequestError("the request body is empty; send an image file (PNG, JPEG, WebP or BMP)")
    try:
        return preprocess(read_image(body, max_pixels=MAX_PIXELS), facts.preprocess)[None]
    except UserError as e:
        raise RequestError(str(e)) from None


def top_k_param(value: str | None, classes: int) -> int:
    """The `top_k` query parameter: 1 or more (more than the classes lists them all)."""
    if value is None:
        return min(DEFAULT_TOP_K, classes)
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise RequestError(f"top_k must be a positive integer, got {value!r}")
    return min(k, classes)


def classification(facts: ModelFacts, outputs: dict[str, np.ndarray], top_k: int) -> dict[str, Any]:
    """The route's JSON answer for one image's outputs (batch axis of 1)."""
    logits = outputs["logits"][0].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    best = np.argsort(-probabilities, kind="stable")[:top_k]
    answer: dict[str, Any] = {
        "model_name": facts.name,
        "top_k": [{"class": int(i), "label": facts.labels[i] if facts.labels else str(int(i)),
                   "probability": float(probabilities[i])} for i in best],
    }
    masks = outputs.get("token_masks")
    if masks is None:
        answer["activation"] = None
        answer["activation_note"] = "the model was exported without --with-masks, so it reports no token masks"
    else:
        rates = masks[0, :, 1:].mean(axis=1)
        answer["activation"] = {name: float(rate) for name, rate in zip(facts.dispatchers, rates)}
        answer["activation_mean"] = float(rates.mean()) if len(rates) else None
    return answer
