"""Balanced clustering of the vocabulary for a clustered drafter head (its token_ordering)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CANDIDATES = 16  # each row's most similar columns kept for the assignment (`_capacity_assign`)
CHUNK_ROWS = 16384  # rows whose similarities are computed at once: [CHUNK_ROWS, C] fp32 at a time


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
        assign = _capacity_assign(x, cent, cap)
        cent = torch.zeros_like(cent).index_add_(0, assign, x)
        cent = F.normalize(cent, dim=-1)
    order = torch.argsort(assign * v + torch.arange(v, device=x.device), stable=True)  # cluster-major
    return order


def _capacity_assign(x: torch.Tensor, cent: torch.Tensor, cap: int, candidates: int = CANDIDATES,
                     chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Each row of x [V, H] to one centroid of cent [C, H], every centroid exactly `cap` rows, by
    similarity x . c: rows propose to their most similar centroid still open; each centroid keeps
    its `room` most similar proposers and closes when full; rejected rows propose again.

    A rejected row's centroid is full, so a row's proposal is simply its most similar open
    centroid. That is read from the row's `candidates` most similar centroids (computed once, a
    chunk of rows at a time: the [V, C] similarities are never held, 2 GiB for Gemma's 262k tokens
    and 2048 clusters); only a row whose candidates have all closed gets its full similarities
    again. The result is that of proposing over the full similarities (ties and rounding aside)."""
    v, c, dev = x.shape[0], cent.shape[0], x.device
    m = min(candidates, c)
    vals = torch.empty(v, m, device=dev)
    cand = torch.empty(v, m, dtype=torch.long, device=dev)
    for a in range(0, v, chunk):
        vals[a : a + chunk], cand[a : a + chunk] = torch.topk(x[a : a + chunk] @ cent.T, m, dim=1)
    assign = torch.full((v,), -1, dtype=torch.long, device=dev)
    room = torch.full((c,), cap, dtype=torch.long, device=dev)
    while True:
        free = (assign < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return assign
        open_ = room[cand[free]] > 0  # [F, m]
        listed = open_.any(1)
        first = open_.to(torch.uint8).argmax(1)  # the most similar open candidate
        best = cand[free, first]
        score = vals[free, first]
        if not bool(listed.all()):  # candidates all closed: the most similar open centroid of all
            rows = free[~listed]
            s = x[rows] @ cent.T
            s[:, room == 0] = float("-inf")
            score[~listed], best[~listed] = s.max(1)
        # rank proposers within each centroid by score, keep the top `room` of them
        order = torch.argsort(score, descending=True)
        best_o, free_o = best[order], free[order]
        rank = torch.zeros_like(best_o)
        sorted_cols, idx = torch.sort(best_o, stable=True)
        starts = torch.searchsorted(sorted_cols, sorted_cols, side="left")
        rank[idx] = torch.arange(idx.numel(), device=dev) - starts
        ok = rank < room[best_o]
        assign[free_o[ok]] = best_o[ok]
        room -= torch.bincount(best_o[ok], minlength=c)
