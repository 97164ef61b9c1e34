"""Verification of drafted tokens: which drafts the target accepts, and the token it adds.

Terms (per sequence, per round). The proposer drafts K tokens d_1..d_K. The target runs ONE
forward over [x, d_1, ..., d_K] (x = the last emitted token) and so gives K+1 next-token
distributions p_1..p_{K+1}, where p_i is the target's distribution for the position of d_i and
p_{K+1} the one after d_K.

- accepted tokens: the longest prefix d_1..d_n that verification keeps (0 <= n <= K).
- rejected token: d_{n+1}, the first draft not kept (none if n = K). Everything after it is
  discarded too.
- bonus token: one token the target contributes itself at position n+1: if n < K it replaces
  the rejected draft (drawn from the residual distribution, below); if n = K it is drawn from
  p_{K+1}. So every round emits n + 1 tokens, and a round costs one target forward.

Greedy (temperature 0): d_i is accepted iff d_i = argmax p_i, for i = 1..n; the bonus token is
argmax p_{n+1}. The emitted tokens are exactly what plain greedy decoding emits.

Sampling (speculative sampling, Leviathan et al. 2023, Chen et al. 2023): the drafter drew
d_i ~ q_i (its processed distribution; a deterministic proposer has q_i = one-hot(d_i)). Then for
i = 1..K in order, with u_i ~ U(0, 1):

    accept d_i  iff  u_i <= min(1, p_i(d_i) / q_i(d_i))

At the first rejection i = n+1 the bonus token is drawn from the residual

    r(v) = max(p_i(v) - q_i(v), 0) / sum_w max(p_i(w) - q_i(w), 0)

and if all K are accepted the bonus is drawn from p_{K+1}. Each emitted token is then distributed
exactly as p (the target's processed distribution): P(emit v) = q(v) min(1, p(v)/q(v)) +
(1 - sum_w min(p(w), q(w))) r(v) = min(p(v), q(v)) + max(p(v) - q(v), 0) = p(v).
p and q must be processed with the same temperature / top-k / top-p (see sampling.py).

These functions are pure: tensors in, tensors out, one row at a time or a batch of rows.
"""

from __future__ import annotations

import torch

from .sampling import sample


def verify_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification for a batch.

    draft: [B, K] drafted token ids. target_logits: [B, K+1, V].
    Returns (n_accepted [B], tokens [B, K+1]) where row b emits tokens[b, : n_accepted[b] + 1]:
    its accepted drafts followed by the bonus token (tokens beyond that are the target's argmax at
    later positions, meaningless, and must be ignored).
    """
    target = target_logits.argmax(dim=-1)  # [B, K+1]
    n, _ = verify_greedy_rows(draft.tolist(), target)
    return torch.tensor(n, dtype=torch.long, device=draft.device), target


def verify_greedy_rows(draft: list[list[int]], target: torch.Tensor) -> tuple[list[int], list[list[int]]]:
    """`verify_greedy` in Python lists, as the decoding loop uses it (two torch calls in all: each
    costs tens of microseconds right after a target forward, whose weight stream flushed the
    caches). draft: B rows of K ids; target: the target's logits [B, K+1, V] or their argmax
    [B, K+1]. Returns (n_accepted per row, the tokens each row emits: accepted drafts + bonus)."""
    if target.dim() == 3:
        target = target.argmax(dim=-1)
    rows = target.tolist()
    n_accepted, emitted = [], []
    for d, t in zip(draft, rows):
        n = 0
        while n < len(d) and d[n] == t[n]:
            n += 1
        n_accepted.append(n)
        emitted.append(t[: n + 1])
    return n_accepted, emitted


def verify_sampled_row(
    draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, list[int]]:
    """Rejection-sampling verification for one row.

    draft: [K] ids; draft_probs: [K, V] the drafter's processed distributions q_i, or None when
    the proposer is deterministic (q_i = one-hot(d_i)); target_probs: [K+1, V] processed p_i.
    Returns (n_accepted, emitted) with emitted = accepted drafts + the bonus token.
    """
    k = draft.shape[0]
    idx = torch.arange(k, device=draft.device)
    p_d = target_probs[idx, draft]  # p_i(d_i)
    q_d = draft_probs[idx, draft] if draft_probs is not None else torch.ones_like(p_d)
    u = torch.rand(k, generator=generator, device=draft.device, dtype=p_d.dtype)
    ok = u * q_d < p_d  # u < p/q, without dividing; a token the target gives p = 0 is never accepted
    n = int(ok.to(torch.long).cumprod(0).sum()) if k else 0
    emitted = draft[:n].tolist()
    if n < k:
        p = target_probs[n]
        q = draft_probs[n] if draft_probs is not None else torch.nn.functional.one_hot(draft[n], p.shape[-1]).to(p)
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        # total == 0 only if p == q exactly, in which case rejection had probability 0; guard anyway
        dist = residual / total if total > 0 else p
        emitted.append(sample(dist, generator))
    else:
        emitted.append(sample(target_probs[k], generator))
    return n, emitted
