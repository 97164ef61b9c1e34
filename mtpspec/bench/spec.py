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
  (the adaptive policy's choice); the drafter's share of the decode time; on the broad held-out
  benchmark's prompts (`heldout.Prompt`s), also tau (mean accepted length) per category and the
  unweighted mean over categories (`heldout_scores`);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..acceptance import AcceptanceTotals
from ..compat import transformers_gemma4_assistant
from ..errors import InputError
from .arguments import as_recorded, check_positive_int
from .heldout import Prompt
from .heldout_scores import heldout_run_record, print_heldout_tables
from .machine import environment, kernel_summary, load_average
from .records import (BenchMismatch, compare_tokens, fmt, log, print_load_warning, recorded_command, rounded,
                      table_console, write_results)
from .timing import Run, alternating_times, hf_runner, interleave, loop_runner, median, quiet_transformers, sync

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


def batches_for(plist: list[list[int]], bsz: int, num_prompts: int | None) -> list[list[list[int]]]:
    """The batches one run at batch size bsz generates: prompts 0..n-1 (cycled when the set is
    smaller) in groups of bsz, n = num_prompts rounded up to a multiple of bsz (default: one batch)."""
    n = bsz if not num_prompts else -(-max(num_prompts, bsz) // bsz) * bsz
    rows = [plist[i % len(plist)] for i in range(n)]
    return [rows[i : i + bsz] for i in range(0, n, bsz)]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class SpecConfig:
    """The arguments of `run_spec_bench` (see there), checked and normalised, and what follows from them."""

    model: str | Path | None
    drafter: str | Path | None
    device: str
    dtype: str
    batch_sizes: Sequence[int]
    draft_tokens: list[DraftSetting]  # given as for `parse_draft_tokens`
    trees: list[Any]  # TreeShapes, given as shapes or "NODES:BEAM:BRANCH"
    modes: list[str]
    temperature: float
    seed: int
    max_new_tokens: int
    repeats: int
    prompts: Sequence[str | list[int] | Prompt] | None
    num_prompts: int | None
    chat: bool
    transformers_assisted: bool
    assisted_k: int  # None given: 4 if among the fixed Ks, else the largest fixed K
    cost_repeats: int
    out: str | Path | None
    plot: str | Path | None
    prompt_lookup: bool = True
    drafter_kind: str = field(init=False)  # "ngram" or "mtp"

    def __post_init__(self) -> None:
        from ..decoding.plan import resolve_drafter
        from ..decoding.tree import TreeShape

        for name in ("max_new_tokens", "repeats", "cost_repeats"):
            check_positive_int(name, getattr(self, name))
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise InputError(f"batch_sizes must be integers >= 1, got {list(self.batch_sizes)!r}")
        if self.num_prompts is not None:
            check_positive_int("num_prompts", self.num_prompts)
        self.draft_tokens = parse_draft_tokens(self.draft_tokens)
        self.trees = list(dict.fromkeys(TreeShape.parse(t) for t in self.trees))
        self.modes = list(dict.fromkeys(self.modes))
        if not self.modes or any(m not in ("greedy", "sampled") for m in self.modes):
            raise InputError(f"modes must be 'greedy' and/or 'sampled', got {self.modes!r}")
        if "sampled" in self.modes and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 for sampled runs, got {self.temperature!r}")
        if self.prompts is not None and not self.prompts:
            raise InputError("prompts is empty")
        self._check_heldout()
        if self.assisted_k is None:
            self.assisted_k = 4 if 4 in self.fixed_ks else max(self.fixed_ks, default=4)
        self.drafter = resolve_drafter(self.model, self.drafter) or "ngram"
        self.drafter_kind = "ngram" if self.drafter == "ngram" else "mtp"
        if self.trees and self.drafter_kind != "mtp":
            raise InputError("draft trees need an MTP drafter (the n-gram proposer drafts chains)")

    @property
    def categories(self) -> list[str] | None:
        """Held-out benchmark prompts: each prompt's category (scored per category); else None."""
        if self.prompts is None or not isinstance(self.prompts[0], Prompt):
            return None
        return [p.category for p in self.prompts]

    def _check_heldout(self) -> None:
        if self.prompts is None or not any(isinstance(p, Prompt) for p in self.prompts):
            return
        if not all(isinstance(p, Prompt) for p in self.prompts):
            raise InputError("prompts: held-out benchmark prompts cannot be mixed with other prompts")
        if self.num_prompts is None:
            self.num_prompts = len(self.prompts)  # every held-out prompt runs
        elif self.num_prompts < len(self.prompts):
            raise InputError(f"num_prompts {self.num_prompts} < the {len(self.prompts)} held-out prompts selected: every "
                             "category must run all its prompts (select fewer with categories / per_category)")

    @property
    def fixed_ks(self) -> list[int]:
        return [k for k in self.draft_tokens if k is not None]

    @property
    def settings(self) -> list[tuple[DraftSetting, Any]]:
        """Every speculative configuration: (K, None) chains, then (K, tree) for each tree shape."""
        return [(k, None) for k in self.draft_tokens] + [(k, t) for t in self.trees for k in self.draft_tokens]

    def arguments(self) -> dict:
        """The arguments as the results record them."""
        return dict(model=as_recorded(self.model), drafter=str(self.drafter),
                    device=self.device, dtype=self.dtype, batch_sizes=list(self.batch_sizes),
                    draft_tokens=[_k_name(k) for k in self.draft_tokens], trees=[str(t) for t in self.trees],
                    modes=self.modes, temperature=self.temperature, seed=self.seed,
                    max_new_tokens=self.max_new_tokens, repeats=self.repeats,
                    prompts=None if self.prompts is None else [p.id if isinstance(p, Prompt) else p for p in self.prompts],
                    num_prompts=self.num_prompts,
                    chat=self.chat, transformers_assisted=self.transformers_assisted, assisted_k=self.assisted_k,
                    cost_repeats=self.cost_repeats, out=as_recorded(self.out), plot=as_recorded(self.plot),
                    prompt_lookup=self.prompt_lookup if self.drafter_kind == "mtp" else None)

    def params_for_row(self, mode: str) -> Callable[[int], Any]:
        """Sampling parameters of row i: greedy, or seeded sampling at the temperature."""
        from ..decoding.sampling import SamplingParams

        if mode == "greedy":
            return lambda i: SamplingParams()
        return lambda i: SamplingParams(self.temperature, 0, 1.0, self.seed + i)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def acceptance_record(runs: list[Run]) -> dict:
    """Acceptance statistics summed over every row of every run."""
    t = AcceptanceTotals.of(st for run in runs for st in run.stats)
    return {
        "mean_accepted_length": rounded(t.mean_accepted_length, 4),
        "acceptance_per_position": [rounded(a, 4) for a in t.acceptance_per_position],
        "mean_k": rounded(t.mean_k, 3),
        "drafter_time_share": rounded(t.drafter_time_share, 4),
        "rounds": t.rounds,
        "target_forwards_per_row": rounded(t.rounds / t.sequences + 1, 2) if t.rounds else None,
    }


def _spec_row(cfg: SpecConfig, mode: str, bsz: int, batches, k: DraftSetting, tree, plain_runs: list[Run],
              spec_runs: list[Run], ref: dict) -> tuple[dict, str | None]:
    """One configuration's results row against plain decoding, and a mismatch message if greedy
    tokens differ."""
    name = f"spec_{_config_name(k, tree)}"
    plain_med = median([x.tok_s for x in plain_runs])
    med = median([x.tok_s for x in spec_runs])
    identical = first_div = mismatch = None
    if mode == "greedy":
        identical = all(x.tokens == plain_runs[0].tokens for x in spec_runs + plain_runs) and \
            ref[name] == ref["plain"] == plain_runs[0].tokens
        if not identical:
            first_div = compare_tokens(spec_runs[0].tokens, plain_runs[0].tokens)["first_divergence"]
            mismatch = f"greedy batch {bsz} K={_config_name(k, tree)}: first divergence {first_div}"
    row = {"mode": mode, "batch_size": bsz, "k": _k_name(k), "tree": as_recorded(tree),
           "config": _config_name(k, tree), "max_new_tokens": cfg.max_new_tokens,
           "prompt_tokens": [len(p) for b in batches for p in b], "batches_per_run": len(batches),
           "plain_tok_s": rounded(plain_med), "spec_tok_s": rounded(med), "speedup": rounded(med / plain_med, 4),
           "plain_decode_tok_s": rounded(median([x.decode_tok_s for x in plain_runs if x.decode_tok_s])),
           "spec_decode_tok_s": rounded(median([x.decode_tok_s for x in spec_runs if x.decode_tok_s])),
           "plain_tok_s_runs": [rounded(x.tok_s) for x in plain_runs],
           "spec_tok_s_runs": [rounded(x.tok_s) for x in spec_runs],
           **acceptance_record(spec_runs),
           "tokens_identical_to_plain": identical, "first_divergence": first_div}
    if cfg.categories:
        row["heldout"] = heldout_run_record(spec_runs, cfg.categories)
    log(f"[{mode}] batch {bsz} K={_config_name(k, tree)}: plain {plain_med:.1f}, spec {med:.1f} tok/s "
        f"({med / plain_med:.2f}x), mean accepted {row['mean_accepted_length']}"
        + (f", mean over categories {row['heldout']['mean_over_categories']}" if cfg.categories else ""))
    return row, mismatch


# ---------------------------------------------------------------------------------------------
# interleaved runs of one mode and batch size
# ---------------------------------------------------------------------------------------------
@dataclass
class _Transformers:
    """transformers' side of the comparison at batch 1 (greedy): the target and, for a Gemma 4
    target with an MTP drafter, the drafter as its assistant model."""

    model: Any = None
    assistant: Any = None


def _load_transformers(cfg: SpecConfig, folder: Path, engine, results: dict) -> _Transformers:
    from transformers import AutoModelForCausalLM

    hf = _Transformers()
    if not (cfg.transformers_assisted and 1 in cfg.batch_sizes and "greedy" in cfg.modes):
        return hf
    log("loading transformers model ...")
    dev, dtype = engine.model.device, engine.model.dtype
    hf.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(dev).eval()
    if cfg.drafter_kind != "mtp":
        return hf
    if getattr(hf.model.config, "model_type", None) not in ("gemma4_text", "gemma4"):
        results["transformers_assistant_error"] = (
            "transformers runs MTP drafters only for Gemma 4 targets; prompt lookup is compared instead")
        return hf
    try:
        with transformers_gemma4_assistant():
            hf.assistant = AutoModelForCausalLM.from_pretrained(str(cfg.drafter), dtype=dtype).to(dev).eval()
    except Exception as e:  # noqa: BLE001 - report, do not fail the bench
        results["transformers_assistant_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"transformers cannot load the drafter: {results['transformers_assistant_error']}")
    return hf


def _runners(cfg: SpecConfig, engine, mode: str, batches, hf: _Transformers | None) -> dict[str, Callable[[], Run]]:
    """Plain decoding, every speculative configuration and, given `hf`, the transformers runs at
    batch 1 with our n-gram counterpart of prompt lookup."""
    from ..decoding.draft_length import AdaptiveDraftLength
    from ..decoding.plan import DraftPlan
    from ..decoding.proposers import NgramProposer

    def plan(proposer, k: DraftSetting, tree=None) -> Callable[[], DraftPlan]:
        # a fresh plan every run. Adaptive K: greedy runs get the plan users get (its own states,
        # per kind of round); sampled runs one given policy, since the plan would give their
        # seeded rows a fixed K (a seeded row must reproduce whatever the timings)
        if k is None and mode == "greedy":
            return lambda: DraftPlan(proposer, None, draft_tree=tree, max_draft_tokens=engine.max_draft_tokens)
        return lambda: DraftPlan(proposer, AdaptiveDraftLength(engine.max_draft_tokens) if k is None else k,
                                 draft_tree=tree)

    model, dev, rows = engine.model, engine.model.device, cfg.params_for_row(mode)
    runners = {"plain": loop_runner(model, batches, cfg.max_new_tokens, rows, device=dev)}
    for k, tree in cfg.settings:
        runners[f"spec_{_config_name(k, tree)}"] = loop_runner(model, batches, cfg.max_new_tokens, rows,
                                                               plan(engine.proposer, k, tree), dev)
    if hf is None:
        return runners
    firsts = [[b[0]] for b in batches]  # transformers runs batch 1 only
    runners["hf_plain"] = hf_runner(hf.model, firsts, cfg.max_new_tokens, 0, dev)
    runners["hf_prompt_lookup"] = hf_runner(hf.model, firsts, cfg.max_new_tokens, 0, dev,
                                            prompt_lookup_num_tokens=cfg.assisted_k)
    if cfg.drafter_kind != "ngram":
        runners["ours_ngram"] = loop_runner(model, batches, cfg.max_new_tokens, rows,
                                            plan(NgramProposer(), cfg.assisted_k), dev)
    if hf.assistant is not None:
        runners["hf_assistant"] = hf_runner(hf.model, firsts, cfg.max_new_tokens, 0, dev, assistant_model=hf.assistant)
    return runners


def _measure(cfg: SpecConfig, engine, plist: list[list[int]], mode: str, bsz: int, hf: _Transformers,
             results: dict) -> list[str]:
    """Every configuration of one mode and batch size, interleaved; their rows go into `results`.
    Returns the greedy mismatches."""
    batches = batches_for(plist, bsz, cfg.num_prompts)
    hf_here = hf.model is not None and bsz == 1 and mode == "greedy"
    runners = _runners(cfg, engine, mode, batches, hf if hf_here else None)

    def failed(name: str, e: Exception) -> None:
        # a transformers path may not run; a speculative configuration that raises is a bug to
        # report, but must not throw away the other measurements: record, drop, go on
        if name == "plain":
            raise e
        key = "transformers_errors" if name.startswith("hf_") else "errors"
        results.setdefault(key, {})[f"{mode} batch {bsz} {name}"] = f"{type(e).__name__}: {e!r}"
        log(f"{mode} batch {bsz} {name} failed: {type(e).__name__}: {e!r}")

    def progress(r: int, got: dict[str, list[Run]]) -> None:
        log(f"[{mode}] batch {bsz}: repeat {r + 1}/{cfg.repeats}: " + ", ".join(
            f"{n} {runs[-1].tok_s:.1f}" for n, runs in got.items()))

    log(f"[{mode}] batch {bsz}: warm-up ({len(runners)} configurations) ...")
    ref, got = interleave(runners, cfg.repeats, failed, progress)
    mismatches = []
    for k, tree in cfg.settings:
        spec_runs = got.get(f"spec_{_config_name(k, tree)}")
        if not spec_runs:
            continue  # failed: see results["errors"]
        row, mismatch = _spec_row(cfg, mode, bsz, batches, k, tree, got["plain"], spec_runs, ref)
        results["runs"].append(row)
        mismatches += [mismatch] if mismatch else []
    if hf_here:
        results["transformers"].extend(_transformers_rows(got, ref, cfg.assisted_k, cfg.drafter_kind, hf.assistant))
    return mismatches


def _transformers_rows(got: dict, ref: dict, k: int, drafter_kind: str, hf_assistant) -> list[dict]:
    """Batch-1 greedy comparison rows: each transformers configuration and our counterpart."""
    rows = []
    plain_ours = median([x.tok_s for x in got["plain"]])
    ours_ng = "spec_" + str(k) if drafter_kind == "ngram" else "ours_ngram"
    hf_plain = median([x.tok_s for x in got["hf_plain"]]) if "hf_plain" in got else None

    def add(what: str, hf_name: str, ours_name: str | None) -> None:
        if hf_name not in got:
            return
        hf_tok_s = median([x.tok_s for x in got[hf_name]])
        row = {"what": what, "k": k if hf_name == "hf_prompt_lookup" else None, "hf_tok_s": rounded(hf_tok_s),
               "hf_speedup_vs_hf_plain": rounded(hf_tok_s / hf_plain, 4) if hf_plain else None,
               "hf_tokens_equal_hf_plain": ref.get(hf_name) == ref.get("hf_plain"),
               "hf_tokens_equal_ours_plain": ref.get(hf_name) == ref.get("plain")}
        if ours_name is not None and ours_name in got:
            ours = median([x.tok_s for x in got[ours_name]])
            row.update({"ours": ours_name, "ours_tok_s": rounded(ours), "ours_speedup_vs_ours_plain": rounded(ours / plain_ours, 4),
                        "ours_vs_hf": rounded(ours / hf_tok_s, 4)})
            if got[ours_name][0].stats:
                row["ours_mean_accepted_length"] = acceptance_record(got[ours_name])["mean_accepted_length"]
        rows.append(row)

    add("plain generate", "hf_plain", "plain")
    add(f"prompt lookup (K={k}) vs our n-gram", "hf_prompt_lookup", ours_ng)
    if hf_assistant is not None:
        best = max((n for n in got if n.startswith("spec_")), key=lambda n: median([x.tok_s for x in got[n]]), default=None)
        add("Gemma 4 assistant_model vs our MTP (best K)", "hf_assistant", best)
    return rows



# ---------------------------------------------------------------------------------------------
# step costs: target 1-token step, verify pass (K+1 tokens), drafting K tokens
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def step_costs(model, proposer, prompt_ids: list[list[int]], ks: Sequence[int], repeats: int, device) -> dict:
    """Median times (ms) at batch len(prompt_ids) on a warmed cache: a 1-token target forward, a
    (K+1)-token target forward (verify), and proposing K tokens; operations alternate, the cache
    is rolled back after each target forward."""
    from ..decoding.loop import DecodeBatch, Request
    from ..decoding.plan import DraftPlan
    from ..decoding.proposers import DraftInput
    from ..decoding.sampling import SamplingParams

    kmax = max(ks)
    bsz = len(prompt_ids)
    max_len = max(len(p) for p in prompt_ids) + 2
    batch = DecodeBatch(model, bsz, max_len, DraftPlan(proposer, kmax, draft_tree=None))
    batch.add([Request(list(p), 1, SamplingParams(), frozenset()) for p in prompt_ids])
    view = batch.cache
    last = batch.last_tokens.to(device)
    inp = DraftInput(model, view, last, batch.last_hidden, batch.history, [SamplingParams()] * bsz,
                     [None] * bsz, [True] * bsz)
    probe = torch.cat([last[:, None], last[:, None].expand(-1, kmax)], dim=1)

    def target(n: int) -> None:
        model(probe[:, :n], view)
        sync(device)
        view.rollback(n)

    ops: dict[str, Callable[[], object]] = {"target_1": lambda: target(1)}
    for k in ks:
        ops[f"verify_{k}"] = (lambda k=k: target(k + 1))
        if proposer is not None:
            ops[f"draft_{k}"] = (lambda k=k: (proposer.propose(inp, k), sync(device)))
    times = {name: median(ts) for name, ts in alternating_times(ops, repeats, warmup=2).items()}
    t1 = times["target_1"]
    row: dict = {"batch_size": bsz, "context": [len(p) for p in prompt_ids], "target_1_ms": rounded(t1 * 1e3),
                 "verify": [], "draft": []}
    for k in ks:
        tv = times[f"verify_{k}"]
        row["verify"].append({"k": k, "tokens": k + 1, "ms": rounded(tv * 1e3), "ratio_to_1": rounded(tv / t1)})
        if proposer is not None:
            td = times[f"draft_{k}"]
            row["draft"].append({"k": k, "ms": rounded(td * 1e3), "per_token_ms": rounded(td / k * 1e3, 4),
                                 "per_token_vs_target_step": rounded(td / k / t1, 4)})
    return row


def _step_cost_rows(cfg: SpecConfig, engine, plist: list[list[int]], results: dict) -> list[dict]:
    rows = []
    for bsz in cfg.batch_sizes:
        ids = [plist[i % len(plist)] for i in range(bsz)]
        log(f"step costs at batch {bsz} ...")
        try:
            rows.append(step_costs(engine.model, engine.proposer, ids, cfg.fixed_ks or [cfg.assisted_k],
                                   cfg.cost_repeats, engine.model.device))
        except Exception as e:  # noqa: BLE001 - keep the measurements made so far
            results.setdefault("errors", {})[f"step costs batch {bsz}"] = f"{type(e).__name__}: {e!r}"
            log(f"step costs at batch {bsz} failed: {e!r}")
    return rows


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def _notes(cfg: SpecConfig) -> dict:
    heldout = {"heldout": "held-out benchmark (mtpspec.bench.heldout): per configuration, tau per category = mean "
                          "accepted length over all verification rounds of the category's prompts (the rows of complete "
                          "passes through the prompt set, all repeats); mean_over_categories = their unweighted mean"}
    return {**(heldout if cfg.categories else {}),
        "tok_s": "generated tokens of the whole batch / wall time of the run (prefill included); median of repeats",
        "speedup": "spec tok_s / plain tok_s, same mode and batch size, interleaved in the same repeats",
        "mean_accepted_length": "tokens emitted per target forward in the decode phase (accepted drafts + bonus)",
        "acceptance_per_position": "accepted / proposed at draft position i (i accepted only if all before were)",
        "mean_k": "drafted tokens per round (the adaptive policy's mean choice); with a tree, its depth",
        "tree": "draft tree NODES:BEAM:BRANCH of depth K: NODES tokens verified per round, grown by "
                "expanding the BEAM best nodes of each depth into their BRANCH best children",
        "sampled": f"temperature {cfg.temperature}, row i seeded with seed + i; lossless in distribution (tokens not compared)",
        "eos": "ignored; every row makes exactly max_new_tokens tokens",
        "step_costs": "median ms on a warmed cache; verify = target forward of K+1 tokens; draft = propose K tokens",
    }


def _results_header(cfg: SpecConfig, engine, folder: Path, prompt_kind: str, command: str | None) -> dict:
    mtp = getattr(engine.proposer, "drafter", None)
    arguments = {**cfg.arguments(), "drafter_dtype": None if mtp is None else str(mtp.dtype).removeprefix("torch."),
                 "drafter_quantize": None if mtp is None else (mtp.quantization or "none")}
    return {
        "benchmark": "spec",
        "model": {"name": engine.name if cfg.model is not None else "SmolLM2-135M-Instruct", "folder": str(folder),
                  "model_type": engine.model.cfg.model_type if hasattr(engine.model.cfg, "model_type") else None,
                  "quantization": engine.model.quantization},
        "drafter": {"name": engine.drafter_name, "kind": cfg.drafter_kind,
                    "path": None if cfg.drafter == "ngram" else str(cfg.drafter),
                    "max_draft_tokens": engine.max_draft_tokens},
        "command": recorded_command(command),
        "arguments": arguments,
        **environment(),
        "prompts": prompt_kind,
        "notes": _notes(cfg),
        "runs": [],
        "transformers": [],
        "step_costs": [],
    }


def _finish(results: dict, cfg: SpecConfig, mismatches: list[str], show_table: bool) -> dict:
    """Plot, write and print the results; raise `BenchMismatch` if greedy tokens differed."""
    results["machine"]["load_average_at_end"] = load_average()
    results["greedy_tokens_identical"] = (not mismatches) if "greedy" in cfg.modes else None
    if cfg.plot is not None:
        try:
            results["plot"] = str(plot_spec(results, cfg.plot))
            log(f"wrote {cfg.plot}")
        except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the measurements
            results["plot_error"] = f"{type(e).__name__}: {e}"
            log(f"plot failed: {results['plot_error']}")
    write_results(results, cfg.out)
    if show_table:
        print_spec_tables(results)
    if mismatches:
        raise BenchMismatch("greedy speculative tokens differ from plain decoding: " + "; ".join(mismatches))
    return results


def run_spec_bench(
    *,
    model: str | Path | None = None,
    drafter: str | Path | None = "ngram",
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str = "auto",
    batch_sizes: Sequence[int] = (1, 4, 8),
    draft_tokens: str | Sequence[Any] = (1, 2, 4, 8, None),
    trees: Sequence[Any] = (),
    modes: Sequence[str] = ("greedy", "sampled"),
    temperature: float = 0.7,
    seed: int = 0,
    max_new_tokens: int = 64,
    repeats: int = 3,
    prompts: Sequence[str | list[int] | Prompt] | None = None,
    num_prompts: int | None = None,
    chat: bool = True,
    transformers_assisted: bool = True,
    assisted_k: int | None = None,
    cost_repeats: int = 10,
    out: str | Path | None = DEFAULT_OUT,
    plot: str | Path | None = DEFAULT_PLOT,
    show_table: bool = True,
    command: str | None = None,
    prompt_lookup: bool = True,
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
    the first B prompts at batch size B). Held-out benchmark prompts (`heldout.Prompt`s, e.g.
    `heldout_scores.heldout_prompts("math,coding", 4)`) all run by default (num_prompts, if
    given, must be at least their number) and every speculative row gets "heldout": tau per
    category and the mean over categories (`heldout_scores`). out / plot: JSON and PNG paths
    (None = do not write). prompt_lookup: an MTP drafter runs with prompt lookup in front of it,
    as `load` gives users by default (False: the drafter alone).
    """
    from ..api import load, resolve_model_path
    from .prompts import bench_prompts

    cfg = SpecConfig(model=model, drafter=drafter, device=device, dtype=dtype, batch_sizes=batch_sizes,
                     draft_tokens=draft_tokens, trees=trees, modes=modes, temperature=temperature, seed=seed,
                     max_new_tokens=max_new_tokens, repeats=repeats, prompts=prompts, num_prompts=num_prompts,
                     chat=chat, transformers_assisted=transformers_assisted, assisted_k=assisted_k,
                     cost_repeats=cost_repeats, out=out, plot=plot, prompt_lookup=prompt_lookup)
    folder = resolve_model_path(model, cache_dir)
    log(f"spec bench: model {folder}, drafter {cfg.drafter}")
    # the target as users load it (`quantize`: a GGUF stays quantized by default); chains, trees below
    engine = load(model, drafter=cfg.drafter, draft_tree=None, device=device, dtype=dtype, cache_dir=cache_dir,
                  quantize=quantize, prompt_lookup=prompt_lookup)
    plist, prompt_kind = bench_prompts(engine, prompts, chat)
    results = _results_header(cfg, engine, folder, prompt_kind, command)
    mismatches: list[str] = []
    hf = _Transformers()
    try:
        with quiet_transformers():
            hf = _load_transformers(cfg, folder, engine, results)
            for mode in cfg.modes:
                for bsz in cfg.batch_sizes:
                    mismatches += _measure(cfg, engine, plist, mode, bsz, hf, results)
            results["step_costs"] = _step_cost_rows(cfg, engine, plist, results)
    finally:
        del hf
        gc.collect()
    return _finish(results, cfg, mismatches, show_table)


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
    weights = results["model"].get("quantization") or results["arguments"]["dtype"]  # e.g. Q4_1 kept quantized
    fig.suptitle(f"speculative decoding: {results['model']['name']} ({weights}) + {results['drafter']['name']} "
                 f"({m.get('cpu_model')}, {m.get('logical_cores')} cores)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_spec_tables(results: dict, console=None) -> None:
    from rich.table import Table

    console = table_console(console, width=170)
    m, k = results["machine"], results["kernel"]
    console.print(f"[bold]speculative decoding: {results['model']['name']} + drafter {results['drafter']['name']}[/]  "
                  f"{results['arguments']['dtype']}, {results['arguments']['max_new_tokens']} new tokens/row, "
                  f"{results['arguments']['repeats']} interleaved repeats  "
                  f"CPU: {m['cpu_model']} ({m['logical_cores']} cores, {m['torch_threads']} torch threads)")
    console.print(f"kernel: {kernel_summary(k)}", soft_wrap=True)  # its own line: never wrapped mid-way
    print_load_warning(console, m)
    t = Table(title="plain vs speculative (tok/s = batch tokens / wall time, prefill included; medians)")
    for col in ("mode", "batch", "K", "plain tok/s", "spec tok/s", "speedup", "mean acc. len", "mean K",
                "acceptance per position", "drafter share", "greedy identical"):
        t.add_column(col, justify="right")
    for r in results["runs"]:
        acc = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_per_position"])
        ident = "-" if r["tokens_identical_to_plain"] is None else ("yes" if r["tokens_identical_to_plain"] else "[red]NO[/]")
        t.add_row(r["mode"], str(r["batch_size"]), r.get("config", r["k"]), f"{r['plain_tok_s']:.1f}", f"{r['spec_tok_s']:.1f}",
                  f"{r['speedup']:.2f}x", fmt(r["mean_accepted_length"], "{:.2f}"), fmt(r["mean_k"], "{:.2f}"), acc,
                  fmt(r["drafter_time_share"], "{:.0%}"), ident)
    console.print(t)
    print_heldout_tables(results, console)
    if results["transformers"] or results.get("transformers_assistant_error") or results.get("transformers_errors"):
        t = Table(title="transformers at batch 1, greedy (same interleaved repeats)")
        for col in ("what", "tf tok/s", "tf vs tf plain", "tf == tf plain", "ours", "ours tok/s", "ours vs ours plain",
                    "ours / tf", "ours mean acc. len"):
            t.add_column(col, justify="right")
        for r in results["transformers"]:
            t.add_row(r["what"], f"{r['hf_tok_s']:.1f}", fmt(r["hf_speedup_vs_hf_plain"], "{:.2f}x"),
                      "yes" if r["hf_tokens_equal_hf_plain"] else "no", r.get("ours", "-"), fmt(r.get("ours_tok_s"), "{:.1f}"),
                      fmt(r.get("ours_speedup_vs_ours_plain"), "{:.2f}x"), fmt(r.get("ours_vs_hf"), "{:.2f}x"),
                      fmt(r.get("ours_mean_accepted_length"), "{:.2f}"))
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
                          f"{v['ms']:.2f}", f"{v['ratio_to_1']:.2f}", fmt(d and d["ms"], "{:.3f}"),
                          fmt(d and d["per_token_vs_target_step"], "{:.3f}"))
        console.print(t)
    for name, err in (results.get("errors") or {}).items():
        console.print(f"[red]error (configuration dropped): {name}: {err}[/]")
