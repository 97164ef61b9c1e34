"""Continuous batching on the one decoding loop: sequences join free slots between rounds and
leave when done or cancelled; every sequence equals the same prompt generated alone."""

from __future__ import annotations

import pytest
import torch

from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import DecodeBatch, Request, decode
from mtpspec.decoding.plan import DraftPlan
from mtpspec.decoding.proposers import NgramProposer
from mtpspec.errors import InputError
from tiny_models import VOCAB


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, tiny_checkpoints):
    return load_decoder(tiny_checkpoints[request.param][0])


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, VOCAB, (L,), generator=g).tolist() * 2)[: 2 * L] for L in (3, 9, 5, 12, 4, 7)[:n]]


@pytest.mark.parametrize("spec", [False, True])
def test_requests_joining_and_leaving_equal_each_alone(model, spec):
    prompts = _prompts(6)
    budgets = [12, 30, 5, 20, 16, 9]
    alone = [decode(model, [Request(p, n)])[0].new_ids for p, n in zip(prompts, budgets)]
    batch = DecodeBatch(model, slots=3, max_len=64, plan=DraftPlan(NgramProposer(), 3) if spec else None)
    pending = list(range(6))
    slot_of: dict[int, int] = {}
    done: dict[int, list[int]] = {}
    rounds = 0
    while pending or batch.active:
        free = batch.free_slots()
        # one newcomer per round, so joins happen while others are mid-generation
        if pending and free:
            i = pending.pop(0)
            ev = batch.add([Request(prompts[i], budgets[i])], [free[0]])[0]
            slot_of[free[0]] = i
            if ev.finished:
                done[i] = list(ev.new_ids)
        for ev in batch.step():
            if ev.finished:
                done[slot_of[ev.row]] = list(ev.new_ids)
        rounds += 1
        assert rounds < 500
    assert [done[i] for i in range(6)] == alone


def test_cancel_frees_the_slot_and_others_continue(model):
    prompts = _prompts(3, seed=1)
    alone = decode(model, [Request(prompts[1], 15)])[0].new_ids
    batch = DecodeBatch(model, slots=2, max_len=64)
    batch.add([Request(prompts[0], 40), Request(prompts[1], 15)])
    batch.step()
    batch.cancel(0)
    assert batch.free_slots() == [0] and batch.active == [1]
    assert batch.seqs[0].finish_reason == "cancelled"
    batch.add([Request(prompts[2], 5)])  # reuses slot 0 while slot 1 is mid-generation
    while batch.active:
        batch.step()
    assert batch.seqs[1].new_ids == alone
    assert batch.seqs[0].new_ids == decode(model, [Request(prompts[2], 5)])[0].new_ids


def test_prompt_too_long_for_the_batch(model):
    batch = DecodeBatch(model, slots=1, max_len=8)
    from mtpspec.errors import InputError

    with pytest.raises(InputError, match="at most 7"):
        batch.add([Request([5] * 9, 4)])


@pytest.mark.parametrize("spec", [False, True])
def test_decode_with_fewer_slots_than_requests_refills_slots(model, spec):
    from mtpspec.decoding.loop import decode_events

    prompts = _prompts(6, seed=2)
    budgets = [3, 25, 1, 14, 30, 6]
    alone = [decode(model, [Request(p, n)])[0].new_ids for p, n in zip(prompts, budgets)]
    plan = DraftPlan(NgramProposer(), 3) if spec else None
    it = decode_events(model, [Request(p, n) for p, n in zip(prompts, budgets)], plan, slots=2)
    last: dict[int, list[int]] = {}
    while True:
        try:
            ev = next(it)
        except StopIteration as stop:
            seqs = stop.value
            break
        assert len(ev.new_ids) >= len(last.get(ev.row, []))  # events are per request index
        last[ev.row] = list(ev.new_ids)
    assert [s.new_ids for s in seqs] == alone
    assert [last[i] for i in range(6)] == alone
    with pytest.raises(InputError, match="no prompts"):
        decode(model, [], plan, slots=2)
    with pytest.raises(InputError, match="slots"):
        decode(model, [Request(prompts[0], 2)], slots=0)


def test_prefill_pieces_cover_every_prompt_once_within_the_budget():
    from mtpspec.decoding.loop import prefill_pieces

    lengths = [5, 7, 7, 30, 31, 90, 3, 200, 8]
    pieces = prefill_pieces(lengths, budget=64)
    assert [i for a, b in pieces for i in range(a, b)] == list(range(len(lengths)))  # consecutive, in order
    for a, b in pieces:
        assert (b - a) * max(lengths[a:b]) <= 64 or b - a == 1  # a prompt over budget goes alone
        if b < len(lengths):  # as many as fit: the next prompt would overflow the piece
            assert (b - a + 1) * max(lengths[a : b + 1]) > 64
    assert prefill_pieces([4] * 10, budget=1000) == [(0, 10)]
    assert prefill_pieces([], budget=10) == []


