"""`mtpspec bench --suite peers`: mtpspec against llama.cpp on the same GGUF file and prompts.

Engines, all greedy, batch 1, the same prompt token ids, a fixed number of new tokens (EOS
ignored), the same thread count, run interleaved (every repeat runs every prompt on every engine,
the engine order rotating) so that a change in machine load hits all engines alike:

    llama.cpp         llama-cpp-python (`pip install mtpspec[peers]`), the GGUF as it is
    mtpspec           the GGUF kept quantized (`quantize="gguf"`), plain decoding
    mtpspec+drafter   the same, with the drafter (the shipped one for the default model, else n-gram)
    mtpspec-f32(+drafter)  optional (`dense=True`): the GGUF dequantized to fp32, for the drafter's
                      acceptance on the dense target

Reported per engine: decode tokens/s (new tokens after the first / time after the first), wall
tokens/s (new tokens / time including the prefill), tokens per target forward for drafting
engines, and the share of greedy tokens equal to llama.cpp's and to mtpspec plain's (the drafter
must match plain exactly: speculative decoding is lossless against the same engine). Figures are
medians over repeats of each engine's totals over all prompts.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PEERS_INSTALL = "pip install 'mtpspec[peers]'   (or: pip install llama-cpp-python==0.3.36)"
BUSY_SHARE = 0.15  # share of the cores used by other processes above which timings are not trustworthy


class PeersUnavailable(RuntimeError):
    """llama-cpp-python is not installed."""


@dataclass
class Run:
    """One prompt on one engine."""

    tokens: list[int]
    prefill_s: float
    decode_s: float
    forwards: int | None = None  # target forwards in the decode phase (drafting engines)


@dataclass
class EngineResult:
    name: str
    runs: dict[int, list[Run]] = field(default_factory=dict)  # repeat -> runs in prompt order

    def _totals(self, repeat: int) -> tuple[int, float, float]:
        runs = self.runs[repeat]
        return sum(len(r.tokens) for r in runs), sum(r.prefill_s for r in runs), sum(r.decode_s for r in runs)

    def decode_tps(self) -> float:
        vals = []
        for rep, runs in self.runs.items():
            n, _, dec = self._totals(rep)
            vals.append((n - len(runs)) / dec)
        return statistics.median(vals)

    def wall_tps(self) -> float:
        vals = []
        for rep in self.runs:
            n, pre, dec = self._totals(rep)
            vals.append(n / (pre + dec))
        return statistics.median(vals)

    def tokens_per_forward(self) -> float | None:
        runs = self.runs[min(self.runs)]
        if any(r.forwards is None for r in runs):
            return None
        return sum(len(r.tokens) - 1 for r in runs) / max(1, sum(r.forwards for r in runs))

    def outputs(self) -> list[list[int]]:
        return [r.tokens for r in self.runs[min(self.runs)]]


def llama_cpp_runner(gguf: Path, threads: int, n_ctx: int) -> Callable[[list[int], int], Run]:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise PeersUnavailable(f"llama-cpp-python is not installed; install it with: {PEERS_INSTALL}") from None
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)

    def run(prompt: list[int], new: int) -> Run:
        llm.reset()
        t0 = time.perf_counter()
        out: list[int] = []
        t1 = t0
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not out:
                t1 = time.perf_counter()
            out.append(int(tok))
            if len(out) == new:
                break
        t2 = time.perf_counter()
        return Run(out, t1 - t0, t2 - t1)

    return run


def mtpspec_runner(engine) -> Callable[[list[int], int], Run]:
    def run(prompt: list[int], new: int) -> Run:
        r = engine.generate(prompt, max_new_tokens=new, ignore_eos=True, chat=False)
        st = r.stats
        forwards = st["target_forwards"] - 1 if engine.proposer is not None else None
        return Run(list(r.token_ids), st["prefill_time"], st["decode_time"], forwards)

    return run


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy outputs agree, counted up to each prompt's first difference."""
    same = total = 0
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        k = next((i for i in range(n) if x[i] != y[i]), n)
        same += k
        total += n
    return same / total if total else 1.0


