"""Speculative decoding benchmark: plain vs speculative decoding of our engine, and transformers'
assisted generation, in one interleaved run.

`run_spec_bench(...)` measures, for every decoding mode (greedy; sampled at `temperature` with a
seed per row), batch size (1, 4, 8 by default) and draft length (fixed K = 1, 2, 4, 8 and the
adaptive policy by default):

* throughput: generated tokens of the batch / wall time of the whole run (prefill included) for
  plain decoding and for speculative decoding through the same loop, as medians over `repeats`
  interleaved repeats (each repeat runs every configuration of that mode and batch size once, in
  an order rotated from repeat to repeat, after one uncounted warm-up each); their ratio is the
  speedup; also the decode-only rates;
* acceptance: mean accepted length (tokens emitted per target forward in the decode phase) and
  acceptance per draft position, summed over all rows and repeats; the mean K actually drafted
  (the adaptive policy's choice); the drafter's share of the decode time;
* losslessness: greedy speculative tokens must equal plain greedy tokens, every row of every run
  (asserted: `BenchMismatch` is raised after the results are written). Sampled runs are lossless
  in distribution only, so their tokens are not compared;
* transformers at batch 1 (greedy; it has no batched speculation): plain `generate`, prompt-lookup
  assisted generation (`prompt_lookup_num_tokens=K`, the counterpart of our n-gram proposer, always
  run so there is always a transformers comparison) next to our n-gram at the same K, and - for a
  Gemma 4 target with an MTP drafter checkpoint - `generate(assistant_model=...)` with the drafter
  loaded as transformers' `Gemma4AssistantForCausalLM`. These are part of the same interleaved
  rotation at batch 1;
* step costs per batch size: a target forward of 1 token, of K+1 tokens (the verify pass; ratio to
  1 token), and the proposer's time to draft K tokens (per drafted token, relative to a 1-token
  target step), measured on a warmed cache by alternating the operations.

It prints rich tables, writes everything (machine info, versions, the command) to a JSON file and
draws a PNG: speedup and mean accepted length against batch size (one line per K) and against K
(one line per batch size). EOS is ignored so every row makes exactly `max_new_tokens` tokens.
"""

from __future__ import annotations

import gc
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..compat import transformers_gemma4_assistant
from ..errors import InputError, MtpspecError
from .plain import (BenchMismatch, _loadavg, _log, _median, _r, _sync, compare_tokens, kernel_info, kernel_summary,
                    machine_info, versions)

DEFAULT_OUT = "bench-results/spec.json"
DEFAULT_PLOT = "bench-results/spec.png"

DraftSetting = int | None  # fixed K, or None = adaptive


def _k_name(k: DraftSetting) -> str:
    return "adaptive" if k is None else str(k)


def _config_name(k: DraftSetting, tree) -> str:
    """'4', 'adaptive', or with a draft tree '4 tree 5:1:2' (the runner/table label)."""
    return _k_name(k) if tree is None else f"{_k_name(k)} tree {tree}"


def parse_draft_tokens(spec: str | Sequence[Any]) -> list[DraftSetting]:
    """"1,2,4,8,adaptive" (or a list of ints / None / "adaptive") -> [1, 2, 4, 8, None]."""
    items = [x.strip() for x in spec.split(",") if x.strip()] if isinstance(spec, str) else list(spec)
    out: list[DraftSetting] = []
    for x in items:
        if x is None or (isinstance(x, str) and x.lower() in ("adaptive", "auto", "a")):
            out.append(None)
            continue
        try:
            k = int(x)
        except (TypeError, ValueError):
            raise InputError(f"draft tokens: {x!r} is neither an integer >= 1 nor 'adaptive'") from None
        if k < 1 or isinstance(x, bool):
            raise InputError(f"draft tokens: {x!r} must be >= 1 (plain decoding is always measured)")
        out.append(k)
    if not out:
        raise InputError("draft tokens: empty list")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
@dataclass
class SpecRun:
    tokens: list[list[int]]
    wall_s: float
    decode_tok_s: float | None
    stats: list[Any] = field(default_factory=list)  # SequenceStats per row (ours only)

    @property
    def tok_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.wall_s


