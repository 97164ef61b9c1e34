"""Held-out evaluation of a drafter: mean accepted length (tokens per target forward, bonus token
included) and per-position acceptance, measured with the real MtpProposer in our decoding loop
(greedy, fixed K; chains, or draft trees of K levels if the engine's proposer drafts trees)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..acceptance import AcceptanceTotals
from ..prompts_file import read_prompts


def acceptance(engine, prompts: list[str], k: int, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Aggregate over all verification rounds of all prompts (an engine with an MTP proposer),
    summed from each sequence's counts."""
    from ..decoding.loop import Request, decode
    from ..decoding.sampling import SamplingParams

    t0 = time.time()
    requests = [Request(engine.encode(p), max_new_tokens, SamplingParams(), engine.eos_ids) for p in prompts]
    seqs = decode(engine.model, requests, engine.plan.with_draft_tokens(k), slots=batch_size)
    totals = AcceptanceTotals.of(s.stats for s in seqs)
    per_position = totals.acceptance_per_position[:k]
    per_position += [None] * (k - len(per_position))
    return {"prompts": len(seqs), "draft_tokens": k, "max_new_tokens": max_new_tokens,
            "mean_accepted_length": round(totals.mean_accepted_length or 0.0, 4),
            "acceptance_per_position": [round(a or 0.0, 4) for a in per_position],
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
        eng.plan = eng.plan.with_proposer(MtpProposer(eng.proposer.drafter.full_head_copy().prepare()))
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
    batch = DecodeBatch(engine.model, 1, len(prompt) + 2)
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
