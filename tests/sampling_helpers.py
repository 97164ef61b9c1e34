"""Exact output distributions of a tiny small-vocabulary target, for the statistical tests that
speculative sampling (chains and trees) samples exactly from the target."""

from __future__ import annotations

import torch

from mtpspec.decoding.sampling import probabilities

SMALL_V = 12


def next_token_probs(model, ids: list[int], params) -> torch.Tensor:
    """The target's processed next-token distribution after `ids`."""
    cache = model.new_cache(1, len(ids) + 1)
    return probabilities(model(torch.tensor([ids]), cache).logits[0, -1], params)


def exact_token_distribution(model, prompt: list[int], params, position: int) -> torch.Tensor:
    """P(the generated token at `position` (0 = the first)), summing over the tokens before it."""
    def walk(ids: list[int], weight: float, depth: int) -> torch.Tensor:
        p = next_token_probs(model, ids, params)
        if depth == position:
            return weight * p
        return sum((walk(ids + [t], weight * float(p[t]), depth + 1) for t in range(SMALL_V) if p[t] > 0),
                   torch.zeros(SMALL_V))

    return walk(list(prompt), 1.0, 0)
