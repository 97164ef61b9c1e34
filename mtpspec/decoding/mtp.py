"""`MtpProposer`: drafts with an MTP drafter (models/drafter.py) behind the `Proposer` interface.

Per round: one attention context over the target cache (each row at its own length, constant
position), then k autoregressive drafter steps, batched over rows. Greedy rows draft the argmax;
sampled rows draw from `probabilities(drafter_logits, params)` (temperature / top-k / top-p applied
exactly as on the target side) with the row's own generator, and that distribution is returned
for rejection sampling. The target cache is only read.
"""

from __future__ import annotations

import torch

from ..models.drafter import MTPDrafter
from .proposers import DraftInput, Proposal
from .sampling import probabilities


class MtpProposer:
    """Proposer backed by an `MTPDrafter` (check it against the target first: `load_drafter`
    does, or `drafter.check_target(target.cfg)`)."""

    def __init__(self, drafter: MTPDrafter) -> None:
        self.drafter = drafter

    @torch.inference_mode()
    def propose(self, inp: DraftInput, k: int) -> Proposal:
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
