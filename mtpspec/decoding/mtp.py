"""`MtpProposer`: drafts with an MTP drafter (models/drafter.py) behind the `Proposer` interface.

Per round: one attention context over the target cache (each row at its own length, constant
position), then k autoregressive drafter steps, batched over rows. Greedy rows draft the argmax;
sampled rows draw from `probabilities(drafter_logits, params)` (temperature / top-k / top-p applied
exactly as on the target side) with the row's own generator, and that distribution is returned
for rejection sampling. The target cache is only read.

Given a `TreeShape` (`propose(inp, k, tree)`), rows get a draft tree instead of a chain (tree.py),
grown as EAGLE-2 does (Li et al. 2024): at depth 1 the drafter's `branch` most likely tokens; at
each next depth the `beam` nodes of the previous depth with the highest path probability (product of the
drafter's probabilities along the path) are expanded, all in one drafter call (the drafter has no
KV cache of its own, so a branch costs one more query row, nothing else), each into its `branch`
most likely children; finally the `nodes` candidates with the highest path probability are kept.
A node's path probability is below its parent's, so the kept set contains every kept node's
ancestors. The tree's tokens are deterministic for greedy and sampled rows alike (tree.py
verifies sampled rows by drawing from the target at each node of the walk).

The proposer drafts what it is asked for; whether a round drafts a tree or a chain, and how deep,
is the drafting plan's decision (decoding/plan.py).
"""

from __future__ import annotations

import torch

from ..models.drafter import MTPDrafter
from .proposers import DraftInput, Proposal
from .sampling import probabilities, sample
from .tree import TreeShape

__all__ = ["MtpProposer", "TreeShape"]


class MtpProposer:
    """Proposer backed by an `MTPDrafter` (check it against the target first: `load_drafter`
    does, or `drafter.check_target(target.cfg)`)."""

    drafts_trees = True

    def __init__(self, drafter: MTPDrafter) -> None:
        self.drafter = drafter

    @property
    def draft_tokens(self) -> int | None:
        """The draft length the drafter was trained for (its `num_assistant_tokens`), if known."""
        return getattr(self.drafter, "draft_tokens", None)

    def max_tokens(self, k: int, tree: TreeShape | None = None) -> int:
        return k if tree is None else max(k, tree.max_nodes(k))

    @torch.inference_mode()
    def propose(self, inp: DraftInput, k: int, tree: TreeShape | None = None) -> Proposal:
        """A chain of k drafts per row, or with `tree` a draft tree of at most k levels."""
        if tree is not None and k > 0:
            return self._propose_tree(inp, k, tree)
        d, target = self.drafter, inp.target
        b = inp.last_tokens.shape[0]
        dev = inp.last_tokens.device
        sampled = [not p.greedy and a for p, a in zip(inp.params, inp.active)]
        ctx = d.context(target.cfg, inp.cache) if k > 0 else None
        if k > 0 and not any(sampled):  # all greedy: the whole chain in one C++ call when it can run
            chain = d.greedy_chain(target, inp.last_tokens, inp.last_hidden, ctx, k)
            if chain is not None:
                return Proposal(chain.to(dev), None)
        tokens = torch.zeros(b, k, dtype=torch.long, device=dev)
        probs = torch.zeros(b, k, d.cfg.vocab_size, device=dev) if any(sampled) else None
        if k == 0:
            return Proposal(tokens, probs)
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
                    nxt[r] = sample(q, inp.generators[r])
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
