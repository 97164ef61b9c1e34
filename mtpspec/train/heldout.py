"""Held-out evaluation during training: the mean accepted length of the drafter being trained,
measured with the real MtpProposer on held-out prompts (greedy, fixed K), and the rule that
decides which evaluated step the run keeps (`within_noise`)."""

from __future__ import annotations

import copy
import math

from ..models.drafter import MTPDrafter
from .evaluate import acceptance


class HeldOut:
    def __init__(self, engine, prompts: list[str], draft_tokens: int, max_new_tokens: int) -> None:
        """engine: the target's engine (its drafter, if any, is not used); prompts: the held-out prompts."""
        self.engine, self.prompts, self.draft_tokens, self.max_new_tokens = engine, prompts, draft_tokens, max_new_tokens

    def measure(self, drafter: MTPDrafter) -> dict:
        """{prompts, mean_accepted_length, acceptance_per_position, eval_seconds, per_prompt} of a
        copy of `drafter` prepared for inference in the target's dtype; per_prompt: each prompt's
        [tokens emitted in verification rounds, rounds] (what `within_noise` compares)."""
        from ..decoding.mtp import MtpProposer

        d = copy.deepcopy(drafter).to(self.engine.model.dtype).prepare()
        d.draft_tokens = self.draft_tokens
        eng = self.engine.with_proposer(MtpProposer(d), draft_tokens=self.draft_tokens, draft_tree=None)
        a = acceptance(eng, self.prompts, self.draft_tokens, self.max_new_tokens, per_prompt=True)
        return {"prompts": a["prompts"], "mean_accepted_length": a["mean_accepted_length"],
                "acceptance_per_position": a["acceptance_per_position"], "eval_seconds": a["seconds"],
                "per_prompt": a["per_prompt"]}


NOISE_Z = 2.0  # standard errors a later evaluation may fall below the best before an earlier step is kept


def difference_standard_error(new: dict, best: dict) -> float:
    """Standard error of tau_new - tau_best, two evaluations (`HeldOut.measure`) on the same prompts,
    over the draw of held-out prompts (0.0 when the evaluations lack per-prompt counts or differ in
    prompts: then only the means are compared).

    tau = Y / X over the n prompts, y_i the tokens prompt i emitted in verification rounds and x_i
    its rounds (over the prompts with rounds in both). Greedy decoding is lossless, so both
    evaluations emit the same text; they differ in rounds (and in y_i only by where the last round
    overshoots max_new_tokens). To first order (delta method) tau - E[tau] = sum_i e_i with
    e_i = (y_i - tau x_i) / X, which sums to 0 over the prompts; the difference of two such
    estimates on the same prompts is sum_i d_i, d_i = e_i(new) - e_i(best), and its variance over
    the draw of prompts is estimated by n / (n - 1) * sum_i d_i^2 (pairing by prompt removes how
    hard each prompt is, which is most of the spread)."""
    a, b = new.get("per_prompt"), best.get("per_prompt")
    if not a or not b or len(a) != len(b):
        return 0.0
    pairs = [(ca, cb) for ca, cb in zip(a, b) if ca[1] and cb[1]]
    if len(pairs) < 2:
        return 0.0

    def residuals(counts: list) -> list[float]:
        y, x = sum(c[0] for c in counts), sum(c[1] for c in counts)
        tau = y / x
        return [(yi - tau * xi) / x for yi, xi in counts]

    d = [ra - rb for ra, rb in zip(residuals([p[0] for p in pairs]), residuals([p[1] for p in pairs]))]
    n = len(d)
    return math.sqrt(n / (n - 1) * sum(v * v for v in d))


def within_noise(new: dict, best: dict, z: float = NOISE_Z) -> bool:
    """Whether evaluation `new` is no worse than `best` beyond the held-out set's noise:
    tau_new >= tau_best - z * `difference_standard_error`. A run keeps its latest evaluated step
    unless this fails: on a few held-out prompts, picking the highest mean kept an earlier step
    by a margin smaller than the noise, which cost 0.04 on the broad benchmark."""
    return new["mean_accepted_length"] >= best["mean_accepted_length"] - z * difference_standard_error(new, best)
