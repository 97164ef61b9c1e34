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
