"""The training core: target activations, the unrolled drafter objective, vocabulary clustering.

Inference (models/drafter.py): after the target has cached K/V for positions < p and produced the
token x_p from its final hidden state h_{p-1}, the drafter runs K steps at the constant position p,
attending to the cached entries j < p (and > p - window in sliding layers); step 1 reads
(embed(x_p), h_{p-1}), step i > 1 reads (embed(draft_{i-1}), post_projection output of step i-1).

Training does exactly this for every anchor p of a sequence at once: the anchors are the query
positions of one attention over the target's K/V with a *strict* causal mask (j < p), so one
forward per step covers all anchors. Step i's teacher is the target's argmax at position
p + i - 1; its input token is the token at p + i - 1, which is what an accepted draft is.
When the data's token differs from the target's argmax (human text), the later steps of that
anchor are masked: at inference the target would never have accepted that path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.decoder import Decoder
from ..models.drafter import MTPDrafter
from ..models.layers import apply_rope, rope_cos_sin

TOPK_STORED = 8  # target top-k ids kept per position (the hard negatives of the sampled loss)


# ---- target activations ------------------------------------------------------------------------
@dataclass
class Activations:
    """One sequence's target activations (fp16 on disk/in memory): ids [T], hidden [T, H] (final
    normed), kv {attention_type: (k, v) each [kv_heads, T, head_dim]}, labels [T] (target argmax
    at each position = its next token), topk [T, TOPK_STORED] ids and topk_logits [T, TOPK_STORED]
    their logits (the soft teacher; None in shards written before it existed), loss_from."""

    ids: torch.Tensor
    hidden: torch.Tensor
    kv: dict
    labels: torch.Tensor
    topk: torch.Tensor
    loss_from: int
    topk_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@torch.inference_mode()
def harvest(target: Decoder, seqs: list[list[int]], loss_from: list[int], attention_types, store_dtype=torch.float16,
            max_tokens_per_batch: int = 2048) -> list[Activations]:
    """Run the target over each sequence (batched by similar length) and keep what the drafter
    training needs."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[Activations | None] = [None] * len(seqs)
    i = 0
    layers = {t: target.cfg.last_cache_layer(t) for t in attention_types}
    while i < len(order):
        longest = len(seqs[order[i]])
        j = i
        while j < len(order) and (j - i + 1) * len(seqs[order[j]]) <= max(max_tokens_per_batch, len(seqs[order[j]])):
            j += 1
        j = max(j, i + 1)
        group = order[i:j]
        longest = max(len(seqs[g]) for g in group)
        toks = torch.zeros(len(group), longest, dtype=torch.long, device=target.device)
        for r, g in enumerate(group):
            toks[r, : len(seqs[g])] = torch.tensor(seqs[g])
        cache = target.new_cache(len(group), longest)
        res = target.forward(toks, cache)
        top_logits, top = res.logits.float().topk(TOPK_STORED, dim=-1)
        for r, g in enumerate(group):
            n = len(seqs[g])
            kv = {t: (cache.k[l][r, :, :n].to(store_dtype).clone(), cache.v[l][r, :, :n].to(store_dtype).clone())
                  for t, l in layers.items()}
            out[g] = Activations(toks[r, :n].clone().cpu(), res.hidden[r, :n].to(store_dtype).cpu(),
                                 {t: (k.cpu(), v.cpu()) for t, (k, v) in kv.items()},
                                 top[r, :n, 0].cpu(), top[r, :n].to(torch.int32).cpu(), loss_from[g],
                                 top_logits[r, :n].to(torch.float16).cpu())
        i = j
    return out  # type: ignore[return-value]


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class Batch:
    ids: torch.Tensor  # [B, L]
    hidden: torch.Tensor  # [B, L, H]
    kv: dict  # type -> (k, v) [B, kvh, L, hd]
    labels: torch.Tensor  # [B, L]
    topk: torch.Tensor  # [B, L, TOPK]
    lengths: torch.Tensor  # [B]
    loss_from: torch.Tensor  # [B]
    topk_logits: torch.Tensor | None = None  # [B, L, TOPK] fp32 (rows without them: soft[b] False)
    soft: torch.Tensor | None = None  # [B] bool: the row has the target's top-k logits


