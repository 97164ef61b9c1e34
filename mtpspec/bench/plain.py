"""Plain (non-speculative) decoding benchmark: our engine against transformers, same machine, same prompts.

`run_plain_bench(...)` measures, for each dtype and batch size:

* throughput: generated tokens per second of wall time for the *whole* generate call (batch tokens
  counted, prefill included) for our engine and for `transformers`' `generate`, as the median of
  interleaved repeats (ours and transformers alternate which goes first) after one uncounted
  warm-up run each; plus our decode-only rate from our own statistics (tokens after the first,
  over the time after the prefill);
* correctness: greedy tokens of both sides, which must be identical in fp32 (in bf16 the matrix
  kernels differ, so only the identical fraction is reported);
* a memory-bandwidth roofline: the machine's memory-read bandwidth (`torch.sum` over a large
  tensor, best of several runs) divided by the bytes of weights one decoding step reads;
* the verify-pass cost: time of a forward of `verify_tokens` tokens over a warmed cache of
  ~`verify_context` tokens, relative to a 1-token forward (what a speculative verify step costs
  compared to a plain decode step), for both engines.

It prints a table to stdout (rich) and writes every figure to a JSON file. Progress goes to stderr.

EOS is ignored on both sides, so every run makes exactly `max_new_tokens` tokens per row: our
requests get `eos_ids=frozenset()`, transformers gets `eos_token_id=None` (as a keyword argument:
a `GenerationConfig` with eos None is merged with the model's default and would stop at EOS) and
`min_new_tokens=max_new_tokens`; the output length is checked.

Prompts: the built-in chat prompts (`prompts.CHAT_PROMPTS`) rendered with the checkpoint's chat
template. A checkpoint without a tokenizer gets deterministic pseudo-random token-id prompts
(`prompts.token_id_prompts`) instead; `prompts=` also accepts token-id lists. Batch size B uses the
first B prompts (cycled). On the transformers side a batch is left-padded by hand (pad id = the
tokenizer's pad token, else the config's pad/eos id, else 0) with an attention mask, which is what
`tokenizer.padding_side = "left"` would produce, and also works with token-id prompts.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError, MtpspecError

DEFAULT_OUT = "bench-results/plain.json"


class BenchMismatch(MtpspecError):
    """fp32 greedy tokens of our engine and transformers differ (raised after results are written)."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "memory_gib": None,
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    info["load_average_at_start"] = _loadavg()
    return info


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: a load above the core count means other processes competed
    for the CPU during the benchmark, and the timings are unreliable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def versions() -> dict:
    import transformers

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mtpspec": __version__}


def kernel_info() -> dict:
    """`mtpspec.kernels.kernel_info()` if the kernels package provides it, else a note."""
    try:
        from ..kernels import kernel_info as ki
    except Exception as e:  # noqa: BLE001 - the kernels package may be absent or mid-edit
        return {"path": "unknown", "reason": f"mtpspec.kernels.kernel_info unavailable ({type(e).__name__})"}
    try:
        return dict(ki())
    except Exception as e:  # noqa: BLE001
        return {"path": "unknown", "reason": f"kernel_info() failed: {type(e).__name__}: {e}"}


def kernel_summary(k: dict) -> str:
    """The kernel path of a run for the tables: "cpp avx2 (prebuilt)", "torch (reason)"."""
    if k.get("path") == "cpp":
        return f"cpp {k.get('isa', '')} ({k.get('build') or 'build unknown'})"
    return f"{k.get('path')}{' (' + k['reason'] + ')' if k.get('reason') else ''}"


