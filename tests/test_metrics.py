"""Acceptance statistics merged over sequences (`mtpspec.acceptance`) and the three places that
report them: the server's Prometheus metrics, the spec bench's rows and the drafter evaluation.
Each must merge the sequences' counts exactly: not average per-sequence means (short and long
sequences weighted alike), not rebuild counts from rounded means."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mtpspec.acceptance import AcceptanceTotals
from mtpspec.decoding.loop import SequenceStats


def _stats(rounds: int, k: int, accepted: int, draft_time: float = 0.0, decode_time: float = 0.0) -> SequenceStats:
    """A sequence of `rounds` verification rounds that each proposed k drafts and accepted `accepted`."""
    st = SequenceStats(draft_time=draft_time, decode_time=decode_time)
    for _ in range(rounds):
        st.record_round(k, accepted, accepted + 1)
    return st


def _three() -> list[SequenceStats]:
    # long and rejecting, short and accepting everything, medium: their per-sequence means
    # (1, 5, 2) average to 2.67; the exact mean is 20 tokens / 13 rounds
    return [_stats(9, 2, 0, 0.125, 1.0), _stats(1, 4, 4, 0.25, 0.5), _stats(3, 3, 1, 0.25, 0.5)]


MEAN = 20 / 13
PER_POSITION = [4 / 13, 1 / 13, 1 / 4, 1.0]  # position 1: 9 + 1 + 3 proposed, 0 + 1 + 3 accepted; ...
MEAN_K = (9 * 2 + 4 + 3 * 3) / 13


def test_totals_merge_counts_exactly():
    t = AcceptanceTotals.of(_three())
    assert (t.sequences, t.rounds, t.round_tokens) == (3, 13, 20)
    assert t.proposed_per_position == [13, 13, 4, 1] and t.accepted_per_position == [4, 1, 1, 1]
    assert t.mean_accepted_length == pytest.approx(MEAN, abs=1e-12)
    assert t.acceptance_per_position == pytest.approx(PER_POSITION, abs=1e-12)
    assert t.mean_k == pytest.approx(MEAN_K, abs=1e-12)
    assert t.drafter_time_share == 0.625 / 2.0
    # the order of the sequences does not matter, nor adding them one at a time
    one_by_one = AcceptanceTotals()
    for st in reversed(_three()):
        one_by_one.add(st)
    assert one_by_one == t


def test_totals_without_rounds_or_at_a_position_without_proposals():
    empty = AcceptanceTotals.of([SequenceStats(new_tokens=1)])  # a sequence that ended at its first token
    assert empty.sequences == 1 and empty.mean_accepted_length is None and empty.mean_k is None
    assert empty.acceptance_per_position == [] and empty.drafter_time_share is None
    t = AcceptanceTotals(rounds=2, round_tokens=3, proposed_per_position=[2, 0], accepted_per_position=[1, 0])
    assert t.acceptance_per_position == [0.5, None]


def test_server_metrics_report_the_exact_aggregate():
    from mtpspec.serve.metrics import Metrics

    m = Metrics()
    for st in _three():
        m.on_finished(st, "length")
    value = m.registry.get_sample_value
    assert value("mtpspec_mean_accepted_length") == pytest.approx(MEAN, abs=1e-12)
    for i, rate in enumerate(PER_POSITION):
        assert value("mtpspec_draft_acceptance_rate", {"position": str(i + 1)}) == pytest.approx(rate, abs=1e-12)
    assert value("mtpspec_draft_tokens_proposed_total") == 31
    assert value("mtpspec_draft_tokens_accepted_total") == 7
    assert value("mtpspec_decode_rounds_total") == 13 and value("mtpspec_decode_round_tokens_total") == 20


def test_spec_bench_rows_sum_every_row_of_every_run():
    from mtpspec.bench.spec import acceptance_record
    from mtpspec.bench.timing import Run

    a, b, c = _three()
    rec = acceptance_record([Run([[1]] * 2, 1.0, None, [a, b]), Run([[1]], 1.0, None, [c])])
    assert rec == {"mean_accepted_length": round(MEAN, 4), "acceptance_per_position": [round(x, 4) for x in PER_POSITION],
                   "mean_k": round(MEAN_K, 3), "drafter_time_share": 0.3125, "rounds": 13,
                   "target_forwards_per_row": round(13 / 3 + 1, 2)}


def test_drafter_evaluation_merges_counts_not_rounded_means(monkeypatch):
    import mtpspec.decoding.loop as loop
    from mtpspec.train.evaluate import acceptance

    plans = []
    engine = SimpleNamespace(model=object(), eos_ids=frozenset({2}), encode=lambda p: [5, 6, 7],
                             plan=SimpleNamespace(with_draft_tokens=lambda k: plans.append(k) or f"K={k}"))

    def decode(model, requests, plan, slots=None):
        assert plan == "K=5" and slots == 2 and len(requests) == 3
        return [SimpleNamespace(stats=st) for st in _three()]

    monkeypatch.setattr(loop, "decode", decode)
    out = acceptance(engine, ["a", "b", "c"], 5, max_new_tokens=16, batch_size=2)
    assert plans == [5]
    assert out["prompts"] == 3 and out["draft_tokens"] == 5 and out["max_new_tokens"] == 16
    assert out["mean_accepted_length"] == round(MEAN, 4)
    # K entries; a position nothing was proposed at reads 0.0
    assert out["acceptance_per_position"] == [round(x, 4) for x in PER_POSITION] + [0.0]
