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


class Runner:
    """A repeatable run over batches that can also go one batch at a time, so that `interleave`
    alternates configurations batch by batch: `start()`, `run_batch(i)` for each batch,
    `result()`; calling it does all three (one whole run)."""

    def __init__(self, n_batches: int) -> None:
        self.batches = n_batches

    def start(self) -> None:
        raise NotImplementedError

    def run_batch(self, i: int) -> None:
        raise NotImplementedError

    def result(self) -> Run:
        raise NotImplementedError

    def __call__(self) -> Run:
        self.start()
        for i in range(self.batches):
            self.run_batch(i)
        return self.result()


class _LoopRunner(Runner):
    def __init__(self, model, batches: Batches, max_new_tokens: int, params_for_row, plan, device) -> None:
        super().__init__(len(batches))
        self.model, self.prompts, self.max_new_tokens = model, batches, max_new_tokens
        self.params_for_row, self.plan, self.device = params_for_row, plan, device
        self.first_row = [sum(len(b) for b in batches[:i]) for i in range(len(batches))]

    def start(self) -> None:
        self.run_plan = self.plan()  # one plan per run: adaptive state starts afresh, lives for the run
        self.tokens: dict[int, list] = {}
        self.stats: dict[int, list] = {}
        self.wall, self.dec_time, self.dec_tokens = 0.0, 0.0, 0

    def run_batch(self, i: int) -> None:
        from ..decoding.loop import Request, decode

        row = self.first_row[i]
        reqs = [Request(list(p), self.max_new_tokens, self.params_for_row(row + j), frozenset())
                for j, p in enumerate(self.prompts[i])]
        sync(self.device)
        t0 = time.perf_counter()
        seqs = decode(self.model, reqs, self.run_plan)
        sync(self.device)
        self.wall += time.perf_counter() - t0
        self.dec_time += max(s.stats.decode_time for s in seqs)
        self.dec_tokens += sum(max(len(s.new_ids) - 1, 0) for s in seqs)
        self.tokens[i] = [list(s.new_ids) for s in seqs]
        self.stats[i] = [s.stats for s in seqs]

    def result(self) -> Run:
        order = sorted(self.tokens)
        return Run([t for i in order for t in self.tokens[i]], self.wall,
                   self.dec_tokens / self.dec_time if self.dec_time > 0 else None,
                   [s for i in order for s in self.stats[i]])


def loop_runner(model, batches: Batches, max_new_tokens: int, params_for_row: Callable[[int], SamplingParams] = greedy_rows,
                plan: Callable[[], DraftPlan | None] = lambda: None, device: torch.device | str = "cpu",
                ) -> Runner:
    """A run of our decoding loop over each batch in turn (rows numbered across batches for
    `params_for_row`), drafting as `plan()` says (called at the start of every run, so that
    adaptive state starts afresh; None = plain decoding)."""
    return _LoopRunner(model, batches, max_new_tokens, params_for_row, plan, device)


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


class _HfRunner(Runner):
    def __init__(self, hf_model, batches: Batches, max_new_tokens: int, pad_id: int, device, gen_kwargs) -> None:
        super().__init__(len(batches))
        self.model, self.max_new_tokens, self.pad_id, self.device, self.kwargs = hf_model, max_new_tokens, pad_id, device, gen_kwargs
        self.inputs = [_left_padded(b, pad_id, device) for b in batches]

    def start(self) -> None:
        self.tokens: dict[int, list] = {}
        self.wall = 0.0

    def run_batch(self, i: int) -> None:
        input_ids, mask = self.inputs[i]
        sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                      min_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                                      pad_token_id=self.pad_id, use_cache=True, **self.kwargs)
        sync(self.device)
        self.wall += time.perf_counter() - t0
        new = out[:, input_ids.shape[1]:].tolist()
        if any(len(row) != self.max_new_tokens for row in new):
            raise MtpspecError(f"transformers generated {len(new[0])} tokens per row, expected {self.max_new_tokens}")
        self.tokens[i] = new

    def result(self) -> Run:
        return Run([t for i in sorted(self.tokens) for t in self.tokens[i]], self.wall, None)


def hf_runner(hf_model, batches: Batches, max_new_tokens: int, pad_id: int, device: torch.device | str,
              **gen_kwargs) -> Runner:
    """A run of transformers' greedy `generate` over each batch in turn; `gen_kwargs` go to
    `generate` (prompt lookup, an assistant model)."""
    return _HfRunner(hf_model, batches, max_new_tokens, pad_id, device, gen_kwargs)


def _reraise(name: str, e: Exception) -> None:
    raise e


def interleave(runners: dict[str, Callable[[], Run]], repeats: int,
               on_error: Callable[[str, Exception], None] = _reraise,
               on_repeat: Callable[[int, dict[str, list[Run]]], None] | None = None,
               ) -> tuple[dict[str, list[list[int]]], dict[str, list[Run]]]:
    """One uncounted warm-up run of every runner (its tokens are returned as the reference), then
    `repeats` rounds that run every runner once, in an order rotated by one from round to round,
    so that a change of the machine's load hits all alike. When every runner is a `Runner` over
    the same batches (more than one), a round alternates them batch by batch (the order rotated
    at every batch): a run of many prompts takes minutes, and the machine's speed drifts. A
    runner that raises is passed to `on_error` (which may re-raise) and dropped. Returns (reference tokens, timed runs) by name."""
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
    per_batch = _batchwise(runners)
    for r in range(repeats):
        if per_batch:  # every runner goes batch by batch: alternate them at each batch
            started = []
            for name in names:
                try:
                    runners[name].start()
                    started.append(name)
                except Exception as e:  # noqa: BLE001
                    drop(name, e)
            for i in range(per_batch):
                live = [n for n in started if n in runners]
                shift = (r + i) % len(live) if live else 0
                for name in live[shift:] + live[:shift]:
                    try:
                        runners[name].run_batch(i)
                    except Exception as e:  # noqa: BLE001
                        drop(name, e)
            for name in started:
                if name in runners:
                    got[name].append(runners[name].result())
        else:
            shift = r % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                try:
                    got[name].append(runners[name]())
                except Exception as e:  # noqa: BLE001
                    drop(name, e)
        for name in [n for n in got if n not in runners]:
            del got[name]
        names = [n for n in names if n in runners]
        if on_repeat is not None:
            on_repeat(r, got)
    return ref, got


def _batchwise(runners: dict) -> int:
    """The common number of batches if every runner is a `Runner` of the same length > 1, else 0."""
    counts = {r.batches if isinstance(r, Runner) else 0 for r in runners.values()}
    return counts.pop() if len(counts) == 1 and min(counts) > 1 else 0


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
