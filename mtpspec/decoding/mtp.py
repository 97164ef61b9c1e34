"""`MtpProposer`: drafts with an MTP drafter (models/drafter.py) behind the `Proposer` interface.

Per round: one attention context over the target cache (each row at its own length, constant
position), then k autoregressive drafter steps, batched over rows. Greedy rows draft the argmax;
sampled rows draw from `probabilities(drafter_logits, params)` (temperature / top-k / top-p applied
exactly as on the target side) with the row's own generator, and that distribution is returned
for rejection sampling. The target cache is only read.

With a `TreeShape`, rows get a draft tree instead of a chain (tree.py), grown as
EAGLE-2 does (Li et al. 2024): at depth 1 the drafter's `branch` most likely tokens; at each next
depth the `beam` nodes of the previous depth with the highest path probability (product of the
drafter's probabilities along the path) are expanded, all in one drafter call (the drafter has no
KV cache of its own, so a branch costs one more query row, nothing else), each into its `branch`
most likely children; finally the `nodes` candidates with the highest path probability are kept.
A node's path probability is below its parent's, so the kept set contains every kept node's
ancestors. The tree's tokens are deterministic for greedy and sampled rows alike (tree.py
verifies sampled rows by drawing from the target at each node of the walk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..models.drafter import MTPDrafter
from .proposers import DraftInput, Proposal
from .sampling import probabilities


@dataclass(frozen=True)
class TreeShape:
    """A draft tree's budget: `nodes` tokens verified per row and round, grown by expanding the
    `beam` best nodes of each depth into their `branch` best children (module docstring)."""

    nodes: int
    beam: int = 4
    branch: int = 4

    def __post_init__(self) -> None:
        for name in ("nodes", "beam", "branch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"draft tree {name} must be an integer >= 1, got {v!r}")

    def candidates(self, depth: int) -> int:
        """An upper bound on the candidates grown for `depth` levels (before keeping `nodes`)."""
        return self.branch + (depth - 1) * self.beam * self.branch if depth else 0

    def __str__(self) -> str:
        return f"{self.nodes}:{self.beam}:{self.branch}"

    @staticmethod
    def parse(text: "str | TreeShape") -> "TreeShape":
        """'N' (N nodes, beam = branch = 4) or 'N:BEAM:BRANCH', e.g. '16:4:4'."""
        if isinstance(text, TreeShape):
            return text
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3:
            raise InputError(f"draft tree must be NODES or NODES:BEAM:BRANCH (integers), got {text!r}")
        return TreeShape(*parts)


AUTO_TREE = TreeShape(6, 1, 3)
"""The tree `mtpspec.load(draft_tree="auto")` drafts with an MTP drafter for one SAMPLED
sequence: 6 nodes, the best node of each level expanded into its 3 best children. Greedy
sequences and batches draft chains. Measured on our 2-core CPU (spec bench, batch 1, held-out
chat): sampled rows accept far more with this tree (1.53-1.59 tokens per round against 1.31-1.36
for adaptive chains; 1.24-1.27x against 1.10-1.14x in four runs), because the walk down the tree
draws the target's token at every node and a runner-up child can hold it. Greedy rows used it too
while drafting cost ~1 ms per level; since the drafter layer runs as one C++ call, greedy chains
cost less per round than the tree's two extra verified tokens and top-k bookkeeping are worth: K=4
chains beat the K=4 tree in both runs of the sixth session (1.80x against 1.77x, 1.79x against
1.69x), adaptive chains the adaptive tree (1.80x against 1.63x). At larger batches the wider
verification does not pay."""


class MtpProposer:
    """Proposer backed by an `MTPDrafter` (check it against the target first: `load_drafter`
    does, or `drafter.check_target(target.cfg)`); `tree` makes it draft trees."""

    def __init__(self, drafter: MTPDrafter, tree: TreeShape | None = None, tree_max_batch: int | None = None,
                 tree_sampled: bool = True, tree_greedy: bool = True) -> None:
        """tree_max_batch: draft trees only while at most this many rows are active (None: any
        number); bigger batches draft chains (a tree multiplies the tokens each row verifies).
        tree_sampled=False: batches with a sampled row draft chains; tree_greedy=False: batches of
        greedy rows only draft chains (see `AUTO_TREE` for what we measured)."""
        self.drafter = drafter
        self.tree = tree
        self.tree_max_batch = tree_max_batch
        self.tree_sampled = tree_sampled
        self.tree_greedy = tree_greedy

    def max_tokens(self, k: int) -> int:
        return k if self.tree is None else max(k, min(self.tree.nodes, self.tree.candidates(k)))

    @torch.inference_mode()
    def propose(self, inp: DraftInput, k: int) -> Proposal:
        if self.tree is not None and k > 0 and (self.tree_max_batch is None or sum(inp.active) <= self.tree_max_batch):
            sampled = any(not p.greedy for p, a in zip(inp.params, inp.active) if a)
            if self.tree_sampled if sampled else self.tree_greedy:
                return self._propose_tree(inp, k, self.tree)
        d, target = self.drafter, inp.target
        b = inp.last_tokens.shape[0]
        dev = inp.last_tokens.device
        tokens = torch.zeros(b, k, dtype=torch.long, device=dev)
        sampled = [not p.greedy and a for p, a in zip(inp.params, inp.active)]
        probs = torch.zeros(b, k, d.cfg.vocab_size, device=dev) if any(sampled) else None
        if k == 0:
            return Proposal(tokens, probs)
        ctx = d.context(target.cfg, inp.cache)
        tok, hidden = inp.last_tokens, inp.last_hidden
        for i in range(k):
            s, hidden = d.step_state(target.embed_tokens(tok), hidden, ctx)
            if probs is None:  # all greedy: the head's argmax, no [B, V] logits
                tokens[:, i] = tok = d.argmax(s)
                continue
            logits = d.logits(s)
            nxt = logits.argmax(dim=-1)
            for r in range(b):
                if sampled[r]:
                    q = probabilities(logits[r], inp.params[r])
                    nxt[r] = torch.multinomial(q, 1, generator=inp.generators[r])[0]
                    probs[r, i] = q
                else:
                    probs[r, i, nxt[r]] = 1.0
            tokens[:, i] = nxt
            tok = nxt
        return Proposal(tokens, probs)

    def _propose_tree(self, inp: DraftInput, k: int, shape: TreeShape) -> Proposal:
        """A draft tree of depth <= k per row (module docstring), as tokens + parents [B, N]."""
        d, target = self.drafter, inp.target
        b = inp.last_tokens.shape[0]
        ctx = d.context(target.cfg, inp.cache)
        s, hidden = d.step_state(target.embed_tokens(inp.last_tokens), inp.last_hidden, ctx)
        ids, logp = d.top_tokens(s, shape.branch)  # depth 1: children of the root (node 0)
        level_tok, level_score = ids, logp
        level_hidden = hidden[:, None].expand(-1, shape.branch, -1)
        level_first = 1  # node index of the level's first node
        toks, scores, parents = [ids], [logp], [torch.zeros_like(ids)]
        for depth in range(2, k + 1):
            w = min(shape.beam, level_tok.shape[1])
            sel = level_score.topk(w, dim=-1).indices  # [B, w] the nodes to expand
            f_tok, f_score = level_tok.gather(1, sel), level_score.gather(1, sel)
            f_hidden = level_hidden.gather(1, sel[..., None].expand(-1, -1, level_hidden.shape[-1]))
            s, hidden = d.step_state(target.embed_tokens(f_tok.reshape(-1)), f_hidden.reshape(b * w, -1), ctx)
            ids, logp = d.top_tokens(s, shape.branch)  # [B*w, branch]
            n = w * shape.branch
            parents.append((level_first + sel)[..., None].expand(-1, -1, shape.branch).reshape(b, n))
            level_first += level_tok.shape[1]
            level_tok = ids.view(b, n)
            # a tiny penalty per depth keeps a child strictly below its parent even when p = 1
            level_score = (f_score[..., None] + logp.view(b, w, -1) - 1e-4).view(b, n)
            level_hidden = hidden.view(b, w, 1, -1).expand(-1, -1, shape.branch, -1).reshape(b, n, -1)
            toks.append(level_tok)
            scores.append(level_score)
        all_tok, all_score, all_par = torch.cat(toks, 1), torch.cat(scores, 1), torch.cat(parents, 1)
        m = all_tok.shape[1]
        keep = all_score.topk(min(shape.nodes, m), dim=-1).indices.sort(dim=-1).values  # [B, N]
        new_index = torch.zeros(b, m + 1, dtype=torch.long, device=keep.device)  # old node -> kept node
        new_index.scatter_(1, keep + 1, torch.arange(1, keep.shape[1] + 1, device=keep.device).expand(b, -1))
        kept_par = new_index.gather(1, all_par.gather(1, keep))
        return Proposal(all_tok.gather(1, keep), parents=kept_par)
