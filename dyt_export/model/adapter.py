"""Adapters that run beside a dispatched unit on every token.

`Adapter` matches the public DyT code's `adaptmlp` (AdaptFormer without its LayerNorm), so
its keys load unchanged. `MoEAdapter` mixes E experts into one adapter per image, which keeps
the cost of one adapter whatever E is (reference, "MoE-adapter").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """`up(relu(down(x))) * scale`; scale is a constant of the recipe, not a weight."""

    def __init__(self, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(F.relu(self.down_proj(x))) * self.scale


class MoEAdapter(nn.Module):
    """E adapter experts mixed per image by `softmax(router(mean of the image's tokens))`.

    The mean runs over every token the unit sees, CLS included, because that is the input
    the adapter serves. Down and up projections and their biases are mixed separately, then
    applied as one adapter (batched matmul), so compute does not grow with E. The routing
    softmax runs in float32 even in an fp16 model: its weights scale every expert.
    """

    def __init__(self, dim: int, bottleneck: int, scale: float, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.down_weight = nn.Parameter(torch.empty(experts, bottleneck, dim))
        self.down_bias = nn.Parameter(torch.zeros(experts, bottleneck))
        self.up_weight = nn.Parameter(torch.empty(experts, dim, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(experts, dim))
        self.scale = float(scale)
        for w in (self.down_weight, self.up_weight):
            nn.init.kaiming_uniform_(w.view(-1, w.shape[-1]), a=5 ** 0.5)

    @property
    def experts(self) -> int:
        return self.router.out_features

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] mixing weights of each image."""
        return self.router(x.mean(dim=1)).float().softmax(dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.routing_weights(x)                                       # [B, E]
        down_w = torch.einsum("be,erc->brc", w, self.down_weight)         # [B, r, C]
        up_w = torch.einsum("be,ecr->bcr", w, self.up_weight)             # [B, C, r]
        down_b = (w @ self.down_bias).unsqueeze(1)                        # [B, 1, r]
        up_b = (w @ self.up_bias).unsqueeze(1)                            # [B, 1, C]
        hidden = F.relu(torch.bmm(x, down_w.transpose(1, 2)) + down_b)
        return (torch.bmm(hidden, up_w.transpose(1, 2)) + up_b) * self.scale


def build_adapter(dim: int, bottleneck: int, scale: float, experts: int) -> nn.Module:
    """A plain adapter for experts == 0, else an MoE-adapter with that many experts."""
    if experts == 0:
        return Adapter(dim, bottleneck, scale)
    return MoEAdapter(dim, bottleneck, scale, experts)
