"""`PromptLookupProposer`: a drafter with prompt lookup in front of it.

Per round and row: if the row's history ends with an n-gram (n >= `min_match`) that occurred
earlier in that history (the prompt or the generated text), the tokens that followed its most
recent occurrence are the row's draft (`NgramProposer.match`); otherwise the wrapped drafter's
draft is. Text that copies from the context (summaries, extraction, quotes, code edits, multi-turn
chat repeating names and phrases) is drafted by lookup, which costs nothing and is accepted far
more often there than a small drafter's guesses; the drafter covers everything else. When every
active row has a match, the drafter is not run at all.

A lookup continuation shorter than k (the match sits near the end of the history) keeps the
drafter's tokens after it: any token is a valid draft, verification decides.

Losslessness: verification does not care where drafts come from, only that a sampled row reports
the distribution q its draft was drawn from (decoding/verify.py). Lookup drafts are deterministic,
so an overridden sampled row reports q = one-hot(draft) at those positions (accepted with the
target's probability p(draft), the residual max(p - q, 0) otherwise), and keeps the drafter's q
at the positions it did not override. Tree rounds (decoding/plan.py) go to the drafter alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .proposers import DraftInput, NgramProposer, Proposal, Proposer

if TYPE_CHECKING:
    from .tree import TreeShape

__all__ = ["PromptLookupProposer"]


class NgramIndex:
    """`NgramProposer.find` for one growing history, in O(1) per round: for each n in
    min_ngram..max_ngram, where each n-gram of the history last ended, extended by the tokens
    appended since the previous call (a scan of the whole history each round cost ~50 us per row
    after a target step: 0.2 ms of a batch-4 round). Histories only grow (the decoding loop
    appends); a shorter one is indexed anew."""

    def __init__(self, history: list[int], min_ngram: int, max_ngram: int) -> None:
        self.history = history
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self._clear()

    def _clear(self) -> None:
        self.done = 0  # n-grams ending at positions < done are indexed
        self.last: dict[int, dict[tuple, int]] = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}

    def find(self) -> tuple[int, int]:
        h = self.history
        L = len(h)
        if L - 1 < self.done:
            self._clear()
        for e in range(self.done, L - 1):  # every position but the last (the suffix itself)
            for n, table in self.last.items():
                if e >= n - 1:
                    table[tuple(h[e - n + 1 : e + 1])] = e
        self.done = max(self.done, L - 1)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            e = self.last[n].get(tuple(h[L - n :]))
            if e is not None:
                return e + 1, n
        return 0, 0


class PromptLookupProposer:
    """`drafter`'s drafts, replaced per row by prompt lookup where the history's last `min_match`
    or more tokens (up to `max_match`) occurred before (module docstring)."""

    def __init__(self, drafter: Proposer, min_match: int = 2, max_match: int = 4) -> None:
        self.inner = drafter
        self.lookup = NgramProposer(max_ngram=max_match, min_ngram=min_match)
        self.drafts_trees = bool(getattr(drafter, "drafts_trees", False))
        self.rounds = 0  # chain rounds proposed, and rows drafted by lookup in them (statistics)
        self.lookup_rows = 0
        self._found: dict[int, tuple[int, int, int, int]] = {}  # this round: row -> (id, len of history, start, n)
        self._index: dict[int, NgramIndex] = {}  # row -> its history's n-gram index

    @property
    def drafter(self):
        """The wrapped MTP drafter (None if the inner proposer has none)."""
        return getattr(self.inner, "drafter", None)

    @property
    def draft_tokens(self) -> int | None:
        return getattr(self.inner, "draft_tokens", None)

    def max_tokens(self, k: int, tree: "TreeShape | None" = None) -> int:
        room = getattr(self.inner, "max_tokens", None)
        if room is None or tree is None:  # chains: k tokens, whoever drafts them
            return k
        return room(k, tree)

    def _find(self, b: int, history: list[int]) -> tuple[int, int]:
        """Row b's match (`NgramProposer.find`), computed once per round (`round_kind` then
        `propose`; the memo lives for one round only)."""
        memo = self._found.get(b)
        if memo is not None and memo[0] == id(history) and memo[1] == len(history):
            return memo[2], memo[3]
        index = self._index.get(b)
        if index is None or index.history is not history:  # a new sequence in this row
            index = self._index[b] = NgramIndex(history, self.lookup.min_ngram, self.lookup.max_ngram)
        start, n = index.find()
        self._found[b] = (id(history), len(history), start, n)
        return start, n

    def round_kind(self, history: list[list[int]], active: list[bool]) -> str:
        """"lookup" when every active row will draft by lookup this round, else "drafter": rounds
        of the two kinds accept (and cost) very differently, so the drafting plan adapts the draft
        length of each separately (decoding/plan.py)."""
        self._found = {}
        rows = [self._find(b, h)[1] for b, (h, a) in enumerate(zip(history, active)) if a]
        return "lookup" if rows and all(rows) else "drafter"

    def propose(self, inp: DraftInput, k: int, tree: "TreeShape | None" = None) -> Proposal:
        if tree is not None:
            return self.inner.propose(inp, k, tree)
        if k == 0:
            return self.inner.propose(inp, k)
        found = []
        for b, (h, a) in enumerate(zip(inp.history, inp.active)):
            start, n = self._find(b, h) if a else (0, 0)
            found.append(list(h[start : start + k]) if n else [])
        self._found = {}
        self.rounds += 1
        self.lookup_rows += sum(1 for f in found if f)
        dev = inp.last_tokens.device
        if all(len(f) == k or not a for f, a in zip(found, inp.active)):
            rows = [f if f else [int(inp.last_tokens[b])] * k for b, f in enumerate(found)]
            return Proposal(torch.tensor(rows, dtype=torch.long, device=dev).view(len(rows), k))
        p = self.inner.propose(inp, k)
        for b, f in enumerate(found):
            if not f:
                continue
            ids = torch.tensor(f, dtype=torch.long, device=dev)
            p.tokens[b, : len(f)] = ids
            if p.probs is not None:  # deterministic drafts: q = one-hot where lookup drafted
                p.probs[b, : len(f)] = 0.0
                p.probs[b, torch.arange(len(f), device=dev), ids] = 1.0
        return p