def collate(items: list[Activations], dtype: torch.dtype = torch.float32) -> Batch:
    b, L = len(items), max(len(a) for a in items)
    h = items[0].hidden.shape[-1]
    ids = torch.zeros(b, L, dtype=torch.long)
    hidden = torch.zeros(b, L, h, dtype=dtype)
    labels = torch.zeros(b, L, dtype=torch.long)
    topk = torch.zeros(b, L, items[0].topk.shape[-1], dtype=torch.long)
    topk_logits = torch.zeros(b, L, items[0].topk.shape[-1])
    soft = torch.tensor([a.topk_logits is not None for a in items])
    kv = {}
    for t, (k, _) in items[0].kv.items():
        kv[t] = (torch.zeros(b, k.shape[0], L, k.shape[-1], dtype=dtype), torch.zeros(b, k.shape[0], L, k.shape[-1], dtype=dtype))
    for r, a in enumerate(items):
        n = len(a)
        ids[r, :n] = a.ids
        hidden[r, :n] = a.hidden.to(dtype)
        labels[r, :n] = a.labels
        topk[r, :n] = a.topk.long()
        if a.topk_logits is not None:
            topk_logits[r, :n] = a.topk_logits.float()
        for t, (k, v) in a.kv.items():
            kv[t][0][r, :, :n] = k.to(dtype)
            kv[t][1][r, :, :n] = v.to(dtype)
    return Batch(ids, hidden, kv, labels, topk, torch.tensor([len(a) for a in items]),
                 torch.tensor([a.loss_from for a in items]), topk_logits if bool(soft.any()) else None, soft)


# ---- the unrolled objective --------------------------------------------------------------------
def _attention(attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos, sin, mask) -> torch.Tensor:
    """DrafterAttention over [B, T] queries (anchor positions) with a per-query key mask."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    q = apply_rope(attn.q_norm(q), cos, sin)  # [B, H, T, hd]
    g = attn.n_heads // attn.n_kv
    q = q.reshape(b, attn.n_kv, g * t, attn.head_dim)
    scores = (q @ k.transpose(-1, -2).to(q.dtype)).float().view(b, attn.n_kv, g, t, -1)  # scaling 1.0
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype).view(b, attn.n_kv, g * t, -1)
    out = (probs @ v.to(q.dtype)).view(b, attn.n_heads, t, attn.head_dim)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))


def _layer(layer, h, ctx):
    kv = ctx[layer.attention_type]
    a = _attention(layer.self_attn, layer.input_layernorm(h), *kv)
    h = h + layer.post_attention_layernorm(a)
    h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    return h * layer.layer_scalar


@dataclass
class StepOut:
    s: torch.Tensor  # [B, T, H_drafter] final normed drafter states (T = L - 1 anchors)
    labels: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool: this (anchor, step) is trained
    target_hidden: torch.Tensor  # [B, T, H_target] the target's hidden that produced the label
    topk: torch.Tensor | None = None  # [B, T, TOPK] the target's top-k ids at the label position
    topk_logits: torch.Tensor | None = None  # [B, T, TOPK] and their logits (None: hard labels only)


def unroll(drafter: MTPDrafter, target: Decoder, batch: Batch, k: int) -> list[StepOut]:
    """The K drafting steps for every anchor p = 1 .. L-1 of every row, as at inference."""
    cfg = drafter.cfg
    b, L = batch.ids.shape
    T = L - 1
    dev = batch.ids.device
    p = torch.arange(1, L, device=dev)  # anchor positions
    keys = torch.arange(L, device=dev)
    ctx = {}
    for t in dict.fromkeys(cfg.layer_types):
        spec = target.cfg.layers[target.cfg.last_cache_layer(t)]
        vis = keys[None, :] < p[:, None]  # j < p
        if t == "sliding_attention" and spec.sliding_window:
            vis &= keys[None, :] > p[:, None] - spec.sliding_window
        vis = vis[None].expand(b, T, L)
        cos, sin = rope_cos_sin(spec, p[None].expand(b, T), drafter.dtype)
        k_, v_ = batch.kv[t]
        ctx[t] = (k_, v_, cos, sin, vis)
    valid_pos = lambda idx: idx < batch.lengths[:, None]  # noqa: E731
    pad = lambda x, i: F.pad(x, (0, i)) if x.dim() == 2 else F.pad(x, (0, 0, 0, i))  # noqa: E731
    ids_p, labels_p, hidden_p = pad(batch.ids, k), pad(batch.labels, k), pad(batch.hidden, k)
    topk_p = F.pad(batch.topk, (0, 0, 0, k))
    topl_p = F.pad(batch.topk_logits, (0, 0, 0, k)) if batch.topk_logits is not None else None
    hidden = batch.hidden[:, :-1]  # h_{p-1}
    alive = valid_pos(p[None].expand(b, T))  # anchor exists
    outs = []
    for i in range(1, k + 1):
        tok = ids_p[:, i : i + T]  # token at p + i - 1
        pos_lab = p + i - 1
        lab = labels_p[:, i : i + T]  # target argmax at p + i - 1
        if i > 1:  # the path continues only if the previous step's label is the token we feed
            alive = alive & (ids_p[:, i : i + T] == labels_p[:, i - 1 : i - 1 + T])
        m = alive & valid_pos(pos_lab[None].expand(b, T)) & ((pos_lab + 1)[None] >= batch.loss_from[:, None])
        with torch.no_grad():
            emb = target.embed_tokens(tok).to(drafter.dtype)
        x = drafter.pre_projection(torch.cat([emb, hidden.to(drafter.dtype)], dim=-1))
        for layer in drafter.model.layers:
            x = _layer(layer, x, ctx)
        s = drafter.model.norm(x)
        hidden = drafter.post_projection(s)
        outs.append(StepOut(s, lab, m, hidden_p[:, i : i + T], topk_p[:, i : i + T],
                            topl_p[:, i : i + T] if topl_p is not None else None))
    return outs


def step_losses(drafter: MTPDrafter, outs: list[StepOut], batch: Batch, *, full_vocab: bool,
                feature_weight: float, cluster_of: torch.Tensor | None, soft_labels: bool = False):
    """Loss, per-step accuracy (of the argmax) and cluster hit counts.

    Loss per step: cross-entropy of the drafter's logits (over the full vocabulary, or over the
    batch's candidate tokens = every target top-k id in the batch) against the teacher: the
    target's argmax (hard), or with soft_labels, for rows whose shards hold the target's top-k
    logits, the target's distribution renormalised over its top-k tokens (soft: more signal per
    position than the argmax alone); + feature_weight * (1 - cos(s, target hidden)) when the
    drafter head is the target's own; + the cluster layer's cross-entropy to the label's cluster."""
    w = drafter.model.embed_tokens.weight
    cand = None
    if not full_vocab:
        cand = torch.unique(torch.cat([batch.topk.flatten(), batch.labels.flatten()]))
        remap = torch.full((w.shape[0],), -1, dtype=torch.long)
        remap[cand] = torch.arange(cand.numel())
        w_c = w[cand]
    total = 0.0
    stats = []
    for o in outs:
        m = o.mask
        n = int(m.sum())
        if n == 0:
            stats.append((0, 0, 0))
            continue
        s = o.s[m]
        lab = o.labels[m]
        if cand is None:
            logits = F.linear(s, w)
            y = lab
        else:
            logits = F.linear(s, w_c)
            y = remap[lab]
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, y[:, None]).squeeze(1)  # hard: -log q(argmax)
        if soft_labels and o.topk_logits is not None:
            soft_rows = batch.soft[:, None].expand_as(m)[m]
            ids = o.topk[m] if cand is None else remap[o.topk[m]]
            p = torch.softmax(o.topk_logits[m].float(), dim=-1)
            soft_nll = -(p * logp.gather(1, ids)).sum(-1)  # -sum_j p_j log q_j over the top-k
            nll = torch.where(soft_rows, soft_nll, nll)
        loss = nll.mean()
        if feature_weight:
            th = o.target_hidden[m].to(s.dtype)
            loss = loss + feature_weight * (1 - F.cosine_similarity(s.float(), th.float(), dim=-1)).mean()
        hits = 0
        if cluster_of is not None and drafter.masked_embedding is not None:
            me = drafter.masked_embedding
            cl_logits = me.centroids(s.detach())
            loss = loss + F.cross_entropy(cl_logits.float(), cluster_of[lab])
            top = cl_logits.topk(me.top_k, dim=-1).indices
            hits = int((top == cluster_of[lab][:, None]).any(-1).sum())
        total = total + loss
        correct = int((logits.argmax(-1) == y).sum())
        stats.append((n, correct, hits))
    return total / len(outs), stats


