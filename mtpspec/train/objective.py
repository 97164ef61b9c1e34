"""The unrolled drafter objective over batches of target activations.

Inference (models/drafter.py): after the target has cached K/V for positions < p and produced the
token x_p from its final hidden state h_{p-1}, the drafter runs K steps at the constant position p,
attending to the cached entries j < p (and > p - window in sliding layers); step 1 reads
(embed(x_p), h_{p-1}), step i > 1 reads (embed(draft_{i-1}), post_projection output of step i-1).

Training runs the same drafter modules for every anchor p of a sequence at once: the anchors are
the queries of one attention over the target's K/V (`MTPDrafter.anchor_context`), so one forward
per step covers all anchors. Step i's teacher is the target's argmax at position p + i - 1; its
input token is the token at p + i - 1, which is what an accepted draft is. When the data's token
differs from the target's argmax (human text), the later steps of that anchor are masked: at
inference the target would never have accepted that path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.decoder import Decoder
from ..models.drafter import MTPDrafter
from .harvest import Activations


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
    b, L = batch.ids.shape
    T = L - 1
    p = torch.arange(1, L, device=batch.ids.device)  # anchor positions
    ctx = drafter.anchor_context(target.cfg, batch.kv, p)
    valid_pos = lambda idx: idx < batch.lengths[:, None]  # noqa: E731
    pad = lambda x: F.pad(x, (0, k)) if x.dim() == 2 else F.pad(x, (0, 0, 0, k))  # noqa: E731
    ids_p, labels_p, hidden_p, topk_p = pad(batch.ids), pad(batch.labels), pad(batch.hidden), pad(batch.topk)
    topl_p = pad(batch.topk_logits) if batch.topk_logits is not None else None
    hidden = batch.hidden[:, :-1]  # h_{p-1}
    alive = valid_pos(p[None].expand(b, T))  # anchor exists
    outs = []
    for i in range(1, k + 1):
        tok = ids_p[:, i : i + T]  # token at p + i - 1
        pos_lab = p + i - 1
        if i > 1:  # the path continues only if the previous step's label is the token we feed
            alive = alive & (tok == labels_p[:, i - 1 : i - 1 + T])
        m = alive & valid_pos(pos_lab[None].expand(b, T)) & ((pos_lab + 1)[None] >= batch.loss_from[:, None])
        with torch.no_grad():
            emb = target.embed_tokens(tok)
        s, hidden = drafter.step_state(emb, hidden, ctx)
        outs.append(StepOut(s, labels_p[:, i : i + T], m, hidden_p[:, i : i + T], topk_p[:, i : i + T],
                            topl_p[:, i : i + T] if topl_p is not None else None))
    return outs


def _nll(logp: torch.Tensor, y: torch.Tensor, o: StepOut, batch: Batch, remap: torch.Tensor | None,
         soft_labels: bool) -> torch.Tensor:
    """Per trained position: -log q(target argmax) (hard), or with soft_labels, on rows that hold
    the target's top-k logits, -sum_j p_j log q_j over the target's top-k distribution p."""
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    if soft_labels and o.topk_logits is not None:
        m = o.mask
        soft_rows = batch.soft[:, None].expand_as(m)[m]
        ids = o.topk[m] if remap is None else remap[o.topk[m]]
        p = torch.softmax(o.topk_logits[m].float(), dim=-1)
        nll = torch.where(soft_rows, -(p * logp.gather(1, ids)).sum(-1), nll)
    return nll


def step_losses(drafter: MTPDrafter, outs: list[StepOut], batch: Batch, *, full_vocab: bool,
                feature_weight: float, cluster_of: torch.Tensor | None, soft_labels: bool = False):
    """Loss, per-step (positions, correct argmax, cluster hits) counts.

    Loss per step: cross-entropy of the drafter's logits (over the full vocabulary, or over the
    batch's candidate tokens = every target top-k id in the batch) against the teacher (`_nll`);
    + feature_weight * (1 - cos(s, target hidden)) when the drafter head is the target's own;
    + the cluster layer's cross-entropy to the label's cluster (cluster_of: each token's cluster)."""
    cand = remap = None
    if not full_vocab:
        cand = torch.unique(torch.cat([batch.topk.flatten(), batch.labels.flatten()]))
        remap = torch.full((drafter.cfg.vocab_size,), -1, dtype=torch.long)
        remap[cand] = torch.arange(cand.numel())
    total = 0.0
    stats = []
    for o in outs:
        m = o.mask
        n = int(m.sum())
        if n == 0:
            stats.append((0, 0, 0))
            continue
        s, lab = o.s[m], o.labels[m]
        logits = drafter.token_logits(s, cand)
        y = lab if remap is None else remap[lab]
        loss = _nll(F.log_softmax(logits.float(), dim=-1), y, o, batch, remap, soft_labels).mean()
        if feature_weight:
            th = o.target_hidden[m].to(s.dtype)
            loss = loss + feature_weight * (1 - F.cosine_similarity(s.float(), th.float(), dim=-1)).mean()
        hits = 0
        if cluster_of is not None and drafter.masked_embedding is not None:
            scores, top = drafter.masked_embedding.clusters(s.detach())
            loss = loss + F.cross_entropy(scores.float(), cluster_of[lab])
            hits = int((top == cluster_of[lab][:, None]).any(-1).sum())
        total = total + loss
        stats.append((n, int((logits.argmax(-1) == y).sum()), hits))
    return total / len(outs), stats


@dataclass
class Objective:
    """The training loss of a batch: K unrolled steps, then `step_losses` with these settings."""

    draft_tokens: int
    full_vocab: bool
    feature_weight: float  # used only while the drafter's head is the target's frozen one
    soft_labels: bool
    bf16: bool  # autocast the forward to bfloat16
    device: str

    def __call__(self, drafter: MTPDrafter, target: Decoder, items: list[Activations]):
        """(loss, per-step (positions, correct, cluster hits)) of a batch of activations."""
        batch = collate(items, drafter.dtype)
        me = drafter.masked_embedding
        head_is_target = not drafter.model.embed_tokens.weight.requires_grad
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            outs = unroll(drafter, target, batch, self.draft_tokens)
            return step_losses(drafter, outs, batch, full_vocab=self.full_vocab,
                               feature_weight=self.feature_weight if head_is_target else 0.0,
                               cluster_of=me.token_clusters() if me is not None else None,
                               soft_labels=self.soft_labels)
