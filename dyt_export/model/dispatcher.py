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
        return self.forward(x)[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [B, N] bool with CLS forced active, logits [B, N-1] float32).

        The logit is computed for CLS too and then ignored: slicing CLS off the [B, N, C]
        input first copied the whole hidden state in every dispatching layer (ONNX Slice),
        and building the mask from a ones column took four more small nodes. The patch tokens'
        logits are the same numbers up to float rounding: bit-identical on ViT-B/16 in PyTorch,
        ONNX Runtime and OpenVINO, a last-bit difference for a few tokens of other shapes in
        PyTorch's GEMM (whose blocking depends on the row count)."""
        logits = F.linear(x.float(), self.mlp_head.weight.float(), self.mlp_head.bias.float()).squeeze(-1)
        is_cls = torch.arange(logits.shape[1], device=x.device) == 0
        return (logits > THRESHOLD_LOGIT) | is_cls, logits[:, 1:]