def _ours_runner(model, proposer, batches: list[list[list[int]]], max_new_tokens: int,
                 params_for_row: Callable[[int], Any], k: DraftSetting, max_k: int, device) -> Callable[[], SpecRun]:
    """One run = every batch of `batches` generated in turn (rows numbered across batches)."""
    from ..decoding.draft_length import AdaptiveDraftLength
    from ..decoding.loop import Request, run

    def go() -> SpecRun:
        policy = AdaptiveDraftLength(max_k) if k is None else k  # fresh adaptive state every run
        tokens, stats, wall, dec_time, dec_tokens, row = [], [], 0.0, 0.0, 0, 0
        for prompt_ids in batches:
            reqs = [Request(list(p), max_new_tokens, params_for_row(row + i), frozenset()) for i, p in enumerate(prompt_ids)]
            row += len(prompt_ids)
            _sync(device)
            t0 = time.perf_counter()
            seqs = run(model, reqs, proposer if k != 0 else None, policy)
            _sync(device)
            wall += time.perf_counter() - t0
            dec_time += max(s.stats.decode_time for s in seqs)
            dec_tokens += sum(max(len(s.new_ids) - 1, 0) for s in seqs)
            tokens += [list(s.new_ids) for s in seqs]
            stats += [s.stats for s in seqs]
        return SpecRun(tokens, wall, dec_tokens / dec_time if dec_time > 0 else None, stats)

    return go


def _hf_runner(hf_model, prompts: list[list[int]], max_new_tokens: int, device, **gen_kwargs) -> Callable[[], SpecRun]:
    """transformers generate at batch 1 over each prompt in turn."""

    def go() -> SpecRun:
        tokens, wall = [], 0.0
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                        min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                                        pad_token_id=0, use_cache=True, **gen_kwargs)
            _sync(device)
            wall += time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            if len(new) != max_new_tokens:
                raise MtpspecError(f"transformers generated {len(new)} tokens, expected {max_new_tokens}")
            tokens.append(new)
        return SpecRun(tokens, wall, None)

    return go


