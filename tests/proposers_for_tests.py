"""Proposers with known acceptance, for losslessness tests: they draft from a precomputed greedy
reference continuation (always accepted), corrupt it (never accepted), or corrupt some tokens."""

from __future__ import annotations

import torch

from mtpspec.decoding.proposers import DraftInput, Proposal
from mtpspec.decoding.sampling import probabilities


class ReferenceProposer:
    """Drafts the reference greedy continuation of each row; `corrupt` is the probability of
    replacing a drafted token by a wrong one (0: always agrees, 1: never agrees)."""

    def __init__(self, references: list[list[int]], vocab: int, corrupt: float = 0.0, seed: int = 0):
        self.refs = references  # prompt + greedy continuation per row
        self.vocab = vocab
        self.corrupt = corrupt
        self.gen = torch.Generator().manual_seed(seed)

    def max_tokens(self, k: int) -> int:
        return k

    def propose(self, inp: DraftInput, k: int) -> Proposal:
        rows = []
        for b, hist in enumerate(inp.history):
            ref = self.refs[b]
            n = len(hist)
            assert hist == ref[:n], "history diverged from the greedy reference: output is not lossless"
            row = ref[n : n + k] + [0] * max(0, n + k - len(ref))
            for i in range(k):
                if torch.rand((), generator=self.gen) < self.corrupt:
                    row[i] = (row[i] + 1 + int(torch.randint(self.vocab - 1, (), generator=self.gen))) % self.vocab
            rows.append(row)
        return Proposal(torch.tensor(rows, dtype=torch.long).view(len(rows), k))


class RandomSamplingProposer:
    """Samples drafts from fixed random logits, processed with each row's sampling parameters
    (as a real drafter's are), and reports that distribution q: a drafter that disagrees with the
    target in a known, non-trivial way."""

    def __init__(self, vocab: int, seed: int = 0, scale: float = 3.0):
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(vocab, generator=g) * scale

    def propose(self, inp: DraftInput, k: int) -> Proposal:
        b = len(inp.history)
        toks = torch.zeros(b, k, dtype=torch.long)
        probs = torch.zeros(b, k, self.logits.shape[0])
        for r in range(b):
            if inp.params[r].greedy:  # a greedy row gets the argmax (verified greedily: probs unused)
                toks[r] = self.logits.argmax()
                continue
            q = probabilities(self.logits, inp.params[r])
            toks[r] = torch.multinomial(q, k, replacement=True, generator=inp.generators[r])
            probs[r] = q
        return Proposal(toks, probs)


def proposer_of_kind(kind: str, full: list[list[int]], vocab: int, seed: int = 0):
    """The losslessness tests' proposers: one that always agrees with the reference continuation
    `full`, one that never does, one that agrees 70% of the time, and n-gram lookup."""
    from mtpspec.decoding.proposers import NgramProposer

    if kind == "ngram":
        return NgramProposer()
    return ReferenceProposer(full, vocab, {"agree": 0.0, "never": 1.0, "partial": 0.3}[kind],
                             **({"seed": seed} if kind == "partial" else {}))
