"""Exact rewrites of the exported graph, applied after the onnxscript optimizer.

Each rule replaces a pattern by one that computes bitwise the same values (in IEEE float,
barring subnormals) but runs faster where a runtime treats the original pattern badly;
measured in docs/levers.md. None may change a result beyond
that, so none is optional.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from onnxscript import ir
from onnxscript.ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern


def _scalar(value: ir.Value, expected: float) -> bool:
    """A one-element constant equal to `expected` rounded to its own dtype (fp32 or fp16)."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return False
    array = tensor.numpy().reshape(-1)
    return bool(array[0] == np.asarray(expected, dtype=array.dtype))


def _exact_gelu(op: Any, x: ir.Value, sqrt2: ir.Value, one: ir.Value, half: ir.Value) -> ir.Value:
    """torch's exact GELU as torchlib writes it: x * (0.5 * (1 + erf(x / sqrt2)))."""
    return op.Mul(x, op.Mul(half, op.Add(op.Erf(op.Div(x, sqrt2)), one)))


def _gelu_affine(op: Any, x: ir.Value, sqrt2: ir.Value, one: ir.Value, half: ir.Value) -> ir.Value:
    """x * (0.5 + 0.5 * erf(x / sqrt2)): halving commutes with rounding, so 0.5 + 0.5 * e is
    bitwise 0.5 * (1 + e). OpenVINO's GeluFusion does not match this form, so it no longer
    folds GELU into the preceding MatMul as a post-op, which on AVX2 CPUs moved that MatMul
    from MLAS to a oneDNN kernel ~30 % slower (OpenVINO 1.10-1.19x / 1.05-1.19x faster at batch
    1 / 8 on ViT-B/16 DyT in two paired runs; ONNX Runtime, which fuses neither form, bitwise
    unchanged and as fast)."""
    return op.Mul(x, op.Add(half, op.Mul(op.Erf(op.Div(x, sqrt2)), half)))


def _is_exact_gelu(context: Any, x: ir.Value, sqrt2: ir.Value, one: ir.Value, half: ir.Value, **_: Any) -> bool:
    return _scalar(sqrt2, 2 ** 0.5) and _scalar(one, 1.0) and _scalar(half, 0.5)


RULES: dict[str, pattern.RewriteRule] = {
    "gelu_affine": pattern.RewriteRule(_exact_gelu, _gelu_affine, _is_exact_gelu, name="GeluAffine"),
}
"""Every exact rewrite, by the name the export's `dyt.rewrites` metadata records it under."""


def apply_exact_rewrites(model: ir.Model) -> dict[str, int]:
    """Apply every rule to `model` in place, then drop the constants they left unused;
    returns how often each rule fired (0 included: the rule ran, nothing matched)."""
    fired = {name: pattern.RewriteRuleSet([rule], commute=True).apply_to_model(model) for name, rule in RULES.items()}
    RemoveUnusedNodesPass()(model)
    return fired