# ---- init from the target ----------------------------------------------------------------------
@torch.no_grad()
def init_from_target(drafter: MTPDrafter, target: Decoder, seed: int = 0, std: float = 0.02) -> bool:
    """Random init, then (when the drafter is as wide as the target) the drafter's head := the
    target's output embedding, pre_projection passes the target hidden through, post_projection
    = identity and residual branches start small. Returns True when the head was copied."""
    drafter.init_random(seed, std=std)
    for name, p in drafter.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
    cfg = drafter.cfg
    h, ht = cfg.hidden_size, cfg.backbone_hidden_size
    if h != ht:
        return False
    lm = target.lm_head.unpacked_weight() if hasattr(target.lm_head, "unpacked_weight") else target.lm_head.weight
    if lm.shape != drafter.model.embed_tokens.weight.shape or target.cfg.final_softcap is not None:
        return False
    drafter.model.embed_tokens.weight.copy_(lm.to(drafter.dtype))
    w = drafter.pre_projection.weight
    w.mul_(0.5)
    w[:, ht:] += torch.eye(h, dtype=w.dtype)
    drafter.post_projection.weight.copy_(torch.eye(h, dtype=w.dtype))
    for layer in drafter.model.layers:
        layer.self_attn.o_proj.weight.mul_(0.1)
        layer.mlp.down_proj.weight.mul_(0.1)
    return True


# ---- balanced clustering of the vocabulary ------------------------------------------------------
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


def cosine_lr(step: int, total: int | None, warmup: int, base: float, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if not total:
        return base
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
