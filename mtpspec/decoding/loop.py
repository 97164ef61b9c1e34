"""The decoding loop: prefill a batch of prompts of different lengths, then decode, plainly or
speculatively (draft with a proposer, verify in one target forward, keep what the target accepts).

It works on token ids only (no text, no HTTP). Stop strings reach it as a callback from the API
layer. How to draft each round (K, tree or chain) is the drafting plan's decision (plan.py); the
loop asks it before every round. Every row keeps its own sampling parameters and random
generator, so a seeded row draws the same tokens whatever else is in the batch, given the same
draft length and the same kind of proposal (chain or tree) each round: a plan with a fixed K and
no "auto" tree (an adaptive K follows measured timings; the "auto" tree depends on the batch).

Entry points: `decode` (run requests to completion), `decode_events` (the same, as a stream of
per-round events) and `DecodeBatch` (slots that requests join and leave: the server's scheduler).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol

import torch

from ..errors import InputError
from ..models.decoder import Decoder
from .plan import DraftPlan
from .proposers import DraftInput, Proposal
from .sampling import SamplingParams, next_token, probabilities
from .tree import TreeMask, verify_greedy_tree, verify_sampled_tree_row
from .verify import verify_greedy_rows, verify_sampled_row

StopCheck = Callable[[list[int]], int | None]
"""Given a row's new token ids, return how many to keep if a stop condition is met, else None."""


