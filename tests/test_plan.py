"""The drafting plan's decisions (mtpspec/decoding/plan.py): which drafter "auto" means, the draft
length (fixed, adaptive with separate greedy and sampled state, the seeded-row rule, the greedy
budget cap), tree or chain each round, and the cache room a batch reserves. No model needed: the
plan only sees the rows' sampling parameters and budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtpspec.decoding import plan as plan_module
from mtpspec.decoding.draft_length import AdaptiveDraftLength, FixedDraftLength
from mtpspec.decoding.plan import AUTO_TREE, DraftPlan, Round, resolve_drafter
from mtpspec.decoding.proposers import NgramProposer
from mtpspec.decoding.sampling import SamplingParams
from mtpspec.decoding.tree import TreeShape
from mtpspec.errors import InputError

GREEDY = SamplingParams()
SAMPLED = SamplingParams(0.8)
SEEDED = SamplingParams(0.8, seed=1)


class TreeDrafter:
    """Stands for an MTP proposer: can draft trees, trained for K = 3."""

    drafts_trees = True
    draft_tokens = 3

    def max_tokens(self, k: int, tree: TreeShape | None = None) -> int:
        return k if tree is None else max(k, tree.max_nodes(k))

    def propose(self, inp, k, tree=None):
        raise AssertionError("the plan never drafts")


# ---- which drafter ---------------------------------------------------------------------------------


def test_auto_means_the_shipped_drafter_for_the_default_model_else_plain(monkeypatch, tmp_path):
    monkeypatch.setattr(plan_module, "shipped_drafter", lambda: tmp_path)
    assert resolve_drafter(None, "auto") == str(tmp_path)
    assert resolve_drafter("my-model", "auto") is None  # no drafter ships for another model: plain, never n-gram
    monkeypatch.setattr(plan_module, "shipped_drafter", lambda: None)
    assert resolve_drafter(None, "auto") is None  # the package without its drafter: plain
    for plain in (None, "", "none"):
        assert resolve_drafter(None, plain) is None
    assert resolve_drafter("m", "ngram") == "ngram" and resolve_drafter("m", Path("d")) == "d"


# ---- plain plans -----------------------------------------------------------------------------------


def test_a_plan_without_a_proposer_or_with_k_0_decodes_plainly():
    for plan in (DraftPlan(), DraftPlan(None, 4), DraftPlan(TreeDrafter(), 0), DraftPlan(TreeDrafter()).with_draft_tokens(0)):
        assert plan.decide([SAMPLED], [10]) == Round(0)
        assert plan.max_k == 0 and plan.max_tokens() == 0 and not plan.speculative


@pytest.mark.parametrize("bad", [-1, True, 1.5, "4"])
def test_draft_tokens_must_be_an_integer_at_least_0(bad):
    with pytest.raises(InputError, match="draft_tokens must be an integer >= 0"):
        DraftPlan(TreeDrafter(), bad)
    with pytest.raises(InputError, match="draft_tokens must be an integer >= 0"):
        DraftPlan().with_draft_tokens(bad)  # checked for plain engines too


# ---- the draft length ------------------------------------------------------------------------------


def test_fixed_k_is_capped_by_the_budget_only_when_every_row_is_greedy():
    plan = DraftPlan(NgramProposer(), 5)
    assert plan.decide([GREEDY], [9]).k == 5
    assert plan.decide([GREEDY, GREEDY], [2, 1]).k == 2  # the largest remaining budget
    # a sampled row's draws depend on K: other rows' budgets must not change it
    assert plan.decide([GREEDY, SEEDED], [1, 1]).k == 5
    assert plan.decide([SAMPLED], [1]).k == 5
    assert plan.max_k == 5 and plan.max_tokens() == 5


def test_adaptive_keeps_one_state_for_greedy_rounds_and_one_for_sampled_rounds():
    plan = DraftPlan(TreeDrafter(), draft_tree=None)
    assert plan.max_draft_tokens == 6  # twice the K the drafter was trained for
    assert DraftPlan(NgramProposer()).max_draft_tokens == 8 and DraftPlan(NgramProposer(), max_draft_tokens=3).max_k == 3
    g = plan.decide([GREEDY, GREEDY], [50, 50])
    s = plan.decide([GREEDY, SAMPLED], [50, 50])  # any sampled row: the sampled state
    assert isinstance(g.policy, AdaptiveDraftLength) and isinstance(s.policy, AdaptiveDraftLength)
    assert g.policy is not s.policy
    assert plan.adaptive_state(greedy=True) is g.policy and plan.adaptive_state(greedy=False) is s.policy
    assert plan.decide([GREEDY], [50]).policy is g.policy  # kept across rounds (and calls)
    assert g.policy.max_k == 6 and plan.max_k == 6


def test_kinds_of_round_share_one_verify_table():
    """A verify pass costs the same whoever drafted its tokens: prompt lookup's state chooses from
    the 3-token verifies the drafter's rounds measured, not from its own single slow one (kept
    apart, that one 17 ms measurement stopped lookup rounds from ever choosing k = 2 again)."""
    plan = DraftPlan(NgramProposer(), draft_tree=None)
    drafter = plan.decide([GREEDY], [50], kind="drafter").policy
    lookup = plan.decide([GREEDY], [50], kind="lookup").policy
    assert drafter is not lookup and drafter.verify is lookup.verify and drafter.draft is not lookup.draft
    assert plan.decide([SAMPLED], [50], kind="lookup").policy.verify is not lookup.verify  # sampled apart
    # lookup rounds: drafting 0.2 ms, one slow 3-token verify (a one-off), 4- and 5-token ones
    for k, seconds in ((2, 0.017), (4, 0.0128), (4, 0.0128), (3, 0.0118), (3, 0.0118)):
        plan.observe(Round(k, None, lookup), 1, [0], seconds, 0.0002, k + 1)
    for _ in range(20):  # the drafter's rounds: plain steps and many 3-token verifies
        plan.observe(Round(0, None, drafter), 1, [0], 0.0089, 0.0, 1)
        plan.observe(Round(2, None, drafter), 1, [1], 0.0093, 0.002, 3)
    assert lookup.verify[(0, 3)] == pytest.approx(0.0093)
    # lookup's acceptance as measured on the broad benchmark: E(k) / T(k) is best at k = 2
    # (with the 17 ms estimate: at k = 4 or 5)
    lookup.accept[:4], lookup.seen[:4] = [0.57, 0.75, 0.76, 0.85], [50] * 4
    assert lookup.choose(1) == 2


def test_a_seeded_sampled_row_makes_the_round_fixed_k_and_teaches_nothing():
    """An adaptive K follows timings; a sampled row's random draws depend on K, so a seeded
    request would not reproduce: such rounds draft the fixed max_draft_tokens // 2."""
    plan = DraftPlan(TreeDrafter(), draft_tree=None)
    for rows in ([SEEDED], [GREEDY, SEEDED], [SAMPLED, SEEDED]):
        rnd = plan.decide(rows, [50] * len(rows))
        assert rnd.k == plan.seeded_draft_tokens == 3 and isinstance(rnd.policy, FixedDraftLength)
        plan.observe(rnd, len(rows), [3] * len(rows), 0.01, 0.001, 4)
    assert plan.adaptive_state(True) is None and plan.adaptive_state(False) is None
    assert DraftPlan(NgramProposer(), max_draft_tokens=1).seeded_draft_tokens == 1
    assert DraftPlan(NgramProposer(), 2).decide([SEEDED], [50]).k == 2  # a fixed K stays that K


