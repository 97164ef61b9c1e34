"""The decoding loop: prefill a batch of prompts of different lengths, then decode, plainly or
speculatively (draft with a proposer, verify in one target forward, keep what the target accepts).

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
from .draft_length import DraftLengthPolicy
from .proposers import DraftInput, Proposal, Proposer
from .sampling import SamplingParams, next_token, probabilities
from .verify import verify_greedy, verify_sampled_row

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
    """Per-sequence statistics. Times in seconds.

    tokens_per_second: decode rate = tokens after the first (which the prefill produces) divided
        by the decode time.
    mean_accepted_length: tokens emitted per target forward in the decode phase (accepted drafts +
        the bonus token); 1.0 for plain decoding.
    acceptance_per_position: for draft position i (1-based), accepted / proposed among the rounds
        that proposed a token at i. Position i counts as accepted only if all before it were.
    drafter_time_share: drafting time / decode time (batch-level: drafting is shared by the rows).
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    prefill_time: float = 0.0
    decode_time: float = 0.0
    draft_time: float = 0.0
    rounds: int = 0
    round_tokens: int = 0
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_time if self.new_tokens > 1 and self.decode_time > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.round_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    @property
    def drafter_time_share(self) -> float:
        return self.draft_time / self.decode_time if self.decode_time > 0 else 0.0

    def record_round(self, k: int, n_accepted: int, emitted: int) -> None:
        """One verification round that proposed k drafts, accepted n and emitted `emitted` tokens."""
        self.rounds += 1
        self.round_tokens += emitted
        while len(self.proposed_per_position) < k:
            self.proposed_per_position.append(0)
            self.accepted_per_position.append(0)
        for i in range(k):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += int(i < n_accepted)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "prefill_time": round(self.prefill_time, 6),
            "decode_time": round(self.decode_time, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "acceptance_per_position": [round(a, 4) for a in self.acceptance_per_position],
            "drafter_time_share": round(self.drafter_time_share, 4),
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

    def accept(self, token: int) -> None:
        """Append one emitted token and apply the stop conditions (EOS is not kept in the output)."""
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


class FixedDraftLength:
    """Always draft k tokens (k = 0: plain decoding)."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise InputError(f"draft_tokens must be >= 0, got {k}")
        self.k = k

    def choose(self, batch_size: int) -> int:
        return self.k

    def observe(self, batch_size: int, k: int, accepted: list[int], verify_time: float, draft_time: float) -> None:
        pass

    @property
    def max_k(self) -> int:
        return self.k


@torch.inference_mode()
def generate(
    model: Decoder,
    requests: list[Request],
    proposer: Proposer | None = None,
    draft_length: "DraftLengthPolicy | int" = 0,
) -> Iterator[Event]:
    """Generate for a batch of requests; yields an Event per row and round.

    Without a proposer this is plain decoding (one token per target forward). With one, every
    round drafts k tokens per row, verifies them in one target forward over k+1 positions, keeps
    the accepted prefix plus the bonus token (verify.py), and rolls each row's cache back over its
    rejected positions. Rows accept different numbers of tokens (ragged) and finish independently.
    The finished `Sequence`s are the generator's return value (see `run`).
    """
    check_requests(model, requests)
    policy = FixedDraftLength(draft_length) if isinstance(draft_length, int) else draft_length
    if proposer is None:
        policy = FixedDraftLength(0)
    limit = model.cfg.max_position  # never run past the model's context
    seqs = [
        Sequence(r, r.params.generator(model.device), min(r.max_new_tokens, limit - len(r.prompt_ids)))
        for r in requests
    ]
    batch, dev = len(seqs), model.device
    lengths = [len(r.prompt_ids) for r in requests]
    capacity = max(n + s.max_new_tokens for n, s in zip(lengths, seqs)) + policy.max_k + 1
    cache = model.new_cache(batch, capacity)
    history = [list(r.prompt_ids) for r in requests]

    # prefill: right-padded prompts; each row's logits and hidden state at its last prompt position
    t0 = time.perf_counter()
    tokens = torch.zeros(batch, max(lengths), dtype=torch.long)
    for b, r in enumerate(requests):
        tokens[b, : lengths[b]] = torch.tensor(r.prompt_ids)
    last = (torch.tensor(lengths)[:, None] - 1).to(dev)
    out = model(tokens.to(dev), cache, logits_at=last)
    cache.set_lengths(lengths)
    last_hidden = out.hidden.gather(1, last[..., None].expand(-1, -1, out.hidden.shape[-1]))[:, 0]
    t_prefill = time.perf_counter() - t0
    last_tokens = torch.zeros(batch, dtype=torch.long)
    t_decode = time.perf_counter()
    for b, s in enumerate(seqs):
        s.stats.prompt_tokens, s.stats.prefill_time, s.stats.target_forwards = lengths[b], t_prefill, 1
        tok = next_token(out.logits[b, 0], s.request.params, s.generator)
        last_tokens[b] = tok
        history[b].append(tok)
        s.accept(tok)
        if s.done:
            s.stats.decode_time = time.perf_counter() - t_decode
        yield Event(b, s.new_ids, s.done)

    draft_time = 0.0
    while not all(s.done for s in seqs):
        active = [not s.done for s in seqs]
        k = min(policy.choose(sum(active)), max(s.max_new_tokens - len(s.new_ids) for s in seqs if not s.done))
        t_round = time.perf_counter()
        if k > 0:
            inp = DraftInput(model, cache, last_tokens.to(dev), last_hidden, history,
                             [s.request.params for s in seqs], [s.generator for s in seqs], active)
            proposal = proposer.propose(inp, k)
            drafts = proposal.tokens.to(dev)
        else:
            proposal, drafts = Proposal(torch.zeros(batch, 0, dtype=torch.long)), torch.zeros(batch, 0, dtype=torch.long, device=dev)
        t_drafted = time.perf_counter()
        draft_time += t_drafted - t_round

        out = model(torch.cat([last_tokens.to(dev)[:, None], drafts], dim=1), cache)
        greedy_n, greedy_tokens = verify_greedy(drafts, out.logits)
        n_accepted = greedy_n.tolist()
        emitted: list[list[int]] = []
        for b, s in enumerate(seqs):
            params = s.request.params
            if s.done:
                emitted.append([])
            elif params.greedy:
                emitted.append(greedy_tokens[b, : n_accepted[b] + 1].tolist())
            else:
                q = proposal.probs[b] if proposal.probs is not None else None
                n_accepted[b], row = verify_sampled_row(drafts[b], q, probabilities(out.logits[b], params), s.generator)
                emitted.append(row)
        # keep each row's accepted positions: last token + n accepted drafts; drop the rest
        keep = torch.tensor([n + 1 if e else 0 for n, e in zip(n_accepted, emitted)], device=dev)
        cache.rollback((k + 1) - keep)
        rows = torch.arange(batch, device=dev)
        last_hidden = out.hidden[rows, torch.tensor(n_accepted, device=dev)]
        now = time.perf_counter()
        policy.observe(sum(active), k, [n for n, a in zip(n_accepted, active) if a], now - t_drafted, t_drafted - t_round)
        for b, s in enumerate(seqs):
            if not emitted[b]:
                continue
            s.stats.target_forwards += 1
            s.stats.record_round(k, n_accepted[b], len(emitted[b]))
            for tok in emitted[b]:
                s.accept(tok)
                history[b].append(tok)
                if s.done:
                    break
            last_tokens[b] = emitted[b][-1]
            s.stats.draft_time = draft_time
            if s.done:
                s.stats.decode_time = now - t_decode
            yield Event(b, s.new_ids, s.done)
    return seqs


def run(
    model: Decoder,
    requests: list[Request],
    proposer: Proposer | None = None,
    draft_length: "DraftLengthPolicy | int" = 0,
    on_event: Callable[[Event], None] | None = None,
) -> list[Sequence]:
    """Run `generate` to completion and return the finished sequences."""
    it = generate(model, requests, proposer, draft_length)
    while True:
        try:
            ev = next(it)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(ev)