def _other_cpu_share(seconds: float = 0.5) -> float | None:
    """Share of the CPU's cores used by other processes over `seconds` (Linux /proc), else None."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        return busy, int(own[11]) + int(own[12])  # utime + stime of this process
    try:
        b0, o0 = sample()
        time.sleep(seconds)
        b1, o1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") * seconds * (os.cpu_count() or 1)
    return max(0.0, (b1 - b0) - (o1 - o0)) / ticks


def machine_busy() -> str | None:
    """A warning when other processes load the CPU (they ruin every engine's timings), else None."""
    share = _other_cpu_share()
    if share is None:
        share = os.getloadavg()[0] / (os.cpu_count() or 1)
    if share > BUSY_SHARE:
        return (f"the machine is busy (other processes use {share:.0%} of the CPU): timings of both engines will be "
                "low and noisy; stop other CPU-heavy processes and re-run")
    return None


def run_peers_bench(
    gguf: Path,
    prompts: list[list[int]],
    engines: dict[str, object],
    *,
    new_tokens: int = 128,
    repeats: int = 2,
    threads: int | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Time llama.cpp and the given mtpspec engines (name -> Engine) on `prompts`, interleaved."""
    import torch

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    n_ctx = max(len(p) for p in prompts) + new_tokens + 16
    runners = {"llama.cpp": llama_cpp_runner(gguf, threads, n_ctx)}
    runners.update({name: mtpspec_runner(e) for name, e in engines.items()})
    names = list(runners)
    warnings = [w for w in [machine_busy()] if w]
    for name in names:  # warm-up: first-call allocations, page faults, thread pools
        runners[name](prompts[0], 8)
    results = {name: EngineResult(name) for name in names}
    for rep in range(repeats):
        for res in results.values():
            res.runs[rep] = []
        for i, p in enumerate(prompts):
            order = names[(rep + i) % len(names):] + names[:(rep + i) % len(names)]
            for name in order:
                results[name].runs[rep].append((i, runners[name](p, new_tokens)))
            progress(f"repeat {rep + 1}/{repeats}: prompt {i + 1}/{len(prompts)}")
        for res in results.values():
            res.runs[rep] = [r for _, r in sorted(res.runs[rep], key=lambda x: x[0])]
    late = machine_busy()
    if late and late not in warnings:
        warnings.append(late)
    return _record(gguf, prompts, results, new_tokens, repeats, threads, warnings)


def _record(gguf, prompts, results: dict[str, EngineResult], new_tokens, repeats, threads, warnings) -> dict:
    base = results["llama.cpp"]
    rows = []
    for name, res in results.items():
        plain_name = name.split("+")[0]
        row = {
            "engine": name,
            "decode_tokens_per_s": round(res.decode_tps(), 2),
            "wall_tokens_per_s": round(res.wall_tps(), 2),
            "decode_vs_llama_cpp": round(res.decode_tps() / base.decode_tps(), 3),
            "wall_vs_llama_cpp": round(res.wall_tps() / base.wall_tps(), 3),
            "tokens_per_target_forward": None if res.tokens_per_forward() is None else round(res.tokens_per_forward(), 3),
            "greedy_agreement_with_llama_cpp": round(_agreement(res.outputs(), base.outputs()), 4),
        }
        if "+" in name and plain_name in results:
            row["equals_plain"] = res.outputs() == results[plain_name].outputs()
        if name == "mtpspec" and "mtpspec-f32" in results:  # reported, not asserted: rounding differs
            row["greedy_agreement_with_fp32"] = round(_agreement(res.outputs(), results["mtpspec-f32"].outputs()), 4)
        rows.append(row)
    return {
        "suite": "peers",
        "gguf": str(gguf),
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads,
        "warnings": warnings,
        "results": rows,
    }


def table(record: dict) -> str:
    """A plain-text table of a peers record."""
    head = f"{'engine':<22}{'decode tok/s':>13}{'wall tok/s':>11}{'decode x':>10}{'wall x':>8}{'tok/fwd':>9}{'=llama':>8}"
    lines = [head]
    for r in record["results"]:
        tpf = "" if r["tokens_per_target_forward"] is None else f"{r['tokens_per_target_forward']:.2f}"
        lines.append(f"{r['engine']:<22}{r['decode_tokens_per_s']:>13.1f}{r['wall_tokens_per_s']:>11.1f}"
                     f"{r['decode_vs_llama_cpp']:>10.2f}{r['wall_vs_llama_cpp']:>8.2f}{tpf:>9}"
                     f"{r['greedy_agreement_with_llama_cpp']:>8.0%}")
    for r in record["results"]:
        if "greedy_agreement_with_fp32" in r:
            lines.append(f"{r['engine']} (quantized) vs mtpspec-f32 (the same GGUF dequantized): greedy tokens equal up "
                         f"to the first difference: {r['greedy_agreement_with_fp32']:.0%}")
    lines.append(f"x = ratio to llama.cpp; =llama: greedy tokens equal to llama.cpp's up to the first difference; "
                 f"{record['prompts']} prompts, {record['new_tokens']} new tokens, {record['repeats']} interleaved "
                 f"repeats (medians), {record['threads']} threads")
    return "\n".join(lines)


def plot(record: dict, path: str | Path) -> None:
    """Bar chart of decode and wall tokens/s per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["results"]
    names = [r["engine"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.6))
    ax.bar([i - 0.2 for i in x], [r["decode_tokens_per_s"] for r in rows], width=0.4, label="decode")
    ax.bar([i + 0.2 for i in x], [r["wall_tokens_per_s"] for r in rows], width=0.4, label="wall (with prefill)")
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{Path(record['gguf']).name}\nbatch 1, greedy, {record['new_tokens']} new tokens, "
                 f"{record['threads']} threads", fontsize=10)
    ax.set_ylim(0, 1.25 * max(max(r["decode_tokens_per_s"], r["wall_tokens_per_s"]) for r in rows))
    for i, r in zip(x, rows):
        ax.annotate(f"{r['decode_vs_llama_cpp']:.2f}x", (i - 0.2, r["decode_tokens_per_s"]), ha="center",
                    va="bottom", fontsize=8)
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(record: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def heldout_prompt_ids(engine, n: int) -> list[list[int]]:
    """n held-out prompts (the first of each category in turn, long-context QA left out: its
    1000-token prompts would make the suite a prefill benchmark), chat-encoded by `engine`."""
    from .heldout import CATEGORIES, encode_prompt, load_heldout

    cats = [c for c in CATEGORIES if c != "long_context_qa"]
    sets = load_heldout(cats)
    picked = []
    i = 0
    while len(picked) < n:
        for c in cats:
            if i < len(sets[c]) and len(picked) < n:
                picked.append(sets[c][i])
        i += 1
    return [encode_prompt(engine, p) for p in picked]


def peers_suite(
    gguf: str | Path | None = None,
    *,
    drafter: str | None = "auto",
    n_prompts: int = 8,
    new_tokens: int = 128,
    repeats: int = 2,
    threads: int | None = None,
    dense: bool = False,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Load the engines for `run_peers_bench` (None = the default model's GGUF) and run it."""
    import importlib.util

    import mtpspec

    from ..default_model import find_default_gguf

    if importlib.util.find_spec("llama_cpp") is None:
        raise PeersUnavailable(f"llama-cpp-python is not installed; install it with: {PEERS_INSTALL}")
    path = Path(gguf) if gguf is not None else find_default_gguf()
    model = None if gguf is None else path
    engines = {"mtpspec": mtpspec.load(model, drafter=None)}
    spec = mtpspec.load(model, drafter=drafter)
    if spec.proposer is not None:
        engines["mtpspec+drafter"] = spec
    if dense:
        engines["mtpspec-f32"] = mtpspec.load(model, drafter=None, quantize="none")
        if spec.proposer is not None:
            engines["mtpspec-f32+drafter"] = mtpspec.load(model, drafter=drafter, quantize="none")
    prompts = heldout_prompt_ids(engines["mtpspec"], n_prompts)
    return run_peers_bench(path, prompts, engines, new_tokens=new_tokens, repeats=repeats, threads=threads,
                           progress=progress)
