"""Draft trees: several candidate continuations verified in ONE target forward.

A chain proposal drafts d_1..d_K and the target checks them in a forward over [x, d_1..d_K]; the
round ends at the first draft the target disagrees with. A tree proposal drafts N nodes, each a
token with a parent (the root x = the row's last emitted token, or an earlier node), so siblings
are alternatives for the same position: when the target rejects the drafter's favourite at some
depth, a sibling may hold the target's token and the round goes on from there.

Layout, per row b (all rows have the same N):

    tokens[b, j]   the token of node j+1 (node 0 is the root x, not stored here)
    parents[b, j]  the node index (0 = root, else 1..j) of node j+1's parent: parents come first
    depth of node i: 0 for the root, depth(parent) + 1 otherwise

The target reads the N+1 nodes [x, tokens...] as one forward. Node i sits at RoPE position
L + depth(i) (L = cache length before the round: x's position) but is written to cache slot
L + i, and attends to the row's cache entries before L plus exactly its ancestors (and itself)
among the nodes: `TreeMask` carries that. A chain d_1..d_K is the tree with parents 0, 1, .., K-1,
for which slot = position and the mask is causal.

`TreeShape` is a tree's budget (how a drafter grows one: decoding/mtp.py); whether a round drafts
a tree or a chain is the drafting plan's decision (decoding/plan.py).

Greedy rows verify with `verify_greedy_tree`, sampled rows with `verify_sampled_tree_row`.
After verification the accepted path's K/V (scattered over slots L + path) move to slots
L, L+1, ... (`KVCache.compact`), so the cache again holds one contiguous sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..models.layers import TreeMask
from .sampling import sample

__all__ = ["TreeMask", "TreeShape", "verify_greedy_tree", "verify_sampled_tree_row"]


@dataclass(frozen=True)
class TreeShape:
    """A draft tree's budget: `nodes` tokens verified per row and round, grown by expanding the
    `beam` best nodes of each depth into their `branch` best children (decoding/mtp.py)."""

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

    def max_nodes(self, depth: int) -> int:
        """The most nodes a tree of at most `depth` levels holds."""
        return min(self.nodes, self.candidates(depth))

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


def verify_greedy_tree(
    tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy verification of a draft tree, for a batch.

    tokens, parents: [B, N] (module docstring); target_logits: [B, N+1, V], the target's logits
    at the root and every node (node i's logits predict the token after node i's path).

    Terms, as in verify.py, along one root-to-node path:
    - accepted tokens: starting at the root, while the target's argmax after the current node is
      the token of one of its children, move to that child (siblings hold distinct tokens, so
      there is at most one). The children moved to are the accepted path, of length n (0..depth).
    - rejected tokens: every other node (the other branches, and the children of the last
      accepted node, none of which is the target's token).
    - bonus token: the target's argmax after the last accepted node.
    The emitted tokens, path tokens + bonus, are exactly what plain greedy decoding emits: each
    is the target's argmax given everything before it, because a node's logits were computed
    attending to exactly its ancestors (`TreeMask`), i.e. as if its path had been emitted.

    Returns (paths, emitted): paths[b] = the accepted nodes' indices (1..N, root excluded), and
    emitted[b] = their tokens followed by the bonus token.
    """
    target = target_logits.argmax(dim=-1).tolist()  # [B][N+1]
    toks, pars = tokens.tolist(), parents.tolist()
    paths, emitted = [], []
    for b in range(len(toks)):
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> child node
        for j, (tok, par) in enumerate(zip(toks[b], pars[b])):
            children.setdefault((par, tok), j + 1)
        node, path = 0, []
        while (child := children.get((node, target[b][node]))) is not None:
            path.append(child)
            node = child
        paths.append(path)
        emitted.append([toks[b][i - 1] for i in path] + [target[b][node]])
    return paths, emitted


def verify_sampled_tree_row(
    tokens: list[int], parents: list[int], target_probs: torch.Tensor, generator: torch.Generator | None
) -> tuple[list[int], list[int]]:
    """Sampling verification of one row's draft tree whose nodes were chosen deterministically
    (the drafter's most likely tokens, not samples).

    target_probs: [N+1, V] the target's processed distributions p at the root and every node
    (sampling.py: temperature / top-k / top-p applied). Starting at the root: draw x ~ p(node);
    if a child of the node holds x, it is accepted and the walk goes on from it; otherwise x is the
    bonus token and the round ends. Each emitted token is thus drawn from exactly the target's
    distribution given everything before it, as in plain sampling: the tree only decides how many
    of those draws one target forward can serve. (This is speculative sampling with one-hot
    proposals: a deterministic candidate c is accepted with probability min(1, p(c)/1) = p(c), and
    after rejecting candidates c_1..c_j the residual is p restricted to the other tokens,
    renormalised; trying candidates in turn like that is the same as the single draw above.)

    Returns (path, emitted) as `verify_greedy_tree` does for one row.
    """
    children: dict[tuple[int, int], int] = {}
    for j, (tok, par) in enumerate(zip(tokens, parents)):
        children.setdefault((par, tok), j + 1)
    node, path = 0, []
    while True:
        x = sample(target_probs[node], generator)
        child = children.get((node, x))
        if child is None:
            return path, [tokens[i - 1] for i in path] + [x]
        path.append(child)
        node = child