def batches_for(plist: list[list[int]], bsz: int, num_prompts: int | None) -> list[list[list[int]]]:
    """The batches one run at batch size bsz generates: prompts 0..n-1 (cycled when the set is
    smaller) in groups of bsz, n = num_prompts rounded up to a multiple of bsz (default: one batch)."""
    n = bsz if not num_prompts else -(-max(num_prompts, bsz) // bsz) * bsz
    rows = [plist[i % len(plist)] for i in range(n)]
    return [rows[i : i + bsz] for i in range(0, n, bsz)]


def _aggregate(runs: list[SpecRun]) -> dict:
    """Acceptance statistics summed over every row of every run."""
    rounds = round_tokens = 0
    prop: list[int] = []
    acc: list[int] = []
    draft = decode = 0.0
    for run in runs:
        for st in run.stats:
            rounds += st.rounds
            round_tokens += st.round_tokens
            draft += st.draft_time
            decode += st.decode_time
            for i, (p, a) in enumerate(zip(st.proposed_per_position, st.accepted_per_position)):
                if i >= len(prop):
                    prop.append(0)
                    acc.append(0)
                prop[i] += p
                acc[i] += a
    return {
        "mean_accepted_length": _r(round_tokens / rounds, 4) if rounds else None,
        "acceptance_per_position": [_r(a / p, 4) if p else None for a, p in zip(acc, prop)],
        "mean_k": _r(sum(prop) / rounds, 3) if rounds else None,
        "drafter_time_share": _r(draft / decode, 4) if decode > 0 else None,
        "rounds": rounds,
        "target_forwards_per_row": _r(rounds / sum(len(r.stats) for r in runs) + 1, 2) if runs and rounds else None,
    }


# ---------------------------------------------------------------------------------------------
# step costs: target 1-token step, verify pass (K+1 tokens), drafting K tokens
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def step_costs(model, proposer, prompt_ids: list[list[int]], ks: Sequence[int], repeats: int, device) -> dict:
    """Median times (ms) at batch len(prompt_ids) on a warmed cache: a 1-token target forward, a
    (K+1)-token target forward (verify), and proposing K tokens; operations alternate, the cache
    is rolled back after each target forward."""
    from ..decoding.loop import DecodeBatch, Request
    from ..decoding.proposers import DraftInput
    from ..decoding.sampling import SamplingParams

    kmax = max(ks)
    bsz = len(prompt_ids)
    max_len = max(len(p) for p in prompt_ids) + 2
    batch = DecodeBatch(model, bsz, max_len, proposer, kmax)
    batch.add([Request(list(p), 1, SamplingParams(), frozenset()) for p in prompt_ids])
    view = batch.cache
    last = batch.last_tokens.to(device)
    inp = DraftInput(model, view, last, batch.last_hidden, batch.history, [SamplingParams()] * bsz,
                     [None] * bsz, [True] * bsz)
    probe = torch.cat([last[:, None], last[:, None].expand(-1, kmax)], dim=1)

    def target(n: int) -> None:
        model(probe[:, :n], view)
        _sync(device)
        view.rollback(n)

    ops: dict[str, Callable[[], None]] = {"target_1": lambda: target(1)}
    for k in ks:
        ops[f"verify_{k}"] = (lambda k=k: target(k + 1))
        if proposer is not None:
            ops[f"draft_{k}"] = (lambda k=k: (proposer.propose(inp, k), _sync(device)))
    times: dict[str, list[float]] = {name: [] for name in ops}
    names = list(ops)
    for i in range(repeats + 2):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            ops[name]()
            dt = time.perf_counter() - t0
            if i >= 2:
                times[name].append(dt)
    t1 = _median(times["target_1"])
    row: dict = {"batch_size": bsz, "context": [len(p) for p in prompt_ids], "target_1_ms": _r(t1 * 1e3),
                 "verify": [], "draft": []}
    for k in ks:
        tv = _median(times[f"verify_{k}"])
        row["verify"].append({"k": k, "tokens": k + 1, "ms": _r(tv * 1e3), "ratio_to_1": _r(tv / t1)})
        if proposer is not None:
            td = _median(times[f"draft_{k}"])
            row["draft"].append({"k": k, "ms": _r(td * 1e3), "per_token_ms": _r(td / k * 1e3, 4),
                                 "per_token_vs_target_step": _r(td / k / t1, 4)})
    return row


# ---------------------------------------------------------------------------------------------
# transformers Gemma 4 assistant
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def run_spec_bench(
    *,
    model: str | Path | None = None,
    drafter: str | Path | None = "ngram",
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_sizes: Sequence[int] = (1, 4, 8),
    draft_tokens: str | Sequence[Any] = (1, 2, 4, 8, None),
    trees: Sequence[Any] = (),
    modes: Sequence[str] = ("greedy", "sampled"),
    temperature: float = 0.7,
    seed: int = 0,
    max_new_tokens: int = 64,
    repeats: int = 3,
    prompts: Sequence[str | list[int]] | None = None,
    num_prompts: int | None = None,
    chat: bool = True,
    transformers_assisted: bool = True,
    assisted_k: int | None = None,
    cost_repeats: int = 10,
    out: str | Path | None = DEFAULT_OUT,
    plot: str | Path | None = DEFAULT_PLOT,
    show_table: bool = True,
    command: str | None = None,
) -> dict:
    """Benchmark speculative against plain decoding (see module docstring); returns the results.

    model: checkpoint folder / .gguf / None (default model). drafter: "ngram", an MTP drafter
    checkpoint folder (gemma4_assistant format), "auto" (the shipped drafter of the default model,
    else "ngram") or None = "ngram". draft_tokens: fixed K values
    and/or None/"adaptive" (e.g. "1,2,4,8,adaptive"). trees: draft tree shapes ("5:1:2" or
    `TreeShape`s; MTP drafters): each K is also run drafting trees of each shape at depth K. modes: "greedy" and/or "sampled"
    (temperature `temperature`, row i seeded with seed + i). assisted_k: K for transformers'
    prompt lookup and our n-gram comparison at batch 1 (default: 4 if in draft_tokens, else the
    largest fixed K). prompts: the prompt set (default: the built-in chat prompts); num_prompts:
    how many of them one run generates, in batches of the batch size (default: one batch, i.e.
    the first B prompts at batch size B). out / plot: JSON and PNG paths (None = do not write).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    from ..api import load, resolve_model_path
    from ..decoding.proposers import NgramProposer
    from ..decoding.sampling import SamplingParams
    from .prompts import bench_prompts

    # ---- argument checks --------------------------------------------------------------------
    for name, v in (("max_new_tokens", max_new_tokens), ("repeats", repeats), ("cost_repeats", cost_repeats)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise InputError(f"batch_sizes must be integers >= 1, got {list(batch_sizes)!r}")
    if num_prompts is not None and (not isinstance(num_prompts, int) or num_prompts < 1):
        raise InputError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    ks = parse_draft_tokens(draft_tokens)
    fixed_ks = [k for k in ks if k is not None]
    from ..decoding.mtp import MtpProposer, TreeShape

    tree_shapes = list(dict.fromkeys(TreeShape.parse(t) for t in trees))
    modes = list(dict.fromkeys(modes))
    if not modes or any(m not in ("greedy", "sampled") for m in modes):
        raise InputError(f"modes must be 'greedy' and/or 'sampled', got {modes!r}")
    if "sampled" in modes and not temperature > 0:
        raise InputError(f"temperature must be > 0 for sampled runs, got {temperature!r}")
    if prompts is not None and not prompts:
        raise InputError("prompts is empty")
    if assisted_k is None:
        assisted_k = 4 if 4 in fixed_ks else (max(fixed_ks) if fixed_ks else 4)
    from ..api import resolve_drafter

    drafter = resolve_drafter(model, drafter) or "ngram"
    drafter_kind = "ngram" if drafter == "ngram" else "mtp"
    if tree_shapes and drafter_kind != "mtp":
        raise InputError("draft trees need an MTP drafter (the n-gram proposer drafts chains)")
    settings = [(k, None) for k in ks] + [(k, t) for t in tree_shapes for k in ks]

    arguments = dict(model=None if model is None else str(model), drafter=str(drafter), device=device, dtype=dtype,
                     batch_sizes=list(batch_sizes), draft_tokens=[_k_name(k) for k in ks],
                     trees=[str(t) for t in tree_shapes], modes=modes,
                     temperature=temperature, seed=seed, max_new_tokens=max_new_tokens, repeats=repeats,
                     prompts=None if prompts is None else list(prompts), num_prompts=num_prompts, chat=chat,
                     transformers_assisted=transformers_assisted, assisted_k=assisted_k, cost_repeats=cost_repeats,
                     out=None if out is None else str(out), plot=None if plot is None else str(plot))

    folder = resolve_model_path(model, cache_dir)
    _log(f"spec bench: model {folder}, drafter {drafter}")
    engine = load(folder, drafter=drafter, draft_tree=None, device=device, dtype=dtype)  # chains; trees below
    dev = engine.model.device
    mtp = getattr(engine.proposer, "drafter", None)
    arguments["drafter_dtype"] = None if mtp is None else str(mtp.dtype).removeprefix("torch.")
    plist, prompt_kind = bench_prompts(engine, prompts, chat)

    results: dict = {
        "benchmark": "spec",
        "model": {"name": engine.name if model is not None else "SmolLM2-135M-Instruct", "folder": str(folder),
                  "model_type": engine.model.cfg.model_type if hasattr(engine.model.cfg, "model_type") else None},
        "drafter": {"name": engine.drafter_name, "kind": drafter_kind, "path": None if drafter == "ngram" else str(drafter),
                    "max_draft_tokens": engine.max_draft_tokens},
        "command": command if command is not None else shlex.join(sys.argv),
        "arguments": arguments,
        "machine": machine_info(),
        "versions": versions(),
        "kernel": kernel_info(),
        "prompts": prompt_kind,
        "notes": {
            "tok_s": "generated tokens of the whole batch / wall time of the run (prefill included); median of repeats",
            "speedup": "spec tok_s / plain tok_s, same mode and batch size, interleaved in the same repeats",
            "mean_accepted_length": "tokens emitted per target forward in the decode phase (accepted drafts + bonus)",
            "acceptance_per_position": "accepted / proposed at draft position i (i accepted only if all before were)",
            "mean_k": "drafted tokens per round (the adaptive policy's mean choice); with a tree, its depth",
            "tree": "draft tree NODES:BEAM:BRANCH of depth K: NODES tokens verified per round, grown by "
                    "expanding the BEAM best nodes of each depth into their BRANCH best children",
            "sampled": f"temperature {temperature}, row i seeded with seed + i; lossless in distribution (tokens not compared)",
            "eos": "ignored; every row makes exactly max_new_tokens tokens",
            "step_costs": "median ms on a warmed cache; verify = target forward of K+1 tokens; draft = propose K tokens",
        },
        "runs": [],
        "transformers": [],
        "step_costs": [],
    }
    mismatches: list[str] = []
    hf = hf_assistant = None
    prev_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if transformers_assisted and 1 in batch_sizes and "greedy" in modes:
            _log("loading transformers model ...")
            hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=engine.model.dtype).to(dev).eval()
            if drafter_kind == "mtp":
                if getattr(hf.config, "model_type", None) in ("gemma4_text", "gemma4"):
                    try:
                        with transformers_gemma4_assistant():
                            hf_assistant = AutoModelForCausalLM.from_pretrained(str(drafter), dtype=engine.model.dtype).to(dev).eval()
                    except Exception as e:  # noqa: BLE001 - report, do not fail the bench
                        results["transformers_assistant_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        _log(f"transformers cannot load the drafter: {results['transformers_assistant_error']}")
                else:
                    results["transformers_assistant_error"] = (
                        "transformers runs MTP drafters only for Gemma 4 targets; prompt lookup is compared instead")
        ngram_for_hf = NgramProposer() if drafter_kind != "ngram" else None

        for mode in modes:
            for bsz in batch_sizes:
                batches = batches_for(plist, bsz, num_prompts)
                firsts = [b[0] for b in batches]  # transformers runs batch 1 only
                if mode == "greedy":
                    params_for_row = lambda i: SamplingParams()  # noqa: E731
                else:
                    params_for_row = lambda i: SamplingParams(temperature, 0, 1.0, seed + i)  # noqa: E731
                runners: dict[str, Callable[[], SpecRun]] = {
                    "plain": _ours_runner(engine.model, None, batches, max_new_tokens, params_for_row, 0, 1, dev)}
                for k, tree in settings:
                    proposer = engine.proposer if tree is None else MtpProposer(engine.proposer.drafter, tree)
                    runners[f"spec_{_config_name(k, tree)}"] = _ours_runner(
                        engine.model, proposer, batches, max_new_tokens, params_for_row, k, engine.max_draft_tokens, dev)
                hf_here = hf is not None and bsz == 1 and mode == "greedy"
                if hf_here:
                    runners["hf_plain"] = _hf_runner(hf, firsts, max_new_tokens, dev)
                    runners["hf_prompt_lookup"] = _hf_runner(hf, firsts, max_new_tokens, dev,
                                                             prompt_lookup_num_tokens=assisted_k)
                    if ngram_for_hf is not None:
                        runners["ours_ngram"] = _ours_runner(engine.model, ngram_for_hf, batches, max_new_tokens,
                                                             params_for_row, assisted_k, assisted_k, dev)
                    if hf_assistant is not None:
                        runners["hf_assistant"] = _hf_runner(hf, firsts, max_new_tokens, dev, assistant_model=hf_assistant)
                names = list(runners)
                _log(f"[{mode}] batch {bsz}: warm-up ({len(names)} configurations) ...")
                ref: dict[str, list[list[int]]] = {}
                def failed(name: str, e: Exception) -> None:
                    # a transformers path may not run; a speculative configuration that raises is a bug
                    # to report, but must not throw away the other measurements: record, drop, go on
                    if name == "plain":
                        raise e
                    key = "transformers_errors" if name.startswith("hf_") else "errors"
                    results.setdefault(key, {})[f"{mode} batch {bsz} {name}"] = f"{type(e).__name__}: {e!r}"
                    _log(f"{mode} batch {bsz} {name} failed: {type(e).__name__}: {e!r}")
                    del runners[name]

                for name in names:
                    try:
                        ref[name] = runners[name]().tokens
                    except Exception as e:  # noqa: BLE001
                        failed(name, e)
                names = list(runners)
                got: dict[str, list[SpecRun]] = {n: [] for n in names}
                for r in range(repeats):
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        if name not in runners:
                            continue
                        try:
                            got[name].append(runners[name]())
                        except Exception as e:  # noqa: BLE001
                            failed(name, e)
                            del got[name]
                    names = [n for n in names if n in runners]
                    _log(f"[{mode}] batch {bsz}: repeat {r + 1}/{repeats}: " + ", ".join(
                        f"{n} {got[n][-1].tok_s:.1f}" for n in names))
                plain_runs = got["plain"]
                plain_med = _median([x.tok_s for x in plain_runs])
                plain_dec = _median([x.decode_tok_s for x in plain_runs if x.decode_tok_s])
                for k, tree in settings:
                    name = f"spec_{_config_name(k, tree)}"
                    sruns = got.get(name)
                    if not sruns:
                        continue  # failed: see results["errors"]
                    med = _median([x.tok_s for x in sruns])
                    identical = None
                    first_div = None
                    if mode == "greedy":
                        identical = all(x.tokens == plain_runs[0].tokens for x in sruns + plain_runs) and \
                            ref[name] == ref["plain"] == plain_runs[0].tokens
                        if not identical:
                            first_div = compare_tokens(sruns[0].tokens, plain_runs[0].tokens)["first_divergence"]
                            mismatches.append(f"greedy batch {bsz} K={_config_name(k, tree)}: first divergence {first_div}")
                    row = {"mode": mode, "batch_size": bsz, "k": _k_name(k), "tree": None if tree is None else str(tree),
                           "config": _config_name(k, tree), "max_new_tokens": max_new_tokens,
                           "prompt_tokens": [len(p) for b in batches for p in b], "batches_per_run": len(batches),
                           "plain_tok_s": _r(plain_med), "spec_tok_s": _r(med), "speedup": _r(med / plain_med, 4),
                           "plain_decode_tok_s": _r(plain_dec),
                           "spec_decode_tok_s": _r(_median([x.decode_tok_s for x in sruns if x.decode_tok_s])),
                           "plain_tok_s_runs": [_r(x.tok_s) for x in plain_runs],
                           "spec_tok_s_runs": [_r(x.tok_s) for x in sruns],
                           **_aggregate(sruns),
                           "tokens_identical_to_plain": identical, "first_divergence": first_div}
                    results["runs"].append(row)
                    _log(f"[{mode}] batch {bsz} K={_config_name(k, tree)}: plain {plain_med:.1f}, spec {med:.1f} tok/s "
                         f"({med / plain_med:.2f}x), mean accepted {row['mean_accepted_length']}")
                if hf_here:
                    results["transformers"].extend(_transformers_rows(got, ref, assisted_k, drafter_kind, hf_assistant))

        # ---- step costs ---------------------------------------------------------------------
        for bsz in batch_sizes:
            ids = [plist[i % len(plist)] for i in range(bsz)]
            _log(f"step costs at batch {bsz} ...")
            try:
                results["step_costs"].append(step_costs(engine.model, engine.proposer, ids,
                                                        fixed_ks or [assisted_k], cost_repeats, dev))
            except Exception as e:  # noqa: BLE001 - keep the measurements made so far
                results.setdefault("errors", {})[f"step costs batch {bsz}"] = f"{type(e).__name__}: {e!r}"
                _log(f"step costs at batch {bsz} failed: {e!r}")
    finally:
        transformers.logging.set_verbosity(prev_verbosity)
        del hf, hf_assistant
        gc.collect()

    results["machine"]["load_average_at_end"] = _loadavg()
    results["greedy_tokens_identical"] = (not mismatches) if "greedy" in modes else None
    if plot is not None:
        try:
            results["plot"] = str(plot_spec(results, plot))
            _log(f"wrote {plot}")
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the measurements
            results["plot_error"] = f"{type(e).__name__}: {e}"
            _log(f"plot failed: {results['plot_error']}")
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        results["out"] = str(path)
        _log(f"wrote {path}")
    if show_table:
        print_spec_tables(results)
    if mismatches:
        raise BenchMismatch("greedy speculative tokens differ from plain decoding: " + "; ".join(mismatches))
    return results


def _transformers_rows(got: dict, ref: dict, k: int, drafter_kind: str, hf_assistant) -> list[dict]:
    """Batch-1 greedy comparison rows: each transformers configuration and our counterpart."""
    rows = []
    plain_ours = _median([x.tok_s for x in got["plain"]])
    ours_ng = "spec_" + str(k) if drafter_kind == "ngram" else "ours_ngram"
    hf_plain = _median([x.tok_s for x in got["hf_plain"]]) if "hf_plain" in got else None

    def add(what: str, hf_name: str, ours_name: str | None) -> None:
        if hf_name not in got:
            return
        hf_tok_s = _median([x.tok_s for x in got[hf_name]])
        row = {"what": what, "k": k if hf_name == "hf_prompt_lookup" else None, "hf_tok_s": _r(hf_tok_s),
               "hf_speedup_vs_hf_plain": _r(hf_tok_s / hf_plain, 4) if hf_plain else None,
               "hf_tokens_equal_hf_plain": ref.get(hf_name) == ref.get("hf_plain"),
               "hf_tokens_equal_ours_plain": ref.get(hf_name) == ref.get("plain")}
        if ours_name is not None and ours_name in got:
            ours = _median([x.tok_s for x in got[ours_name]])
            row.update({"ours": ours_name, "ours_tok_s": _r(ours), "ours_speedup_vs_ours_plain": _r(ours / plain_ours, 4),
                        "ours_vs_hf": _r(ours / hf_tok_s, 4)})
            if got[ours_name][0].stats:
                row["ours_mean_accepted_length"] = _aggregate(got[ours_name])["mean_accepted_length"]
        rows.append(row)

    add("plain generate", "hf_plain", "plain")
    add(f"prompt lookup (K={k}) vs our n-gram", "hf_prompt_lookup", ours_ng)
    if hf_assistant is not None:
        best = max((n for n in got if n.startswith("spec_")), key=lambda n: _median([x.tok_s for x in got[n]]), default=None)
        add("Gemma 4 assistant_model vs our MTP (best K)", "hf_assistant", best)
    return rows


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def plot_spec(results: dict, path: str | Path) -> Path:
    """PNG: speedup and mean accepted length vs batch size (a line per K; solid greedy, dashed
    sampled) and vs K (a line per batch size; the adaptive policy plotted at its mean K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    styles = {"greedy": "-", "sampled": "--"}
    configs = list(dict.fromkeys(r.get("config", r["k"]) for r in runs))
    batches = sorted({r["batch_size"] for r in runs})
    cmap = plt.get_cmap("tab10")
    for (row_i, metric, label) in ((0, "speedup", "speedup (spec / plain tok/s)"),
                                   (1, "mean_accepted_length", "mean accepted length (tokens / target forward)")):
        ax = axes[row_i][0]
        for ci, c in enumerate(configs):
            for mode, ls in styles.items():
                pts = sorted((r["batch_size"], r[metric]) for r in runs
                             if r.get("config", r["k"]) == c and r["mode"] == mode and r[metric] is not None)
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", color=cmap(ci % 10), label=f"K={c} {mode}")
        ax.set_xlabel("batch size")
        ax.set_xticks(batches)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax = axes[row_i][1]
        trees = list(dict.fromkeys(r.get("tree") for r in runs))
        for ci, b in enumerate(batches):
            for mode, ls in styles.items():
                sel = [r for r in runs if r["batch_size"] == b and r["mode"] == mode and r[metric] is not None]
                for ti, tree in enumerate(trees):  # chains solid/dashed, trees dotted with other markers
                    pts = sorted((float(r["k"]), r[metric]) for r in sel if r["k"] != "adaptive" and r.get("tree") == tree)
                    if pts:
                        ax.plot(*zip(*pts), ls if tree is None else ":", marker="osD^v"[ti % 5], color=cmap(ci % 10),
                                label=f"batch {b} {mode}" + ("" if tree is None else f" tree {tree}"))
                for r in sel:
                    if r["k"] == "adaptive" and r.get("tree") is None and r.get("mean_k") is not None:
                        ax.plot([r["mean_k"]], [r[metric]], marker="*", markersize=12, color=cmap(ci % 10),
                                linestyle="none")
        ax.set_xlabel("draft tokens K (star: adaptive, at its mean K)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.axhline(1.0, color="grey", lw=0.8)
    axes[0][0].legend(fontsize=7, ncol=2)
    axes[0][1].legend(fontsize=7, ncol=2)
    m = results["machine"]
    fig.suptitle(f"speculative decoding: {results['model']['name']} + {results['drafter']['name']} "
                 f"({results['arguments']['dtype']}, {m.get('cpu_model')}, {m.get('logical_cores')} cores)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_spec_tables(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=170)
    m, k = results["machine"], results["kernel"]
    console.print(f"[bold]speculative decoding: {results['model']['name']} + drafter {results['drafter']['name']}[/]  "
                  f"{results['arguments']['dtype']}, {results['arguments']['max_new_tokens']} new tokens/row, "
                  f"{results['arguments']['repeats']} interleaved repeats  "
                  f"CPU: {m['cpu_model']} ({m['logical_cores']} cores, {m['torch_threads']} torch threads)  "
                  f"kernel: {kernel_summary(k)}")
    loads = [x for x in (m.get("load_average_at_start"), m.get("load_average_at_end")) if x]
    if loads and m.get("logical_cores") and max(x[0] for x in loads) > m["logical_cores"] + 0.5:
        console.print(f"[yellow]warning: load average {' -> '.join(str(x[0]) for x in loads)} on "
                      f"{m['logical_cores']} cores: other processes competed for the CPU; timings are unreliable[/]")
    t = Table(title="plain vs speculative (tok/s = batch tokens / wall time, prefill included; medians)")
    for col in ("mode", "batch", "K", "plain tok/s", "spec tok/s", "speedup", "mean acc. len", "mean K",
                "acceptance per position", "drafter share", "greedy identical"):
        t.add_column(col, justify="right")
    for r in results["runs"]:
        acc = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_per_position"])
        ident = "-" if r["tokens_identical_to_plain"] is None else ("yes" if r["tokens_identical_to_plain"] else "[red]NO[/]")
        t.add_row(r["mode"], str(r["batch_size"]), r.get("config", r["k"]), f"{r['plain_tok_s']:.1f}", f"{r['spec_tok_s']:.1f}",
                  f"{r['speedup']:.2f}x", _fmt(r["mean_accepted_length"], "{:.2f}"), _fmt(r["mean_k"], "{:.2f}"), acc,
                  _fmt(r["drafter_time_share"], "{:.0%}"), ident)
    console.print(t)
    if results["transformers"] or results.get("transformers_assistant_error") or results.get("transformers_errors"):
        t = Table(title="transformers at batch 1, greedy (same interleaved repeats)")
        for col in ("what", "tf tok/s", "tf vs tf plain", "tf == tf plain", "ours", "ours tok/s", "ours vs ours plain",
                    "ours / tf", "ours mean acc. len"):
            t.add_column(col, justify="right")
        for r in results["transformers"]:
            t.add_row(r["what"], f"{r['hf_tok_s']:.1f}", _fmt(r["hf_speedup_vs_hf_plain"], "{:.2f}x"),
                      "yes" if r["hf_tokens_equal_hf_plain"] else "no", r.get("ours", "-"), _fmt(r.get("ours_tok_s"), "{:.1f}"),
                      _fmt(r.get("ours_speedup_vs_ours_plain"), "{:.2f}x"), _fmt(r.get("ours_vs_hf"), "{:.2f}x"),
                      _fmt(r.get("ours_mean_accepted_length"), "{:.2f}"))
        console.print(t)
        if results.get("transformers_assistant_error"):
            console.print(f"transformers assistant: {results['transformers_assistant_error']}")
        for name, err in (results.get("transformers_errors") or {}).items():
            console.print(f"[yellow]{name}: {err}[/]")
    if results["step_costs"]:
        t = Table(title="step costs on a warmed cache (ms, medians): target 1 token, verify K+1 tokens, draft K tokens")
        for col in ("batch", "target 1-tok ms", "K", "verify ms", "verify / 1-tok", "draft ms", "draft per token / target step"):
            t.add_column(col, justify="right")
        for c in results["step_costs"]:
            drafts = {d["k"]: d for d in c["draft"]}
            for i, v in enumerate(c["verify"]):
                d = drafts.get(v["k"])
                t.add_row(str(c["batch_size"]) if i == 0 else "", f"{c['target_1_ms']:.2f}" if i == 0 else "", str(v["k"]),
                          f"{v['ms']:.2f}", f"{v['ratio_to_1']:.2f}", _fmt(d and d["ms"], "{:.3f}"),
                          _fmt(d and d["per_token_vs_target_step"], "{:.3f}"))
        console.print(t)
    for name, err in (results.get("errors") or {}).items():
        console.print(f"[red]error (configuration dropped): {name}: {err}[/]")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else spec.format(x)
