"""`mtpspec bench --suite peers`: mtpspec against llama.cpp on the same GGUF file and prompts.

Engines, all greedy, the same prompt token ids, a fixed number of new tokens (EOS ignored), the
same thread count, run interleaved (every repeat runs every prompt group on every engine, the
engine order rotating) so that a change in machine load hits all engines alike. Batch 1 (default)
runs one prompt at a time; batch B runs groups of B prompts together: llama.cpp as one context
holding B sequences (its low-level batch API: one `llama_decode` per step for all B, as its
`llama-batched` example and server do; where that crashes, checked in a child process, llama.cpp
is left out and the ratios are to mtpspec plain), mtpspec as `generate(prompts, batch_size=B)`:

    llama.cpp         llama-cpp-python (`pip install mtpspec[peers]`), the GGUF as it is
    mtpspec           the GGUF kept quantized (`quantize="gguf"`), plain decoding
    mtpspec+drafter   the same, with the drafter (the shipped one for the default model, else n-gram)
    mtpspec-f32(+drafter)  optional (`dense=True`): the GGUF dequantized to fp32, for the drafter's
                      acceptance on the dense target

Reported per engine: decode tokens/s (new tokens after the first / time after the first; for a
batch, all its sequences' tokens over the group's time), wall tokens/s (new tokens / time
including the prefill), tokens per target forward for drafting
engines, and the share of greedy tokens equal to llama.cpp's and to mtpspec plain's (the drafter
must match plain exactly: speculative decoding is lossless against the same engine). Figures are
medians over repeats of each engine's totals over all prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
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


Runner = Callable[[list[list[int]], int], list[Run]]  # (a group of prompts, new tokens) -> one Run each


def _split(group_prefill: float, group_decode: float, outs: list[list[int]]) -> list[Run]:
    """One Run per sequence of a batch, the group's times shared equally (so that sums over runs
    give the group's time and the aggregate tokens/s)."""
    n = len(outs)
    return [Run(o, group_prefill / n, group_decode / n) for o in outs]


NO_EXTRA_BUFTS = ("llama.cpp crashed (segmentation fault) decoding this file with its default extra buffer types "
                  "(weight repacking, AMX) on this CPU; it runs without them (use_extra_bufts=False)")


def extra_bufts_work(gguf: Path, extra_bufts: bool = True) -> bool:
    """Whether llama.cpp decodes `gguf` (with its default extra buffer types: repacked weights,
    AMX; or without them). Tried in a child process: llama-cpp-python 0.3.36 built from PyPI
    segfaults with them on the first decode on a Xeon with AMX, which no exception handler could
    survive."""
    code = ("import sys\n"
            "from mtpspec.bench.peers import _model_params\n"
            "from llama_cpp import Llama\n"
            "with _model_params(use_extra_bufts=sys.argv[2] == '1'):\n"
            "    Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False).eval([1, 2, 3])")
    return _child_succeeds(code, str(gguf), "1" if extra_bufts else "0")


def _child_succeeds(code: str, *args: str) -> bool:
    """Whether `python -c code args...` exits 0 within 10 minutes (a crash stays in the child)."""
    try:
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0


NO_BATCHED = ("llama.cpp crashed decoding {batch} sequences in one context on this CPU (checked in a child process); "
              "the batch-{batch} ratios compare against mtpspec's plain decoding at batch {batch} instead")


def _ratio_key(baseline: str) -> str:
    """The suffix of a record's ratio fields (`decode_vs_<key>`) for its baseline engine."""
    return "llama_cpp" if baseline == "llama.cpp" else "mtpspec"


def batched_works(gguf: Path, batch: int, extra_bufts: bool = True) -> bool:
    """Whether llama.cpp decodes `batch` sequences in one context (the batched runner) on this
    file without crashing. Tried in a child process, like `extra_bufts_work`: on a Xeon with AMX
    llama-cpp-python 0.3.36's multi-sequence context segfaulted even without extra buffer types."""
    code = ("import sys\n"
            "from mtpspec.bench.peers import llama_cpp_runner\n"
            "b = int(sys.argv[2])\n"
            "run = llama_cpp_runner(sys.argv[1], 1, 32, b, extra_bufts=sys.argv[3] == '1')\n"
            "outs = run([[1, 2, 3 + i] for i in range(b)], 4)\n"
            "assert len(outs) == b and all(len(r.tokens) == 4 for r in outs)\n"
            "run.free()")
    return _child_succeeds(code, str(gguf), str(batch), "1" if extra_bufts else "0")