@pytest.mark.parametrize("spec", [False, True])
def test_prompts_of_very_different_lengths_prefill_in_pieces_and_equal_each_alone(model, spec, monkeypatch):
    """`add` prefills contiguous slots in pieces of at most PREFILL_TOKENS padded tokens: every
    forward of the prefill stays in the budget, requests keep their slot order, and every sequence
    still equals its prompt decoded alone."""
    from mtpspec.decoding import loop

    g = torch.Generator().manual_seed(5)
    lengths = [40, 3, 5, 4, 33, 6, 2, 18]
    prompts = [torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in lengths]
    budgets = [6, 9, 4, 12, 7, 5, 10, 8]
    alone = [decode(model, [Request(p, n)])[0].new_ids for p, n in zip(prompts, budgets)]
    monkeypatch.setattr(loop, "PREFILL_TOKENS", 48)
    forwards = []  # (first slot, prompt lengths) of each prefill forward
    real = loop.DecodeBatch._prefill

    def spy(self, requests, first, limit, *keep):
        forwards.append((first, [len(r.prompt_ids) for r in requests]))
        return real(self, requests, first, limit, *keep)

    monkeypatch.setattr(loop.DecodeBatch, "_prefill", spy)
    plan = DraftPlan(NgramProposer(), 3) if spec else None
    got = decode(model, [Request(p, n) for p, n in zip(prompts, budgets)], plan, slots=6)
    assert [s.new_ids for s in got] == alone
    assert all(len(f) == 1 or len(f) * max(f) <= 48 for _, f in forwards), forwards
    # the first six requests (40, 3, 5, 4, 33, 6 tokens) join slots 0-5 in request order, in four forwards
    assert forwards[:4] == [(0, [40]), (1, [3, 5, 4]), (4, [33]), (5, [6])], forwards
    assert sorted(x for _, f in forwards for x in f) == sorted(lengths)


@pytest.mark.parametrize("spec", [False, True])
def test_a_repeated_prompt_is_prefilled_once_and_every_copy_equals_decoding_it_alone(model, spec, monkeypatch):
    """Requests with the same prompt (the self-instruct recipe sends one prompt thousands of times,
    a server `n` > 1) prefill it in one forward, within an add and across adds, and copy its K/V:
    sampled rows with their own seeds and greedy rows equal decoding each alone, mixed with
    other prompts."""
    from mtpspec.decoding import loop
    from mtpspec.decoding.sampling import SamplingParams

    g = torch.Generator().manual_seed(8)
    shared = torch.randint(3, VOCAB, (11,), generator=g).tolist()
    other = torch.randint(3, VOCAB, (7,), generator=g).tolist()
    reqs = [Request(shared, 8, SamplingParams(1.0, seed=i)) for i in range(5)] + [Request(other, 8), Request(shared, 8)]
    reqs += [Request(shared, 6, SamplingParams(0.8, top_k=20, seed=40 + i)) for i in range(4)]
    plan = DraftPlan(NgramProposer(), 3) if spec else None
    alone = [decode(model, [r], plan)[0].new_ids for r in reqs]
    prefilled = []
    real = loop.DecodeBatch._prefill

    def spy(self, requests, first, limit, *keep):
        prefilled.extend(len(r.prompt_ids) for r in requests)
        return real(self, requests, first, limit, *keep)

    monkeypatch.setattr(loop.DecodeBatch, "_prefill", spy)
    got = decode(model, reqs, plan, slots=4)
    assert [s.new_ids for s in got] == alone
    assert sorted(prefilled) == [7, 11], prefilled  # the shared prompt once, across three adds
    assert len({tuple(s.new_ids) for s in got[:5]}) > 1  # the copies sample with their own seeds


def test_distill_decodes_shortest_prompts_first_and_answers_in_prompt_order(model, monkeypatch):
    """Self-distillation orders its requests by prompt length (prefill pieces of similar lengths pad
    little) and returns each prompt's own greedy answer, in the order of the prompts."""
    from types import SimpleNamespace

    from mtpspec.decoding import loop
    from mtpspec.train.harvest import distill

    g = torch.Generator().manual_seed(6)
    lengths = [30, 3, 17, 5, 9]
    prompts = [torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in lengths]
    alone = [decode(model, [Request(p, 6)])[0].new_ids for p in prompts]
    seen = []
    real = loop.decode

    def spy(m, reqs, plan=None, slots=None, recorder=None):
        seen.append([len(r.prompt_ids) for r in reqs])
        return real(m, reqs, plan, slots, recorder)

    monkeypatch.setattr(loop, "decode", spy)
    got = distill(SimpleNamespace(model=model, eos_ids=frozenset()), prompts, 6, 64, slots=2)
    assert seen == [sorted(lengths)]
    assert got == alone
