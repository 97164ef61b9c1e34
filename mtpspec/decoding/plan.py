"""The drafting plan: every decision about how to draft is made here.

- Which drafter (`resolve_drafter`): "auto" means the MTP drafter shipped with mtpspec for this
  model if there is one (only the default model has one), else plain decoding. n-gram drafting and
  other drafters are used only when named.
- How many tokens per round (`DraftPlan.draft_tokens`): a fixed K, or adaptive
  (draft_length.py), with one learned state for rounds of greedy rows and one for rounds with
  sampled rows (they accept differently), and per kind of round when the proposer tells kinds
  apart before drafting (`round_kind`: prompt lookup's rounds drafted by lookup vs by the drafter
  accept and cost very differently), kept for the plan's lifetime (across calls). The verify
  pass costs the same for every kind, so the kinds share one table of verify costs.
- Each round (`DraftPlan.decide`), from the state of the batch: K, and whether to draft a tree
  (which `TreeShape`) or a chain.

Proposers (proposers.py, mtp.py) are mechanism only: `propose(inp, k, tree)` drafts what it is
asked for. The decoding loop (loop.py) asks `decide` before every round and reports the round's
outcome to `observe`. An `Engine` (api.py) holds one plan; the server's scheduler uses the
engine's plan.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .draft_length import AdaptiveDraftLength, CostTable, DraftLengthPolicy, FixedDraftLength
from .sampling import SamplingParams
from .tree import TreeShape

if TYPE_CHECKING:
    from .proposers import Proposer

AUTO_TREE = TreeShape(6, 1, 3)
"""The tree `draft_tree="auto"` drafts with an MTP drafter while exactly one SAMPLED sequence
decodes: 6 nodes, the best node of each level expanded into its 3 best children. A sampled row's
walk down the tree draws the target's token at every node and a runner-up child can hold it, so
it accepts more than a chain. Greedy rows and batches draft chains: there the tree's extra
verified tokens cost more than they gain (measured on CPU; README, Performance)."""

# package data (mtpspec/drafters/), so it ships in the wheel and is found wherever mtpspec is installed
SHIPPED_DRAFTER = Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-instruct"


def shipped_drafter() -> Path | None:
    """The trained drafter for the default model that ships with the package (package data), if present."""
    return SHIPPED_DRAFTER if (SHIPPED_DRAFTER / "config.json").exists() else None


def resolve_drafter(model: str | Path | None, drafter: str | Path | None) -> str | None:
    """The drafter to load for `model` (None = the default model): None, "" or "none" -> None
    (plain decoding); "auto" -> the MTP drafter shipped with mtpspec for this model if there is
    one (mtpspec/drafters/smollm2-135m-instruct, for the default model), else None (plain
    decoding); anything else ("ngram" or a drafter folder) as given."""
    if drafter in (None, "", "none"):
        return None
    if drafter == "auto":
        shipped = shipped_drafter() if model is None else None
        return None if shipped is None else str(shipped)
    return str(drafter)


def check_draft_tokens(k) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise InputError(f"draft_tokens must be an integer >= 0 (0 = plain decoding), got {k!r}")


@dataclass(frozen=True)
class Round:
    """One round's decision: draft k tokens deep (0 = a plain decoding round), as a tree of this
    shape or (tree=None) a chain. `policy` chose k and learns from the round's outcome (None:
    nothing to learn)."""

    k: int
    tree: TreeShape | None = None
    policy: DraftLengthPolicy | None = None


class DraftPlan:
    """How a batch drafts: a proposer (None: plain decoding), a draft-length policy and a tree rule.

    draft_tokens: a fixed K (0 = plain decoding); None = adaptive, up to `max_draft_tokens`
        (default: twice the K the drafter was trained for, or 8), from measured acceptance and
        costs; or a `DraftLengthPolicy` object, asked every round as it is (tests and benchmarks
        that measure one policy; no greedy/sampled split, no seeded-row rule).
    draft_tree: None or "none" = chains; "auto" = `AUTO_TREE` while exactly one sampled row
        decodes, chains otherwise (chains always for a proposer that cannot draft trees); a
        `TreeShape` or "NODES:BEAM:BRANCH" = that tree every round (needs an MTP drafter).

    The per-round rules are `decide`'s. The plan's adaptive state is shared by every batch that
    uses the plan (one batch at a time: it is not locked).
    """

    def __init__(
        self,
        proposer: "Proposer | None" = None,
        draft_tokens: "int | DraftLengthPolicy | None" = None,
        *,
        draft_tree: "str | TreeShape | None" = "auto",
        max_draft_tokens: int | None = None,
    ) -> None:
        if draft_tokens is not None and not hasattr(draft_tokens, "choose"):
            check_draft_tokens(draft_tokens)
        if max_draft_tokens is not None and (not isinstance(max_draft_tokens, int) or max_draft_tokens < 1):
            raise InputError(f"max_draft_tokens must be an integer >= 1, got {max_draft_tokens!r}")
        self.proposer = proposer
        self.draft_tokens = draft_tokens
        self.max_draft_tokens = max_draft_tokens or 2 * (getattr(proposer, "draft_tokens", None) or 4)
        self.tree, self.tree_only_lone_sampled = self._tree_rule(draft_tree, proposer)
        self._adaptive: dict[tuple, AdaptiveDraftLength] = {}  # (all rows greedy?, round kind) -> state
        self._verify_costs: dict[bool, CostTable] = {}  # all rows greedy? -> the verify table its kinds share

    @staticmethod
    def _tree_rule(draft_tree, proposer) -> tuple[TreeShape | None, bool]:
        if draft_tree is None or draft_tree == "none":
            return None, False
        can = bool(getattr(proposer, "drafts_trees", False))
        if draft_tree == "auto":
            return (AUTO_TREE, True) if can else (None, False)
        shape = TreeShape.parse(draft_tree)
        if not can:
            raise InputError("a draft tree needs an MTP drafter (plain decoding and n-gram drafting have none)")
        return shape, False

    # ---- derived plans -------------------------------------------------------------------------
    def with_draft_tokens(self, k: int | None) -> "DraftPlan":
        """This plan with a fixed K (0 = plain decoding); None = this plan itself (its own K, or
        adaptive with its learned state)."""
        if k is None:
            return self
        check_draft_tokens(k)
        plan = copy.copy(self)
        plan.draft_tokens = k
        return plan

    def with_proposer(self, proposer: "Proposer | None") -> "DraftPlan":
        """The same settings around another proposer, with fresh adaptive state."""
        plan = copy.copy(self)
        plan.proposer = proposer
        if not getattr(proposer, "drafts_trees", False):
            plan.tree, plan.tree_only_lone_sampled = None, False
        plan._adaptive, plan._verify_costs = {}, {}
        return plan

    # ---- what a batch needs to know ------------------------------------------------------------
    @property
    def speculative(self) -> bool:
        return self.proposer is not None and self.draft_tokens != 0

    @property
    def max_k(self) -> int:
        """The deepest round this plan can ask for."""
        if not self.speculative:
            return 0
        d = self.draft_tokens
        return self.max_draft_tokens if d is None else d if isinstance(d, int) else d.max_k

    @property
    def seeded_draft_tokens(self) -> int:
        """The fixed K of adaptive plans for rounds with a seeded sampled row (`decide`)."""
        return self.max_draft_tokens // 2 or 1

    def max_tokens(self) -> int:
        """The most tokens per row a round drafts (the room a batch's cache reserves)."""
        k = self.max_k
        if k == 0:
            return 0
        room = getattr(self.proposer, "max_tokens", None)
        if room is None:  # a proposer without max_tokens drafts chains
            return k
        return room(k, self.tree) if self.tree is not None else room(k)

    # ---- each round ----------------------------------------------------------------------------
    def round_kind(self, history: list[list[int]], active: list[bool]):
        """The proposer's kind of the coming round (`proposer.round_kind(history, active)`, e.g.
        "lookup" / "drafter" for `PromptLookupProposer`), or None if it does not tell kinds apart.
        Only adaptive plans ask (the loop passes the result to `decide`)."""
        ask = getattr(self.proposer, "round_kind", None)
        if ask is None or not self.speculative or self.draft_tokens is not None:
            return None
        return ask(history, active)

    def decide(self, params: list[SamplingParams], remaining: list[int], kind=None) -> Round:
        """K and tree-or-chain for a round of the active rows (their sampling parameters and how
        many tokens each may still emit):

        1. No proposer (or draft_tokens=0): a plain round.
        2. K: the fixed K; a given policy's choice; adaptive: if a row samples with a seed, the
           fixed `seeded_draft_tokens` (an adaptive K follows timings, and a sampled row's random
           draws depend on K, so the seeded request would not reproduce), else the choice of the
           greedy state (all rows greedy) or of the sampled state, for this `kind` of round
           (`round_kind`).
        3. All rows greedy: K is capped by the largest remaining budget (a sampled row's draws
           depend on K, so its K must not depend on other rows' budgets).
        4. A tree if K > 0 and the plan has one: every round, or ("auto") only while exactly one
           row decodes and it samples; else a chain.
        """
        if not self.speculative:
            return Round(0)
        greedy = all(p.greedy for p in params)
        policy = self._length_policy(params, greedy, kind)
        k = policy.choose(len(params))
        if greedy:
            k = min(k, max(remaining))
        tree = self.tree
        if k == 0 or (self.tree_only_lone_sampled and (len(params) != 1 or greedy)):
            tree = None
        return Round(k, tree, policy)

    def _length_policy(self, params: list[SamplingParams], greedy: bool, kind=None) -> DraftLengthPolicy:
        d = self.draft_tokens
        if isinstance(d, int):
            return FixedDraftLength(d)
        if d is not None:
            return d
        if any(not p.greedy and p.seed is not None for p in params):
            return FixedDraftLength(self.seeded_draft_tokens)
        if (greedy, kind) not in self._adaptive:
            # one verify table for every kind of round: a verify pass costs the same whoever drafted
            costs = self._verify_costs.setdefault(greedy, CostTable())
            self._adaptive[(greedy, kind)] = AdaptiveDraftLength(self.max_draft_tokens, verify_costs=costs)
        return self._adaptive[(greedy, kind)]

    def adaptive_state(self, greedy: bool, kind=None) -> AdaptiveDraftLength | None:
        """The learned adaptive state for rounds of greedy rows (or with sampled rows) of this
        kind (`round_kind`), if any yet."""
        return self._adaptive.get((greedy, kind))

    def observe(self, rnd: Round, batch_size: int, accepted: list[int], verify_time: float, draft_time: float,
                verified_tokens: int) -> None:
        """A round's outcome (`DraftLengthPolicy.observe`), for the policy that chose its K."""
        if rnd.policy is not None:
            rnd.policy.observe(batch_size, rnd.k, accepted, verify_time, draft_time, verified_tokens=verified_tokens)
