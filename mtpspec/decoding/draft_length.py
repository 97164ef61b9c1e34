"""Choosing the draft length k each round: fixed, or adapted to measured acceptance and costs.

A round with k drafts costs  T(k) = draft(k) + verify(k)  and emits on average

    E(k) = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_k

tokens, where a_i is the probability that draft i is accepted given drafts 1..i-1 were. The
adaptive policy estimates a_i from the rounds it has seen (running means in which the prior counts
as `prior_weight` observations, turning into exponential moving averages after 1 / (1 - decay)
observations: a few rounds replace the prior, one unlucky round does not switch drafting off; a
position not observed yet takes the mean of the observed ones), measures
the drafting time per k and the verify time per number of tokens verified (both per
batch-size bucket, since batching changes both; a cost not measured yet is interpolated linearly
between the nearest measured ones, extrapolated past them), and picks the k in [0, max_k] that maximises
E(k) / T(k). k = 0 is plain decoding, chosen when the drafter does not pay; an exploration round
now and then keeps the estimates fresh: every `explore_every` rounds while drafting pays, and at
doubling intervals (up to 8x) while it stays off, since each exploring round costs the whole batch a
verify pass (at batches 4 and 8 of the default model every 16th round exploring cost ~4%); an
exploring round that paid for itself (as many tokens per row as plain decoding would have made in
its time) brings the interval back to `explore_every`. (Counting any accepted draft as success,
at batch 4 one row of four accepting kept exploring every 16th round, each such round costing 2x
a plain one for 1.6 tokens per row.)

Drafting has a fixed cost per round besides its cost per token (the default model's drafter on a
2-core Xeon: 1.17 / 1.62 / 2.24 ms for k = 1 / 2 / 4, against a 3.8 ms target step): priced per
drafted token, as a running mean over rounds of different k, short drafts looked cheap after long
ones and long drafts dear after short ones.

The verify cost is keyed by the tokens a round verifies, not by k: a chain of k drafts verifies
k + 1 tokens, a draft tree of depth k its node count + 1, which is the same for every k past the
tree's full size (6:1:3: 7 tokens for every k >= 2). Keyed by k, the estimate of a k the policy
stopped choosing went stale (one slow early round kept it looking expensive); keyed by tokens, every
round that verifies the same number of tokens refreshes it. The loop reports the count with each
round (`observe(..., verified_tokens=)`); a k not seen yet is assumed to verify k + 1 tokens.
A verify pass costs the same whatever drafted its tokens, so the policies of different kinds of
round (prompt lookup's and the drafter's, plan.py) share one verify table (`verify_costs`): kept
apart, the lookup policy once measured a 3-token verify at 17 ms (the drafter policy's median: 9.3
ms over 1731 rounds), never chose k = 2 again and so never corrected it.

Two guards against deciding on the first rounds alone. The first time a step shape runs it pays
one-time costs (the default model's first 5-token verify took 21 ms, later ones 14 ms), so the
second measurement of each verify size, and of the draft cost, replaces the first; after that
they are running means, then moving averages like the acceptance. And k = 0 (drafting off) is not
chosen before `min_observations` rounds have observed the first draft position: one rejected
first draft made drafting look unprofitable and, exploring only every 16th round, plain decoding
stayed on for a whole short answer (seen on a CI machine: 32 tokens, 32 target forwards).

Acceptance estimates count rows, not rounds (a round of a batch of 4 weighs as much as 4 rounds
of one row). The default decay, 0.98, averages over about 50 such observations. With 0.9 (10 rounds) the estimates at
batch 1, where a round is one 0/1 observation per position, swung so much that the policy
thrashed: on 8 held-out chat prompts it chose K = 1..7 (K=2 most often) and accepted 2.10 tokens
per round against 2.38 for a fixed K=4, 9% slower; with 0.98 it settles on K = 4 (chains) or
5 (the 6:1:3 tree) and matches the best fixed K.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import InputError


class DraftLengthPolicy(Protocol):
    max_k: int

    def choose(self, batch_size: int) -> int: ...

    def observe(self, batch_size: int, k: int, accepted: list[int], verify_time: float, draft_time: float,
                verified_tokens: int | None = None) -> None: ...


class FixedDraftLength:
    """Always draft k tokens (k = 0: plain decoding)."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise InputError(f"draft_tokens must be >= 0, got {k}")
        self.k = k

    def choose(self, batch_size: int) -> int:
        return self.k

    def observe(self, batch_size: int, k: int, accepted: list[int], verify_time: float, draft_time: float,
                verified_tokens: int | None = None) -> None:
        pass

    @property
    def max_k(self) -> int:
        return self.k


