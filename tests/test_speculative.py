"""Losslessness of speculative decoding: whole token sequences equal plain decoding of the same
target, for proposers that always agree, never agree, partially agree, and n-gram lookup; K in
{1, 3, 8}; batch 1 and 5 with prompts of different lengths; generation crossing the sliding window.
That sampled tokens follow the target's distribution is tested in test_sampling_exactness.py."""

from __future__ import annotations

import pytest
import torch

from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.draft_length import AdaptiveDraftLength, _bucket
from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.plan import DraftPlan
from mtpspec.decoding.proposers import NgramProposer
from mtpspec.decoding.sampling import SamplingParams
from proposers_for_tests import RandomSamplingProposer, ReferenceProposer, proposer_of_kind
from tiny_models import VOCAB

NEW = 40  # > 8, the Gemma 3 tiny model's sliding window, together with the prompt

B1 = _bucket(1)  # the cost-estimate bucket of batch 1


def prompts(batch: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [5, 13, 2, 9, 17][:batch] if batch > 1 else [11]
    # repetitive prompts give the n-gram proposer something to find
    out = []
    for n in lens:
        base = torch.randint(3, VOCAB, (max(1, n // 2),), generator=g).tolist()
        out.append((base * 3)[:n])
    return out


def plain(model, ps, new=NEW):
    return [s.new_ids for s in decode(model, [Request(p, new) for p in ps])]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def target(request, tiny_checkpoints):
    return load_decoder(tiny_checkpoints[request.param][0])


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kind", ["agree", "never", "partial", "ngram"])
def test_greedy_speculative_equals_plain(target, kind, k, batch):
    ps = prompts(batch)
    ref = plain(target, ps)
    full = [p + r for p, r in zip(ps, ref)]
    proposer = proposer_of_kind(kind, full, VOCAB, seed=k)
    seqs = decode(target, [Request(p, NEW) for p in ps], DraftPlan(proposer, k))
    assert [s.new_ids for s in seqs] == ref
    for s in seqs:
        st = s.stats
        # the first token comes from the prefill; the last round may emit more than max_new_tokens keeps
        assert len(s.new_ids) - 1 <= st.round_tokens <= len(s.new_ids) - 1 + k
        assert st.target_forwards == st.rounds + 1
        if kind == "agree":
            # every draft accepted: k+1 tokens per round (the last round may be cut by max_new_tokens)
            assert st.rounds == -(-(NEW - 1) // (k + 1))
            assert all(a == 1.0 for a in st.acceptance_per_position)
        if kind == "never":
            assert st.mean_accepted_length == 1.0 and st.rounds == NEW - 1
            assert all(a == 0.0 for a in st.acceptance_per_position)
        if kind == "partial":
            assert 1.0 < st.mean_accepted_length < k + 1 or k == 1


def test_adaptive_draft_length_is_lossless(target):
    ps = prompts(5, seed=4)
    ref = plain(target, ps)
    full = [p + r for p, r in zip(ps, ref)]
    for corrupt in (0.0, 0.5):
        seqs = decode(target, [Request(p, NEW) for p in ps], DraftPlan(ReferenceProposer(full, VOCAB, corrupt), AdaptiveDraftLength(6)))
        assert [s.new_ids for s in seqs] == ref


def test_eos_and_max_tokens_inside_an_accepted_run(target):
    """A row stops in the middle of a round's accepted tokens: output truncated exactly like plain."""
    ps = prompts(5, seed=5)
    ref = plain(target, ps)
    eos = ref[1][6]  # a token that occurs in row 1's continuation
    full = [p + r for p, r in zip(ps, ref)]
    reqs = lambda: [Request(p, n, eos_ids=frozenset([eos])) for p, n in zip(ps, [40, 40, 7, 3, 40])]  # noqa: E731
    expect = [s.new_ids for s in decode(target, reqs())]
    got = decode(target, reqs(), DraftPlan(ReferenceProposer(full, VOCAB, 0.0), 8))
    assert [s.new_ids for s in got] == expect
    assert [s.finish_reason for s in got] == [s.finish_reason for s in decode(target, reqs())]


def test_adaptive_policy_prefers_long_drafts_when_accepted_and_none_when_rejected():
    good, bad = AdaptiveDraftLength(8), AdaptiveDraftLength(8)
    for _ in range(60):
        for pol, acc in ((good, 8), (bad, 0)):
            k = pol.choose(1)
            # synthetic costs: verify 10 ms + 0.5 ms per draft, drafting 1 ms per token
            pol.observe(1, k, [min(acc, k)], 0.010 + 0.0005 * k, 0.001 * k)
    assert good.choose(1) >= 6
    assert bad.choose(1) <= 1


def test_adaptive_policy_replaces_its_prior_within_a_few_rounds():
    pol = AdaptiveDraftLength(8, prior_acceptance=0.7, prior_weight=2.0)
    pol.observe(1, 2, [0], 0.01, 0.002)  # one unlucky round: draft 1 rejected
    assert pol.accept[0] == pytest.approx(1.4 / 3)  # the prior counts as two observations
    assert pol.expected_tokens(2) > 1.2  # drafting is not written off after one round
    for _ in range(8):
        pol.observe(1, 2, [1], 0.01, 0.002)  # then draft 1 accepted, draft 2 rejected, every round
    assert pol.accept[0] > 0.8 and pol.accept[1] < 0.2  # the evidence has replaced the prior
    fresh = AdaptiveDraftLength(8, prior_acceptance=0.7, prior_weight=0.0)
    fresh.observe(1, 1, [1], 0.01, 0.001)
    fresh.observe(1, 1, [0], 0.01, 0.001)
    assert fresh.accept[0] == pytest.approx(0.5)  # a running mean while few rounds were seen
    # positions 2.. not observed yet take the observed mean (0.5), not the prior
    assert fresh.expected_tokens(3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_adaptive_policy_keys_verify_cost_by_tokens_verified():
    """A 6-node tree verifies 7 tokens for every depth k >= 2: all those rounds share one cost
    estimate, so a slow early round at k = 3 does not keep k = 3 looking expensive once k = 5
    rounds (same 7 tokens) measure it again."""
    pol = AdaptiveDraftLength(8, decay=0.9)  # forgets the slow round within the 40 rounds below
    pol.observe(1, 0, [0], 0.020, 0.0)  # plain round: 1 token
    pol.observe(1, 3, [3], 0.050, 0.003, verified_tokens=7)  # one slow round
    for _ in range(40):
        pol.observe(1, 5, [2], 0.022, 0.005, verified_tokens=7)
    assert pol.verified_tokens(B1, 3) == pol.verified_tokens(B1, 5) == 7
    assert pol._verify_time(B1, pol.verified_tokens(B1, 3)) == pytest.approx(0.022, rel=0.02)
    assert pol.verified_tokens(B1, 4) == 5  # never seen: assumed a chain (k + 1 tokens)
    assert pol._verify_time(B1, 5) == pytest.approx(0.020 + (0.022 - 0.020) * 4 / 6, rel=0.02)  # interpolated


def test_adaptive_policy_counts_a_fixed_cost_per_drafting_round():
    """Drafting costs per round, not only per token (the default model's drafter: 1.17 / 1.62 / 2.24
    ms for k = 1 / 2 / 4 against a 3.8 ms target step). Here drafting k tokens costs 3 + 0.5 k ms,
    a verify pass 10 + 0.5 (tokens - 1) ms, and each draft is accepted with probability 0.7: k = 4
    pays best (2.77 tokens in 17 ms), k = 1 barely (1.7 in 14). Rounds of k = 1 and k = 4 have
    been seen (explorations, rounds capped near the end of a sequence); priced per drafted token
    (a mean of 3.5 and 1.25 ms), k = 4 looked dear and the policy chose k = 2."""
    import random

    rnd = random.Random(0)
    pol = AdaptiveDraftLength(4, explore_every=0)
    for i in range(200):
        k = 1 if i % 2 else 4
        n = 0
        while n < k and rnd.random() < 0.7:
            n += 1
        pol.observe(1, k, [n], (10 + 0.5 * k) / 1000, (3 + 0.5 * k) / 1000)
    pol.observe(1, 0, [0], 0.010, 0.0)
    assert pol._draft_time(B1, 4) == pytest.approx(0.005) and pol._draft_time(B1, 1) == pytest.approx(0.0035)
    assert pol._draft_time(B1, 2) == pytest.approx(0.004)  # interpolated between the measured k
    assert pol.choose(1) == 4


def test_adaptive_policy_does_not_switch_drafting_off_on_its_first_rounds():
    """Regression (CI, the wheel test): the first round's draft was rejected and its verify, the
    first 5-token step, was slow (one-time costs); the policy chose plain decoding from round 3 on
    and, exploring every 16th round, never drafted again in a 32-token answer. Now the warm-up
    measurement is replaced by the next one and k = 0 needs min_observations rounds of evidence."""
    pol = AdaptiveDraftLength(4)
    assert pol.choose(1) == 4
    pol.observe(1, 4, [0], 0.021, 0.010)  # rejected, slow first verify and first drafting round
    assert pol.choose(1) == 0
    pol.observe(1, 0, [0], 0.012, 0.0)
    ks = []
    for _ in range(7):
        k = pol.choose(1)
        ks.append(k)
        pol.observe(1, k, [min(k, 1)], 0.012 + 0.0004 * k, 0.003 * k)  # now the first draft is accepted
    assert all(k >= 1 for k in ks), ks
    assert pol.verify[(B1, 5)] == pytest.approx(0.021)  # measured once so far: kept until a second comes
    pol.observe(1, 4, [1], 0.0136, 0.012)
    assert pol.verify[(B1, 5)] == pytest.approx(0.0136)  # the second replaces the warm-up measurement
    pol.observe(1, 4, [1], 0.0140, 0.012)
    assert pol.verify[(B1, 5)] == pytest.approx(0.0138)  # then a running mean
    # a drafter that keeps being rejected is switched off once min_observations rounds saw it
    bad = AdaptiveDraftLength(4, min_observations=8)
    ks = []
    for _ in range(12):
        k = bad.choose(1)
        ks.append(k)
        bad.observe(1, k, [0], 0.012 + 0.0004 * k, 0.003 * k)
    assert ks[-1] == 0 and sum(1 for k in ks if k) == 8, ks


def test_the_loop_reports_tokens_verified_per_round(target):
    """Chains verify k + 1 tokens, trees their node count + 1; the policy records both."""
    from mtpspec.decoding.mtp import MtpProposer, TreeShape

    seen = []

    class Recording(AdaptiveDraftLength):
        def observe(self, batch_size, k, accepted, verify_time, draft_time, verified_tokens=None):
            seen.append((k, verified_tokens))
            super().observe(batch_size, k, accepted, verify_time, draft_time, verified_tokens)

    ps = [torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(3)).tolist()]
    decode(target, [Request(ps[0] * 2, 24)], DraftPlan(NgramProposer(), Recording(4)))
    assert seen and all(n == k + 1 for k, n in seen)
    from drafter_helpers import random_drafter

    seen.clear()
    decode(target, [Request(ps[0], 24)],
           DraftPlan(MtpProposer(random_drafter(target, seed=1)), Recording(4), draft_tree=TreeShape(6, 1, 3)))
    assert {n for k, n in seen if k >= 2} == {7} and all(n == 4 for k, n in seen if k == 1)


def test_adaptive_policy_survives_rounds_capped_to_plain():
    """The loop may cap k (even to 0) near the end of a sequence: the policy must keep working."""
    pol = AdaptiveDraftLength(4)
    for _ in range(5):
        pol.choose(3)
        pol.observe(3, 0, [0, 0, 0], 0.01, 0.0)  # the loop ran plain rounds whatever was asked
    k = pol.choose(3)
    assert k >= 1
    pol.observe(3, k, [1, 0, 2], 0.012, 0.001 * k)
    for _ in range(20):
        k = pol.choose(3)
        assert 0 <= k <= 4
        pol.observe(3, k, [min(1, k)] * 3, 0.01 + 0.001 * k, 0.001 * k)


@pytest.mark.parametrize("kind", ["agree", "partial"])
def test_rows_with_different_budgets_finish_mid_round(target, kind):
    """A row that reaches its max_new_tokens while its drafts are still being accepted, and then
    sits out the rounds of a row with a larger budget, must stay inside the cache (regression: the
    finished row kept the positions of its cut-off tokens and overflowed the cache a round later)."""
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (20, 2, 9)]
    budgets = [12, 25, 3]  # row 0 sets the batch's length (32); rows 0 and 2 finish first
    ref = [decode(target, [Request(p, n)])[0].new_ids for p, n in zip(ps, budgets)]
    # the proposer knows each row's continuation well past its budget, so drafts keep being accepted
    full = [p + r for p, r in zip(ps, plain(target, ps, 40))]
    for k in (4, 7):
        proposer = ReferenceProposer(full, VOCAB, 0.0 if kind == "agree" else 0.3, seed=k)
        seqs = decode(target, [Request(p, n) for p, n in zip(ps, budgets)], DraftPlan(proposer, k))
        assert [s.new_ids for s in seqs] == ref


def test_default_policy_settles_on_one_k_at_batch_1():
    """At batch 1 a round is one 0/1 observation per draft position. The default estimates
    (averaged over ~50 rounds) settle on one K for a drafter of constant quality; with the old
    10-round averages (decay 0.9) the choice swung between K values round after round."""
    import random

    def modal_share(decay: float | None, seed: int) -> float:
        rnd = random.Random(seed)
        pol = AdaptiveDraftLength(8) if decay is None else AdaptiveDraftLength(8, decay=decay)
        ks = []
        for _ in range(300):
            k = pol.choose(1)
            n = 0
            while n < k and rnd.random() < 0.6:  # each draft accepted with probability 0.6
                n += 1
            pol.observe(1, k, [n], (20 + 1.0 * k) / 1000, 0.8 * k / 1000)
            ks.append(k)
        tail = ks[100:]
        return max(tail.count(k) for k in set(tail)) / len(tail)

    settled = [modal_share(None, s) for s in range(8)]
    swinging = [modal_share(0.9, s) for s in range(8)]
    assert min(settled) >= 0.65 and sum(settled) / 8 >= 0.85  # exploration rounds aside, one K
    assert sum(swinging) / 8 < sum(settled) / 8 - 0.1


def test_acceptance_estimates_count_rows_not_rounds():
    """A round of 4 rows is 4 observations: it moves the estimate as 4 one-row rounds do (in the
    running-mean phase exactly), so batches adapt as fast as before while batch 1 averages over
    ~50 rounds."""
    batched, single = AdaptiveDraftLength(8), AdaptiveDraftLength(8)
    batched.observe(4, 1, [1, 1, 0, 0], 0.02, 0.001)
    for n in (1, 1, 0, 0):
        single.observe(1, 1, [n], 0.02, 0.001)
    assert batched.seen[0] == single.seen[0] == 4
    assert batched.accept[0] == pytest.approx(single.accept[0]) == pytest.approx((0.7 * 2 + 2) / 6)


@pytest.mark.parametrize("kind", ["ngram", "mtp-chain", "mtp-tree", "mtp-lookup", "random-sampling"])
def test_a_seeded_row_alone_equals_the_same_row_in_a_mixed_batch(target, kind):
    """The loop's promise: a seeded sampled row draws the same tokens whatever else is in the batch
    (greedy and sampled rows, other prompt lengths and budgets, joining later through continuous
    batching), given a fixed draft length and proposal kind. Regression: rounds were shortened to
    the longest remaining budget in the batch, so a row's last rounds drew different numbers of
    random values alone and in a batch."""
    from drafter_helpers import random_drafter
    from mtpspec.decoding.lookup import PromptLookupProposer
    from mtpspec.decoding.mtp import MtpProposer, TreeShape

    g = torch.Generator().manual_seed(21)
    ps = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 12, 5, 9)]
    params = [SamplingParams(0.9, seed=11), SamplingParams(), SamplingParams(1.2, top_k=20, seed=5),
              SamplingParams(0.7, top_p=0.9, seed=9), SamplingParams(1.0, seed=3)]
    budgets = [13, 30, 9, 22, 17]
    proposer = {
        "ngram": lambda: NgramProposer(),
        "mtp-chain": lambda: MtpProposer(random_drafter(target, seed=3)),
        "mtp-tree": lambda: MtpProposer(random_drafter(target, seed=3)),
        "mtp-lookup": lambda: PromptLookupProposer(MtpProposer(random_drafter(target, seed=3))),
        "random-sampling": lambda: RandomSamplingProposer(VOCAB),
    }[kind]()
    # a fixed K and a tree (or chain) at every round: the same proposal kind alone and in a batch
    plan = DraftPlan(proposer, 3, draft_tree=TreeShape(6, 2, 2) if kind == "mtp-tree" else None)
    reqs = [Request(p, n, q) for p, n, q in zip(ps, budgets, params)]
    alone = [decode(target, [r], plan)[0].new_ids for r in reqs]
    assert len({tuple(a) for a in alone}) == len(alone)
    for slots in (None, 2):
        together = decode(target, reqs, plan, slots=slots)
        assert [s.new_ids for s in together] == alone, f"slots={slots}"


class HiddenStateCheck:
    """Wraps a proposer and checks, every round, what it is given to draft from: for each active
    row, `last_hidden` must be the target's final hidden state at the position of the row's last
    accepted token's predecessor (the position whose logits produced the pending token), as a
    fresh forward over the row's history computes it."""

    def __init__(self, inner):
        self.inner, self.rounds = inner, 0
        self.drafts_trees = getattr(inner, "drafts_trees", False)

    def max_tokens(self, k: int, tree=None) -> int:
        if not hasattr(self.inner, "max_tokens"):
            return k
        return self.inner.max_tokens(k) if tree is None else self.inner.max_tokens(k, tree)

    def propose(self, inp, k, tree=None):
        for b, (hist, active) in enumerate(zip(inp.history, inp.active)):
            if active:
                fresh = inp.target(torch.tensor([hist[:-1]]), inp.target.new_cache(1, len(hist))).hidden[0, -1]
                torch.testing.assert_close(inp.last_hidden[b], fresh, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"row {b}, history {len(hist)}: {m}")
        self.rounds += 1
        return self.inner.propose(inp, k) if tree is None else self.inner.propose(inp, k, tree)


@pytest.mark.parametrize("kind", ["reference", "random-sampling", "mtp-chain", "mtp-tree", "mtp-lookup"])
def test_drafters_get_the_targets_hidden_state_at_the_last_accepted_position(target, kind):
    """Greedy and sampled rows of different lengths, drafts partly accepted, chains and trees."""
    from drafter_helpers import copying_drafter
    from mtpspec.decoding.lookup import PromptLookupProposer
    from mtpspec.decoding.mtp import MtpProposer, TreeShape

    ps = prompts(4, seed=8)
    params = [SamplingParams(), SamplingParams(0.8, seed=1), SamplingParams(), SamplingParams(1.0, seed=2)]
    full = [p + r for p, r in zip(ps, plain(target, ps, 30))]
    inner = {
        "reference": lambda: ReferenceProposer(full, VOCAB, 0.4, seed=3),
        "random-sampling": lambda: RandomSamplingProposer(VOCAB),
        "mtp-chain": lambda: MtpProposer(copying_drafter(target).prepare()),
        "mtp-tree": lambda: MtpProposer(copying_drafter(target).prepare()),
        "mtp-lookup": lambda: PromptLookupProposer(MtpProposer(copying_drafter(target).prepare())),
    }[kind]()
    if kind == "reference":
        params = [SamplingParams()] * 4  # the reference continuation is the greedy one
    check = HiddenStateCheck(inner)
    plan = DraftPlan(check, 3, draft_tree=TreeShape(6, 2, 2) if kind == "mtp-tree" else None)
    seqs = decode(target, [Request(p, 20, q) for p, q in zip(ps, params)], plan)
    assert check.rounds >= 5 and any(s.stats.mean_accepted_length > 1 for s in seqs)


def test_batch_sizes_one_and_two_keep_their_own_costs():
    """A verify pass of two rows costs ~1.5x one row's on the default model: batch 1 and batch 2
    must not share cost estimates (they did: both fell in one bucket), nor 3 with 5."""
    pol = AdaptiveDraftLength(4)
    pol.observe(1, 0, [0], 0.004, 0.0)
    pol.observe(2, 0, [0, 0], 0.006, 0.0)
    pol.observe(3, 0, [0] * 3, 0.008, 0.0)
    pol.observe(5, 0, [0] * 5, 0.010, 0.0)
    costs = {b: pol._verify_time(_bucket(b), 1) for b in (1, 2, 3, 4, 5, 8)}
    assert costs == {1: 0.004, 2: 0.006, 3: 0.008, 4: 0.008, 5: 0.010, 8: 0.010}


def _drafting_gaps(pol, batch: int, accepted: list[int], cost) -> tuple[list[int], list[int]]:
    """600 rounds of `pol` at `batch`, a drafting round accepting `accepted` per row and costing
    cost(k) = (verify, draft) seconds: the rounds that drafted, and the gaps between those after
    the warm-up (a drafting round, then min_observations)."""
    drafted = []
    for r in range(1, 601):
        k = pol.choose(batch)
        if k:
            drafted.append(r)
        pol.observe(batch, k, accepted if k else [0] * batch, *cost(k))
    late = [r for r in drafted if r >= 16]
    return drafted, [b - a for a, b in zip(late, late[1:])]


def test_an_exploring_round_that_does_not_pay_keeps_exploration_rare_in_a_batch():
    """At batch 4 one row of four accepting its draft is not a sign that drafting pays: a round
    costing twice a plain one for 1.25 tokens per row must let the exploring interval keep doubling
    (counting any accepted draft as success explored every 16th round, ~2.5% of a batch's time);
    a round that pays for itself brings exploration back to every 16 rounds."""
    pol = AdaptiveDraftLength(4, explore_every=16, min_observations=4)
    _, gaps = _drafting_gaps(pol, 4, [1, 0, 0, 0], lambda k: (0.008 + 0.005 * k, 0.003 * k))
    assert gaps[:4] == [32, 64, 128, 128] and set(gaps[3:]) == {128}, gaps
    pol = AdaptiveDraftLength(4, explore_every=16, min_observations=4)
    for r in range(40):
        k = pol.choose(4)
        pol.observe(4, k, [0] * 4, 0.008 + 0.005 * k, 0.003 * k)  # drafting off, exploring
    while not pol.exploring:
        pol.observe(4, 0, [0] * 4, 0.008, 0.0)
        k = pol.choose(4)
    assert pol.explore_gap > 16
    pol.observe(4, k, [k] * 4, 0.008 + 0.001 * k, 0.0005 * k)  # every row accepted, a cheap round: it paid
    assert pol.explore_gap == 16


def test_adaptive_policy_explores_less_while_drafting_stays_off_and_recovers():
    """Exploring rounds (k = 1 while the policy would not draft) come every `explore_every` rounds
    at first, then at doubling intervals up to 8x while drafting keeps losing; once the drafter is
    accepted again the policy drafts and explores every `explore_every` rounds again."""
    pol = AdaptiveDraftLength(4, explore_every=16, min_observations=4)
    # a drafter that is always rejected
    drafted, gaps = _drafting_gaps(pol, 1, [0], lambda k: (0.012 + 0.004 * k, 0.004 * k))
    assert gaps[:4] == [32, 64, 128, 128] and set(gaps[3:]) == {128}, gaps
    assert len(drafted) < 20  # every 16th round would have drafted ~37 times
    first = None
    for r in range(400):  # the drafter starts to be accepted: exploring finds it, then it drafts
        k = pol.choose(1)
        pol.observe(1, k, [k], 0.012 + 0.0004 * k, 0.0005 * k)
        if k and first is None:
            first = r
    assert first is not None and first <= 128 and pol.explore_gap == 16
    assert pol.choose(1) >= 1  # drafting pays again and is on