# ---------------------------------------------------------------------------------------------
# memory bandwidth and bytes per step
# ---------------------------------------------------------------------------------------------
def measure_read_bandwidth(size_mb: int = 256, runs: int = 10, device: torch.device | str = "cpu") -> dict:
    """Memory-read bandwidth in GB/s (1e9 bytes/s): best of `runs` `torch.sum` over a `size_mb` MB
    fp32 tensor, with torch's current thread count."""
    n = size_mb * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    torch.sum(x)  # touch / warm up
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        torch.sum(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * x.element_size()
    del x
    best = min(times)
    return {"gb_per_s": nbytes / best / 1e9, "bytes": nbytes, "runs": runs, "best_s": best,
            "median_gb_per_s": nbytes / _median(times) / 1e9, "threads": torch.get_num_threads(),
            "method": f"torch.sum over a {size_mb} MB fp32 tensor, best of {runs}"}


def weight_bytes_per_step(hf_model: torch.nn.Module) -> dict:
    """Bytes of parameters one decoding step reads: every parameter (linear layers, norms, LM head)
    counted once (tied embeddings = the LM head, counted once); an untied input embedding table is
    excluded (a step reads one row of it). KV-cache reads are not included."""
    emb = hf_model.get_input_embeddings().weight
    out = hf_model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    total = 0
    n_params = 0
    for _, p in hf_model.named_parameters():  # named_parameters de-duplicates shared tensors
        if p is emb and not tied:
            continue
        total += p.numel() * p.element_size()
        n_params += p.numel()
    return {"bytes": total, "params": n_params, "tied_embeddings": tied}


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# token comparison
# ---------------------------------------------------------------------------------------------
def compare_tokens(ours: list[list[int]], ref: list[list[int]]) -> dict:
    """Row-by-row comparison: identical rows, the first differing position of each row, the fraction
    of tokens before the first divergence, and the fraction of equal positions."""
    first_diff: list[int | None] = []
    prefix = same = total = 0
    for a, b in zip(ours, ref):
        n = max(len(a), len(b))
        d = next((i for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]), None)
        first_diff.append(d)
        prefix += n if d is None else d
        same += sum(1 for x, y in zip(a, b) if x == y)
        total += n
    return {
        "identical": all(d is None for d in first_diff) and len(ours) == len(ref),
        "rows": len(ours),
        "first_divergence": first_diff,
        "identical_prefix_fraction": prefix / total if total else 1.0,
        "identical_position_fraction": same / total if total else 1.0,
    }


# ---------------------------------------------------------------------------------------------
# the two engines' generate calls
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    tokens: list[list[int]]
    wall_s: float
    decode_tok_s: float | None  # ours only: decode-only batch rate from our stats

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tok_s(self) -> float:
        return self.n_tokens / self.wall_s


def _ours_runner(decoder, prompt_ids: list[list[int]], max_new_tokens: int, device) -> Callable[[], RunResult]:
    from ..decoding.loop import Request, run
    from ..decoding.sampling import SamplingParams

    greedy = SamplingParams()

    def go() -> RunResult:
        reqs = [Request(list(p), max_new_tokens, greedy, frozenset()) for p in prompt_ids]
        _sync(device)
        t0 = time.perf_counter()
        seqs = run(decoder, reqs)
        _sync(device)
        wall = time.perf_counter() - t0
        dec_time = max(s.stats.decode_time for s in seqs)
        dec_tokens = sum(max(len(s.new_ids) - 1, 0) for s in seqs)
        return RunResult([list(s.new_ids) for s in seqs], wall, dec_tokens / dec_time if dec_time > 0 else None)

    return go


def _hf_runner(hf_model, prompt_ids: list[list[int]], max_new_tokens: int, pad_id: int, device) -> Callable[[], RunResult]:
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for b, p in enumerate(prompt_ids):  # left padding
        input_ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)

    def go() -> RunResult:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                pad_token_id=pad_id, use_cache=True,
            )
        _sync(device)
        wall = time.perf_counter() - t0
        new = out[:, width:].tolist()
        if any(len(row) != max_new_tokens for row in new):
            raise MtpspecError(f"transformers generated {len(new[0])} tokens per row, expected {max_new_tokens}")
        return RunResult(new, wall, None)

    return go


