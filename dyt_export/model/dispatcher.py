"""The token dispatcher: one linear logit per patch token, active iff logit > 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import THRESHOLD_LOGIT


class TokenDispatcher(nn.Module):
    """`Linear(C, 1)` on every token but CLS; named like the public code's `TokenSelect`.

    Logits are computed in float32 whatever the model's precision: an fp16 logit rounds
    tokens near 0 to the other side of the threshold, which changes which tokens run.
    At inference the Gumbel noise of training is gone: the mask is the plain threshold.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp_head = nn.Linear(dim, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N-1] float32 logits of the patch tokens."""
        w = self.mlp_head.weight.float()
        b = self.mlp_head.bias.float()
        return F.linear(x[:, 1:, :].float(), w, b).squeeze(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [B, N] bool with CLS forced active, logits [B, N-1] float32)."""
        logits = self.logits(x)
        cls = torch.ones_like(logits[:, :1], dtype=torch.bool)
        return torch.cat([cls, logits > THRESHOLD_LOGIT], dim=1), logits