class Recorder(Protocol):
    """What a plain-decoding batch reports of the target's work, for whoever wants to keep it
    (drafter training records its activations while the target answers: train/harvest.py).
    Called with inference tensors that the batch reuses: copy what you keep."""

    def prompt(self, slot: int, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Slot's prompt was prefilled: hidden [L, H] of its L positions, logits [V] of the last."""

    def step(self, slots: list[int], hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """One token fed to each of `slots`: hidden [B, H] and logits [B, V] at each row's position,
        for all B rows of the batch (row b is slot b; rows not in `slots` hold nothing)."""

    def finished(self, slot: int, seq: "SequenceState", cache) -> None:
        """Slot's sequence is done; `cache` (a KVCache) holds the K/V of all its tokens but the
        last, until the slot is reused."""


@dataclass
class Request:
    """One sequence to generate.

    eos_ids: tokens that end the sequence (not kept in the output), unless `ignore_eos`.
    stop_check: stop strings (see `StopCheck`).
    ignore_eos: EOS tokens are ordinary output tokens (kept in `new_ids`); the sequence runs until
        max_new_tokens (or the context) or a stop string.
    min_tokens: as vLLM's and transformers' `min_new_tokens`: no EOS among the first `min_tokens`
        new tokens, and no stop string completed by them. EOS is suppressed by masking its logits
        in the TARGET's distribution at output positions 0..min_tokens-1 (greedy: the argmax of
        the other tokens; sampled: EOS gets probability 0, the rest renormalised), the same way in
        plain decoding and in the verification of draft chains and trees (every verified position
        knows its output index), so speculative decoding stays lossless under these semantics; the
        drafter's q ignores the mask (verification rejects a drafted EOS there). Stop strings are
        checked only once more than `min_tokens` tokens exist, and only occurrences that end after
        the text of the first `min_tokens` tokens count (vLLM's detokenizer does the same; the
        `stop_check` must know `min_tokens`: `Engine.stop_check(stop, min_tokens)`). With
        ignore_eos, min_tokens leaves EOS alone (as vLLM, whose min_tokens masks only stop tokens).
        Must be <= max_new_tokens; a context shorter than that ends the sequence earlier.
    """

    prompt_ids: list[int]
    max_new_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    eos_ids: frozenset[int] = frozenset()
    stop_check: StopCheck | None = None
    min_tokens: int = 0
    ignore_eos: bool = False

    def suppresses_eos(self, n_out: int) -> bool:
        """Whether EOS is masked for the token at 0-based output index n_out."""
        return n_out < self.min_tokens and not self.ignore_eos and bool(self.eos_ids)


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
class SequenceState:
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
        """Append one emitted token and apply the stop conditions (EOS is not kept in the output
        unless ignore_eos; stop strings are not checked within the first min_tokens tokens)."""
        r = self.request
        self.new_ids.append(token)
        if token in r.eos_ids and not r.ignore_eos:  # never among the first min_tokens (masked)
            self.new_ids.pop()
            self.finish_reason = "stop"
        elif (r.stop_check is not None and len(self.new_ids) > r.min_tokens
              and (keep := r.stop_check(self.new_ids)) is not None):
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
        if not isinstance(r.min_tokens, int) or isinstance(r.min_tokens, bool) or r.min_tokens < 0:
            raise InputError(f"min_tokens must be an integer >= 0, got {r.min_tokens!r}")
        if r.min_tokens > r.max_new_tokens:
            raise InputError(f"min_tokens ({r.min_tokens}) must be <= max_new_tokens ({r.max_new_tokens})")
        if not isinstance(r.ignore_eos, bool):
            raise InputError(f"ignore_eos must be a boolean, got {r.ignore_eos!r}")
        if len(r.prompt_ids) >= limit:
            raise InputError(
                f"prompt {i} has {len(r.prompt_ids)} tokens; the model's context is {limit} tokens"
            )
        bad = [t for t in r.prompt_ids if not 0 <= t < model.cfg.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{model.cfg.vocab_size - 1})")


PREFILL_TOKENS = 2048  # padded prompt tokens per prefill forward (a longer prompt is prefilled alone)
PROMPT_CACHE = 4  # repeated prompts whose prefill a batch keeps between adds to copy (e.g. the self-instruct recipe's one prompt)


def prefill_pieces(lengths: list[int], budget: int = PREFILL_TOKENS) -> list[tuple[int, int]]:
    """Consecutive pieces [a, b) of prompts (their lengths, in slot order) prefilled in one forward
    each: a forward pads every prompt to the piece's longest, so a piece holds as many prompts as
    fit `budget` padded tokens (at least one): 128 prompts of 20-450 tokens would pad to 57k tokens
    in one forward. Callers that order requests by prompt length (`train.harvest.distill`) waste
    little on padding."""
    pieces, a = [], 0
    while a < len(lengths):
        b, longest = a + 1, lengths[a]
        while b < len(lengths) and (b - a + 1) * max(longest, lengths[b]) <= budget:
            longest = max(longest, lengths[b])
            b += 1
        pieces.append((a, b))
        a = b
    return pieces


class DecodeBatch:
    """A fixed number of slots that decode together; sequences join and leave between rounds.

    `add` prefills new requests into free slots (several at once when the slots are contiguous,
    in pieces of at most PREFILL_TOKENS padded tokens; a prompt repeated within an add or kept from
    an earlier one is prefilled once and its K/V copied) and returns their first-token events;
    `step` runs one round for every active slot: plain
    decoding (k = 0) or speculative (draft k tokens per row, verify all k+1 positions in one target
    forward, keep the accepted prefix plus the bonus token, roll each row's cache back over its
    rejected positions; or draft a tree of depth k per row, verify all its nodes in one forward
    and keep the accepted path, see tree.py). Rows accept different numbers of tokens (ragged) and finish
    independently; a finished or cancelled slot is free for the next `add`. This is the one
    decoding loop: `decode_events` below and the server's scheduler both drive it.

    plan: how to draft (plan.py); None = plain decoding. recorder: told of every prefill, step and
    finished sequence (plain decoding only).
    """

    def __init__(self, model: Decoder, slots: int, max_len: int, plan: DraftPlan | None = None,
                 recorder: Recorder | None = None) -> None:
        self.model = model
        self.plan = plan if plan is not None else DraftPlan()
        if recorder is not None and self.plan.proposer is not None:
            raise ValueError("a recorder needs plain decoding (no proposer)")
        self.recorder = recorder
        self.max_len = max_len
        # room for the widest proposal the plan can ask for (a chain of its largest K, or a tree)
        self.cache = model.new_cache(slots, max_len + self.plan.max_tokens() + 1)
        self.seqs: list[SequenceState | None] = [None] * slots
        self.history: list[list[int]] = [[] for _ in range(slots)]
        self.last_tokens = torch.zeros(slots, dtype=torch.long)
        self._no_drafts: dict[int, torch.Tensor] = {}  # rounds without drafts: [rows, 0] per row count
        self.last_hidden = torch.zeros(slots, model.cfg.hidden_size, dtype=model.dtype, device=model.device)
        self.decode_start = [0.0] * slots
        self._pending: tuple | None = None  # the last round's outcome, waiting for its whole time
        # prefills of repeated prompts (K/V, last hidden state, logits), most recently used last
        self._prompts: OrderedDict[tuple[int, ...], tuple] = OrderedDict()

    @property
    def slots(self) -> int:
        return len(self.seqs)

    @property
    def active(self) -> list[int]:
        return [b for b, s in enumerate(self.seqs) if s is not None and not s.done]

    def free_slots(self) -> list[int]:
        return [b for b, s in enumerate(self.seqs) if s is None or s.done]

    def cancel(self, slot: int) -> None:
        """Stop a sequence now (e.g. its client went away); its slot is free for the next add."""
        s = self.seqs[slot]
        if s is not None and not s.done:
            s.finish_reason = "cancelled"

    # ---- joining -----------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, requests: list[Request], slots: list[int] | None = None) -> list[Event]:
        """Prefill `requests` into free slots (the lowest free ones by default); returns each one's
        first-token event (its `row` is the slot)."""
        self._observe_pending(None)  # a prefill is not part of the last round's cost
        check_requests(self.model, requests)
        for i, r in enumerate(requests):
            if len(r.prompt_ids) + 1 > self.max_len:
                raise InputError(f"prompt {i} has {len(r.prompt_ids)} tokens; this batch holds at most {self.max_len - 1}")
        free = self.free_slots()
        slots = free[: len(requests)] if slots is None else slots
        if len(slots) < len(requests) or not set(slots) <= set(free):
            raise RuntimeError("not enough free slots")
        limit = min(self.model.cfg.max_position, self.max_len)  # never run past the context
        # a prompt repeated within this add, or kept from an earlier one, is prefilled once and copied
        fresh, repeated, seen = [], set(), set()
        for i, r in enumerate(requests):
            key = tuple(r.prompt_ids)
            if (key in self._prompts or key in seen) and len(key) <= PREFILL_TOKENS:
                repeated.add(key)
            else:
                seen.add(key)
                fresh.append(i)
        events: dict[int, Event] = {}
        start = 0
        while start < len(fresh):  # each run of contiguous slots, in forwards of at most PREFILL_TOKENS padded tokens
            end = start + 1
            while end < len(fresh) and slots[fresh[end]] == slots[fresh[end - 1]] + 1:
                end += 1
            run = [requests[i] for i in fresh[start:end]]
            for a, b in prefill_pieces([len(r.prompt_ids) for r in run], PREFILL_TOKENS):
                for ev in self._prefill(run[a:b], slots[fresh[start + a]], limit, repeated):
                    events[ev.row] = ev
            start = end
        for i, r in enumerate(requests):
            if slots[i] not in events:
                events[slots[i]] = self._copy_prompt(r, slots[i], limit)
        while len(self._prompts) > PROMPT_CACHE:  # the least recently used go once this add is done
            self._prompts.popitem(last=False)
        return [events[b] for b in slots]

    def _prefill(self, requests: list[Request], first: int, limit: int, keep: set = frozenset()) -> list[Event]:
        """Prefill `requests` into slots first, first + 1, ... in one forward; the prompts in `keep`
        are kept for `_copy_prompt`."""
        model, dev = self.model, self.model.device
        n = len(requests)
        view = self.cache.rows(first, first + n)
        lengths = [len(r.prompt_ids) for r in requests]
        t0 = time.perf_counter()
        view.set_lengths([0] * n)
        tokens = torch.zeros(n, max(lengths), dtype=torch.long)
        for i, r in enumerate(requests):
            tokens[i, : lengths[i]] = torch.tensor(r.prompt_ids)
        last = (torch.tensor(lengths)[:, None] - 1).to(dev)
        out = model(tokens.to(dev), view, logits_at=last)
        view.set_lengths(lengths)
        self.last_hidden[first : first + n] = out.hidden.gather(1, last[..., None].expand(-1, -1, out.hidden.shape[-1]))[:, 0]
        t_prefill = time.perf_counter() - t0
        for i, r in enumerate(requests):
            key = tuple(r.prompt_ids)
            if self.recorder is not None:
                self.recorder.prompt(first + i, out.hidden[i, : lengths[i]], out.logits[i, 0])
            if key in keep and key not in self._prompts:
                full = out.hidden[i, : lengths[i]].clone() if self.recorder is not None else None
                self._prompts[key] = (self.cache.snapshot_row(first + i), self.last_hidden[first + i].clone(),
                                      out.logits[i, 0].clone(), full)
        return [self._start(first + i, r, out.logits[i, 0], t_prefill, limit) for i, r in enumerate(requests)]

    def _copy_prompt(self, r: Request, b: int, limit: int) -> Event:
        """Start `r` in slot b from the kept prefill of its prompt (copied K/V, hidden state, logits):
        what prefilling it would give, without the forward."""
        key = tuple(r.prompt_ids)
        t0 = time.perf_counter()
        kv, hidden, logits, full = self._prompts[key]
        self._prompts.move_to_end(key)
        self.cache.restore_row(b, kv)
        self.last_hidden[b] = hidden
        if self.recorder is not None:
            self.recorder.prompt(b, full, logits)
        return self._start(b, r, logits, time.perf_counter() - t0, limit)

    def _start(self, b: int, r: Request, logits: torch.Tensor, t_prefill: float, limit: int) -> Event:
        """Slot b's sequence for `r`, its prompt prefilled: draw the first token from `logits`."""
        dev = self.model.device
        n_prompt = len(r.prompt_ids)
        s = SequenceState(r, r.params.generator(dev), min(r.max_new_tokens, limit - n_prompt))
        self.seqs[b] = s
        s.stats.prompt_tokens, s.stats.prefill_time, s.stats.target_forwards = n_prompt, t_prefill, 1
        self.decode_start[b] = time.perf_counter()
        if r.suppresses_eos(0):
            logits = logits.index_fill(-1, torch.tensor(sorted(r.eos_ids), device=dev), float("-inf"))
        tok = next_token(logits, r.params, s.generator)
        self.last_tokens[b] = tok
        self.history[b] = list(r.prompt_ids) + [tok]
        s.accept(tok)
        if s.done:
            s.stats.decode_time = time.perf_counter() - self.decode_start[b]
            if self.recorder is not None:
                self.recorder.finished(b, s, self.cache)
        return Event(b, s.new_ids, s.done)

    # ---- one round ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One decoding round over the active slots; returns an event per slot that got tokens."""
        active_slots = self.active
        if not active_slots:
            return []
        model, dev = self.model, self.model.device
        hi = active_slots[-1] + 1  # rows 0..hi-1 run; inactive ones among them are rolled back
        seqs = self.seqs[:hi]
        active = [s is not None and not s.done for s in seqs]
        view = self.cache.rows(0, hi)
        running = [s for s, a in zip(seqs, active) if a]
        t_round = time.perf_counter()
        self._observe_pending(t_round)
        rnd = self.plan.decide([s.request.params for s in running],
                               [s.max_new_tokens - len(s.new_ids) for s in running],
                               self.plan.round_kind(self.history[:hi], active))
        k = rnd.k
        last_tokens = self.last_tokens[:hi]  # (each torch call costs tens of us after a step: few of them)
        if last_tokens.device != dev:
            last_tokens = last_tokens.to(dev)
        if k > 0:
            inp = DraftInput(model, view, last_tokens, self.last_hidden[:hi], self.history[:hi],
                             [s.request.params if s else SamplingParams() for s in seqs],
                             [s.generator if s else None for s in seqs], active)
            propose = self.plan.proposer.propose
            proposal = propose(inp, k) if rnd.tree is None else propose(inp, k, rnd.tree)
            drafts = proposal.tokens.to(dev)
        else:
            if (drafts := self._no_drafts.get(hi)) is None:
                drafts = self._no_drafts[hi] = torch.zeros(hi, 0, dtype=torch.long, device=dev)
            proposal = Proposal(drafts)
        t_drafted = time.perf_counter()

        if proposal.parents is None:
            n_accepted, emitted = self._verify_chain(view, seqs, active, last_tokens, drafts, proposal, k)
        else:
            n_accepted, emitted = self._verify_tree(view, seqs, active, last_tokens, drafts, proposal.parents)
        now = time.perf_counter()
        events = []
        updated = []  # rows whose last token changed, set in one torch call below
        for b, s in enumerate(seqs):
            if not emitted[b]:
                continue
            st = s.stats
            st.target_forwards += 1
            st.draft_time += t_drafted - t_round
            st.record_round(k, n_accepted[b], len(emitted[b]))
            for tok in emitted[b]:
                s.accept(tok)
                self.history[b].append(tok)
                if s.done:
                    break
            updated.append(b)  # its last token: the last one kept (a stop may cut the round)
            if s.done:
                st.decode_time = now - self.decode_start[b]
                # the row may have been cut (max_new_tokens, stop) inside its accepted run: keep only
                # what it emitted, so the rounds it sits out until its slot is reused stay in the cache
                view.lengths[b] = len(self.history[b]) - 1
                if self.recorder is not None:
                    self.recorder.finished(b, s, self.cache)
            events.append(Event(b, s.new_ids, s.done))
        if len(updated) == 1:
            self.last_tokens[updated[0]] = self.history[updated[0]][-1]
        elif updated:
            self.last_tokens[updated] = torch.tensor([self.history[b][-1] for b in updated])
        self._pending = (rnd, len(active_slots), [n for n, a in zip(n_accepted, active) if a], t_drafted - t_round,
                         drafts.shape[1] + 1, t_drafted, time.perf_counter())
        return events

    def _observe_pending(self, t_next: float | None) -> None:
        """Report the last round to the drafting plan. Its verify time runs from the end of its
        drafting to the start of the next round (t_next): the target forward, acceptance and the
        round's bookkeeping, and what the caller did with its events (detokenizing, stop strings,
        streaming), which every round pays whatever its k, so a round that emits more tokens
        spreads it thinner. Without a next round (t_next None: a prefill comes first), or when
        the pause between rounds was longer than the round itself (the caller did something else),
        it ends where the round's step ended."""
        if self._pending is None:
            return
        rnd, batch_size, accepted, draft_time, verified, t_drafted, t_end = self._pending
        self._pending = None
        end = t_end if t_next is None or t_next - t_end > t_end - t_drafted else t_next
        self.plan.observe(rnd, batch_size, accepted, end - t_drafted, draft_time, verified_tokens=verified)

    def _suppress_eos(self, logits, seqs, active, depth=None):
        """The target's logits [B, N+1, V] over [last, nodes...] with EOS masked (-inf) where a
        row's min_tokens forbids it: at the position predicting output index len(new_ids) + depth
        (depth [B, N+1] = each node's depth in the tree, `TreeMask.depth`; None = a chain, where it
        is the position's index)."""
        rows = [b for b, s in enumerate(seqs) if active[b] and s.request.suppresses_eos(len(s.new_ids))]
        if not rows:
            return logits
        logits = logits.clone()
        n = logits.shape[1]
        depth = torch.arange(n).expand(len(seqs), n) if depth is None else depth.cpu()
        for b in rows:
            r = seqs[b].request
            where = ((len(seqs[b].new_ids) + depth[b]) < r.min_tokens).nonzero()[:, 0].to(logits.device)
            eos = torch.tensor(sorted(r.eos_ids), device=logits.device)
            logits[b, where[:, None], eos[None, :]] = float("-inf")
        return logits

    def _verify_chain(self, view, seqs, active, last_tokens, drafts, proposal, k):
        """Verify k drafts per row in one forward over [last, d_1..d_k] (verify.py); keep each row's
        last token + accepted drafts in the cache. Returns (n_accepted, emitted) per row. Few torch
        calls: each costs tens of microseconds after the forward's weight stream (see verify_greedy_rows)."""
        dev = self.model.device
        hi = len(seqs)
        tokens = last_tokens[:, None] if k == 0 else torch.cat([last_tokens[:, None], drafts], dim=1)
        out = self.model(tokens, view)
        logits = self._suppress_eos(out.logits, seqs, active, None)
        target = out.argmax if out.argmax is not None and logits is out.logits else logits
        n_accepted, greedy_rows = verify_greedy_rows(drafts.tolist() if k else [[]] * hi, target)
        emitted: list[list[int]] = []
        for b, s in enumerate(seqs):
            if not active[b]:
                emitted.append([])
            elif s.request.params.greedy:
                emitted.append(greedy_rows[b])
            else:
                q = proposal.probs[b] if proposal.probs is not None else None
                target_p = probabilities(logits[b], s.request.params)
                n_accepted[b], row = verify_sampled_row(drafts[b], q, target_p, s.generator)
                emitted.append(row)
        back = [k - n if e else k + 1 for n, e in zip(n_accepted, emitted)]  # (k + 1) - kept
        if any(back):
            view.rollback(torch.tensor(back, device=dev))
        if all(n == n_accepted[0] for n in n_accepted):
            self.last_hidden[:hi] = out.hidden[:, n_accepted[0]]
        else:
            self.last_hidden[:hi] = out.hidden[torch.arange(hi, device=dev), torch.tensor(n_accepted, device=dev)]
        if self.recorder is not None:  # plain decoding: one position per row
            # all rows, as views: gathering the active rows' [vocab] logits costs as much as their top-k
            self.recorder.step([b for b in range(hi) if active[b]], out.hidden[:, 0], logits[:, 0])
        return n_accepted, emitted

    def _verify_tree(self, view, seqs, active, last_tokens, drafts, parents):
        """Verify a draft tree per row (tree.py) in one forward; move each row's accepted path to
        contiguous cache slots. Returns (n_accepted, emitted) per row."""
        dev = self.model.device
        hi = len(active)
        base = view.lengths.clone()
        tree = TreeMask.from_parents(parents)
        out = self.model(torch.cat([last_tokens[:, None], drafts], dim=1), view, tree=tree)
        logits = self._suppress_eos(out.logits, seqs, active, tree.depth)
        paths, emitted = verify_greedy_tree(drafts, parents, logits)
        for b, s in enumerate(seqs):
            if active[b] and not s.request.params.greedy:
                target_p = probabilities(logits[b], s.request.params)
                paths[b], emitted[b] = verify_sampled_tree_row(drafts[b].tolist(), parents[b].tolist(), target_p,
                                                               s.generator)
        emitted = [e if a else [] for e, a in zip(emitted, active)]
        view.compact(base, [[0] + p if a else [] for p, a in zip(paths, active)])
        last = torch.tensor([p[-1] if p else 0 for p in paths], device=dev)
        self.last_hidden[:hi] = out.hidden[torch.arange(hi, device=dev), last]
        return [len(p) for p in paths], emitted


def decode_events(
    model: Decoder,
    requests: list[Request],
    plan: DraftPlan | None = None,
    slots: int | None = None,
    recorder: Recorder | None = None,
) -> Iterator[Event]:
    """Decode a list of requests (plain with plan=None, else speculative as the plan says); yields
    an Event per request and round, its `row` being the request's index. slots=None decodes all
    requests as one batch; slots=N decodes at most N at a time and gives a slot to the next request
    as soon as its sequence finishes (continuous batching). Every sequence equals decoding it alone.
    The finished `SequenceState`s, in request order, are the generator's return value (see `decode`)."""
    check_requests(model, requests)
    if slots is not None and slots < 1:
        raise InputError(f"slots must be >= 1, got {slots}")
    limit = model.cfg.max_position
    max_len = max(min(limit, len(r.prompt_ids) + r.max_new_tokens) for r in requests)
    batch = DecodeBatch(model, min(slots or len(requests), len(requests)), max_len, plan, recorder)
    seqs: list[SequenceState | None] = [None] * len(requests)
    owner: dict[int, int] = {}  # slot -> request index
    nxt = 0
    while nxt < len(requests) or batch.active:
        free = batch.free_slots()[: len(requests) - nxt]
        if free:
            events = batch.add(requests[nxt : nxt + len(free)], free)
            for j, slot in enumerate(free):
                owner[slot] = nxt + j
                seqs[nxt + j] = batch.seqs[slot]
            nxt += len(free)
        else:
            events = batch.step()
        for ev in events:
            yield replace(ev, row=owner[ev.row])
    return seqs


def decode(model: Decoder, requests: list[Request], plan: DraftPlan | None = None,
           slots: int | None = None, recorder: Recorder | None = None) -> list[SequenceState]:
    """Run `decode_events` to completion and return the finished sequences, in request order."""
    it = decode_events(model, requests, plan, slots, recorder)
    while True:
        try:
            next(it)
        except StopIteration as stop:
            return stop.value

