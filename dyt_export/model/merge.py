"""Token merging (ToMe, Bolya et al., ICLR 2023) as the DyT paper stacks it (Table 5):
bipartite soft matching on the attention keys, then a size-weighted average of merged tokens.

Shapes stay static: a block that enters with T tokens and merges r leaves T - r for every
image, so the only data-dependent ops of a DyT + ToMe export remain the dispatch's. Each image
is matched on its own (MatMul, ReduceMax/ArgMax, TopK, GatherElements) and merged by one sum
scatter per tensor (ScatterElements with reduction "add", opset >= 16); ONNX has no "mean"
reduction, so the average is the merged sum of `x * size` over the merged sum of `size`.
Matching and merging run in float32 whatever the model's precision: merged sums reach
`size` times a token's magnitude, and a float16 cosine would decide merges on rounding.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class MergePlan(NamedTuple):
    """Which tokens merge where, per image. Positions index set A (even tokens, CLS first) and
    set B (odd tokens)."""

    kept: torch.Tensor
    """[B, A - r] the A tokens that stay, in their original order (CLS first)."""
    merged: torch.Tensor
    """[B, r] the A tokens that merge."""
    into: torch.Tensor
    """[B, r] the B token each of them merges into."""


def bipartite_matching(metric: torch.Tensor, r: int) -> MergePlan:
    """ToMe's bipartite soft matching on `metric` [B, T, D]: each A token's most cosine-similar
    B token; the r A tokens with the highest such similarity merge. CLS (A's first) gets
    similarity -inf, so it never merges while r < |A| (the caller caps r at (T - 1) // 2)."""
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)            # [B, A, B] cosine
    is_cls = torch.arange(scores.shape[1], device=scores.device) == 0
    scores = scores.masked_fill(is_cls[None, :, None], float("-inf"))
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    return MergePlan(order[:, r:].sort(dim=-1).values, merged, partner.gather(1, merged))


def merge_sum(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """[B, T, C] -> [B, T - r, C]: the kept A tokens, then every B token plus the A tokens
    merged into it (summed)."""
    a, b = x[:, ::2], x[:, 1::2]
    channels = x.shape[-1]
    kept = a.gather(1, plan.kept.unsqueeze(-1).expand(-1, -1, channels))
    moved = a.gather(1, plan.merged.unsqueeze(-1).expand(-1, -1, channels))
    b = b.scatter_reduce(1, plan.into.unsqueeze(-1).expand(-1, -1, channels), moved, reduce="sum")
    return torch.cat([kept, b], dim=1)


def merge_tokens(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor,
                 r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged x [B, T - r, C], merged sizes [B, T - r, 1] float32) after matching on `metric`.
    `size` [B, T, 1] counts the original patches each token stands for (None: all 1)."""
    plan = bipartite_matching(metric, r)
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    total = merge_sum(x.float() * size, plan)
    size = merge_sum(size, plan)
    return (total / size).to(x.dtype), size
