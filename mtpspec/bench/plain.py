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
EOS is ignored on both sides (see `timing`), so every run makes exactly `max_new_tokens` tokens per row.

Prompts: the built-in chat prompts (`prompts.CHAT_PROMPTS`) rendered with the checkpoint's chat
template. A checkpoint without a tokenizer gets deterministic pseudo-random token-id prompts
(`prompts.token_id_prompts`) instead; `prompts=` also accepts token-id lists. Batch size B uses the
first B prompts (cycled). On the transformers side a batch is left-padded (pad id = the
tokenizer's pad token, else the config's pad/eos id, else 0) with an attention mask.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import InputError, MtpspecError
from .arguments import as_recorded, check_positive_int
from .machine import environment, kernel_summary, load_average, measure_read_bandwidth
from .records import (BenchMismatch, compare_tokens, fmt, log, print_load_warning, recorded_command, rounded,
                      table_console, write_results)
from .timing import alternating_times, hf_runner, interleave, loop_runner, median, quiet_transformers, sync

__all__ = ["BenchMismatch", "compare_tokens", "kernel_summary", "print_tables", "run_plain_bench"]

DEFAULT_OUT = "bench-results/plain.json"


# ---------------------------------------------------------------------------------------------
# weight bytes per step and the verify-pass cost
# ---------------------------------------------------------------------------------------------
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


def _one_vs_k(step: Callable[[int], None], k: int, repeats: int) -> dict:
    """Median times of 1-token and k-token steps (each restoring the cache), alternated."""
    times = alternating_times({"1": lambda: step(1), "k": lambda: step(k)}, repeats, warmup=3)
    t1, tk = median(times["1"]), median(times["k"])
    return {"t1_ms": t1 * 1e3, "tk_ms": tk * 1e3, "ratio": tk / t1}


@torch.inference_mode()
def verify_cost_ours(decoder, context: list[int], k: int, repeats: int, device) -> dict:
    ctx = torch.tensor([context], dtype=torch.long, device=device)
    probe = torch.tensor([context[:k]], dtype=torch.long, device=device)
    cache = decoder.new_cache(1, len(context) + k)
    decoder(ctx, cache, logits_at=torch.tensor([[len(context) - 1]], device=device))

    def step(n: int) -> None:
        decoder(probe[:, :n], cache)
        sync(device)
        cache.rollback(n)
        if int(cache.lengths[0]) != len(context):
            raise MtpspecError("verify bench: cache length wrong after rollback")

    return _one_vs_k(step, k, repeats)


@torch.inference_mode()
def verify_cost_hf(hf_model, context: list[int], k: int, repeats: int, device) -> dict:
    from transformers import DynamicCache

    ctx = torch.tensor([context], dtype=torch.long, device=device)
    probe = torch.tensor([context[:k]], dtype=torch.long, device=device)
    cache = DynamicCache(config=hf_model.config)
    hf_model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step(n: int) -> None:
        hf_model(input_ids=probe[:, :n], past_key_values=cache, use_cache=True)
        sync(device)
        cache.crop(-n)  # negative = remove n tokens
        if cache.get_seq_length() != len(context):
            raise MtpspecError("verify bench: transformers cache length wrong after crop")

    return _one_vs_k(step, k, repeats)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class PlainConfig:
    """The checked arguments of `run_plain_bench`."""

    model: str | Path | None
    cache_dir: str | Path | None
    device: torch.device  # given as a name
    dtypes: dict[str, torch.dtype]  # given as names; canonical name -> dtype once checked
    batch_sizes: Sequence[int]
    max_new_tokens: int
    repeats: int
    prompts: Sequence[str | list[int]] | None
    chat: bool
    check_fp32_identical: bool
    verify_tokens: int
    verify_context: int
    verify_repeats: int
    bandwidth_mb: int
    bandwidth_runs: int
    out: str | Path | None

    def __post_init__(self) -> None:
        from ..api import resolve_device

        for name in ("max_new_tokens", "repeats", "verify_tokens", "verify_context", "verify_repeats",
                     "bandwidth_mb", "bandwidth_runs"):
            check_positive_int(name, getattr(self, name))
        if not self.batch_sizes:
            raise InputError("batch_sizes is empty")
        for b in self.batch_sizes:
            check_positive_int("each batch size", b)
        if not self.dtypes:
            raise InputError("dtypes is empty")
        self.dtypes = _canonical_dtypes(self.dtypes)
        self.device = resolve_device(self.device)
        if self.prompts is not None and not self.prompts:
            raise InputError("prompts is empty")

    def arguments(self) -> dict:
        """The arguments as the results record them."""
        return dict(model=as_recorded(self.model), cache_dir=as_recorded(self.cache_dir), device=str(self.device),
                    dtypes=list(self.dtypes), batch_sizes=list(self.batch_sizes), max_new_tokens=self.max_new_tokens,
                    repeats=self.repeats, prompts=None if self.prompts is None else list(self.prompts), chat=self.chat,
                    check_fp32_identical=self.check_fp32_identical, verify_tokens=self.verify_tokens,
                    verify_context=self.verify_context, verify_repeats=self.verify_repeats,
                    bandwidth_mb=self.bandwidth_mb, bandwidth_runs=self.bandwidth_runs, out=as_recorded(self.out))


