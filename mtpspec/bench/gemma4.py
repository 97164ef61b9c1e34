"""Gemma 4-shaped random models: plain decoding speed, and the MoE expert-widening table.

`run_gemma4_bench(...)` builds, from a config and without any download, random models with the
structure of the published Gemma 4 text variants (shapes scaled down so that they run on a CPU
box, vocabulary kept at the real 262144 because the LM head is the real cost of a decoding step
at these widths):

* **dense** (E2B-like): [s,s,s,s,f] attention layout, one KV head, per-layer inputs (PLE), the
  last layers reuse the K/V of earlier ones (KV sharing) with a double-wide MLP, final softcap,
  tied embeddings. Plain decoding tok/s at each batch size (batch 1 and 8 by default), as the
  median of repeats, plus the weight bytes one step reads and the bandwidth roofline.
* **moe** (26B-A4B-like): [s x5, f] layout, K-as-V on full layers, a dense MLP plus 128 experts
  top-8 per layer. For each batch size B and verify width K (a forward of K+1 tokens per row, as
  speculative verification does; K=0 is a plain decoding step) it reports the mean number of
  distinct experts each MoE layer reads, as a fraction of all experts, relative to B=1, K=0 and
  relative to a plain step (K=0) at the same batch size: the expert weights a verify pass reads.
  The uniform-routing expectation E * (1 - (1 - k/E)^N) (N tokens) is printed next to the
  measurement. The forward's time is reported too.

Results go to a JSON file and a rich table; progress to stderr. Timings are medians; nothing is
asserted about them.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from .arguments import as_recorded, check_positive_int
from .machine import environment, load_average, measure_read_bandwidth
from .records import log, recorded_command, rounded, table_console, write_results
from .timing import loop_runner, median

DEFAULT_OUT = "bench-results/gemma4.json"
S, F = "sliding_attention", "full_attention"

# E2B: 35 layers, hidden 1536, 8 heads / 1 KV head, PLE 256, last 20 layers share KV, double-wide MLP.
# Scaled: 15 layers, hidden 640, 8 x 80-dim heads, PLE 32, last 6 layers shared. ~370M parameters
# (168M tied embedding/head + 126M PLE table + ~75M layers).
DENSE = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2560, num_hidden_layers=15,
    num_attention_heads=8, num_key_value_heads=1, head_dim=80, global_head_dim=160,
    layer_types=[S, S, S, S, F] * 3, sliding_window=512, hidden_size_per_layer_input=32,
    vocab_size_per_layer_input=262144, num_kv_shared_layers=6, use_double_wide_mlp=True,
)
# 26B-A4B: 30 layers, hidden 2816, dense MLP 2112 + 128 experts top-8 (704), K as V on full layers.
MOE = dict(
    vocab_size=262144, hidden_size=512, intermediate_size=384, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, global_head_dim=128,
    num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S] * 5 + [F], sliding_window=512,
    hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128, top_k_experts=8,
    moe_intermediate_size=128,
)
_COMMON = dict(max_position_embeddings=4096, final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1,
               pad_token_id=0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_DENSE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, global_head_dim=32, layer_types=[S, S, F, S, F],
                  sliding_window=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
                  num_kv_shared_layers=2, use_double_wide_mlp=True)
TINY_MOE = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, layer_types=[S, S, F], sliding_window=8, hidden_size_per_layer_input=0,
                enable_moe_block=True, num_experts=16, top_k_experts=2, moe_intermediate_size=16)


def build_random_gemma4(layout: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02):
    """Our `Decoder` for a Gemma 4 text config (`layout` = `Gemma4TextConfig` fields on top of
    common Gemma 4 defaults), randomly initialised (matrices N(0, std), norms/scales as built),
    prepared. Returns (decoder, transformers config)."""
    import transformers as tf

    from ..models.config import from_hf_config
    from ..models.decoder import Decoder

    hf_cfg = tf.Gemma4TextConfig(**{**_COMMON, **layout})
    cfg = from_hf_config(hf_cfg)
    g = torch.Generator().manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # projections, embeddings, expert tensors
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model = model.to(dtype=dtype)
    return model.prepare(), hf_cfg


def _param_count(model) -> int:
    n = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            n += p.numel()
        packed = getattr(m, "_packed", None)
        if packed is not None and getattr(m, "weight", None) is not None and m.weight.numel() == 0:
            n += m.in_features * m.out_features
    return n


def _step_bytes(model) -> int:
    """Weight bytes one batch-1 decoding step reads: every linear layer (LM head included), norms and
    scales; embedding/PLE tables excluded (one row each). For MoE layers: all experts (an upper
    bound - a step reads only the experts its tokens were routed to)."""
    el = model.dtype.itemsize
    n = 0
    for mod_name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            continue
        for name, p in m.named_parameters(recurse=False):
            n += p.numel()
        packed = getattr(m, "_packed", None)
        if packed is not None and m.weight.numel() == 0:
            n += m.in_features * m.out_features
    return n * el


def _prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length + 3 * b,), generator=g).tolist() for b in range(batch)]


def _plain_speed(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    prompts = _prompts(model.cfg.vocab_size, batch, prompt_len, seed=batch)
    go = loop_runner(model, [prompts], new_tokens)
    go()  # warm-up
    runs = [go() for _ in range(repeats)]
    decode = [x.decode_tok_s if x.decode_tok_s is not None else float("nan") for x in runs]
    return {"batch_size": batch, "prompt_tokens": [len(p) for p in prompts], "new_tokens": new_tokens,
            "tok_s": rounded(median([x.tok_s for x in runs])), "decode_tok_s": rounded(median(decode)),
            "tok_s_runs": [rounded(x.tok_s) for x in runs]}


@torch.inference_mode()
def expert_widening(model, batch_sizes: Sequence[int], verify_k: Sequence[int], prompt_len: int, steps: int) -> list[dict]:
    """Mean distinct experts per MoE layer for a forward of K+1 tokens per row at batch B (the
    prefill's experts are not counted). `steps` forwards per (B, K), each after advancing the cache
    by one greedy token, so different contexts are sampled."""
    from ..models.moe import MoEStats

    n_exp = next(s.moe.n_experts for s in model.cfg.layers if s.moe is not None)
    top_k = next(s.moe.top_k for s in model.cfg.layers if s.moe is not None)
    rows = []
    for bsz in batch_sizes:
        prompts = _prompts(model.cfg.vocab_size, bsz, prompt_len, seed=100 + bsz)
        for k in verify_k:
            width = max(len(p) for p in prompts)
            cache = model.new_cache(bsz, width + steps + k + 2)
            tokens = torch.zeros(bsz, width, dtype=torch.long)
            for b, p in enumerate(prompts):  # right-aligned so every row ends at the same column
                tokens[b, width - len(p):] = torch.tensor(p)
            out = model(tokens, cache, logits_at=torch.full((bsz, 1), width - 1))
            last = out.logits[:, -1].argmax(-1)
            touched, times = [], []
            for _ in range(steps):
                draft = torch.randint(3, model.cfg.vocab_size, (bsz, k)) if k else torch.zeros(bsz, 0, dtype=torch.long)
                st = MoEStats()
                t0 = time.perf_counter()
                out = model(torch.cat([last[:, None], draft], 1), cache, moe_stats=st)
                times.append(time.perf_counter() - t0)
                cache.rollback(k)  # keep only the first token (as if every draft were rejected)
                last = out.logits[:, 0].argmax(-1)
                touched.append(statistics.mean(st.experts_touched.values()))
            n_tok = bsz * (k + 1)
            rows.append({
                "batch_size": bsz, "k": k, "tokens_per_forward": n_tok,
                "experts_per_layer": rounded(statistics.mean(touched), 2),
                "fraction_of_experts": rounded(statistics.mean(touched) / n_exp, 4),
                "uniform_expectation": rounded(n_exp * (1 - (1 - top_k / n_exp) ** n_tok), 2),
                "forward_ms": rounded(statistics.median(times) * 1e3, 2),
            })
            del cache
    base = next((r for r in rows if r["batch_size"] == min(batch_sizes) and r["k"] == min(verify_k)), rows[0])
    for r in rows:
        plain = next((x for x in rows if x["batch_size"] == r["batch_size"] and x["k"] == 0), None)
        # the verify pass's expert reads relative to a plain decoding step at the same batch size
        r["experts_vs_plain_step"] = rounded(r["experts_per_layer"] / plain["experts_per_layer"], 3) if plain else None
        r["experts_vs_base"] = rounded(r["experts_per_layer"] / base["experts_per_layer"], 3)
        # expert weights read per emitted token if all k drafts were accepted (k+1 tokens per row)
        r["experts_per_token_if_all_accepted"] = rounded(r["experts_per_layer"] / r["tokens_per_forward"], 3)
    return rows


def run_gemma4_bench(
    *,
    dense_layout: dict | None = None,
    moe_layout: dict | None = None,
    tiny: bool = False,
    dtype: str = "float32",
    batch_sizes: Sequence[int] = (1, 8),
    moe_batch_sizes: Sequence[int] = (1, 4, 8),
    moe_verify_k: Sequence[int] = (0, 4),
    prompt_tokens: int = 64,
    max_new_tokens: int = 32,
    repeats: int = 3,
    moe_steps: int = 8,
    bandwidth_mb: int = 256,
    seed: int = 0,
    out: str | Path | None = DEFAULT_OUT,
    show_table: bool = True,
    command: str | None = None,
) -> dict:
    """Plain decoding speed of a Gemma 4 E2B-shaped random model at each batch size, and the expert-
    widening table of a 26B-A4B-shaped random MoE (see module docstring). tiny=True uses tiny
    layouts (tests). Returns the results dict (also written to `out` unless None)."""
    from ..api import resolve_dtype

    for name, v in (("prompt_tokens", prompt_tokens), ("max_new_tokens", max_new_tokens), ("repeats", repeats),
                    ("moe_steps", moe_steps)):
        check_positive_int(name, v)
    if not batch_sizes or not moe_batch_sizes or not moe_verify_k:
        raise InputError("batch_sizes, moe_batch_sizes and moe_verify_k must not be empty")
    dt = resolve_dtype(dtype)
    dense_layout = dense_layout or (TINY_DENSE if tiny else DENSE)
    moe_layout = moe_layout or (TINY_MOE if tiny else MOE)
    results: dict = {
        "benchmark": "gemma4",
        "command": recorded_command(command),
        "arguments": dict(tiny=tiny, dtype=str(dt).removeprefix("torch."), batch_sizes=list(batch_sizes),
                          moe_batch_sizes=list(moe_batch_sizes), moe_verify_k=list(moe_verify_k),
                          prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, repeats=repeats,
                          moe_steps=moe_steps, seed=seed, out=as_recorded(out)),
        **environment(),
        "notes": {
            "tok_s": "generated tokens of the batch / wall time (prefill included); median of repeats",
            "decode_tok_s": "tokens after the first / time after the prefill (batch rows summed)",
            "weight_bytes_per_step": "linear layers + LM head + norms; embedding and PLE tables excluded",
            "experts_per_layer": "mean distinct experts one MoE layer reads in a forward of K+1 tokens x B rows",
            "uniform_expectation": "E * (1 - (1 - top_k/E)^(B*(K+1))) if routing were uniform and independent",
        },
    }
    bw = measure_read_bandwidth(bandwidth_mb if not tiny else 16, 5)
    results["bandwidth_gb_per_s"] = rounded(bw["gb_per_s"])

    log("gemma4: building the dense E2B-shaped random model ...")
    model, hf_cfg = build_random_gemma4(dense_layout, seed=seed, dtype=dt)
    wb = _step_bytes(model)
    dense = {"layout": {k: v for k, v in dense_layout.items()}, "params": _param_count(model),
             "weight_bytes_per_step": wb, "roofline_b1_tok_s": rounded(bw["gb_per_s"] * 1e9 / wb), "runs": []}
    for bsz in batch_sizes:
        log(f"gemma4 dense: batch {bsz} ...")
        row = _plain_speed(model, bsz, prompt_tokens, max_new_tokens, repeats)
        dense["runs"].append(row)
        log(f"gemma4 dense: batch {bsz}: {row['tok_s']} tok/s (decode {row['decode_tok_s']})")
    results["dense"] = dense
    del model
    gc.collect()

    log("gemma4: building the MoE 26B-A4B-shaped random model ...")
    model, hf_cfg = build_random_gemma4(moe_layout, seed=seed + 1, dtype=dt)
    moe = {"layout": {k: v for k, v in moe_layout.items()}, "params": _param_count(model),
           "num_experts": moe_layout["num_experts"], "top_k_experts": moe_layout["top_k_experts"],
           "widening": expert_widening(model, moe_batch_sizes, moe_verify_k, prompt_tokens, moe_steps)}
    results["moe"] = moe
    del model
    gc.collect()
    results["machine"]["load_average_at_end"] = load_average()
    write_results(results, out)
    if show_table:
        print_gemma4_tables(results)
    return results


def print_gemma4_tables(results: dict, console=None) -> None:
    from rich.table import Table

    console = table_console(console)
    d = results["dense"]
    t = Table(title=f"Gemma 4 E2B-shaped random model, plain decoding ({d['params'] / 1e6:.1f}M params, "
                    f"{d['weight_bytes_per_step'] / 1e6:.1f} MB read per step, roofline b1 "
                    f"{d['roofline_b1_tok_s']} tok/s at {results['bandwidth_gb_per_s']} GB/s)")
    for col in ("batch", "new tok", "tok/s", "decode tok/s"):
        t.add_column(col, justify="right")
    for r in d["runs"]:
        t.add_row(str(r["batch_size"]), str(r["new_tokens"]), f"{r['tok_s']:.1f}", f"{r['decode_tok_s']:.1f}")
    console.print(t)
    m = results["moe"]
    t = Table(title=f"MoE expert widening ({m['num_experts']} experts, top-{m['top_k_experts']}; "
                    f"forward of K+1 tokens per row at batch B)")
    for col in ("B", "K", "tokens", "experts/layer", "of all", "uniform exp.", "vs B1 K0", "vs K0 same B", "experts/token if all accepted", "forward ms"):
        t.add_column(col, justify="right")
    for r in m["widening"]:
        t.add_row(str(r["batch_size"]), str(r["k"]), str(r["tokens_per_forward"]), f"{r['experts_per_layer']:.1f}",
                  f"{r['fraction_of_experts']:.0%}", f"{r['uniform_expectation']:.1f}", f"{r['experts_vs_base']:.2f}x",
                  "-" if r["experts_vs_plain_step"] is None else f"{r['experts_vs_plain_step']:.2f}x",
                  f"{r['experts_per_token_if_all_accepted']:.2f}", f"{r['forward_ms']:.1f}")
    console.print(t)
