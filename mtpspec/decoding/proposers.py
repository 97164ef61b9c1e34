"""Proposers: anything that drafts the next K tokens of each row, behind one small interface.

The decoding loop calls `proposer.propose(inp, k, tree)` and never asks what kind of proposer it
has. A proposer is mechanism only: it drafts what it is asked for (k tokens deep; a tree of the
given `TreeShape` or, with tree=None, a chain), and the drafting plan (plan.py) decides what to ask.
A proposer returns the drafted ids and, if it drafted by sampling, the processed distributions it
sampled from (needed for unbiased rejection sampling; see verify.py). A deterministic proposer
(n-gram lookup, or any argmax drafter on a greedy row) returns probs=None: q is then one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from ..cache import KVCache
from ..models.decoder import Decoder
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .tree import TreeShape


@dataclass
class DraftInput:
    """What a proposer may read to draft for each row b of the batch.

    cache: the target's KV cache; row b holds valid K/V for positions 0 .. cache.lengths[b]-1,
        which is everything before `last_tokens[b]` (the last token itself is not in it yet: the
        next target forward will process it). A proposer must not modify the cache.
    last_tokens: [B] the last emitted token of each row.
    last_hidden: [B, H] the target's final hidden state at the position whose logits produced
        last_tokens[b] (what an MTP drafter consumes).
    history: prompt + emitted tokens of each row, ending with last_tokens[b].
    params / generators: each row's sampling parameters and random generator.
    active: [B] bool, rows still generating (a proposer may skip the others).
    """

    target: Decoder
    cache: KVCache
    last_tokens: torch.Tensor
    last_hidden: torch.Tensor
    history: list[list[int]]
    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    active: list[bool]


@dataclass
class Proposal:
    """tokens: [B, n] drafted ids: a chain d_1..d_k (n = k), or the nodes of a draft tree of depth
    at most k (tree.py), in which case parents [B, n] gives each node's parent (0 = the row's last
    token, i = tokens[:, i-1]); tree tokens are deterministic (probs unused).
    probs: [B, k, V] the processed distributions each chain draft was sampled from (rows with
    sampling), or None if every draft is deterministic."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    parents: torch.Tensor | None = None


class Proposer(Protocol):
    """Drafts up to k tokens deep per row: a chain, or with `tree` a draft tree of that shape.
    `drafts_trees` (optional, default False) says whether it can draft trees at all."""

    def propose(self, inp: DraftInput, k: int, tree: "TreeShape | None" = None) -> Proposal: ...

    def max_tokens(self, k: int, tree: "TreeShape | None" = None) -> int:
        """The most tokens per row `propose(inp, k, tree)` returns (the cache reserves that room;
        optional: without it, k)."""
        ...


class NgramProposer:
    """Model-free drafting by prompt lookup: find the most recent earlier occurrence of the row's
    last n tokens (n from max_ngram down to min_ngram) in its history and propose the tokens that
    followed it. Rows with no match get a repeat of their last token (almost surely rejected, at
    no extra cost: the verify pass is paid anyway). Deterministic, so probs is None.
    """

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("n-gram sizes must satisfy 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def lookup(self, history: list[int], k: int) -> list[int]:
        """The up-to-k tokens that followed the latest earlier match of history's suffix."""
        return self.match(history, k)[0]

    def match(self, history: list[int], k: int) -> tuple[list[int], int]:
        """(the up-to-k tokens that followed the most recent earlier occurrence of the longest
        matching suffix of `history`, n from max_ngram down to min_ngram; that n), or ([], 0)."""
        start, n = self.find(history)
        return (list(history[start : start + k]), n) if n else ([], 0)

    def find(self, history: list[int]) -> tuple[int, int]:
        """(where the continuation of the match `match` describes starts in history, n), or (0, 0).
        Vectorized over the earlier occurrences of the last token (long prompts stay cheap)."""
        L = len(history)
        if L < 2:
            return 0, 0
        h = np.asarray(history, dtype=np.int64)
        ends = np.flatnonzero(h[: L - 1] == h[L - 1])  # e: h[e] is the last token, e <= L - 2
        longest = self.max_ngram if L - 1 >= self.max_ngram else L - 1
        # length[i] = how many tokens of the suffix match ending at ends[i] (up to `longest`)
        length = np.ones(len(ends), dtype=np.int64)
        alive = np.ones(len(ends), dtype=bool)
        for j in range(1, longest):
            ok = alive & (ends >= j)
            ok[ok] = h[ends[ok] - j] == h[L - 1 - j]
            length += ok
            alive = ok
        for n in range(longest, self.min_ngram - 1, -1):
            hits = np.flatnonzero(length >= n)
            if hits.size:  # most recent; the continuation starts at <= L - 1: it is non-empty
                return int(ends[hits[-1]]) + 1, n
        return 0, 0

    drafts_trees = False

    def max_tokens(self, k: int, tree: "TreeShape | None" = None) -> int:
        return k

    def propose(self, inp: DraftInput, k: int, tree: "TreeShape | None" = None) -> Proposal:
        if tree is not None:
            raise ValueError("the n-gram proposer drafts chains only")
        rows = []
        for b, hist in enumerate(inp.history):
            found = self.lookup(hist, k) if inp.active[b] else []
            pad = found[-1] if found else hist[-1]
            rows.append(found + [pad] * (k - len(found)))
        return Proposal(torch.tensor(rows, dtype=torch.long, device=inp.last_tokens.device).view(len(rows), k))