def _canonical_dtypes(dtypes: Sequence[str]) -> dict[str, torch.dtype]:
    from ..api import resolve_dtype

    return {str(dt).removeprefix("torch."): dt for dt in (resolve_dtype(d) for d in dtypes)}


# ---------------------------------------------------------------------------------------------
# measurements of one dtype
# ---------------------------------------------------------------------------------------------
def _pad_id(tok, hf) -> int:
    """The tokenizer's pad token, else the config's pad/eos id, else 0."""
    return next((x for x in (getattr(tok, "pad_token_id", None), hf.config.pad_token_id,
                             getattr(tok, "eos_token_id", None), hf.config.eos_token_id) if isinstance(x, int)), 0)


@dataclass
class _Throughput:
    row: dict  # the results row
    ours_tokens: list[list[int]]
    ours_tok_s: float  # medians, not rounded
    ours_decode_tok_s: float


def _throughput(cfg: PlainConfig, dname: str, bsz: int, engine, hf, plist: list[list[int]], pad_id: int,
                prompt_kind: str) -> _Throughput:
    """Ours and transformers at batch size bsz, interleaved."""
    ids = [plist[i % len(plist)] for i in range(bsz)]
    runners = {"ours": loop_runner(engine.model, [ids], cfg.max_new_tokens, device=cfg.device),
               "hf": hf_runner(hf, [ids], cfg.max_new_tokens, pad_id, cfg.device)}

    def progress(r: int, got: dict) -> None:
        log(f"[{dname}] batch {bsz}: repeat {r + 1}/{cfg.repeats}: ours {got['ours'][-1].tok_s:.1f} tok/s, "
            f"transformers {got['hf'][-1].tok_s:.1f} tok/s")

    log(f"[{dname}] batch {bsz}: warm-up ...")
    ref, got = interleave(runners, cfg.repeats, on_repeat=progress)
    ours_runs, hf_runs = got["ours"], got["hf"]
    cmp = compare_tokens(ref["ours"], ref["hf"])
    ours_med = median([x.tok_s for x in ours_runs])
    hf_med = median([x.tok_s for x in hf_runs])
    dec_med = median([x.decode_tok_s for x in ours_runs if x.decode_tok_s is not None])
    row = {
        "dtype": dname, "batch_size": bsz, "max_new_tokens": cfg.max_new_tokens, "prompts": prompt_kind,
        "prompt_tokens": [len(p) for p in ids],
        "ours_tok_s": rounded(ours_med), "hf_tok_s": rounded(hf_med), "speedup": rounded(ours_med / hf_med),
        "ours_decode_tok_s": rounded(dec_med),
        "ours_wall_s": [rounded(x.wall_s, 4) for x in ours_runs], "hf_wall_s": [rounded(x.wall_s, 4) for x in hf_runs],
        "ours_tok_s_runs": [rounded(x.tok_s) for x in ours_runs], "hf_tok_s_runs": [rounded(x.tok_s) for x in hf_runs],
        "tokens_identical": cmp["identical"],
        "identical_prefix_fraction": rounded(cmp["identical_prefix_fraction"], 4),
        "identical_position_fraction": rounded(cmp["identical_position_fraction"], 4),
        "first_divergence": cmp["first_divergence"],
        "identity_asserted": cfg.dtypes[dname] == torch.float32 and cfg.check_fp32_identical,
        "deterministic_across_repeats": all(x.tokens == ref[who] for who in got for x in got[who]),
    }
    log(f"[{dname}] batch {bsz}: ours {ours_med:.1f} tok/s, transformers {hf_med:.1f} tok/s, "
        f"identical={cmp['identical']}")
    return _Throughput(row, ref["ours"], ours_med, dec_med)