@contextlib.contextmanager
def _model_params(**fields):
    """llama_cpp.Llama built with these llama_model_params fields (it reads the defaults once)."""
    from llama_cpp import llama_cpp as lib  # the module Llama reads them from

    default = lib.llama_model_default_params

    def patched():
        params = default()
        for k, v in fields.items():
            setattr(params, k, v)
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llama_cpp_runner(gguf: Path, threads: int, n_ctx: int, batch: int = 1, extra_bufts: bool = True) -> Runner:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise PeersUnavailable(f"llama-cpp-python is not installed; install it with: {PEERS_INSTALL}") from None
    with _model_params(**({} if extra_bufts else {"use_extra_bufts": False})):
        llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                    verbose=False)
    if batch > 1:
        return _llama_cpp_batched(llm, n_ctx, batch)

    def run_one(prompt: list[int], new: int) -> Run:
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

    return lambda prompts, new: [run_one(p, new) for p in prompts]


def _llama_cpp_batched(llm, n_ctx: int, batch: int) -> Runner:
    """Greedy decoding of up to `batch` sequences at once in one llama.cpp context (low-level API):
    one decode call prefills every prompt, then each step decodes one token of every sequence."""
    import ctypes

    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max = batch
    params.n_ctx = n_ctx * batch
    params.n_batch = params.n_ubatch = max(512, n_ctx * batch)
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context for {batch} sequences of {n_ctx} tokens")
    cb = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    n_vocab = llm.n_vocab()

    def fill(entries) -> None:  # (token, position, sequence, wants logits)
        cb.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            cb.token[i], cb.pos[i], cb.n_seq_id[i], cb.logits[i] = tok, pos, 1, logits
            cb.seq_id[i][0] = seq

    def argmax(i: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).argmax())

    def decode() -> None:
        if llama_cpp.llama_decode(ctx, cb) != 0:
            raise RuntimeError("llama_decode failed")

    def run(prompts: list[list[int]], new: int) -> list[Run]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        entries, last = [], []
        for s, p in enumerate(prompts):
            entries += [(tok, j, s, j == len(p) - 1) for j, tok in enumerate(p)]
            last.append(len(entries) - 1)
        fill(entries)
        decode()
        outs = [[argmax(i)] for i in last]
        t1 = time.perf_counter()
        for step in range(1, new):
            fill([(o[-1], len(p) + step - 1, s, True) for s, (p, o) in enumerate(zip(prompts, outs))])
            decode()
            for s, o in enumerate(outs):
                o.append(argmax(s))
        return _split(t1 - t0, time.perf_counter() - t1, outs)

    run.free = lambda: (llama_cpp.llama_batch_free(cb), llama_cpp.llama_free(ctx))  # type: ignore[attr-defined]
    return run


