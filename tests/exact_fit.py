"""Goodness-of-fit of sampled speculative decoding against the target's EXACT conditional
distributions, for the statistical losslessness tests (test_sampling_exactness.py).

How it works. A run decodes many seeded rows at once through the real loop; every emitted token
x_t (after the first, which the prefill samples plainly) is recorded with its round slot (1 = the
first token a verification round emits, ..., K+1 = the bonus token after an all-accepted chain).
Afterwards ONE plain forward over each row's final sequence gives the target's processed
distribution p_t = p(. | prompt, x_1..x_{t-1}) at every position. Lossless sampling means that
each x_t is a draw from p_t given everything before it, whatever the drafts, slots and rows.

The test statistic (per group of observations, e.g. all tokens of one slot): with O the counts
of the emitted categories, E = sum_t p_t and C = sum_t diag(p_t) - p_t p_t^T,

    T = (O - E)^T C^+ (O - E)

O - E is a sum of martingale differences with covariance C, so under losslessness T follows
chi-square with rank(C) degrees of freedom (categories with expected count < 5 are pooled into
one). Categories are either token ids, or ranks within p_t (0 = the target's most likely token),
which lines up a bias towards "the likely token" or "the drafter's favourite" across contexts
whose likely tokens differ. A token the target gives probability 0 is an immediate failure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mtpspec.decoding.loop import Request, decode_events
from mtpspec.decoding.plan import DraftPlan
from mtpspec.decoding.proposers import DraftInput, Proposal
from mtpspec.decoding.sampling import SamplingParams, probabilities

ALPHA = 1e-4
"""Significance level of each fit test (a run makes about ten: 1e-3 family-wise)."""


@dataclass
class Observations:
    probs: torch.Tensor  # [n, V] the target's exact processed distribution at each emitted token
    tokens: torch.Tensor  # [n]
    slots: torch.Tensor  # [n] 1..K+1: the token's place in its verification round


def run_and_observe(model, prompts: list[list[int]], params: list[SamplingParams], new_tokens: int, proposer,
                    k, tree=None) -> Observations:
    """Decode every prompt (one seeded row each, one batch; K drafts per round, as chains or, with
    `tree`, as that draft tree) and pair each token after the first with the target's exact
    distribution for it and its round slot."""
    reqs = [Request(p, new_tokens, q) for p, q in zip(prompts, params)]
    slots: list[list[int]] = [[] for _ in prompts]
    seen = [0] * len(prompts)

    events = decode_events(model, reqs, DraftPlan(proposer, k, draft_tree=tree))
    while True:
        try:
            ev = next(events)
        except StopIteration as done:
            seqs = done.value
            break
        if seen[ev.row]:  # the prefill's token is plain sampling: not observed
            slots[ev.row] += list(range(1, len(ev.new_ids) - seen[ev.row] + 1))
        seen[ev.row] = len(ev.new_ids)
    assert all(len(s.new_ids) == new_tokens and len(sl) == new_tokens - 1 for s, sl in zip(seqs, slots))
    assert len({len(p) for p in prompts}) == 1, "prompts of one length: one batched forward gives every p_t"
    n0 = len(prompts[0])
    ids = torch.tensor([p + s.new_ids for p, s in zip(prompts, seqs)])
    logits = model(ids[:, :-1], model.new_cache(len(prompts), ids.shape[1])).logits[:, n0:]  # p of new tokens 1..
    probs = torch.cat([probabilities(lg, q) for lg, q in zip(logits, params)])
    tokens = ids[:, n0 + 1:].reshape(-1)
    slot_ids = torch.tensor(slots).reshape(-1)
    return Observations(probs, tokens, slot_ids)


def fit_pvalue(probs: torch.Tensor, tokens: torch.Tensor, by_rank: bool) -> tuple[float, int]:
    """(p-value, degrees of freedom) of the fit statistic (module docstring) for one group."""
    probs = probs.double()
    n, v = probs.shape
    if n == 0:
        return 1.0, 0
    if bool((probs[torch.arange(n), tokens] <= 0).any()):
        return 0.0, 0  # a token the target can never emit
    if by_rank:
        order = probs.argsort(dim=-1, descending=True, stable=True)
        tokens = (order == tokens[:, None]).nonzero()[:, 1]
        probs = probs.gather(1, order)
    expected = probs.sum(0)
    # pool categories with a small expected count into one, so the chi-square law applies
    small = expected < 5
    if int(small.sum()) > 0:
        keep = (~small).nonzero()[:, 0].tolist()
        bins = torch.full((v,), len(keep), dtype=torch.long)
        bins[keep] = torch.arange(len(keep))
        m = len(keep) + 1
        probs = torch.zeros(n, m, dtype=probs.dtype).index_add_(1, bins, probs)
        tokens = bins[tokens]
        expected = probs.sum(0)
        v = m
    observed = torch.bincount(tokens, minlength=v).double()
    cov = torch.diag(expected) - probs.T @ probs
    d = observed - expected
    rank = int(torch.linalg.matrix_rank(cov, hermitian=True))
    if rank == 0:
        return 1.0, 0
    stat = float(d @ torch.linalg.pinv(cov, hermitian=True) @ d)
    p = float(torch.special.gammaincc(torch.tensor(rank / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return p, rank


def failed_fits(obs: Observations, k: int, alpha: float = ALPHA) -> list[str]:
    """Every group (all tokens; each round slot 1..k+1) x (by token id; by rank) whose fit test
    rejects at `alpha`, described; empty if the run is consistent with exact sampling."""
    groups = {"all": torch.ones_like(obs.slots, dtype=torch.bool)}
    for s in range(1, k + 2):
        groups[f"slot {s}"] = obs.slots == s
    bad = []
    for name, sel in groups.items():
        for by_rank in (False, True):
            p, df = fit_pvalue(obs.probs[sel], obs.tokens[sel], by_rank)
            if p < alpha:
                bad.append(f"{name} by {'rank' if by_rank else 'token'}: p = {p:.2e} (n = {int(sel.sum())}, df = {df})")
    return bad


# ---- a proposer that depends on position, row and history ---------------------------------------

class DistortedTargetProposer:
    """Samples each draft from q_i = the target's own next-token distribution after the row's
    history and drafts so far, sharpened or flattened by a factor that depends on the draft
    position and tilted by noise that depends on the row, the position and the last tokens. So q
    is close enough to p that whole chains are often accepted (every slot, the bonus after an
    all-accepted chain included, is observed often), and different enough at every position and
    row that verifying with the wrong q, p or position shows."""

    def __init__(self, strength: float = 1.5, sharpen: tuple[float, ...] = (0.6, 0.85, 1.1), seed: int = 0):
        self.strength = strength
        self.sharpen = sharpen  # per draft position i: q_i ~ p_i ** sharpen[i % len]
        self.gen = torch.Generator().manual_seed(seed)
        self._noise: dict[tuple, torch.Tensor] = {}

    def max_tokens(self, k: int) -> int:
        return k

    def noise(self, row: int, pos: int, history: list[int], vocab: int) -> torch.Tensor:
        key = (row % 7, pos, tuple(history[-2:]))
        if key not in self._noise:
            seed = hash(key) % (2**31)
            self._noise[key] = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * self.strength
        return self._noise[key]

    def propose(self, inp: DraftInput, k: int) -> Proposal:
        model, cache, b = inp.target, inp.cache, len(inp.history)
        v = model.cfg.vocab_size
        tokens = torch.zeros(b, k, dtype=torch.long)
        probs = torch.zeros(b, k, v)
        hist = [list(h) for h in inp.history]
        rows = [r for r in range(b) if inp.active[r] and not inp.params[r].greedy]
        params = {replace(inp.params[r], seed=None) for r in rows}
        assert len(params) <= 1, "one sampling setting per batch (this proposer processes q for all rows at once)"
        # the target's own distributions after each draft: one-token forwards that write K/V past
        # each row's length (the verify pass overwrites those slots), lengths restored at the end
        saved = cache.lengths.clone()
        tok = inp.last_tokens
        for i in range(k):
            logits = model(tok[:, None], cache).logits[:, 0].float().log_softmax(-1)
            if rows:
                tilt = torch.stack([self.noise(r, i, hist[r], v) for r in rows])
                q = probabilities(logits[rows] * self.sharpen[i % len(self.sharpen)] + tilt, next(iter(params)))
                tokens[rows, i] = torch.multinomial(q, 1, generator=self.gen)[:, 0]
                probs[rows, i] = q
            for r in range(b):
                hist[r].append(int(tokens[r, i]))
            tok = tokens[:, i]
        cache.set_lengths(saved)
        return Proposal(tokens, probs)