class CostTable(dict):
    """Measured seconds by key ((bucket, tokens verified) or (bucket, k)). The n-th measurement
    of a key weighs 1 / (n - 1): the second replaces the first (one-time warm-up costs), later ones
    form a running mean of all but the first, which turns into the moving average of `decay`."""

    def __init__(self, decay: float = 0.98) -> None:
        super().__init__()
        self.decay = decay
        self.count: dict = {}  # key -> measurements behind its estimate

    def add(self, key, seconds: float) -> None:
        n = self.count.get(key, 0)
        self.count[key] = n + 1
        self[key] = seconds if n == 0 else self[key] + max(1 - self.decay, 1 / n) * (seconds - self[key])


def _bucket(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, 9-16, ... share cost estimates (buckets 0, 1, 2, 3, 4, ...)."""
    return max(0, batch_size - 1).bit_length()


def _interpolate(known: list[tuple[int, float]], n: int, one_point) -> float | None:
    """The cost at n from sorted measured (n_i, seconds) pairs: the measurement at n, else linear
    through the two nearest (extrapolated past the ends), else one_point(n0, t0) from a single
    measurement; None without any."""
    if not known:
        return None
    for nn, t in known:
        if nn == n:
            return t
    if len(known) == 1:
        return one_point(*known[0])
    below = [p for p in known if p[0] < n]
    above = [p for p in known if p[0] > n]
    (n0, t0), (n1, t1) = (below[-1], above[0]) if below and above else (known[-2], known[-1]) if below else (known[0], known[1])
    return max(t0 + (t1 - t0) * (n - n0) / (n1 - n0), 1e-9)


class AdaptiveDraftLength:
    """Pick k from measured acceptance and costs (see module docstring)."""

    def __init__(self, max_k: int = 8, *, prior_acceptance: float = 0.7, prior_weight: float = 2.0, decay: float = 0.98,
                 explore_every: int = 16, min_observations: int = 8, verify_costs: CostTable | None = None):
        """verify_costs: a verify table shared with the policies of other kinds of round on the
        same target (module docstring); None = its own."""
        if max_k < 1:
            raise ValueError("max_k must be >= 1")
        self.max_k = max_k
        self.decay = decay
        self.explore_every = explore_every
        self.min_observations = min_observations
        self.prior = prior_acceptance
        self.prior_weight = prior_weight
        self.accept = [prior_acceptance] * max_k  # a_1 .. a_max_k
        self.seen = [0] * max_k  # observations of each a_i
        # (bucket, tokens verified) -> seconds
        self.verify: CostTable = verify_costs if verify_costs is not None else CostTable(decay)
        self.tokens: dict[tuple[int, int], int] = {}  # (bucket, k) -> tokens a round of k verified
        self.draft = CostTable(decay)  # (bucket, k) -> seconds drafting k tokens
        self.rounds = 0
        self.last_k = min(4, max_k)
        self.explore_gap = explore_every  # rounds until the next exploration (doubles while drafting stays off)
        self.next_explore = explore_every
        self.exploring = False  # the last round chosen was an exploration

    def expected_tokens(self, k: int) -> float:
        return self._expected_all(k)[k]

    def _expected_all(self, k_max: int) -> list[float]:
        """[E(0), ..., E(k_max)] in one pass."""
        observed = [a for a, n in zip(self.accept, self.seen) if n]
        unseen = sum(observed) / len(observed) if observed else self.prior
        out, total, run = [1.0], 1.0, 1.0
        for i in range(k_max):
            run *= self.accept[i] if self.seen[i] else unseen
            total += run
            out.append(total)
        return out

    def verified_tokens(self, bucket: int, k: int) -> int:
        """Tokens a round of k drafts verifies in this bucket: as observed, else k + 1 (a chain)."""
        return self.tokens.get((bucket, k), k + 1)

    def _verify_time(self, bucket: int, n: int, known: list | None = None) -> float | None:
        """Verify time of n tokens: measured, else interpolated (extrapolated) from the nearest.
        known: this bucket's sorted (tokens, seconds) pairs, if the caller has them already."""
        if known is None:
            known = sorted((nn, t) for (b, nn), t in self.verify.items() if b == bucket)
        # one point: assume a verify pass grows 5% per extra token
        return _interpolate(known, n, lambda n0, t0: t0 * (1 + 0.05 * (n - n0)))

    def _draft_time(self, bucket: int, k: int, known: list | None = None) -> float | None:
        """Drafting time of k tokens: measured, else interpolated (extrapolated) from the nearest k.
        known: this bucket's sorted (k, seconds) pairs."""
        if k == 0:
            return 0.0
        if known is None:
            known = sorted((kk, t) for (b, kk), t in self.draft.items() if b == bucket)
        return _interpolate(known, k, lambda k0, t0: t0 * k / k0)  # one point: proportional to k

    def choose(self, batch_size: int) -> int:
        self.rounds += 1
        bucket = _bucket(batch_size)
        seen = {nn for (b, nn) in self.verify if b == bucket}
        drafted = sorted((kk, t) for (b, kk), t in self.draft.items() if b == bucket)
        if not drafted:
            # warm-up for this batch size: a drafting round first (the loop may cap k, even to 0,
            # near the end of a sequence; we ask again until a drafting round was measured) ...
            return max(1, self.last_k)
        if len(seen) < 2:
            # ... and a second verify size (plain decoding, k = 0, if not yet seen) for the cost slope
            return next(k for k in (0, max(1, self.last_k), 1, 2) if self.verified_tokens(bucket, k) not in seen)
        scores = {}
        known = sorted((nn, t) for (b, nn), t in self.verify.items() if b == bucket)
        expected = self._expected_all(self.max_k)
        for k in range(self.max_k + 1):
            t_verify = self._verify_time(bucket, self.verified_tokens(bucket, k), known)
            scores[k] = expected[k] / (t_verify + self._draft_time(bucket, k, drafted))
        if self.seen[0] < self.min_observations:
            scores.pop(0)  # too few rounds to write the drafter off
        best = max(scores, key=scores.get)
        self.exploring = bool(self.explore_every) and self.rounds >= self.next_explore
        if self.exploring:
            # while drafting stays off, each exploration waits twice as long for the next (up to
            # 8x): an exploring round costs the whole batch a verify pass. An exploring round whose
            # draft is accepted brings the next one back to explore_every (observe)
            cap = 8 * self.explore_every
            self.explore_gap = min(2 * self.explore_gap, cap) if best == 0 else self.explore_every
            self.next_explore = self.rounds + self.explore_gap
            best = min(self.max_k, best + 1) if best < self.max_k else best - 1
        self.last_k = best
        return best

    def _paid(self, bucket: int, accepted: list[int], seconds: float) -> bool:
        """Whether a drafting round emitted at least as many tokens per row as plain decoding would
        have in its time (`seconds`), by this bucket's measured one-token step; without that
        measurement, whether any draft was accepted."""
        plain = self.verify.get((bucket, 1))
        if plain is None:
            return any(accepted)
        return 1 + sum(accepted) / len(accepted) >= seconds / plain

    def observe(self, batch_size: int, k: int, accepted: list[int], verify_time: float, draft_time: float,
                verified_tokens: int | None = None) -> None:
        """One round's outcome: k drafted per row (0 = plain), each active row's accepted count,
        the verify and draft times, and the tokens each row verified (default k + 1)."""
        bucket, d = _bucket(batch_size), self.decay
        if self.exploring and k > 0 and accepted and self._paid(bucket, accepted, verify_time + draft_time):
            self.explore_gap = self.explore_every
            self.next_explore = min(self.next_explore, self.rounds + self.explore_every)
        n = k + 1 if verified_tokens is None else verified_tokens
        self.tokens[(bucket, k)] = n
        self.verify.add((bucket, n), verify_time)
        if k > 0:
            self.draft.add((bucket, k), draft_time)
        for i in range(k):  # rows that reached draft i (all earlier drafts accepted)
            reached = [n for n in accepted if n >= i]
            if reached:
                rate = sum(1 for n in reached if n > i) / len(reached)
                r = len(reached)  # each row is one observation: a batch of r rows weighs r rounds of one
                self.seen[i] += r
                w = max(1 - d**r, r / (self.seen[i] + self.prior_weight))  # running mean first, then EMA
                self.accept[i] += w * (rate - self.accept[i])
