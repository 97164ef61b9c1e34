"""Timed runs for the benchmarks: our decoding loop and transformers' `generate` as repeatable
runs, interleaved repeats of several runs, and alternating timings of single operations.

EOS is ignored on both sides, so every run makes exactly `max_new_tokens` tokens per row: our
requests get `eos_ids=frozenset()`, transformers gets `eos_token_id=None` (as a keyword argument:
a `GenerationConfig` with eos None is merged with the model's default and would stop at EOS) and
`min_new_tokens=max_new_tokens`; the output length is checked.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..decoding.plan import DraftPlan
from ..decoding.sampling import SamplingParams
from ..errors import MtpspecError

Batches = list[list[list[int]]]  # batches of prompts (token ids), generated one after the other


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass
class Run:
    """One timed run: the generated tokens of every row, the wall time, our decode-only rate
    (tokens after the first / time after the prefill, summed over the batches; None for
    transformers) and our per-row `SequenceStats`."""

    tokens: list[list[int]]
    wall_s: float
    decode_tok_s: float | None
    stats: list[Any] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tok_s(self) -> float:
        return self.n_tokens / self.wall_s


def greedy_rows(row: int) -> SamplingParams:
    """Sampling parameters of every row of a greedy run."""
    return SamplingParams()


def loop_runner(model, batches: Batches, max_new_tokens: int, params_for_row: Callable[[int], SamplingParams] = greedy_rows,
                plan: Callable[[], DraftPlan | None] = lambda: None, device: torch.device | str = "cpu",
                ) -> Callable[[], Run]:
    """A run of our decoding loop over each batch in turn (rows numbered across batches for
    `params_for_row`), drafting as `plan()` says (called every run, so that adaptive state starts
    afresh; None = plain decoding)."""
    from ..decoding.loop import Request, decode

    def go() -> Run:
        run_plan = plan()
        tokens, stats, wall, dec_time, dec_tokens, row = [], [], 0.0, 0.0, 0, 0
        for prompt_ids in batches:
            reqs = [Request(list(p), max_new_tokens, params_for_row(row + i), frozenset()) for i, p in enumerate(prompt_ids)]
            row += len(prompt_ids)
            sync(device)
            t0 = time.perf_counter()
            seqs = decode(model, reqs, run_plan)
            sync(device)
            wall += time.perf_counter() - t0
            dec_time += max(s.stats.decode_time for s in seqs)
            dec_tokens += sum(max(len(s.new_ids) - 1, 0) for s in seqs)
            tokens += [list(s.new_ids) for s in seqs]
            stats += [s.stats for s in seqs]
        return Run(tokens, wall, dec_tokens / dec_time if dec_time > 0 else None, stats)

    return go


def _left_padded(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention mask of a batch padded on the left (what `tokenizer.padding_side =
    "left"` produces; works with token-id prompts too)."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        input_ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return input_ids.to(device), mask.to(device)


def hf_runner(hf_model, batches: Batches, max_new_tokens: int, pad_id: int, device: torch.device | str,
              **gen_kwargs) -> Callable[[], Run]:
    """A run of transformers' greedy `generate` over each batch in turn; `gen_kwargs` go to
    `generate` (prompt lookup, an assistant model)."""
    inputs = [_left_padded(b, pad_id, device) for b in batches]

    def go() -> Run:
        tokens, wall = [], 0.0
        for input_ids, mask in inputs:
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                                        pad_token_id=pad_id, use_cache=True, **gen_kwargs)
            sync(device)
            wall += time.perf_counter() - t0
            new = out[:, input_ids.shape[1]:].tolist()
            if any(len(row) != max_new_tokens for row in new):
                raise MtpspecError(f"transformers generated {len(new[0])} tokens per row, expected {max_new_tokens}")
            tokens += new
        return Run(tokens, wall, None)

    return go


def _reraise(name: str, e: Exception) -> None:
    raise e


def interleave(runners: dict[str, Callable[[], Run]], repeats: int,
               on_error: Callable[[str, Exception], None] = _reraise,
               on_repeat: Callable[[int, dict[str, list[Run]]], None] | None = None,
               ) -> tuple[dict[str, list[list[int]]], dict[str, list[Run]]]:
    """One uncounted warm-up run of every runner (its tokens are returned as the reference), then
    `repeats` rounds that run every runner once, in an order rotated by one from round to round,
    so that a change of the machine's load hits all alike. A runner that raises is passed to
    `on_error` (which may re-raise) and dropped. Returns (reference tokens, timed runs) by name."""
    runners = dict(runners)
    ref: dict[str, list[list[int]]] = {}

    def drop(name: str, e: Exception) -> None:
        on_error(name, e)
        del runners[name]

    for name in list(runners):
        try:
            ref[name] = runners[name]().tokens
        except Exception as e:  # noqa: BLE001
            drop(name, e)
    names = list(runners)
    got: dict[str, list[Run]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            try:
                got[name].append(runners[name]())
            except Exception as e:  # noqa: BLE001
                drop(name, e)
                del got[name]
        names = [n for n in names if n in runners]
        if on_repeat is not None:
            on_repeat(r, got)
    return ref, got


def alternating_times(ops: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each operation over `repeats` rounds after `warmup` uncounted ones; every round
    runs all operations, in an order rotated by one from round to round."""
    names = list(ops)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            ops[name]()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


@contextmanager
def quiet_transformers():
    """transformers logs errors only inside the block (not its warnings about generation flags)."""
    import transformers

    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(prev)
