"""Held-out evaluation of a drafter: mean accepted length (tokens per target forward, bonus token
included) and per-position acceptance, measured with the real MtpProposer in our decoding loop
(greedy, fixed K; chains, or draft trees of K levels if the engine's proposer drafts trees): on a
prompts file (`evaluate_drafter`) or on the broad held-out benchmark, per category and as the
unweighted mean over categories (`evaluate_drafter_heldout`, see `mtpspec.bench.heldout`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..acceptance import AcceptanceTotals
from ..prompts_file import read_prompts


def _decode_stats(engine, prompt_ids: list[list[int]], k: int, max_new_tokens: int, batch_size: int) -> list:
    """Each prompt's `SequenceStats` (greedy, K drafted every round), in prompt order."""
    from ..decoding.loop import Request, decode
    from ..decoding.sampling import SamplingParams

    requests = [Request(ids, max_new_tokens, SamplingParams(), engine.eos_ids) for ids in prompt_ids]
    return [s.stats for s in decode(engine.model, requests, engine.plan.with_draft_tokens(k), slots=batch_size)]


def _summary(totals: AcceptanceTotals, k: int) -> dict:
    per_position = totals.acceptance_per_position[:k]
    per_position += [None] * (k - len(per_position))
    return {"mean_accepted_length": round(totals.mean_accepted_length or 0.0, 4),
            "acceptance_per_position": [round(a or 0.0, 4) for a in per_position]}


def acceptance(engine, prompts: list[str], k: int, max_new_tokens: int = 64, batch_size: int = 8,
               per_prompt: bool = False) -> dict:
    """Aggregate over all verification rounds of all prompts (an engine with an MTP proposer),
    summed from each sequence's counts; per_prompt: also each prompt's [round tokens, rounds]."""
    t0 = time.time()
    stats = _decode_stats(engine, [engine.encode(p) for p in prompts], k, max_new_tokens, batch_size)
    out = {"prompts": len(stats), "draft_tokens": k, "max_new_tokens": max_new_tokens,
           **_summary(AcceptanceTotals.of(stats), k), "seconds": round(time.time() - t0, 1)}
    if per_prompt:
        out["per_prompt"] = [[s.round_tokens, s.rounds] for s in stats]
    return out


def heldout_acceptance(engine, heldout: Mapping[str, Sequence], k: int, max_new_tokens: int = 64,
                       batch_size: int = 8) -> dict:
    """`acceptance` on held-out benchmark prompts ({category: [heldout.Prompt]}, as `load_heldout`
    gives), rendered with the engine's chat template (`encode_prompt`; multi-turn prompts whole).
    Besides the figures over all rounds of all prompts, "heldout" holds tau (mean accepted length)
    and per-position acceptance per category and their unweighted mean, "mean_over_categories"
    (the scoring convention of `mtpspec.bench.heldout`; record: `bench.heldout_scores`)."""
    from ..bench.heldout import encode_prompt
    from ..bench.heldout_scores import category_record, category_totals

    t0 = time.time()
    prompts = [p for ps in heldout.values() for p in ps]
    stats = _decode_stats(engine, [encode_prompt(engine, p) for p in prompts], k, max_new_tokens, batch_size)
    per_category = category_record(category_totals(((p.category, st) for p, st in zip(prompts, stats)), list(heldout)), k)
    return {"prompts": len(stats), "draft_tokens": k, "max_new_tokens": max_new_tokens,
            **_summary(AcceptanceTotals.of(stats), k), "heldout": per_category, "seconds": round(time.time() - t0, 1)}


def _drafter_engine(drafter, target, k: int | None, full_head: bool, engine):
    """(K, the engine evaluating `drafter`): `engine` if given, else loaded; with full_head, a copy
    drafting with the clustered drafter's full LM head."""
    import mtpspec
    from ..decoding.mtp import MtpProposer
    from ..drafter_checkpoint import read_drafter_config

    _, k_ckpt = read_drafter_config(drafter)
    k = k or k_ckpt or 4
    eng = engine or mtpspec.load(target, drafter=str(drafter), draft_tokens=k, draft_tree=None, prompt_lookup=False)
    if full_head:
        from ..decoding.lookup import PromptLookupProposer

        eng = copy.copy(eng)
        full = MtpProposer(eng.proposer.drafter.full_head_copy().prepare())
        if isinstance(eng.proposer, PromptLookupProposer):  # the same lookup in front of the full head
            full = PromptLookupProposer(full, eng.proposer.lookup.min_ngram, eng.proposer.lookup.max_ngram)
        eng.plan = eng.plan.with_proposer(full)
    return k, eng


def _head(eng, full_head: bool) -> str:
    return "full" if full_head or not eng.proposer.drafter.cfg.clustered else "clustered"


def evaluate_drafter(drafter: str | Path, prompts: str | Path, *, target: str | None = None, k: int | None = None,
                     max_new_tokens: int = 64, limit: int | None = None, batch_size: int = 8,
                     full_head: bool = False, engine=None) -> dict:
    """Mean accepted length of a drafter folder on a prompts file (.jsonl {"prompt"} or .txt).
    full_head: evaluate a clustered drafter's weights with the full LM head instead. `engine`: an
    already loaded engine with this drafter (saves loading it again)."""
    k, eng = _drafter_engine(drafter, target, k, full_head, engine)
    ps = read_prompts(prompts)[:limit] if limit else read_prompts(prompts)
    out = acceptance(eng, ps, k, max_new_tokens, batch_size)
    out["prompts_file"] = str(prompts)
    out["head"] = _head(eng, full_head)
    return out


def evaluate_drafter_heldout(drafter: str | Path, heldout: Mapping[str, Sequence] | None = None, *,
                             target: str | None = None, k: int | None = None, max_new_tokens: int = 64,
                             batch_size: int = 8, full_head: bool = False, engine=None) -> dict:
    """A drafter folder on the broad held-out benchmark: `heldout_acceptance` on `heldout`
    ({category: prompts}, e.g. `load_heldout("math,coding", per_category=4)`; None = all of it),
    with "prompts_file" None and "head" as `evaluate_drafter`."""
    from ..bench.heldout import load_heldout

    heldout = load_heldout() if heldout is None else heldout
    k, eng = _drafter_engine(drafter, target, k, full_head, engine)
    out = heldout_acceptance(eng, heldout, k, max_new_tokens, batch_size)
    out["prompts_file"] = None
    out["head"] = _head(eng, full_head)
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
