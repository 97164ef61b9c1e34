"""Sampling parameters and the one place that turns logits into token probabilities.

Order of processing (as transformers' `generate`): temperature, then top-k, then top-p. A
temperature of 0 means greedy decoding (argmax); no probabilities are formed then. The same
function serves the target and (later) a drafter, so both sides always see identically processed
distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0 < p <= 1):
            raise InputError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A fresh generator for one sequence (seeded when a seed is set)."""
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed next-token distribution (fp32, sums to 1 over the last dim) for sampling params.

    logits: [..., vocab]. Requires params.temperature > 0.
    """
    if params.greedy:
        raise ValueError("probabilities() is for sampling; greedy decoding takes the argmax")
    x = logits.float() / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - params.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        x = x.masked_fill(remove, float("-inf"))
    return x.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a 1-D vector of non-negative weights (a distribution, or any
    unnormalised one) by inverting its CDF: one uniform u in [0, total), the first index whose
    cumulative weight exceeds u. Exact (float64 sums); a token of weight 0 is never drawn. Over a
    49k vocabulary it costs ~0.13 ms on a 2-core CPU against ~1.4 ms for `torch.multinomial`, which
    made up a fifth of the self-instruct recipe's generation time."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[-1]
    u = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device) * total
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= probs.shape[-1]:  # u rounded up to the total: the last token of non-zero weight
        i = int(torch.nonzero(probs > 0)[-1])
    return i


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its last logits [vocab]: argmax if greedy, else a sample."""
    if params.greedy:
        return int(logits.argmax())
    return sample(probabilities(logits, params), generator)
