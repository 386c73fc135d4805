"""The experiment the loadtest weighs against the server's fixed image cap: a batch capped by
a token budget instead (Ray Serve's `batch_size_fn`), each image counted at the active MLP
tokens per image of the last calls.

Why it might pay: a DyT batch costs what its active tokens cost, so a cap in tokens would
hold batches to a steady cost and so steady latency while activation varies. Why it might
not: a request's tokens are unknown until it has run, so the estimate can only follow the
recent past. The budget is the fixed cap times the mean tokens per image of the image pool,
so both caps admit the same images on average and the comparison is of their p99 at equal
throughput (docs/serving.md has the outcome). Not part of the server: the loadtest deploys
this subclass itself.
"""
from __future__ import annotations

import numpy as np

from runtimes.serving.app import DytServer
from runtimes.serving.batching import Batcher, Done, Work
from runtimes.serving.models import ServeConfig, ServedModel

SMOOTHING = 0.3
"""Weight of the newest call in the running estimate of tokens per image."""


def image_tokens(masks: np.ndarray) -> np.ndarray:
    """Active MLP rows per image of [B, D, N] token masks (the class token included)."""
    return masks.sum(axis=(1, 2)).astype(np.float64)


class TokenBudgetBatcher(Batcher):
    def __init__(self, model: ServedModel, budget: int, tokens_per_image: float, wait_s: float) -> None:
        if not model.facts.has_masks:
            raise ValueError(f"{model.name}: token budgets need a model exported with --with-masks")
        self.estimate = tokens_per_image
        super().__init__(model, budget, wait_s)

    def cost(self, items: list[Work]) -> int:
        """Estimated tokens of `items`, each request capped at the whole budget (it then runs alone)."""
        return int(sum(min(item.images * self.estimate, self.max_batch) for item in items))

    async def _run(self, items: list[Work]) -> list[Done]:
        done = await super()._run(items)
        seen = np.concatenate([image_tokens(d.outputs["token_masks"]) for d in done]).mean()
        self.estimate = (1 - SMOOTHING) * self.estimate + SMOOTHING * float(seen)
        return done


class TokenBudgetServer(DytServer):
    """The server with a token budget of `max_batch` x `tokens_per_image` per model."""

    def __init__(self, config: ServeConfig, tokens_per_image: float) -> None:
        self.tokens_per_image = tokens_per_image
        super().__init__(config)

    def _batcher(self, model: ServedModel) -> Batcher:
        budget = int(round(self.config.max_batch * self.tokens_per_image))
        return TokenBudgetBatcher(model, budget, self.tokens_per_image, self.config.batch_wait_s)
