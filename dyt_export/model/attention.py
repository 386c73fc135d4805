"""Multi-head self-attention on timm's `Attention` weights, with an optional key bias.

Written out as matmul + softmax rather than timm's fused SDPA call: the additive key bias
must be shape-polymorphic in the number of gathered tokens (SDPA with a mask trips export
guards on that data-dependent length), and the softmax stays float32 in fp16 models.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention


def attention(attn: Attention, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, C] -> [B, T, C]; key_bias [B, 1, 1, T] is added to the scores (0 or -inf)."""
    return _attend(attn, x, key_bias)[0]


def attention_and_keys(attn: Attention, x: torch.Tensor,
                       key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention`, and the keys averaged over heads [B, T, head_dim]: ToMe's merge metric
    (for ToMe the key bias is log(token size), proportional attention)."""
    out, k = _attend(attn, x, key_bias)
    return out, k.mean(dim=1)


def _attend(attn: Attention, x: torch.Tensor, key_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output [B, T, C], keys [B, heads, T, head_dim])."""
    b, t, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if key_bias is not None:
        scores = scores.float() + key_bias
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    out = (probs @ v).transpose(1, 2).reshape(b, t, c)
    return attn.proj(attn.norm(out)), k