def test_observe_teaches_the_state_that_chose_k():
    plan = DraftPlan(NgramProposer())
    rnd = plan.decide([SAMPLED], [50])
    before = rnd.policy.rounds, list(rnd.policy.seen)
    plan.observe(rnd, 1, [rnd.k], 0.02, 0.001 * rnd.k, rnd.k + 1)
    assert rnd.policy.seen[0] == before[1][0] + 1 and plan.adaptive_state(greedy=True) is None


def test_a_given_policy_is_asked_every_round_as_it_is():
    seen = []

    class Recording(AdaptiveDraftLength):
        def choose(self, batch_size):
            seen.append(batch_size)
            return 2

    policy = Recording(4)
    plan = DraftPlan(NgramProposer(), policy)
    for rows in ([GREEDY], [SEEDED, SAMPLED], [SAMPLED, GREEDY, GREEDY]):  # no seeded rule, no greedy/sampled split
        rnd = plan.decide(rows, [50] * len(rows))
        assert rnd.policy is policy and rnd.k == 2
    assert seen == [1, 2, 3] and plan.max_k == 4


# ---- tree or chain ---------------------------------------------------------------------------------


def test_auto_tree_only_while_one_sampled_row_decodes():
    plan = DraftPlan(TreeDrafter(), 3)  # draft_tree="auto"
    assert plan.tree == AUTO_TREE and plan.tree_only_lone_sampled
    assert plan.decide([SAMPLED], [50]).tree == AUTO_TREE
    assert plan.decide([SEEDED], [50]).tree == AUTO_TREE
    assert plan.decide([GREEDY], [50]).tree is None  # greedy rows: chains
    assert plan.decide([SAMPLED, SAMPLED], [50, 50]).tree is None  # batches: chains
    assert plan.decide([SAMPLED, GREEDY], [50, 50]).tree is None
    assert plan.max_tokens() == TreeDrafter().max_tokens(3, AUTO_TREE) == 6  # room for the tree