def _verify_row(cfg: PlainConfig, dname: str, engine, hf, context_base: list[int]) -> dict:
    """The verify-pass cost of both engines on a context of ~verify_context tokens."""
    context = (context_base * (cfg.verify_context // len(context_base) + 1))[:cfg.verify_context]
    k = cfg.verify_tokens
    if len(context) < k:
        raise InputError(f"verify_context ({cfg.verify_context}) must be >= verify_tokens ({k})")
    log(f"[{dname}] verify cost: {k} vs 1 token at context {len(context)} ...")
    vo = verify_cost_ours(engine.model, context, k, cfg.verify_repeats, cfg.device)
    vh = verify_cost_hf(hf, context, k, cfg.verify_repeats, cfg.device)
    return {"dtype": dname, "context": len(context), "tokens": k, "repeats": cfg.verify_repeats,
            "ours_t1_ms": rounded(vo["t1_ms"]), "ours_tk_ms": rounded(vo["tk_ms"]), "ours_ratio": rounded(vo["ratio"]),
            "hf_t1_ms": rounded(vh["t1_ms"]), "hf_tk_ms": rounded(vh["tk_ms"]), "hf_ratio": rounded(vh["ratio"])}


@dataclass
class _DtypeResult:
    runs: list[dict]
    verify: dict
    weight_bytes: dict
    b1_tok_s: float | None  # ours at batch 1, for the roofline
    b1_decode_tok_s: float | None


def _measure_dtype(cfg: PlainConfig, folder: Path, dname: str) -> _DtypeResult:
    """Load both engines in one dtype; throughput rows at every batch size, then the verify cost."""
    from transformers import AutoModelForCausalLM

    from ..api import load
    from .prompts import bench_prompts

    dt = cfg.dtypes[dname]
    log(f"[{dname}] loading our engine and transformers ...")
    engine = load(folder, device=cfg.device, dtype=dt)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt).to(cfg.device).eval()
    plist, prompt_kind = bench_prompts(engine, cfg.prompts, cfg.chat)
    pad_id = _pad_id(engine.tokenizer, hf)
    rows, b1 = [], None
    for bsz in cfg.batch_sizes:
        t = _throughput(cfg, dname, bsz, engine, hf, plist, pad_id, prompt_kind)
        rows.append(t.row)
        if bsz == 1:
            b1 = t
    verify = _verify_row(cfg, dname, engine, hf, plist[0] + (b1.ours_tokens[0] if b1 else []))
    result = _DtypeResult(rows, verify, weight_bytes_per_step(hf), b1 and b1.ours_tok_s,
                          b1 and b1.ours_decode_tok_s)
    del engine, hf
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
_NOTES = {
    "tok_s": "generated tokens of the whole batch / wall time of the generate call (prefill included)",
    "ours_decode_tok_s": "ours only: tokens after the first / time after the prefill (batch rows summed)",
    "roofline_tok_s": "bandwidth / weight bytes read per decoding step (batch-1 bound; KV reads excluded)",
    "verify_ratio": "time of a forward of verify_tokens tokens / time of a 1-token forward, batch 1",
    "eos": "ignored on both sides; every row makes exactly max_new_tokens tokens",
}


def _rounded_values(d: dict) -> dict:
    return {k: (rounded(v) if isinstance(v, float) else v) for k, v in d.items()}


def _best_bandwidth(first: dict, cfg: PlainConfig) -> dict:
    """Bandwidth measured again after the runs (the machine may have been busier at the start):
    the best of both."""
    second = measure_read_bandwidth(cfg.bandwidth_mb, cfg.bandwidth_runs, cfg.device)
    bw = dict(second if second["gb_per_s"] > first["gb_per_s"] else first)
    bw["measurements_gb_per_s"] = [rounded(first["gb_per_s"]), rounded(second["gb_per_s"])]
    bw["method"] += " (measured before and after the runs; the best is kept)"
    log(f"bandwidth (best of start/end): {bw['gb_per_s']:.1f} GB/s")
    return bw


def _roofline_row(dname: str, m: _DtypeResult, gb_per_s: float) -> dict:
    wb, b1, b1_dec = m.weight_bytes, m.b1_tok_s, m.b1_decode_tok_s
    roof = gb_per_s * 1e9 / wb["bytes"]
    return {"dtype": dname, "weight_bytes_per_step": wb["bytes"], "params_read_per_step": wb["params"],
            "tied_embeddings": wb["tied_embeddings"], "roofline_tok_s": rounded(roof),
            "ours_b1_tok_s": rounded(b1), "ours_b1_fraction": rounded(b1 / roof, 4) if b1 else None,
            "ours_b1_decode_tok_s": rounded(b1_dec),
            "ours_b1_decode_fraction": rounded(b1_dec / roof, 4) if b1_dec else None}


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
    from ..api import resolve_model_path

    cfg = PlainConfig(model, cache_dir, device, dtypes, batch_sizes, max_new_tokens, repeats, prompts, chat,
                      check_fp32_identical, verify_tokens, verify_context, verify_repeats, bandwidth_mb, bandwidth_runs,
                      out)
    folder = resolve_model_path(model, cache_dir)
    log(f"model folder: {folder}")
    env = environment()
    log(f"kernel: {env['kernel']}")
    log(f"measuring memory-read bandwidth ({bandwidth_mb} MB x {bandwidth_runs}) ...")
    bw = measure_read_bandwidth(bandwidth_mb, bandwidth_runs, cfg.device)
    log(f"bandwidth: {bw['gb_per_s']:.1f} GB/s")
    results: dict = {
        "benchmark": "plain",
        "model": {"name": "SmolLM2-135M-Instruct" if model is None else Path(model).name, "folder": str(folder)},
        "command": recorded_command(command),
        "arguments": cfg.arguments(),
        **env,
        "bandwidth": _rounded_values(bw),
        "notes": _NOTES,
        "runs": [],
        "verify": [],
        "roofline": [],
    }
    measured: dict[str, _DtypeResult] = {}
    with quiet_transformers():
        for dname in cfg.dtypes:
            measured[dname] = m = _measure_dtype(cfg, folder, dname)
            results["runs"] += m.runs
            results["verify"].append(m.verify)
    bw = _best_bandwidth(bw, cfg)
    results["bandwidth"] = _rounded_values(bw)
    results["roofline"] = [_roofline_row(dname, m, bw["gb_per_s"]) for dname, m in measured.items()]
    results["machine"]["load_average_at_end"] = load_average()
    mismatches = [f"{r['dtype']} batch {r['batch_size']}: rows first differ at {r['first_divergence']}"
                  for r in results["runs"] if cfg.dtypes[r["dtype"]] == torch.float32 and not r["tokens_identical"]]
    fp32 = any(dt == torch.float32 for dt in cfg.dtypes.values())
    results["fp32_tokens_identical"] = (not mismatches) if fp32 else None
    write_results(results, out)
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
    from rich.table import Table

    console = table_console(console)
    m, bw, k = results["machine"], results["bandwidth"], results["kernel"]
    console.print(f"[bold]plain decoding: {results['model']['name']}[/]  "
                  f"CPU: {m['cpu_model']} ({m['logical_cores']} cores, {m['torch_threads']} torch threads)  "
                  f"read bandwidth: {bw['gb_per_s']:.1f} GB/s")
    console.print(f"kernel: {kernel_summary(k)}", soft_wrap=True)  # its own line: never wrapped mid-way
    print_load_warning(console, m)

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
                  fmt(r["ours_b1_tok_s"], "{:.1f}"), fmt(r["ours_b1_fraction"], "{:.1%}"),
                  fmt(r["ours_b1_decode_tok_s"], "{:.1f}"), fmt(r["ours_b1_decode_fraction"], "{:.1%}"))
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
