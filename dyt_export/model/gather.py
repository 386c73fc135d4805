"""Compute a unit on the active tokens only, in forms the dynamo exporter turns into
data-dependent ONNX (NonZero / TopK, Gather, Scatter) that ONNX Runtime and OpenVINO run.

Two shapes of work exist. A row-wise unit (the MLP) treats tokens independently, so the
active tokens of the whole batch are flattened into one `[K, C]` matrix. A unit with
attention (attention, whole layer) must keep each image's tokens apart, so each image's
active tokens are compacted to the front of its row and padded to the batch's largest
active count; padded slots are masked out of attention and write zeros back.

Indices, never boolean-mask assignment or `masked_scatter`: the dynamo exporter has been
reported to get those wrong (pytorch #186146), and index tensors lower to plain Gather.
"""
from __future__ import annotations

from typing import Callable

import torch

RowFn = Callable[[torch.Tensor], torch.Tensor]
"""[K, C] -> [K, C]: a unit's residual branch applied to token rows."""
SeqFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""([B, T, C], additive key bias [B, 1, 1, T] or None) -> [B, T, C]: a branch with attention."""


def active_index(mask: torch.Tensor) -> torch.Tensor:
    """The active tokens' rows [K] in the flattened batch [B*N]. CLS is always active, so
    1 <= K <= B*N; telling the exporter keeps its guards on the data-dependent K quiet."""
    b, n = mask.shape
    index = torch.nonzero(mask.reshape(-1)).squeeze(1)
    torch._check(index.shape[0] >= 1)
    torch._check(index.shape[0] <= b * n)
    return index


def rowwise_added(x: torch.Tensor, mask: torch.Tensor, fn: RowFn) -> torch.Tensor:
    """x + fn(x) on the active rows of the flattened batch, x elsewhere: [B, N, C].

    The branch output is scattered into zeros and added to the residual. Adding it inside
    the scatter instead (ScatterND reduction "add" into x) is bit-identical and 1.5-2 % faster
    on ONNX Runtime (no zeros fill, one Add fewer), but OpenVINO then holds 27-56 MB more at
    batch 32 on ViT-B/16 and ONNX Runtime's arena 18 MB more at activation 0.7, which puts
    DyT's peak memory above the dense export's; and ONNX Runtime's CPU ScatterND has no fp16
    "add" reduction (measured and rejected: docs/levers.md).
    """
    b, n, c = x.shape
    flat = x.reshape(b * n, c)
    index = active_index(mask)
    rows = flat.index_select(0, index)
    return x + torch.zeros_like(flat).index_put((index,), fn(rows)).reshape(b, n, c)


def compact_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, token positions with the active ones first (in original order), cut to the
    batch's largest active count; and which of those slots are active. [B, T] each.

    Sorting `mask * N + (N - 1 - position)` descending puts active tokens ahead of inactive
    ones and keeps both groups in position order; the keys are unique and below 2N, exact in
    float32, so an unstable sort is deterministic. A full sort (ONNX TopK(N) + Slice) measured
    0.3-5.6 % faster than TopK(longest) on ORT and OpenVINO (docs/variants.md).
    """
    b, n = mask.shape
    longest = mask.sum(dim=1).max().item()
    torch._check(longest >= 1)
    torch._check(longest <= n)
    position = torch.arange(n, device=mask.device, dtype=torch.float32)
    key = mask.to(torch.float32) * n + (n - 1 - position)
    order = key.sort(dim=1, descending=True).indices[:, :longest]
    return order, torch.gather(mask, 1, order)


def key_padding_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, T]: 0 for valid keys, -inf for padding or inactive."""
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    neg = torch.full((), float("-inf"), dtype=dtype, device=valid.device)
    return torch.where(valid, zero, neg)[:, None, None, :]


def sequence_added(x: torch.Tensor, mask: torch.Tensor, fn: SeqFn) -> torch.Tensor:
    """x + fn on each image's active tokens only (attention never crosses images or reaches an
    inactive token), x elsewhere: [B, N, C].

    Rows are addressed in the flattened batch (`image * N + position`), one index per token:
    Gather and ScatterND on [B*L] indices, not per-element [B, L, C] indices
    (GatherElements/ScatterElements), which were slower or equal on ORT and OpenVINO
    (docs/variants.md). Padded slots point at inactive tokens of their own image and write
    zeros, so no scatter index repeats and no active result is overwritten. As in
    `rowwise_added`, the branch is scattered into zeros and added (adding it inside the
    scatter: bit-identical; measured and rejected in docs/variants.md).
    """
    b, n, c = x.shape
    order, valid = compact_order(mask)
    rows = (order + torch.arange(b, device=x.device).unsqueeze(1) * n).reshape(-1)
    flat = x.reshape(b * n, c)
    out = fn(flat.index_select(0, rows).reshape(b, -1, c), key_padding_bias(valid, torch.float32))
    out = (out * valid.unsqueeze(-1).to(out.dtype)).reshape(-1, c)
    return x + torch.zeros_like(flat).index_put((rows,), out).reshape(b, n, c)


def sequence_masked(x: torch.Tensor, mask: torch.Tensor, fn: SeqFn) -> torch.Tensor:
    """The training-time formulation: fn on every token with inactive keys masked out,
    then the branch multiplied by the mask. Same numbers as `sequence_added`'s branch, no savings."""
    out = fn(x, key_padding_bias(mask, torch.float32))
    return out * mask.unsqueeze(-1).to(out.dtype)