# ---------------------------------------------------------------------------------------------
# verify-pass cost
# ---------------------------------------------------------------------------------------------
def _time_pairs(step: Callable[[int], None], k: int, repeats: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Alternate 1-token and k-token steps (each restoring the cache); times in seconds."""
    t1, tk = [], []
    for i in range(warmup + repeats):
        for n, acc in ((1, t1), (k, tk)) if i % 2 == 0 else ((k, tk), (1, t1)):
            t0 = time.perf_counter()
            step(n)
            dt = time.perf_counter() - t0
            if i >= warmup:
                acc.append(dt)
    return t1, tk


@torch.inference_mode()
def verify_cost_ours(decoder, context: list[int], k: int, repeats: int, device) -> dict:
    ctx = torch.tensor([context], dtype=torch.long, device=device)
    probe = torch.tensor([context[:k]], dtype=torch.long, device=device)
    cache = decoder.new_cache(1, len(context) + k)
    decoder(ctx, cache, logits_at=torch.tensor([[len(context) - 1]], device=device))

    def step(n: int) -> None:
        decoder(probe[:, :n], cache)
        _sync(device)
        cache.rollback(n)
        if int(cache.lengths[0]) != len(context):
            raise MtpspecError("verify bench: cache length wrong after rollback")

    t1, tk = _time_pairs(step, k, repeats)
    return {"t1_ms": _median(t1) * 1e3, "tk_ms": _median(tk) * 1e3, "ratio": _median(tk) / _median(t1)}


@torch.inference_mode()
def verify_cost_hf(hf_model, context: list[int], k: int, repeats: int, device) -> dict:
    from transformers import DynamicCache

    ctx = torch.tensor([context], dtype=torch.long, device=device)
    probe = torch.tensor([context[:k]], dtype=torch.long, device=device)
    cache = DynamicCache(config=hf_model.config)
    hf_model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step(n: int) -> None:
        hf_model(input_ids=probe[:, :n], past_key_values=cache, use_cache=True)
        _sync(device)
        cache.crop(-n)  # negative = remove n tokens
        if cache.get_seq_length() != len(context):
            raise MtpspecError("verify bench: transformers cache length wrong after crop")

    t1, tk = _time_pairs(step, k, repeats)
    return {"t1_ms": _median(t1) * 1e3, "tk_ms": _median(tk) * 1e3, "ratio": _median(tk) / _median(t1)}


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def run_plain_bench(
    *,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    batch_sizes: Sequence[int] = (1, 8),
    max_new_tokens: int = 128,
    repeats: int = 3,
    prompts: Sequence[str | list[int]] | None = None,
    chat: bool = True,
    check_fp32_identical: bool = True,
    verify_tokens: int = 5,
    verify_context: int = 100,
    verify_repeats: int = 30,
    bandwidth_mb: int = 256,
    bandwidth_runs: int = 10,
    out: str | Path | None = DEFAULT_OUT,
    show_table: bool = True,
    command: str | None = None,
) -> dict:
    """Benchmark plain greedy decoding of our engine against transformers; returns the results dict.

    model: checkpoint folder or .gguf file; None = the default model (SmolLM2-135M-Instruct,
        converted once from its GGUF into the cache on first use).
    cache_dir: where converted models are cached (default: $MTPSPEC_CACHE or ~/.cache/mtpspec).
    device: torch device for both engines ("cpu", "cuda", ...).
    dtypes: model dtypes to run, each of "float32"/"fp32", "bfloat16"/"bf16" (or "float16").
    batch_sizes: batch sizes to run; batch size B uses the first B prompts (cycled).
    max_new_tokens: tokens generated per row (EOS ignored: every run makes exactly this many).
    repeats: timed repeats per (dtype, batch size), after one uncounted warm-up per engine; the
        engines alternate which goes first; medians are reported.
    prompts: user messages (chat-templated if `chat`) or token-id lists; None = the built-in
        prompts (or pseudo-random token ids if the checkpoint has no tokenizer).
    chat: apply the chat template to text prompts.
    check_fp32_identical: raise `BenchMismatch` (after printing and writing the results) if the
        fp32 greedy tokens of the two engines differ.
    verify_tokens / verify_context / verify_repeats: the verify-pass cost measurement: a forward
        of `verify_tokens` tokens vs 1 token, batch 1, on a cache warmed with `verify_context`
        tokens, median over `verify_repeats` repeats of each.
    bandwidth_mb / bandwidth_runs: size of the tensor summed to measure memory-read bandwidth, and
        how many runs (best is kept).
    out: JSON output path (parent folders are created); None = do not write.
    show_table: print the rich table to stdout.
    command: the command line to record in the JSON (default: this process's argv).

    Throughput ("tok/s") = generated tokens of the whole batch / wall time of the generate call,
    prefill included. "decode tok/s" (ours only) excludes the prefill and the first token.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    from ..api import load, resolve_device, resolve_dtype, resolve_model_path
    from .prompts import bench_prompts

    # ---- argument checks --------------------------------------------------------------------
    def _pos_int(name: str, v: Any) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")

    for name, v in (("max_new_tokens", max_new_tokens), ("repeats", repeats), ("verify_tokens", verify_tokens),
                    ("verify_context", verify_context), ("verify_repeats", verify_repeats),
                    ("bandwidth_mb", bandwidth_mb), ("bandwidth_runs", bandwidth_runs)):
        _pos_int(name, v)
    if not batch_sizes:
        raise InputError("batch_sizes is empty")
    for b in batch_sizes:
        _pos_int("each batch size", b)
    if not dtypes:
        raise InputError("dtypes is empty")
    dts = {str(dt).removeprefix("torch."): dt for dt in (resolve_dtype(d) for d in dtypes)}  # canonical names
    dev = resolve_device(device)
    if prompts is not None and not prompts:
        raise InputError("prompts is empty")

    arguments = dict(model=None if model is None else str(model), cache_dir=None if cache_dir is None else str(cache_dir),
                     device=str(dev), dtypes=list(dts), batch_sizes=list(batch_sizes), max_new_tokens=max_new_tokens,
                     repeats=repeats, prompts=None if prompts is None else list(prompts), chat=chat,
                     check_fp32_identical=check_fp32_identical, verify_tokens=verify_tokens,
                     verify_context=verify_context, verify_repeats=verify_repeats, bandwidth_mb=bandwidth_mb,
                     bandwidth_runs=bandwidth_runs, out=None if out is None else str(out))

    folder = resolve_model_path(model, cache_dir)
    _log(f"model folder: {folder}")
    kinfo = kernel_info()
    _log(f"kernel: {kinfo}")
    _log(f"measuring memory-read bandwidth ({bandwidth_mb} MB x {bandwidth_runs}) ...")
    bw = measure_read_bandwidth(bandwidth_mb, bandwidth_runs, dev)
    _log(f"bandwidth: {bw['gb_per_s']:.1f} GB/s")

    results: dict = {
        "benchmark": "plain",
        "model": {"name": "SmolLM2-135M-Instruct" if model is None else Path(model).name, "folder": str(folder)},
        "command": command if command is not None else shlex.join(sys.argv),
        "arguments": arguments,
        "machine": machine_info(),
        "versions": versions(),
        "kernel": kinfo,
        "bandwidth": {k: (_r(v) if isinstance(v, float) else v) for k, v in bw.items()},
        "notes": {
            "tok_s": "generated tokens of the whole batch / wall time of the generate call (prefill included)",
            "ours_decode_tok_s": "ours only: tokens after the first / time after the prefill (batch rows summed)",
            "roofline_tok_s": "bandwidth / weight bytes read per decoding step (batch-1 bound; KV reads excluded)",
            "verify_ratio": "time of a forward of verify_tokens tokens / time of a 1-token forward, batch 1",
            "eos": "ignored on both sides; every row makes exactly max_new_tokens tokens",
        },
        "runs": [],
        "verify": [],
        "roofline": [],
    }
    mismatches: list[str] = []
    roof_inputs: list[tuple[str, dict, float | None, float | None]] = []
    prev_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for dname, dt in dts.items():
            _log(f"[{dname}] loading our engine and transformers ...")
            engine = load(folder, device=dev, dtype=dt)
            hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt).to(dev).eval()
            tok = engine.tokenizer

            # ---- prompts --------------------------------------------------------------------
            plist, prompt_kind = bench_prompts(engine, prompts, chat)
            pad_id = next((x for x in (getattr(tok, "pad_token_id", None), hf.config.pad_token_id,
                                       getattr(tok, "eos_token_id", None), hf.config.eos_token_id) if isinstance(x, int)), 0)

            # ---- throughput + identity -------------------------------------------------------
            ours_b1_tok_s = ours_b1_decode = None
            b1_tokens: list[int] | None = None
            for bsz in batch_sizes:
                ids = [plist[i % len(plist)] for i in range(bsz)]
                ours_go = _ours_runner(engine.model, ids, max_new_tokens, dev)
                hf_go = _hf_runner(hf, ids, max_new_tokens, pad_id, dev)
                _log(f"[{dname}] batch {bsz}: warm-up ...")
                ours_ref = ours_go().tokens
                hf_ref = hf_go().tokens
                ours_runs: list[RunResult] = []
                hf_runs: list[RunResult] = []
                deterministic = True
                for r in range(repeats):
                    order = (("ours", ours_go), ("hf", hf_go)) if r % 2 == 0 else (("hf", hf_go), ("ours", ours_go))
                    for who, go in order:
                        res = go()
                        (ours_runs if who == "ours" else hf_runs).append(res)
                        deterministic &= res.tokens == (ours_ref if who == "ours" else hf_ref)
                    _log(f"[{dname}] batch {bsz}: repeat {r + 1}/{repeats}: ours {ours_runs[-1].tok_s:.1f} tok/s, "
                         f"transformers {hf_runs[-1].tok_s:.1f} tok/s")
                cmp = compare_tokens(ours_ref, hf_ref)
                ours_med = _median([x.tok_s for x in ours_runs])
                hf_med = _median([x.tok_s for x in hf_runs])
                dec_med = _median([x.decode_tok_s for x in ours_runs if x.decode_tok_s is not None])
                row = {
                    "dtype": dname, "batch_size": bsz, "max_new_tokens": max_new_tokens, "prompts": prompt_kind,
                    "prompt_tokens": [len(p) for p in ids],
                    "ours_tok_s": _r(ours_med), "hf_tok_s": _r(hf_med), "speedup": _r(ours_med / hf_med),
                    "ours_decode_tok_s": _r(dec_med),
                    "ours_wall_s": [_r(x.wall_s, 4) for x in ours_runs], "hf_wall_s": [_r(x.wall_s, 4) for x in hf_runs],
                    "ours_tok_s_runs": [_r(x.tok_s) for x in ours_runs], "hf_tok_s_runs": [_r(x.tok_s) for x in hf_runs],
                    "tokens_identical": cmp["identical"],
                    "identical_prefix_fraction": _r(cmp["identical_prefix_fraction"], 4),
                    "identical_position_fraction": _r(cmp["identical_position_fraction"], 4),
                    "first_divergence": cmp["first_divergence"],
                    "identity_asserted": dt == torch.float32 and check_fp32_identical,
                    "deterministic_across_repeats": deterministic,
                }
                results["runs"].append(row)
                if dt == torch.float32 and not cmp["identical"]:
                    mismatches.append(f"{dname} batch {bsz}: rows first differ at {cmp['first_divergence']}")
                if bsz == 1:
                    ours_b1_tok_s, ours_b1_decode = ours_med, dec_med
                    b1_tokens = ours_ref[0]
                _log(f"[{dname}] batch {bsz}: ours {ours_med:.1f} tok/s, transformers {hf_med:.1f} tok/s, "
                     f"identical={cmp['identical']}")

            # ---- roofline inputs (computed after the last bandwidth measurement) -----------------
            roof_inputs.append((dname, weight_bytes_per_step(hf), ours_b1_tok_s, ours_b1_decode))

            # ---- verify-pass cost -----------------------------------------------------------
            base = plist[0] + (b1_tokens or [])
            context = (base * (verify_context // len(base) + 1))[:verify_context]
            k = verify_tokens
            if len(context) < k:
                raise InputError(f"verify_context ({verify_context}) must be >= verify_tokens ({k})")
            _log(f"[{dname}] verify cost: {k} vs 1 token at context {len(context)} ...")
            vo = verify_cost_ours(engine.model, context, k, verify_repeats, dev)
            vh = verify_cost_hf(hf, context, k, verify_repeats, dev)
            results["verify"].append({
                "dtype": dname, "context": len(context), "tokens": k, "repeats": verify_repeats,
                "ours_t1_ms": _r(vo["t1_ms"]), "ours_tk_ms": _r(vo["tk_ms"]), "ours_ratio": _r(vo["ratio"]),
                "hf_t1_ms": _r(vh["t1_ms"]), "hf_tk_ms": _r(vh["tk_ms"]), "hf_ratio": _r(vh["ratio"]),
            })
            del engine, hf
            gc.collect()
    finally:
        transformers.logging.set_verbosity(prev_verbosity)

    # bandwidth again at the end (the machine may have been busier at the start): keep the best
    bw2 = measure_read_bandwidth(bandwidth_mb, bandwidth_runs, dev)
    if bw2["gb_per_s"] > bw["gb_per_s"]:
        bw = bw2
    bw["measurements_gb_per_s"] = [results["bandwidth"]["gb_per_s"], _r(bw2["gb_per_s"])]
    bw["method"] += " (measured before and after the runs; the best is kept)"
    results["bandwidth"] = {k: (_r(v) if isinstance(v, float) else v) for k, v in bw.items()}
    _log(f"bandwidth (best of start/end): {bw['gb_per_s']:.1f} GB/s")
    for dname, wb, b1, b1_dec in roof_inputs:
        roof = bw["gb_per_s"] * 1e9 / wb["bytes"]
        results["roofline"].append({
            "dtype": dname, "weight_bytes_per_step": wb["bytes"], "params_read_per_step": wb["params"],
            "tied_embeddings": wb["tied_embeddings"], "roofline_tok_s": _r(roof),
            "ours_b1_tok_s": _r(b1), "ours_b1_fraction": _r(b1 / roof, 4) if b1 else None,
            "ours_b1_decode_tok_s": _r(b1_dec), "ours_b1_decode_fraction": _r(b1_dec / roof, 4) if b1_dec else None,
        })

    results["machine"]["load_average_at_end"] = _loadavg()
    results["fp32_tokens_identical"] = (not mismatches) if any(dt == torch.float32 for dt in dts.values()) else None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        results["out"] = str(path)
        _log(f"wrote {path}")
    if show_table:
        print_tables(results)
    if mismatches and check_fp32_identical:
        raise BenchMismatch("fp32 greedy tokens differ between our engine and transformers: " + "; ".join(mismatches))
    return results


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def print_tables(results: dict, console=None) -> None:
    """Print the results as rich tables (to stdout unless a console is given)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a file or pipe: do not squeeze the tables into 80 columns
            console = Console(width=150)
    m, bw, k = results["machine"], results["bandwidth"], results["kernel"]
    console.print(f"[bold]plain decoding: {results['model']['name']}[/]  "
                  f"CPU: {m['cpu_model']} ({m['logical_cores']} cores, {m['torch_threads']} torch threads)  "
                  f"kernel: {kernel_summary(k)}  "
                  f"read bandwidth: {bw['gb_per_s']:.1f} GB/s")
    loads = [x for x in (m.get("load_average_at_start"), m.get("load_average_at_end")) if x]
    if loads and m.get("logical_cores") and max(x[0] for x in loads) > m["logical_cores"] + 0.5:
        console.print(f"[yellow]warning: load average {' -> '.join(str(x[0]) for x in loads)} on "
                      f"{m['logical_cores']} cores: other processes competed for the CPU; timings are unreliable[/]")

    t = Table(title="throughput (tok/s = batch tokens / wall time of generate, prefill included)")
    for col in ("dtype", "batch", "new tok", "ours tok/s", "transformers tok/s", "speedup",
                "ours decode tok/s", "tokens identical"):
        t.add_column(col, justify="right")
    for r in results["runs"]:
        if r["tokens_identical"]:
            ident = "yes"
        else:
            ident = f"{'NO ' if r['identity_asserted'] else ''}prefix {r['identical_prefix_fraction']:.1%}"
        t.add_row(_short(r["dtype"]), str(r["batch_size"]), str(r["max_new_tokens"]), f"{r['ours_tok_s']:.1f}",
                  f"{r['hf_tok_s']:.1f}", f"{r['speedup']:.2f}x",
                  f"{r['ours_decode_tok_s']:.1f}" if r["ours_decode_tok_s"] is not None else "-", ident)
    console.print(t)

    t = Table(title="memory-bandwidth roofline (batch 1)")
    for col in ("dtype", "weight MB/step", "roofline tok/s", "ours b1 tok/s", "of roofline",
                "ours b1 decode tok/s", "of roofline "):
        t.add_column(col, justify="right")
    for r in results["roofline"]:
        t.add_row(_short(r["dtype"]), f"{r['weight_bytes_per_step'] / 1e6:.1f}", f"{r['roofline_tok_s']:.1f}",
                  _fmt(r["ours_b1_tok_s"], "{:.1f}"), _fmt(r["ours_b1_fraction"], "{:.1%}"),
                  _fmt(r["ours_b1_decode_tok_s"], "{:.1f}"), _fmt(r["ours_b1_decode_fraction"], "{:.1%}"))
    console.print(t)

    t = Table(title="verify-pass cost (forward of k tokens vs 1 token, batch 1, warmed cache)")
    for col in ("dtype", "context", "k", "ours 1-tok ms", "ours k-tok ms", "ours ratio",
                "tf 1-tok ms", "tf k-tok ms", "tf ratio"):
        t.add_column(col, justify="right")
    for r in results["verify"]:
        t.add_row(_short(r["dtype"]), str(r["context"]), str(r["tokens"]), f"{r['ours_t1_ms']:.2f}", f"{r['ours_tk_ms']:.2f}",
                  f"{r['ours_ratio']:.2f}", f"{r['hf_t1_ms']:.2f}", f"{r['hf_tk_ms']:.2f}", f"{r['hf_ratio']:.2f}")
    console.print(t)


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else spec.format(x)
