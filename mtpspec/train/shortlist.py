"""A shortlist LM head for answering training prompts: the target's exact logits of a few clusters
of likely tokens, -inf for the rest.

Self-distillation has the target answer thousands of prompts. For a small target with a large
vocabulary the LM head is most of each decode step (Gemma 3 270M: 262,144 x 640 weights against
~100M in its blocks, ~60% of a 128-row step). The shortlist computes it for a few clusters only:

- the vocabulary in C clusters of equal size (the drafter's clustered head's token ordering:
  balanced k-means of the output embeddings, `clustering.py`);
- a linear scorer of the target's final hidden state h over the clusters, fitted (`fit`) to put
  the cluster of the target's argmax first, on positions the exact head labelled (the run's first
  shard, which the trainer answers with the full head);
- the exact logits h . w_v of the tokens of the top_k clusters the scorer ranks highest.

Greedy decoding over the shortlist picks the target's own argmax whenever that token is in the
shortlist, and the best shortlisted token otherwise. How often it is in the shortlist (`recall`)
is measured on positions held out of the fit; the trainer uses the shortlist only when that recall
is at least `MIN_RECALL`, so the answers it trains on are the target's greedy answers at that rate
(the few others are still the target's best token among tens of thousands of likely ones). The
hidden states and K/V recorded for the drafter are the target's exact ones either way.

Prompts the target writes (sampled) are not: on the openings Gemma 3 270M writes, the shortlist
fitted on its answers leaves out 13% of the probability and misses the argmax at 7.9% of positions
(`drafters/shortlist_truncation.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import kernels
from ..models.drafter import token_clusters

MIN_RECALL = 0.99  # held-out share of positions whose argmax the shortlist holds, to use it
FIT_POSITIONS = 50_000  # at most this many positions of the first shard fit the scorer


@dataclass
class Shortlist:
    """weight [C, P, H] fp32: the LM head's rows cluster-major (row (c, p) = token order[c * P + p]);
    order [V]: that permutation; scorer [C, H] and bias [C]: the cluster scores' linear map;
    top_k: clusters scored exactly per position; softcap: the target's final logit softcap (or
    None); recall: the held-out share of argmaxes inside the shortlist measured by `fit`; always
    [A]: tokens scored at every position whatever their cluster (the tokens that end a sequence:
    a shortlist that missed one could never end an answer or a prompt)."""

    weight: torch.Tensor
    order: torch.Tensor
    scorer: torch.Tensor
    bias: torch.Tensor
    top_k: int
    softcap: float | None = None
    recall: float | None = None
    always: torch.Tensor | None = None
    # the logits buffer `__call__` returns (all -inf but the last call's candidates) and those ids
    _buf: torch.Tensor | None = field(default=None, init=False, repr=False)
    _written: torch.Tensor | None = field(default=None, init=False, repr=False)
    _always_rows: torch.Tensor | None = field(default=None, init=False, repr=False)  # [A, H] weight rows

    @property
    def vocab_size(self) -> int:
        return self.order.numel()

    def candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, top_k * P + A], exact logits [N, top_k * P + A] fp32) of the shortlisted tokens
        (and the `always` ones) of each final hidden state hidden [N, H]."""
        s = hidden.float().contiguous()
        top = self._clusters(s)
        c, p, _ = self.weight.shape
        vals = kernels.cluster_scores(self.weight, s, top)
        if vals is None:  # no extension (or not a CPU): the same products in torch
            vals = torch.einsum("nkph,nh->nkp", self.weight[top], s).reshape(s.shape[0], -1)
        ids = self.order.view(c, p)[top].reshape(s.shape[0], -1)
        if self.always is not None and self.always.numel():
            if self._always_rows is None:
                pos = torch.empty_like(self.order)  # each token's row in the cluster-major weight
                pos[self.order] = torch.arange(self.order.numel(), device=self.order.device)
                self._always_rows = self.weight.view(-1, s.shape[1])[pos[self.always]]
            ids = torch.cat([ids, self.always.expand(s.shape[0], -1)], dim=1)
            vals = torch.cat([vals, s @ self._always_rows.T], dim=1)
        if self.softcap is not None:
            vals = torch.tanh(vals / self.softcap) * self.softcap
        return ids, vals

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [..., V]: the shortlist's exact logits, -inf elsewhere; their argmax [...]) of
        final hidden states hidden [..., H]. The logits are a view of a buffer the next call
        rewrites (a fresh [rows, V] tensor per decode step costs more in page faults than the
        shortlist's products): valid until then, as a decode loop reads them; clone to keep them."""
        lead = hidden.shape[:-1]
        ids, vals = self.candidates(hidden.reshape(-1, hidden.shape[-1]))
        n = ids.shape[0]
        if self._buf is None or self._buf.shape[0] < n or self._buf.device != ids.device:
            self._buf = torch.full((n, self.vocab_size), float("-inf"), dtype=torch.float32, device=ids.device)
        elif self._written is not None:  # back to -inf where the last call wrote
            self._buf[: self._written.shape[0]].scatter_(1, self._written, float("-inf"))
        logits = self._buf[:n]
        logits.scatter_(1, ids, vals)
        self._written = ids
        best = ids.gather(1, vals.argmax(dim=-1, keepdim=True)).squeeze(1)
        return logits.view(*lead, -1), best.view(lead)

    def hits(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[N] bool: whether each label (the exact head's argmax) is among the shortlisted tokens."""
        cluster_of = token_clusters(self.order, self.weight.shape[1])
        inside = (self._clusters(hidden.float()) == cluster_of[labels][:, None]).any(dim=-1)
        return inside | torch.isin(labels, self.always) if self.always is not None else inside

    def _clusters(self, s: torch.Tensor) -> torch.Tensor:
        """The top_k clusters [N, top_k] the scorer ranks highest for fp32 states s [N, H]."""
        return torch.topk(F.linear(s, self.scorer, self.bias), self.top_k, dim=-1).indices

    @classmethod
    @torch.no_grad()
    def fit(cls, lm_weight: torch.Tensor, order: torch.Tensor, hidden: torch.Tensor, topk: torch.Tensor, *,
            n_clusters: int, top_k: int | tuple[int, ...], softcap: float | None = None, steps: int = 600,
            batch: int = 1024, lr: float = 2e-3, weight_decay: float = 3e-3, holdout: float = 0.2,
            min_recall: float = MIN_RECALL, seed: int = 0, always: torch.Tensor | None = None) -> "Shortlist":
        """A shortlist of the LM head lm_weight [V, H] clustered by `order` (a cluster-major
        permutation, n_clusters clusters), its scorer fitted on final hidden states hidden [N, H]
        and the exact head's top tokens there, topk [N, k] (argmax first). The scorer starts from
        the clusters' mean weight rows (h . mean = the mean logit of a cluster's tokens) and learns
        a correction D (and a bias) by Adam over `steps` batches of `batch` positions (seeded: the
        same data gives the same shortlist), minimising the cross-entropy of the clusters of the
        top tokens (weight 1/2 for the argmax's, 1/(2(k-1)) for each other's; a wider target than the
        argmax alone, which overfits a few thousand positions) + weight_decay |D|^2. `recall`: the
        share of a `holdout` share of the positions (never fitted) whose argmax the shortlist holds.
        top_k: clusters scored per position, or sizes to try: the smallest whose recall reaches
        min_recall (else the largest). always: tokens scored at every position (see the class)."""
        v, h = lm_weight.shape
        if v % n_clusters or order.numel() != v:
            raise ValueError(f"{n_clusters} clusters do not split a vocabulary of {v} tokens")
        p = v // n_clusters
        weight = lm_weight.float()[order].reshape(n_clusters, p, h).contiguous()
        n, k = topk.shape
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        n_test = min(n - 1, int(holdout * n))
        test, train = perm[:n_test], perm[n_test:]
        x = hidden.float()
        y = token_clusters(order, p)[topk.long()]  # [N, k]
        share = torch.full((k,), 0.5 / (k - 1)) if k > 1 else torch.ones(1)  # the argmax's cluster: 1/2
        share[0] = 0.5 if k > 1 else 1.0
        base = weight.mean(dim=1)
        delta, bias = torch.zeros(n_clusters, h), torch.zeros(n_clusters)
        with torch.enable_grad():
            params = [delta.requires_grad_(), bias.requires_grad_()]
            opt = torch.optim.Adam(params, lr=lr)
            for step in range(steps):
                b = train[torch.randint(train.numel(), (min(batch, train.numel()),), generator=g)]
                logp = F.log_softmax(F.linear(x[b], base + delta, bias), dim=-1)
                loss = -(logp.gather(1, y[b]) * share).sum(-1).mean() + weight_decay * delta.square().sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        sizes = sorted({top_k} if isinstance(top_k, int) else set(top_k))
        out = cls(weight, order.clone(), (base + delta).detach(), bias.detach(), sizes[-1], softcap,
                  always=None if always is None else torch.as_tensor(always, dtype=torch.long).unique())
        for size in sizes if n_test else sizes[-1:]:
            out.top_k = size
            if n_test:
                out.recall = float(out.hits(x[test], topk[test, 0].long()).float().mean())
                if out.recall >= min_recall:
                    break
        return out

    def to(self, device: torch.device | str) -> "Shortlist":
        """This shortlist with its tensors on `device`."""
        return Shortlist(self.weight.to(device), self.order.to(device), self.scorer.to(device), self.bias.to(device),
                         self.top_k, self.softcap, self.recall, None if self.always is None else self.always.to(device))


def fit_on_answers(model, order: torch.Tensor, answers: list, *, n_clusters: int, seed: int = 0,
                   always=None) -> Shortlist:
    """The shortlist of `model`'s (a Decoder's) LM head clustered by `order` (n_clusters clusters),
    fitted on answered sequences (`harvest.Activations`: the target's final hidden states and its
    top tokens at each position) at their labelled positions, from each prompt's last on (at most
    FIT_POSITIONS, a seeded sample), trying C/64, C/32 and C/16 clusters (`Shortlist.fit`); always:
    the tokens that end a sequence (scored at every position)."""
    hidden = torch.cat([a.hidden[max(0, a.loss_from - 1):] for a in answers])
    topk = torch.cat([a.topk[max(0, a.loss_from - 1):] for a in answers])
    if hidden.shape[0] > FIT_POSITIONS:
        keep = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(seed))[:FIT_POSITIONS]
        hidden, topk = hidden[keep], topk[keep]
    head = model.lm_head
    weight = head.unpacked_weight() if hasattr(head, "unpacked_weight") else head.weight.detach()
    return Shortlist.fit(weight.cpu(), order.cpu(), hidden, topk, n_clusters=n_clusters,
                         top_k=tuple(max(1, n_clusters // d) for d in (64, 32, 16)),
                         softcap=model.cfg.final_softcap, seed=seed, always=always)


@contextlib.contextmanager
def shortlisted(model, shortlist: Shortlist | None):
    """`model` (a Decoder) computes its logits with `shortlist` inside the block (None: unchanged)."""
    if shortlist is None:
        yield model
        return
    before, model.head_shortlist = model.head_shortlist, shortlist
    try:
        yield model
    finally:
        model.head_shortlist = before
