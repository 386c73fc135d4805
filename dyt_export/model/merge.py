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


def similarities(metric: torch.Tensor) -> torch.Tensor:
    """[B, A, B] cosine similarity of every A token of `metric` [B, T, D] with every B token,
    float32; CLS's row (A's first) is -inf, so it never merges while r < |A| (the caller caps
    r at (T - 1) // 2)."""
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    is_cls = torch.arange(scores.shape[1], device=scores.device) == 0
    return scores.masked_fill(is_cls[None, :, None], float("-inf"))


def bipartite_matching(scores: torch.Tensor, r: int) -> MergePlan:
    """ToMe's bipartite soft matching on `scores` [B, A, B] (`similarities`): each A token's
    most similar B token; the r A tokens with the highest such similarity merge."""
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    return MergePlan(order[:, r:].sort(dim=-1).values, merged, partner.gather(1, merged))


def matching_margin(scores: torch.Tensor, r: int) -> torch.Tensor:
    """[B] how close each image's matching came to another decision: the smallest of the gap
    between the r-th and (r+1)-th best A tokens' similarities (which tokens merge) and, for each
    merging A token, the gap between its best and second-best B token (where it merges); inf
    where no other decision existed (`scores` as for `bipartite_matching`, r >= 1). A runtime
    whose similarities differ from these by less than half the margin merges the same tokens,
    so parity checks excuse only images whose margin lies within float noise, as they excuse
    dispatcher logits near 0."""
    top = scores.topk(min(2, scores.shape[-1]), dim=-1).values               # [B, A, 1 or 2]
    ranked, order = top[..., 0].sort(dim=-1, descending=True)
    boundary = ranked[:, r - 1] - ranked[:, r]                                # inf when CLS is next
    if top.shape[-1] == 1:
        return boundary
    partner_gap = (top[..., 0] - top[..., 1]).gather(1, order[:, :r]).min(dim=1).values
    return torch.minimum(boundary, partner_gap)


def merge_sum(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """[B, T, C] -> [B, T - r, C]: the kept A tokens, then every B token plus the A tokens
    merged into it (summed)."""
    a, b = x[:, ::2], x[:, 1::2]
    channels = x.shape[-1]
    kept = a.gather(1, plan.kept.unsqueeze(-1).expand(-1, -1, channels))
    moved = a.gather(1, plan.merged.unsqueeze(-1).expand(-1, -1, channels))
    b = b.scatter_reduce(1, plan.into.unsqueeze(-1).expand(-1, -1, channels), moved, reduce="sum")
    return torch.cat([kept, b], dim=1)


def merge_tokens(x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int,
                 margins: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged x [B, T - r, C], merged sizes [B, T - r, 1] float32) after matching on `metric`.
    `size` [B, T, 1] counts the original patches each token stands for (None: all 1);
    `margins` collects the matching's margin [B] for parity checks."""
    scores = similarities(metric)
    plan = bipartite_matching(scores, r)
    if margins is not None:
        margins.append(matching_margin(scores, r))
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    total = merge_sum(x.float() * size, plan)
    size = merge_sum(size, plan)
    return (total / size).to(x.dtype), size