def test_a_fixed_tree_every_round_and_none_when_k_is_0():
    shape = TreeShape(8, 2, 3)
    plan = DraftPlan(TreeDrafter(), 3, draft_tree="8:2:3")
    assert plan.tree == shape and not plan.tree_only_lone_sampled
    for rows in ([GREEDY], [SAMPLED], [GREEDY, SAMPLED, GREEDY]):
        assert plan.decide(rows, [50] * len(rows)).tree == shape
    assert plan.max_tokens() == 8
    zero = DraftPlan(TreeDrafter(), FixedDraftLength(0), draft_tree=shape).decide([GREEDY], [50])
    assert zero.k == 0 and zero.tree is None  # a plain round verifies no tree
    capped = DraftPlan(TreeDrafter(), 3, draft_tree=shape).decide([GREEDY], [1])
    assert capped.k == 1 and capped.tree == shape  # a one-level tree


def test_chains_only_without_a_tree_drafter():
    for tree in (None, "none"):
        assert DraftPlan(TreeDrafter(), 3, draft_tree=tree).decide([SAMPLED], [50]).tree is None
    assert DraftPlan(NgramProposer(), 3).decide([SAMPLED], [50]).tree is None  # "auto" with n-gram: chains
    for proposer in (None, NgramProposer()):
        with pytest.raises(InputError, match="needs an MTP drafter"):
            DraftPlan(proposer, 3, draft_tree="6:1:3")
    with pytest.raises(InputError, match="NODES or NODES:BEAM:BRANCH"):
        DraftPlan(TreeDrafter(), 3, draft_tree="6:x")


# ---- derived plans ---------------------------------------------------------------------------------


def test_derived_plans():
    plan = DraftPlan(TreeDrafter(), draft_tree="5:1:2")
    learned = plan.decide([GREEDY], [50]).policy
    assert plan.with_draft_tokens(None) is plan  # the engine's own plan, learned state included
    fixed = plan.with_draft_tokens(2)
    assert fixed.draft_tokens == 2 and fixed.tree == plan.tree and plan.draft_tokens is None
    assert fixed.decide([GREEDY], [50]).k == 2
    other = plan.with_proposer(TreeDrafter())
    assert other.tree == plan.tree and other.decide([GREEDY], [50]).policy is not learned  # fresh state
    assert plan.with_proposer(NgramProposer()).tree is None  # n-gram drafts chains

