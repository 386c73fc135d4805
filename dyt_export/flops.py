"""Analytic compute of a DyT ViT from how many tokens each dispatcher activated.

Convention: **multiply-adds (MACs)**, which is what the DyT paper (and fvcore, which it
follows) calls FLOPs. Counted terms, per image:

* `patch_embed`: the patch convolution, `patches * C * in_chans * P * P`;
* `norm`: every LayerNorm at 5 per element (fvcore's estimate for an affine norm), on the
  tokens that actually pass it: a dispatched unit normalises only its active tokens;
* `qkv`, `attn_scores` (Q K^T), `attn_values` (P V), `attn_proj`: on the tokens taking
  part in attention (`k` of them: `3kC^2`, `k^2 C`, `k^2 C`, `kC^2`);
* `mlp`: `2 k C H` for the `k` tokens entering the MLP;
* `adapter`: `2 N C r` per unit (every token passes the adapter); for an MoE-adapter also
  the per-image expert mixing (`E (2 r C + r + C)`), counted under `router` with the
  router's `E C`;
* `dispatcher`: `N C` per dispatcher (one logit per token: the exported graph computes
  CLS's too and ignores it, which is cheaper than copying the patch tokens out first);
* `head`: `C * classes` on the CLS token;
* `merge` (ToMe): the bipartite matching's cosine similarities, `ceil(T/2) floor(T/2) D` for a
  block entering with T tokens (D = head_dim); with ToMe, attention (and its LayerNorm) counts
  the block's T entering tokens, everything after the merge (dispatcher, adapter, MLP) the
  merged count, the final LayerNorm the last block's.

Not counted, as in fvcore: softmax, GELU, residual adds, the position-embedding add, the
token mean feeding an MoE router, and the gather/scatter that moves tokens. With these
rules dense ViT-B/16 at 224 is 17.58 G, the paper's figure (checked in the tests).

`k` is the image's own active count. A batched attention unit pads every image to the
batch's largest count; that padding is an implementation cost, not the model's, and is
left out so that an image costs the same alone or in a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import DyTConfig

TERMS: tuple[str, ...] = ("patch_embed", "norm", "qkv", "attn_scores", "attn_values", "attn_proj", "merge", "mlp",
                          "adapter", "router", "dispatcher", "head")
NORM_MACS_PER_ELEMENT = 5


@dataclass(frozen=True)
class Macs:
    """MACs of a batch, split by term and by block.

    `blocks[term]` is [B, depth] (float64); `outside[term]` is the cost that every image
    pays once outside the blocks (patch embedding, final norm, head).
    """

    blocks: dict[str, np.ndarray]
    outside: dict[str, float]

    def per_image(self) -> np.ndarray:
        """[B] total MACs of each image."""
        return sum(v.sum(axis=1) for v in self.blocks.values()) + sum(self.outside.values())

    def per_block(self) -> np.ndarray:
        """[B, depth] MACs spent inside each block."""
        return sum(self.blocks.values())

    def by_term(self) -> dict[str, np.ndarray]:
        """term -> [B] MACs, over the whole network."""
        out = {t: v.sum(axis=1) for t, v in self.blocks.items()}
        batch = next(iter(out.values())).shape[0]
        for t, v in self.outside.items():
            out[t] = out.get(t, np.zeros(batch)) + v
        return out


def _check_counts(cfg: DyTConfig, active_counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(active_counts)
    d = len(cfg.dispatcher_names)
    if counts.ndim != 2 or counts.shape[1] != d:
        raise ValueError(f"active_counts must be [batch, {d}] (one column per dispatcher), got {counts.shape}")
    tokens = np.asarray(cfg.dispatcher_tokens)
    if counts.size and (counts.min() < 1 or (counts > tokens).any()):
        raise ValueError(f"active counts must lie in 1..the tokens each dispatcher sees ({cfg.num_tokens}, fewer "
                         "after ToMe merges; CLS is always active)")
    return counts.astype(np.float64)


def _adapter_macs(cfg: DyTConfig, tokens: int) -> tuple[float, float]:
    """(adapter application, MoE routing and mixing) MACs of one unit on `tokens`, per image."""
    if not cfg.bottleneck:
        return 0.0, 0.0
    c, r, e = cfg.embed_dim, cfg.bottleneck, cfg.experts
    apply = 2.0 * tokens * c * r
    mixing = e * c + e * (2 * r * c + r + c) if e else 0.0
    return apply, mixing


def count_macs(cfg: DyTConfig, active_counts: np.ndarray | None) -> Macs:
    """MACs of each image given the active tokens (CLS included) of every dispatcher.

    `active_counts` is [B, D] in `cfg.dispatcher_names` order; None means the dense
    export (every token active, dispatchers not run) and gives a batch of one.
    """
    c, h = float(cfg.embed_dim), float(cfg.mlp_hidden_dim)
    counts = None if active_counts is None else _check_counts(cfg, active_counts)
    b = 1 if counts is None else counts.shape[0]
    blocks = {t: np.zeros((b, cfg.depth)) for t in TERMS if t not in ("patch_embed", "head")}
    column = 0
    for i, (entering, merged) in enumerate(cfg.merge_schedule):
        n = float(entering - merged)  # tokens after ToMe's merge: what the DyT units see
        adapter, mixing = _adapter_macs(cfg, entering - merged)
        if merged:
            blocks["merge"][:, i] += ((entering + 1) // 2) * (entering // 2) * (c / cfg.num_heads)
        dispatched = counts is not None and cfg.has_dispatcher(i)
        active = {}
        for unit in cfg.units:
            if dispatched:
                active[unit] = counts[:, column]
                column += 1
                blocks["dispatcher"][:, i] += n * c
            else:
                active[unit] = np.full(b, n)
            blocks["adapter"][:, i] += adapter
            blocks["router"][:, i] += mixing
        k_attn = active.get("attn", active.get("layer", float(entering)))
        k_mlp = active.get("mlp", active.get("layer", n))
        blocks["norm"][:, i] += NORM_MACS_PER_ELEMENT * c * (k_attn + k_mlp)
        blocks["qkv"][:, i] += 3 * k_attn * c * c
        blocks["attn_scores"][:, i] += k_attn * k_attn * c
        blocks["attn_values"][:, i] += k_attn * k_attn * c
        blocks["attn_proj"][:, i] += k_attn * c * c
        blocks["mlp"][:, i] += 2 * k_mlp * c * h
    outside = {
        "patch_embed": float(cfg.num_patches * c * cfg.in_chans * cfg.patch_size ** 2),
        "norm": NORM_MACS_PER_ELEMENT * (cfg.num_tokens - sum(m for _, m in cfg.merge_schedule)) * c,
        "head": c * cfg.num_classes,
    }
    return Macs(blocks, outside)


def macs_per_image(cfg: DyTConfig, active_counts: np.ndarray | None) -> np.ndarray:
    """[B] MACs (float64) of each image; `active_counts` [B, D] or None for dense ([1])."""
    return count_macs(cfg, active_counts).per_image()


def flops_summary(cfg: DyTConfig, active_counts: np.ndarray) -> dict[str, Any]:
    """Mean DyT MACs of a batch against the dense export of the same model, in GMACs."""
    dense = float(macs_per_image(cfg, None)[0])
    per_image = macs_per_image(cfg, active_counts)
    return {"dense_gmacs": dense / 1e9, "mean_gmacs": float(per_image.mean()) / 1e9,
            "min_gmacs": float(per_image.min()) / 1e9, "max_gmacs": float(per_image.max()) / 1e9,
            "ratio": float(per_image.mean()) / dense}