def mtpspec_runner(engine) -> Runner:
    def run(prompts: list[list[int]], new: int) -> list[Run]:
        if len(prompts) == 1:
            r = engine.generate(prompts[0], max_new_tokens=new, ignore_eos=True, chat=False)
            st = r.stats
            forwards = st["target_forwards"] - 1 if engine.proposer is not None else None
            return [Run(list(r.token_ids), st["prefill_time"], st["decode_time"], forwards)]
        t0 = time.perf_counter()
        rs = engine.generate(prompts, max_new_tokens=new, ignore_eos=True, chat=False, batch_size=len(prompts))
        wall = time.perf_counter() - t0
        prefill = max(r.stats["prefill_time"] for r in rs)  # all prompts prefill together, before any decoding
        runs = _split(prefill, wall - prefill, [list(r.token_ids) for r in rs])
        if engine.proposer is not None:
            for run_, r in zip(runs, rs):
                run_.forwards = r.stats["target_forwards"] - 1
        return runs

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
    batch: int = 1,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Time llama.cpp and the given mtpspec engines (name -> Engine) on `prompts`, interleaved, in
    groups of `batch` prompts decoded together (the prompt count must be a multiple of it)."""
    import torch

    if batch < 1 or len(prompts) % batch:
        raise ValueError(f"the number of prompts ({len(prompts)}) must be a multiple of the batch size ({batch})")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    n_ctx = max(len(p) for p in prompts) + new_tokens + 16
    extra = extra_bufts_work(gguf)
    warnings = [w for w in [machine_busy(), None if extra else NO_EXTRA_BUFTS] if w]
    runners = {}
    if batch == 1 or batched_works(gguf, batch, extra):
        runners["llama.cpp"] = llama_cpp_runner(gguf, threads, n_ctx, batch, extra_bufts=extra)
    else:
        warnings.append(NO_BATCHED.format(batch=batch))
    runners.update({name: mtpspec_runner(e) for name, e in engines.items()})
    names = list(runners)
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    for name in names:  # warm-up: first-call allocations, page faults, thread pools
        runners[name](groups[0], 8)
    results = {name: EngineResult(name) for name in names}
    for rep in range(repeats):
        for res in results.values():
            res.runs[rep] = []
        for i, group in enumerate(groups):
            order = names[(rep + i) % len(names):] + names[:(rep + i) % len(names)]
            for name in order:
                results[name].runs[rep].append((i, runners[name](group, new_tokens)))
            progress(f"repeat {rep + 1}/{repeats}: prompt group {i + 1}/{len(groups)}")
        for res in results.values():
            res.runs[rep] = [r for _, runs in sorted(res.runs[rep], key=lambda x: x[0]) for r in runs]
    late = machine_busy()
    if late and late not in warnings:
        warnings.append(late)
    free = getattr(runners.get("llama.cpp"), "free", None)
    if free is not None:
        free()
    return _record(gguf, prompts, results, new_tokens, repeats, threads, warnings, batch)


def _record(gguf, prompts, results: dict[str, EngineResult], new_tokens, repeats, threads, warnings,
            batch: int = 1) -> dict:
    """The suite's record. Ratios are to llama.cpp, or to mtpspec's plain decoding when llama.cpp
    could not run (its batched context crashed): `baseline` names it, and the rows then carry
    `decode_vs_mtpspec` / `wall_vs_mtpspec` and no agreement with llama.cpp."""
    baseline = "llama.cpp" if "llama.cpp" in results else "mtpspec"
    key = _ratio_key(baseline)
    base = results[baseline]
    rows = []
    for name, res in results.items():
        plain_name = name.split("+")[0]
        row = {
            "engine": name,
            "decode_tokens_per_s": round(res.decode_tps(), 2),
            "wall_tokens_per_s": round(res.wall_tps(), 2),
            f"decode_vs_{key}": round(res.decode_tps() / base.decode_tps(), 3),
            f"wall_vs_{key}": round(res.wall_tps() / base.wall_tps(), 3),
            "tokens_per_target_forward": None if res.tokens_per_forward() is None else round(res.tokens_per_forward(), 3),
        }
        if baseline == "llama.cpp":
            row["greedy_agreement_with_llama_cpp"] = round(_agreement(res.outputs(), base.outputs()), 4)
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
        "batch": batch,
        "baseline": baseline,
        "repeats": repeats,
        "threads": threads,
        "warnings": warnings,
        "results": rows,
    }


def table(record: dict) -> str:
    """A plain-text table of a peers record."""
    baseline = record.get("baseline", "llama.cpp")
    key = _ratio_key(baseline)
    head = f"{'engine':<22}{'decode tok/s':>13}{'wall tok/s':>11}{'decode x':>10}{'wall x':>8}{'tok/fwd':>9}{'=llama':>8}"
    lines = [head]
    for r in record["results"]:
        tpf = "" if r["tokens_per_target_forward"] is None else f"{r['tokens_per_target_forward']:.2f}"
        agree = r.get("greedy_agreement_with_llama_cpp")
        lines.append(f"{r['engine']:<22}{r['decode_tokens_per_s']:>13.1f}{r['wall_tokens_per_s']:>11.1f}"
                     f"{r[f'decode_vs_{key}']:>10.2f}{r[f'wall_vs_{key}']:>8.2f}{tpf:>9}"
                     f"{'' if agree is None else format(agree, '.0%'):>8}")
    for r in record["results"]:
        if "greedy_agreement_with_fp32" in r:
            lines.append(f"{r['engine']} (quantized) vs mtpspec-f32 (the same GGUF dequantized): greedy tokens equal up "
                         f"to the first difference: {r['greedy_agreement_with_fp32']:.0%}")
    lines.append(f"x = ratio to {'llama.cpp' if baseline == 'llama.cpp' else 'mtpspec plain (llama.cpp did not run)'}; "
                 f"=llama: greedy tokens equal to llama.cpp's up to the first difference; "
                 f"{record['prompts']} prompts, batch {record.get('batch', 1)}, {record['new_tokens']} new tokens, "
                 f"{record['repeats']} interleaved repeats (medians), {record['threads']} threads")
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
    ax.set_title(f"{Path(record['gguf']).name}\nbatch {record.get('batch', 1)}, greedy, {record['new_tokens']} new tokens, "
                 f"{record['threads']} threads", fontsize=10)
    ax.set_ylim(0, 1.25 * max(max(r["decode_tokens_per_s"], r["wall_tokens_per_s"]) for r in rows))
    key = _ratio_key(record.get("baseline", "llama.cpp"))
    for i, r in zip(x, rows):
        ax.annotate(f"{r[f'decode_vs_{key}']:.2f}x", (i - 0.2, r["decode_tokens_per_s"]), ha="center",
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
    batch: int = 1,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Load the engines for `run_peers_bench` (None = the default model's GGUF) and run it; with
    batch B, n_prompts is rounded up to a multiple of B."""
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
    prompts = heldout_prompt_ids(engines["mtpspec"], -(-n_prompts // batch) * batch)
    return run_peers_bench(path, prompts, engines, new_tokens=new_tokens, repeats=repeats, threads=threads,
                           batch=batch, progress=progress)
