"""The unrolled drafter objective over batches of target activations.

Inference (models/drafter.py): after the target has cached K/V for positions < p and produced the
token x_p from its final hidden state h_{p-1}, the drafter runs K steps at the constant position p,
attending to the cached entries j < p (and > p - window in sliding layers); step 1 reads
(embed(x_p), h_{p-1}), step i > 1 reads (embed(draft_{i-1}), post_projection output of step i-1).

Training runs the same drafter modules for every anchor p of a sequence at once: the anchors are
the queries of one attention over the target's K/V (`MTPDrafter.anchor_context`), so one forward
per step covers all anchors. Only anchors that some step trains are computed, packed: none past a
row's length (a batch's shorter rows), none more than K before its loss_from (a prompt's anchors);
only attention sees the padded [B, T] grid. Step i's teacher is the target's argmax at position
p + i - 1; its input token is the token at p + i - 1, which is what an accepted draft is. When the data's token
differs from the target's argmax (human text), the later steps of that anchor are masked: at
inference the target would never have accepted that path.

Loss (`step_losses`): the mean over the K steps of each step's cross-entropy to the teacher (the
target's argmax, or with soft labels its top-k distribution) plus the feature and cluster terms;
with `acceptance_weight` w > 0 the cross-entropy gets the share 1 - w and the acceptance
objective L_acc (`acceptance_loss`) the share w:

For an anchor t whose step 1 is trained, let n_t <= K be its run of consecutive trained steps
from step 1 (a step's mask is on while the path stays on the target's tokens, inside the row and
from loss_from on; a later step trained after an untrained one does not count: that chain never
starts at inference) and a_{t,i} the probability that step i's draft is accepted given steps < i
were. Verification stops at the first rejection, so the expected number of accepted drafts is

    E_t = sum_{i=1..n_t} prod_{j=1..i} a_{t,j}   ( = sum_n n P(n), P(n) = a_1..a_n (1 - a_{n+1}), a_{n_t+1} = 0 )

    L_acc = 1 - sum_t E_t / (K N),   N = the anchors whose step 1 is trained,

in [0, 1]: 0 when every step of every full chain is accepted surely. Its gradient,
dE_t/da_{t,j} = sum_{i=j..n_t} prod_{l<=i, l!=j} a_{t,l}, weighs step j by the acceptance of
the steps before it (a step behind a likely rejection hardly matters) and by what it unlocks
after it. a_{t,i} (`acceptance_verify`):

- "greedy" (default): a = q(y), the drafter's probability of the target's argmax y. Greedy
  verification accepts a draft iff it is y, so a drafter sampling from q is accepted with
  probability q(y) (drafting the argmax, as inference does at temperature 0, is accepted iff
  q's argmax is y; q(y) is its smooth surrogate). The setting the held-out benchmark measures
  (greedy verification, fixed K), and it needs no stored target logits: hence the default.
- "sampled": a = sum_x min(p(x), q(x)) = 1 - TV(p, q), speculative sampling's acceptance
  probability (decoding/verify.py), with p the softmax of the target's stored top-k logits
  (temperature 1; the mass outside its top-k dropped and the rest renormalised). Rows whose
  shards hold no logits use p = one-hot(y), i.e. "greedy". Approximate beyond the truncation of
  p: the unroll feeds step i + 1 the target's token, while sampled verification would feed the
  accepted draft (distributed as min(p, q) / a).

q is the drafter's softmax over the batch's candidate tokens (unless full_vocab: over the whole
vocabulary), as for the cross-entropy: it drops the mass of the other tokens, so it overestimates
q(y) and a, the less so the better the drafter. From a fresh drafter a ~ 1/candidates and the
products make L_acc's gradient tiny; the cross-entropy share (1 - w) keeps early training going.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.decoder import Decoder
from ..models.drafter import MTPDrafter, chosen_cluster_logits
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


def unroll(drafter: MTPDrafter, target: Decoder, batch: Batch, k: int, first: int = 1,
           first_hidden: torch.Tensor | None = None) -> list[StepOut]:
    """The K drafting steps for every anchor p = first .. L-1 of every row, as at inference (step
    i's outputs are indexed by anchor, p - first). first_hidden: the first step's hidden input
    [B, L - first, H] instead of the target's h_{p-1} (experiments with other drafter inputs)."""
    b, L = batch.ids.shape
    T = L - first
    p = torch.arange(first, L, device=batch.ids.device)  # anchor positions
    valid_pos = lambda idx: idx < batch.lengths[:, None]  # noqa: E731
    alive = valid_pos(p[None].expand(b, T))  # anchor exists
    # the anchors some step trains (step i's label is at p + i - 1, trained from loss_from - 1 on), [N]
    # indices into [B * T]; the others' outputs stay zero on the grid and are never read (masks)
    packed = (alive & (p[None] + k >= batch.loss_from[:, None])).flatten().nonzero().squeeze(1)
    ctx = drafter.anchor_context(target.cfg, batch.kv, p, packed)
    pad = lambda x: F.pad(x, (0, k)) if x.dim() == 2 else F.pad(x, (0, 0, 0, k))  # noqa: E731
    ids_p, labels_p, hidden_p, topk_p = pad(batch.ids), pad(batch.labels), pad(batch.hidden), pad(batch.topk)
    topl_p = pad(batch.topk_logits) if batch.topk_logits is not None else None
    hidden = batch.hidden[:, first - 1 : -1] if first_hidden is None else first_hidden  # h_{p-1}
    hidden = hidden.reshape(b * T, -1).index_select(0, packed)
    outs = []
    for i in range(1, k + 1):
        at = slice(first + i - 1, first + i - 1 + T)  # position p + i - 1
        tok = ids_p[:, at]
        pos_lab = p + i - 1
        if i > 1:  # the path continues only if the previous step's label is the token we feed
            alive = alive & (tok == labels_p[:, first + i - 2 : first + i - 2 + T])
        m = alive & valid_pos(pos_lab[None].expand(b, T)) & ((pos_lab + 1)[None] >= batch.loss_from[:, None])
        with torch.no_grad():
            emb = target.embed_tokens(tok.flatten().index_select(0, packed))
        s, hidden = drafter.step_state(emb, hidden, ctx)
        s = s.new_zeros(b * T, s.shape[-1]).index_copy(0, packed, s).view(b, T, -1)  # back on the grid
        outs.append(StepOut(s, labels_p[:, at], m, hidden_p[:, at], topk_p[:, at],
                            topl_p[:, at] if topl_p is not None else None))
    return outs


ACCEPTANCE_VERIFY = ("greedy", "sampled")


def _teacher_topk(o: StepOut, batch: Batch, remap: torch.Tensor | None):
    """Per trained position: (row holds the target's top-k logits [n] bool, their ids in the
    logits' index space [n, TOPK], the target's top-k distribution p [n, TOPK])."""
    m = o.mask
    soft_rows = batch.soft[:, None].expand_as(m)[m]
    ids = o.topk[m] if remap is None else remap[o.topk[m]]
    return soft_rows, ids, torch.softmax(o.topk_logits[m].float(), dim=-1)


def _nll(logp: torch.Tensor, y: torch.Tensor, o: StepOut, batch: Batch, remap: torch.Tensor | None,
         soft_labels: bool) -> torch.Tensor:
    """Per trained position: -log q(target argmax) (hard), or with soft_labels, on rows that hold
    the target's top-k logits, -sum_j p_j log q_j over the target's top-k distribution p."""
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    if soft_labels and o.topk_logits is not None:
        soft_rows, ids, p = _teacher_topk(o, batch, remap)
        nll = torch.where(soft_rows, -(p * logp.gather(1, ids)).sum(-1), nll)
    return nll


def acceptance_probs(logp: torch.Tensor, y: torch.Tensor, o: StepOut, batch: Batch, remap: torch.Tensor | None,
                     verify: str) -> torch.Tensor:
    """Per trained position, the probability a that the step's draft is accepted (module
    docstring): q(y) ("greedy"), or sum_x min(p(x), q(x)) over the target's top-k p ("sampled",
    on rows holding the target's logits; q(y) on the others)."""
    a = logp.gather(1, y[:, None]).squeeze(1).exp()
    if verify == "sampled" and o.topk_logits is not None:
        soft_rows, ids, p = _teacher_topk(o, batch, remap)
        a = torch.where(soft_rows, torch.minimum(p, logp.gather(1, ids).exp()).sum(-1), a)
    return a


def expected_accepted_length(a: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a, mask: [K, ...] per-step acceptance probabilities and trained masks of the same anchors.
    Returns (E [...], chains [...] bool): E = sum_{i <= n} prod_{j <= i} a_j over each anchor's run
    of n consecutive trained steps from step 1 (0 where step 1 is not trained), and which anchors
    have a chain (step 1 trained)."""
    chain = mask.to(torch.long).cumprod(0).bool()  # steps 1..i all trained
    run = torch.where(chain, a, torch.ones_like(a)).cumprod(0)
    return torch.where(chain, run, torch.zeros_like(run)).sum(0), chain[0]


def acceptance_loss(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_acc = 1 - sum of E over the anchors with a chain / (K * their number); a, mask [K, ...]
    (`expected_accepted_length`). 0 (with a graph) when no anchor has a chain."""
    e, chains = expected_accepted_length(a, mask)
    n = int(chains.sum())
    if n == 0:
        return (a * 0).sum()
    return 1 - e[chains].sum() / (a.shape[0] * n)


MINING_CLUSTERS = 4  # clusters searched per position for the drafter's own top tokens (`drafted_tokens`)


@torch.no_grad()
def drafted_tokens(drafter: MTPDrafter, states: list[torch.Tensor], scores: list[torch.Tensor], n: int,
                   head: torch.Tensor) -> torch.Tensor:
    """The tokens the drafter itself ranks first at the trained positions: each position's top n
    among the tokens of its MINING_CLUSTERS best clusters (the argmax a clustered head drafts is
    almost always there). states, scores: per step, the trained positions' final states [N, H]
    and their cluster scores [N, C]; head: the LM weight cluster-major [C, P, H] (its rows in
    token_ordering's order), a frozen copy. Unique ids [M].

    Why: the sampled cross-entropy normalises over the batch's candidates, the target's top-k ids
    of the batch (a few hundred of a large vocabulary), so tokens outside them are never pushed
    down: on Gemma 3 270M the full head's argmax is such a token at 6.4% of unseen positions
    (drafters/README.md). Adding the tokens it would draft makes them negatives where they are wrong."""
    me = drafter.masked_embedding
    order = me.token_ordering.view(me.num_centroids, me.per_cluster)
    found = []
    for s, sc in zip(states, scores):
        if not len(s):
            continue
        s = s.detach().to(head.dtype).contiguous()
        top = torch.topk(sc.detach(), MINING_CLUSTERS, dim=-1).indices
        # a chunk of positions at a time: without the C++ kernel off CPU the chosen blocks are gathered
        vals = torch.cat([chosen_cluster_logits(head, s[i:i + 512], top[i:i + 512]) for i in range(0, len(s), 512)])
        best = vals.topk(n, dim=-1).indices  # index into the chosen clusters' tokens
        found.append(order[top].flatten(1).gather(1, best).flatten())
    return torch.unique(torch.cat(found)) if found else torch.zeros(0, dtype=torch.long)


def step_losses(drafter: MTPDrafter, outs: list[StepOut], batch: Batch, *, full_vocab: bool,
                feature_weight: float, cluster_of: torch.Tensor | None, soft_labels: bool = False,
                acceptance_weight: float = 0.0, acceptance_verify: str = "greedy",
                hard_negatives: int = 0, mining_head: torch.Tensor | None = None):
    """Loss, per-step (positions, correct argmax, cluster hits) counts.

    Loss per step: (1 - acceptance_weight) * the cross-entropy of the drafter's logits (over the
    full vocabulary, or over the batch's candidate tokens = every target top-k id in the batch,
    and with hard_negatives = n > 0 and a clustered head (mining_head, `drafted_tokens`) the
    drafter's own top n tokens at each trained position) against the teacher (`_nll`); +
    feature_weight * (1 - cos(s, target hidden)) when the drafter head is the target's own; + the
    cluster layer's cross-entropy to the label's cluster (cluster_of: each token's cluster).
    Averaged over the steps, plus acceptance_weight * L_acc (`acceptance_loss` of
    `acceptance_probs` with acceptance_verify, module docstring)."""
    if acceptance_verify not in ACCEPTANCE_VERIFY:
        raise InputError(f"acceptance_verify must be one of {', '.join(ACCEPTANCE_VERIFY)}, got {acceptance_verify!r}")
    if not 0 <= acceptance_weight <= 1:
        raise InputError(f"acceptance_weight must be in [0, 1], got {acceptance_weight}")
    me = drafter.masked_embedding if cluster_of is not None else None
    trained = [o for o in outs if bool(o.mask.any())]
    states = [o.s[o.mask] for o in trained]
    # the cluster layer learns from detached states (its own cross-entropy, below)
    scores = [me.centroids(s.detach()) for s in states] if me is not None else [None] * len(states)
    cand = remap = None
    if not full_vocab:
        parts = [batch.topk.flatten(), batch.labels.flatten()]
        if hard_negatives and me is not None and mining_head is not None:
            parts.append(drafted_tokens(drafter, states, scores, hard_negatives, mining_head))
        cand = torch.unique(torch.cat(parts))
        remap = torch.full((drafter.cfg.vocab_size,), -1, dtype=torch.long)
        remap[cand] = torch.arange(cand.numel())
    total = 0.0
    stats = []
    acc_a = []  # per step: [B, T] acceptance probabilities (0 where not trained)
    computed = iter(zip(states, scores))
    for o in outs:
        m = o.mask
        n = int(m.sum())
        if n == 0:
            stats.append((0, 0, 0))
            if acceptance_weight:
                acc_a.append(torch.zeros(m.shape, device=m.device))
            continue
        (s, sc), lab = next(computed), o.labels[m]
        logits = drafter.token_logits(s, cand)
        y = lab if remap is None else remap[lab]
        logp = F.log_softmax(logits.float(), dim=-1)
        loss = _nll(logp, y, o, batch, remap, soft_labels).mean()
        if acceptance_weight:
            loss = (1 - acceptance_weight) * loss
            a = acceptance_probs(logp, y, o, batch, remap, acceptance_verify)
            acc_a.append(torch.zeros(m.shape, dtype=a.dtype, device=a.device).masked_scatter(m, a))
        if feature_weight:
            th = o.target_hidden[m].to(s.dtype)
            loss = loss + feature_weight * (1 - F.cosine_similarity(s.float(), th.float(), dim=-1)).mean()
        hits = 0
        if sc is not None:
            c = cluster_of[lab]
            loss = loss + F.cross_entropy(sc.float(), c)
            # the label's cluster is chosen (among the top_k) when fewer than top_k clusters score
            # higher: a comparison, not a top-k of every row (ties aside, the same count)
            hits = int(((sc > sc.gather(1, c[:, None])).sum(-1) < me.top_k).sum())
        total = total + loss
        stats.append((n, int((logits.argmax(-1) == y).sum()), hits))
    total = total / len(outs)
    if acceptance_weight:
        total = total + acceptance_weight * acceptance_loss(torch.stack(acc_a), torch.stack([o.mask for o in outs]))
    return total, stats


@dataclass
class Objective:
    """The training loss of a batch: K unrolled steps, then `step_losses` with these settings."""

    draft_tokens: int
    full_vocab: bool
    feature_weight: float  # used only while the drafter's head is the target's frozen one
    soft_labels: bool
    bf16: bool  # autocast the forward to bfloat16
    device: str
    acceptance_weight: float = 0.0  # share of the acceptance objective L_acc in the loss (0: cross-entropy only)
    acceptance_verify: str = "greedy"  # its per-step acceptance: "greedy" q(y) or "sampled" sum min(p, q)
    # per trained position, the drafter's own top tokens added to the sampled loss's candidates
    # (`drafted_tokens`; a clustered head over the target's frozen embedding only)
    hard_negatives: int = 0

    def __post_init__(self):
        self._head = None  # (source weight, its cluster-major copy) for drafted_tokens

    def _mining_head(self, drafter: MTPDrafter) -> torch.Tensor:
        """A float32 cluster-major copy of the frozen LM weight, made once (0.7 GB for 262k x 640)."""
        w, me = drafter.model.embed_tokens.weight, drafter.masked_embedding
        if self._head is None or self._head[0] is not w:
            self._head = (w, w.detach().float().index_select(0, me.token_ordering)
                          .view(me.num_centroids, me.per_cluster, -1).contiguous())
        return self._head[1]

    def __call__(self, drafter: MTPDrafter, target: Decoder, items: list[Activations]):
        """(loss, per-step (positions, correct, cluster hits)) of a batch of activations."""
        batch = collate(items, drafter.dtype)
        me = drafter.masked_embedding
        head_is_target = not drafter.model.embed_tokens.weight.requires_grad
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            outs = unroll(drafter, target, batch, self.draft_tokens)
            mine = self.hard_negatives and me is not None and not self.full_vocab and head_is_target
            return step_losses(drafter, outs, batch, full_vocab=self.full_vocab,
                               feature_weight=self.feature_weight if head_is_target else 0.0,
                               cluster_of=me.token_clusters() if me is not None else None,
                               soft_labels=self.soft_labels, acceptance_weight=self.acceptance_weight,
                               acceptance_verify=self.acceptance_verify, hard_negatives=self.hard_negatives,
                               mining_head=self._mining_head(drafter) if mine else None)
