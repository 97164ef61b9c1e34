"""Held-out evaluation during training: the mean accepted length of the drafter being trained,
measured with the real MtpProposer on held-out prompts (greedy, fixed K)."""

from __future__ import annotations

import copy

from ..models.drafter import MTPDrafter
from .evaluate import acceptance


class HeldOut:
    def __init__(self, engine, prompts: list[str], draft_tokens: int, max_new_tokens: int) -> None:
        """engine: the target's engine (its drafter, if any, is not used); prompts: the held-out prompts."""
        self.engine, self.prompts, self.draft_tokens, self.max_new_tokens = engine, prompts, draft_tokens, max_new_tokens

    def measure(self, drafter: MTPDrafter) -> dict:
        """{prompts, mean_accepted_length, acceptance_per_position, eval_seconds} of a copy of
        `drafter` prepared for inference in the target's dtype."""
        from ..decoding.mtp import MtpProposer

        d = copy.deepcopy(drafter).to(self.engine.model.dtype).prepare()
        d.draft_tokens = self.draft_tokens
        eng = self.engine.with_proposer(MtpProposer(d), draft_tokens=self.draft_tokens, draft_tree=None)
        a = acceptance(eng, self.prompts, self.draft_tokens, self.max_new_tokens)
        return {"prompts": a["prompts"], "mean_accepted_length": a["mean_accepted_length"],
                "acceptance_per_position": a["acceptance_per_position"], "eval_seconds": a["seconds"]}
