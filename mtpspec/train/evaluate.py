"""Held-out evaluation of a drafter: mean accepted length (tokens per target forward, bonus token
included) and per-position acceptance, measured with the real MtpProposer in our decoding loop
(greedy, fixed K; chains, or draft trees of K levels if the engine's proposer drafts trees)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

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
                     max_new_tokens: int = 64, limit: int | None = None, batch_size: int = 8,
                     full_head: bool = False, engine=None) -> dict:
    """Mean accepted length of a drafter folder on a prompts file (.jsonl {"prompt"} or .txt).
    full_head: evaluate a clustered drafter's weights with the full LM head instead. `engine`: an
    already loaded engine with this drafter (saves loading it again)."""
    import mtpspec
    from ..decoding.mtp import MtpProposer
    from ..drafter_checkpoint import read_drafter_config

    _, k_ckpt = read_drafter_config(drafter)
    k = k or k_ckpt or 4
    eng = engine or mtpspec.load(target, drafter=str(drafter), draft_tokens=k, draft_tree=None)
    if full_head:
        eng = copy.copy(eng)
        eng.proposer = MtpProposer(eng.proposer.drafter.full_head_copy().prepare(), eng.proposer.tree)
    ps = read_prompts(prompts)[:limit] if limit else read_prompts(prompts)
    out = acceptance(eng, ps, k, max_new_tokens, batch_size)
    out["prompts_file"] = str(prompts)
    out["head"] = "full" if full_head or not eng.proposer.drafter.cfg.clustered else "clustered"
    return out


@torch.inference_mode()
def head_costs(engine, repeats: int = 50) -> dict:
    """Batch-1 costs (ms, medians) of the drafter's LM head alone and of one whole drafting step,
    with the drafter's own head and, for a clustered drafter, with the full head (same weights)."""
    from ..decoding.loop import DecodeBatch, Request
    from ..decoding.mtp import MtpProposer
    from ..decoding.proposers import DraftInput
    from ..decoding.sampling import SamplingParams

    drafter = engine.proposer.drafter
    variants = {"clustered" if drafter.cfg.clustered else "full": drafter}
    if drafter.cfg.clustered:
        variants["full"] = drafter.full_head_copy().prepare()
    prompt = list(range(10, 74))  # 64 context tokens
    batch = DecodeBatch(engine.model, 1, len(prompt) + 2, None, 0)
    batch.add([Request(prompt, 1, SamplingParams(), frozenset())])
    inp = DraftInput(engine.model, batch.cache, batch.last_tokens, batch.last_hidden, batch.history,
                     [SamplingParams()], [None], [True])
    s = torch.randn(1, drafter.cfg.hidden_size, dtype=drafter.dtype, device=drafter.device)

    def median_ms(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(sorted(times)[len(times) // 2] * 1e3, 3)

    out = {}
    for name, d in variants.items():
        prop = MtpProposer(d)
        out[name] = {"head_ms": median_ms(lambda d=d: d.logits(s)),
                     "draft_step_ms": median_ms(lambda p=prop: p.propose(inp, 1))}
    if "clustered" in out:
        out["head_cost_ratio_full_over_clustered"] = round(out["full"]["head_ms"] / out["clustered"]["head_ms"], 2)
        out["step_cost_ratio_full_over_clustered"] = round(out["full"]["draft_step_ms"] / out["clustered"]["draft_step_ms"], 2)
    return out
