"""Held-out evaluation of a drafter: mean accepted length (tokens per target forward, bonus token
included) and per-position acceptance, measured with the real MtpProposer in our decoding loop
(greedy, fixed K)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import InputError
from ..prompts_file import read_prompts


def acceptance(engine, prompts: list[str], k: int, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Aggregate over all verification rounds of all prompts (an engine with an MTP proposer)."""
    t0 = time.time()
    res = engine.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, draft_tokens=k)
    rounds = emitted = 0.0
    acc = [0.0] * k
    prop = [0.0] * k
    for r in res:
        st = r.stats
        tau = st["mean_accepted_length"]
        n_rounds = max(0, len(r.token_ids) - 1) / tau if tau else 0.0
        rounds += n_rounds
        emitted += n_rounds * tau
        for i, a in enumerate(st["acceptance_per_position"][:k]):
            acc[i] += a * n_rounds
            prop[i] += n_rounds
    return {"prompts": len(res), "draft_tokens": k, "max_new_tokens": max_new_tokens,
            "mean_accepted_length": round(emitted / rounds, 4) if rounds else 0.0,
            "acceptance_per_position": [round(a / p, 4) if p else 0.0 for a, p in zip(acc, prop)],
            "seconds": round(time.time() - t0, 1)}


def evaluate_drafter(drafter: str | Path, prompts: str | Path, *, target: str | None = None, k: int | None = None,
                     max_new_tokens: int = 64, limit: int | None = None, batch_size: int = 8) -> dict:
    """Mean accepted length of a drafter folder on a prompts file (.jsonl {"prompt"} or .txt)."""
    import mtpspec
    from ..drafter_checkpoint import read_drafter_config

    _, k_ckpt = read_drafter_config(drafter)
    k = k or k_ckpt or 4
    eng = mtpspec.load(target, drafter=str(drafter), draft_tokens=k)
    ps = read_prompts(prompts)[:limit] if limit else read_prompts(prompts)
    out = acceptance(eng, ps, k, max_new_tokens, batch_size)
    out["prompts_file"] = str(prompts)
    return out
