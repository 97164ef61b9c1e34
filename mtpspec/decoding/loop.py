"""The decoding loop: prefill a batch of prompts of different lengths, then decode step by step.

It works on token ids only (no text, no HTTP). Stop strings reach it as a callback from the API
layer. Every row keeps its own sampling parameters and random generator, so a seeded row draws
the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import InputError
from ..models.decoder import Decoder
from .sampling import SamplingParams, next_token

StopCheck = Callable[[list[int]], int | None]
"""Given a row's new token ids, return how many to keep if a stop condition is met, else None."""


@dataclass
class Request:
    """One sequence to generate."""

    prompt_ids: list[int]
    max_new_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    eos_ids: frozenset[int] = frozenset()
    stop_check: StopCheck | None = None


@dataclass
class SequenceStats:
    """Per-sequence statistics. Times in seconds; tokens_per_second is the decode rate
    (tokens after the first, which comes from the prefill, divided by the decode time)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    prefill_time: float = 0.0
    decode_time: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_time if self.new_tokens > 1 and self.decode_time > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "prefill_time": round(self.prefill_time, 6),
            "decode_time": round(self.decode_time, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
        }


@dataclass
class Sequence:
    """A row's running state and, once finished, its output."""

    request: Request
    generator: torch.Generator | None
    max_new_tokens: int  # the request's, capped by the model's context
    new_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    stats: SequenceStats = field(default_factory=SequenceStats)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int) -> int:
        """Append a token and apply stop conditions; returns how many of the row's tokens are final."""
        r = self.request
        self.new_ids.append(token)
        if token in r.eos_ids:
            self.new_ids.pop()
            self.finish_reason = "stop"
        elif r.stop_check is not None and (keep := r.stop_check(self.new_ids)) is not None:
            del self.new_ids[keep:]
            self.finish_reason = "stop"
        elif len(self.new_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        self.stats.new_tokens = len(self.new_ids)
        return len(self.new_ids)


@dataclass
class Event:
    """Emitted after every step for each row that received tokens: its new ids so far."""

    row: int
    new_ids: list[int]
    finished: bool


def check_requests(model: Decoder, requests: list[Request]) -> None:
    if not requests:
        raise InputError("no prompts given")
    limit = model.cfg.max_position
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise InputError(f"prompt {i} is empty")
        if r.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
        if len(r.prompt_ids) >= limit:
            raise InputError(
                f"prompt {i} has {len(r.prompt_ids)} tokens; the model's context is {limit} tokens"
            )
        bad = [t for t in r.prompt_ids if not 0 <= t < model.cfg.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{model.cfg.vocab_size - 1})")


@torch.inference_mode()
def generate(model: Decoder, requests: list[Request]) -> Iterator[Event]:
    """Plain (non-speculative) generation for a batch; yields an Event per row and step.

    Call `list(...)`, or iterate for streaming; the finished `Sequence`s are the generator's return
    value (see `run`).
    """
    check_requests(model, requests)
    limit = model.cfg.max_position  # never run past the model's context
    seqs = [
        Sequence(r, r.params.generator(model.device), min(r.max_new_tokens, limit - len(r.prompt_ids)))
        for r in requests
    ]
    batch = len(seqs)
    lengths = [len(r.prompt_ids) for r in requests]
    capacity = max(n + s.max_new_tokens for n, s in zip(lengths, seqs))
    cache = model.new_cache(batch, capacity)

    # prefill: right-padded prompts; each row's logits at its last prompt position
    t0 = time.perf_counter()
    width = max(lengths)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for b, r in enumerate(requests):
        tokens[b, : lengths[b]] = torch.tensor(r.prompt_ids)
    last = torch.tensor(lengths)[:, None] - 1
    out = model(tokens.to(model.device), cache, logits_at=last.to(model.device))
    cache.set_lengths(lengths)
    logits = out.logits[:, 0]
    t_prefill = time.perf_counter() - t0
    for b, s in enumerate(seqs):
        s.stats.prompt_tokens = lengths[b]
        s.stats.prefill_time = t_prefill
        s.stats.target_forwards = 1

    t_decode = time.perf_counter()
    while True:
        next_tokens = torch.zeros(batch, 1, dtype=torch.long)
        for b, s in enumerate(seqs):
            if s.done:
                continue
            tok = next_token(logits[b], s.request.params, s.generator)
            s.accept(tok)
            next_tokens[b, 0] = tok
            if s.done:
                s.stats.decode_time = time.perf_counter() - t_decode
            yield Event(b, s.new_ids, s.done)
        if all(s.done for s in seqs):
            break
        logits = model(next_tokens.to(model.device), cache).logits[:, 0]
        for s in seqs:
            if not s.done:
                s.stats.target_forwards += 1
    return seqs


def run(model: Decoder, requests: list[Request], on_event: Callable[[Event], None] | None = None) -> list[Sequence]:
    """Run `generate` to completion and return the finished sequences."""
    it = generate(model, requests)
    while True:
        try:
            ev = next(it)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(ev)
