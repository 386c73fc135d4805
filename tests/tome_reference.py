"""DyT + ToMe written out a second time, one image at a time, in float64, from the issue's
five steps and ToMe's reference (facebookresearch/ToMe, `tome/merge.py`, `tome/patch/timm.py`),
without the product's model code: only the model's weights and config are read.

Per block: attention with proportional attention (`+ log(size)` of each key), its residual;
bipartite soft matching on the keys averaged over heads (normalised; A = even tokens with CLS
first and never merged, B = odd tokens; each A token's most similar B token; the r A tokens
with the highest similarity merge, r capped at half of the non-CLS tokens); the size-weighted
average merge, unmerged A tokens first in their order, then B; then the DyT dispatcher (CLS
always active, logit > 0), the adapter on every token and the MLP on the active ones.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Reference(NamedTuple):
    logits: torch.Tensor
    """[classes] float64."""
    masks: list[torch.Tensor]
    """One bool row per dispatcher, as long as the tokens it saw (no padding)."""
    margins: list[float]
    """Per block, the smallest gap of any merge decision (the r-th vs the (r+1)-th best
    similarity, and a merging token's best vs second-best partner): how far that block is from
    a tie; inf where it merges nothing."""


def _adapter(p: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, scale: float, experts: int) -> torch.Tensor:
    if experts == 0:
        return F.linear(F.relu(F.linear(x, p[prefix + "down_proj.weight"], p[prefix + "down_proj.bias"])),
                        p[prefix + "up_proj.weight"], p[prefix + "up_proj.bias"]) * scale
    # MoE-adapter: experts mixed by softmax(router(mean of the image's tokens)), then one adapter.
    w = F.linear(x.mean(dim=0), p[prefix + "router.weight"], p[prefix + "router.bias"]).softmax(dim=-1)
    down_w = sum(w[e] * p[prefix + "down_weight"][e] for e in range(experts))
    down_b = sum(w[e] * p[prefix + "down_bias"][e] for e in range(experts))
    up_w = sum(w[e] * p[prefix + "up_weight"][e] for e in range(experts))
    up_b = sum(w[e] * p[prefix + "up_bias"][e] for e in range(experts))
    return F.linear(F.relu(F.linear(x, down_w, down_b)), up_w, up_b) * scale


def _merge(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Bipartite soft matching and the size-weighted average, by lists."""
    metric = keys / keys.norm(dim=-1, keepdim=True)
    a_tokens, b_tokens = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    similarity = metric[a_tokens] @ metric[b_tokens].T
    candidates = []  # (best similarity, A index, partner B index, second best) of every non-CLS A token
    for a in range(1, len(a_tokens)):
        ordered = similarity[a].sort(descending=True)
        second = float(ordered.values[1]) if len(b_tokens) > 1 else -math.inf
        candidates.append((float(ordered.values[0]), a, int(ordered.indices[0]), second))
    candidates.sort(key=lambda c: -c[0])
    merging = candidates[:r]
    margin = min([candidates[r - 1][0] - candidates[r][0]] if len(candidates) > r else [math.inf])
    margin = min([margin] + [best - second for best, _, _, second in merging])
    groups = {j: [b_tokens[j]] for j in range(len(b_tokens))}
    for _, a, partner, _ in merging:
        groups[partner].append(a_tokens[a])
    merged_a = {a for _, a, _, _ in merging}
    kept = [a_tokens[a] for a in range(len(a_tokens)) if a not in merged_a]
    rows = [x[t] for t in kept] + [(x[g] * size[g, None]).sum(dim=0) / size[g].sum() for g in groups.values()]
    sizes = [size[t] for t in kept] + [size[g].sum() for g in groups.values()]
    return torch.stack(rows), torch.stack(sizes), margin


def reference(model, image: torch.Tensor, mode: str = "dynamic") -> Reference:
    """Logits, masks and merge margins of `image` [C, H, W] under `model`'s weights and config."""
    cfg = model.dyt_config
    p = {k: v.double() for k, v in model.state_dict().items()}
    c, heads = cfg.embed_dim, cfg.num_heads
    x = F.conv2d(image[None].double(), p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = torch.cat([p["cls_token"][0], x.flatten(2)[0].T]) + p["pos_embed"][0]
    size = torch.ones(len(x), dtype=torch.float64)
    masks, margins = [], []
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        t = len(x)
        h = F.layer_norm(x, (c,), p[b + "norm1.weight"], p[b + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"]).reshape(t, 3, heads, -1).permute(1, 2, 0, 3)
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // heads) + size.log()  # + log(size) of each key
        out = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(t, c)
        x = x + F.linear(out, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        r = min((cfg.tome_r or (0,) * cfg.depth)[i], (t - 1) // 2)
        margins.append(math.inf)
        if r:
            x, size, margins[-1] = _merge(x, size, k.mean(dim=0), r)
        mask = torch.ones(len(x), dtype=torch.bool)
        if cfg.has_dispatcher(i):
            if mode != "dense":
                head = b + "mlp_token_select.mlp_head."
                mask = F.linear(x, p[head + "weight"], p[head + "bias"])[:, 0] > 0
                mask[0] = True
            masks.append(mask)
        h = F.layer_norm(x, (c,), p[b + "norm2.weight"], p[b + "norm2.bias"], 1e-6)
        mlp = F.linear(F.gelu(F.linear(h, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"])),
                       p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
        adapter = _adapter(p, b + "adaptmlp.", x, cfg.adapter_scale, cfg.experts) if cfg.bottleneck else 0
        x = x + mask[:, None] * mlp + adapter
    x = F.layer_norm(x, (c,), p["norm.weight"], p["norm.bias"], 1e-6)
    return Reference(F.linear(x[0], p["head.weight"], p["head.bias"]), masks, margins)
