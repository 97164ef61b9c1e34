"""Balanced clustering of the vocabulary for a clustered drafter head (its token_ordering)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def balanced_kmeans(emb: torch.Tensor, n_clusters: int, iters: int = 8, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of emb [V, H] into n_clusters groups of exactly V / n_clusters rows
    (spherical k-means with a capacity-constrained assignment). Returns token_ordering: a
    permutation of range(V) whose view [C, V/C] lists each cluster's tokens."""
    v = emb.shape[0]
    if v % n_clusters:
        raise ValueError(f"n_clusters ({n_clusters}) must divide the vocabulary size ({v})")
    cap = v // n_clusters
    x = F.normalize(emb.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(v, generator=g)[:n_clusters]].clone()
    assign = torch.zeros(v, dtype=torch.long)
    for _ in range(iters):
        assign = _capacity_assign(x @ cent.T, cap)
        cent = torch.zeros_like(cent).index_add_(0, assign, x)
        cent = F.normalize(cent, dim=-1)
    order = torch.argsort(assign * v + torch.arange(v), stable=True)  # cluster-major
    return order


def _capacity_assign(sim: torch.Tensor, cap: int) -> torch.Tensor:
    """Each row to one column, every column exactly `cap` rows: rows propose to their best
    column still open to them; columns keep their `cap` most similar proposers; repeat."""
    v, c = sim.shape
    assign = torch.full((v,), -1, dtype=torch.long)
    room = torch.full((c,), cap, dtype=torch.long)
    sim = sim.clone()
    while True:
        free = (assign < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return assign
        s = sim[free]
        s[:, room == 0] = float("-inf")
        best = s.argmax(1)
        score = s[torch.arange(free.numel()), best]
        # rank proposers within each column by score, keep the top `room` of them
        order = torch.argsort(score, descending=True)
        best_o, free_o = best[order], free[order]
        rank = torch.zeros_like(best_o)
        sorted_cols, idx = torch.sort(best_o, stable=True)
        starts = torch.searchsorted(sorted_cols, sorted_cols, side="left")
        rank[idx] = torch.arange(idx.numel()) - starts
        ok = rank < room[best_o]
        assign[free_o[ok]] = best_o[ok]
        room -= torch.bincount(best_o[ok], minlength=c)
        rejected = free_o[~ok]
        sim[rejected, best_o[~ok]] = float("-inf")
