"""Prompt lookup in front of a drafter (decoding/lookup.py): the n-gram match it relies on, which
rows draft by lookup, the q it reports for sampled rows, and losslessness through the loop with a
real (random) MTP drafter, greedy, across families, batch sizes, K and the sliding window.
Sampled exactness: test_sampling_exactness.py; API and CLI wiring: below."""

from __future__ import annotations

import random

import pytest
import torch

from drafter_helpers import random_drafter
from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.lookup import NgramIndex, PromptLookupProposer
from mtpspec.decoding.mtp import MtpProposer
from mtpspec.decoding.plan import DraftPlan
from mtpspec.decoding.proposers import DraftInput, NgramProposer, Proposal
from mtpspec.decoding.sampling import SamplingParams


def reference_match(history: list[int], k: int, max_n: int, min_n: int) -> tuple[list[int], int]:
    """The plain scan: longest n first, most recent earlier occurrence first."""
    for n in range(min(max_n, len(history) - 1), min_n - 1, -1):
        suffix = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == suffix:
                return history[start + n : start + n + k], n
    return [], 0


def test_match_equals_the_plain_scan_on_random_histories():
    rng = random.Random(0)
    for _ in range(4000):
        vocab = rng.choice([2, 3, 5, 40])
        history = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        max_n = rng.randint(1, 5)
        min_n = rng.randint(1, max_n)
        k = rng.randint(1, 6)
        got = NgramProposer(max_n, min_n).match(history, k)
        assert got == reference_match(history, k, max_n, min_n), (history, k, max_n, min_n)


def test_the_incremental_index_equals_the_plain_scan_as_a_history_grows():
    """Prompt lookup keeps one `NgramIndex` per row, extended by the tokens appended since the last
    round; at every length (grown one token or several at a time, as accepted drafts arrive) it must
    find what a scan of the whole history finds, and index a replaced (shorter) history anew."""
    rng = random.Random(1)
    for _ in range(300):
        vocab = rng.choice([2, 3, 5, 40])
        max_n = rng.randint(1, 5)
        min_n = rng.randint(1, max_n)
        history = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        index = NgramIndex(history, min_n, max_n)
        while len(history) < 60:
            start, n = index.find()
            want = reference_match(history, 1_000, max_n, min_n)
            assert (history[start:] if n else [], n) == want, (history, max_n, min_n)
            history.extend(rng.randrange(vocab) for _ in range(rng.choice([1, 1, 2, 5])))
        del history[10:]  # the loop never shortens a history, but a shorter one must not go stale
        start, n = index.find()
        assert (history[start:] if n else [], n) == reference_match(history, 1_000, max_n, min_n)


def test_match_prefers_the_longest_suffix_then_the_latest_occurrence():
    ng = NgramProposer(4, 2)
    #          0  1  2  3  4  5  6  7  8  9 10
    history = [7, 1, 2, 9, 5, 1, 2, 8, 3, 1, 2]
    assert ng.match(history, 3) == ([8, 3, 1], 2)  # "1 2" last seen at 5..6
    history = [4, 1, 2, 9, 5, 1, 2, 8, 3, 4, 1, 2]
    assert ng.match(history, 3) == ([9, 5, 1], 3)  # "4 1 2" (n = 3) beats the later "1 2"
    assert ng.match([1, 2, 3, 4], 2) == ([], 0)
    assert NgramProposer(4, 1).match([5, 6, 5], 4) == ([6, 5], 1)  # the follow stops at the end


class Const:
    """An inner proposer drafting token 0 everywhere; with `sample`, sampled rows report a uniform q."""

    drafts_trees = False

    def __init__(self, vocab: int = 16, sample: bool = False):
        self.calls, self.vocab, self.sample = 0, vocab, sample

    def propose(self, inp: DraftInput, k: int, tree=None) -> Proposal:
        self.calls += 1
        b = len(inp.history)
        probs = None
        if self.sample:
            probs = torch.zeros(b, k, self.vocab)
            for r, p in enumerate(inp.params):
                probs[r] = 1.0 / self.vocab if not p.greedy else 0.0
                if p.greedy:
                    probs[r, :, 0] = 1.0
        return Proposal(torch.zeros(b, k, dtype=torch.long), probs)


def _input(histories, params=None, active=None) -> DraftInput:
    b = len(histories)
    return DraftInput(None, None, torch.tensor([h[-1] for h in histories]), torch.zeros(b, 4), histories,
                      params or [SamplingParams()] * b, [None] * b, active or [True] * b)


def test_rows_with_a_match_draft_by_lookup_the_others_by_the_drafter():
    inner = Const()
    prop = PromptLookupProposer(inner)
    matched = [3, 4, 5, 6, 7, 3, 4]  # "3 4" occurred: 5 6 7 3 follow
    single = [3, 4, 5, 6, 7, 8, 3]  # only a 1-token match: below min_match = 2
    out = prop.propose(_input([matched, single]), 4)
    assert out.tokens.tolist() == [[5, 6, 7, 3], [0, 0, 0, 0]] and inner.calls == 1
    short = [9, 1, 2, 8, 1, 2]  # the follow "8 1 2" is shorter than k: the drafter's tokens after it
    assert prop.propose(_input([short]), 5).tokens.tolist() == [[8, 1, 2, 0, 0]]
    calls = inner.calls
    out = prop.propose(_input([matched, matched]), 4)  # every row matched: the drafter is not run
    assert inner.calls == calls and out.tokens.tolist() == [[5, 6, 7, 3]] * 2 and out.probs is None
    # an inactive row's history is not looked up, and does not force the drafter to run
    out = prop.propose(_input([matched, single], active=[True, False]), 4)
    assert inner.calls == calls and out.tokens[0].tolist() == [5, 6, 7, 3]


def test_sampled_rows_report_one_hot_q_where_lookup_drafted():
    inner = Const(vocab=16, sample=True)
    prop = PromptLookupProposer(inner)
    short = [9, 1, 2, 8, 1, 2]
    params = [SamplingParams(0.8, seed=1), SamplingParams(0.8, seed=2), SamplingParams()]
    out = prop.propose(_input([short, [1, 2, 3, 4, 5, 6], short], params), 5)
    q = out.probs
    for i, tok in enumerate([8, 1, 2]):  # lookup positions: q = one-hot of the drafted token
        assert q[0, i, tok] == 1.0 and q[0, i].sum() == 1.0
    assert torch.allclose(q[0, 3:], torch.full((2, 16), 1 / 16))  # the drafter's own q after the follow
    assert torch.allclose(q[1], torch.full((5, 16), 1 / 16))  # no match: untouched
    assert q[2, 0, 8] == 1.0 and q[2, 3, 0] == 1.0  # a greedy row: one-hot either way


def test_trees_and_attributes_go_to_the_drafter(tiny_checkpoints):
    from mtpspec.decoding.tree import TreeShape

    target = load_decoder(tiny_checkpoints["gemma3"][0])
    mtp = MtpProposer(random_drafter(target, seed=1))
    prop = PromptLookupProposer(mtp)
    assert prop.drafts_trees and prop.drafter is mtp.drafter
    shape = TreeShape(6, 2, 2)
    assert prop.max_tokens(3, shape) == mtp.max_tokens(3, shape) and prop.max_tokens(3) == 3
    plan = DraftPlan(prop, 3, draft_tree=shape)
    ps = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11]]
    ref = [s.new_ids for s in decode(target, [Request(p, 16) for p in ps])]
    assert [s.new_ids for s in decode(target, [Request(p, 16) for p in ps], plan)] == ref
    assert prop.rounds == 0  # tree rounds never look up


def _repetitive(lens, seed, vocab=60):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        base = torch.randint(3, vocab, (max(2, n // 3),), generator=g).tolist()
        out.append((base * 4)[:n])
    return out


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen2"])
def test_greedy_lookup_with_a_drafter_equals_plain(tiny_checkpoints, name):
    """Prompts that repeat themselves (lookup drafts often) and tiny random targets (whose greedy
    output loops, so generated text matches too); 24 new tokens cross Gemma 3's window of 8."""
    target = load_decoder(tiny_checkpoints[name][0])
    drafter = random_drafter(target, seed=4)
    for batch in (1, 4):
        ps = _repetitive([12] if batch == 1 else [12, 5, 17, 3], seed=batch)
        ref = [s.new_ids for s in decode(target, [Request(p, 24) for p in ps])]
        for k in (1, 3, 6):
            prop = PromptLookupProposer(MtpProposer(drafter))
            seqs = decode(target, [Request(p, 24) for p in ps], DraftPlan(prop, k, draft_tree=None))
            assert [s.new_ids for s in seqs] == ref, (name, batch, k)
            assert prop.lookup_rows > 0, "lookup never drafted: the test does not cover it"
            assert prop.lookup_rows < prop.rounds * len(ps), "the drafter never drafted"


def test_load_puts_lookup_in_front_of_an_mtp_drafter_unless_asked_not_to(tmp_path, tiny_with_tokenizer):
    import mtpspec
    from mtpspec.drafter_checkpoint import save_drafter

    folder = tiny_with_tokenizer
    target = load_decoder(folder)
    save_drafter(random_drafter(target, seed=5), tmp_path / "d", draft_tokens=3)
    eng = mtpspec.load(folder, drafter=str(tmp_path / "d"), draft_tree=None)
    assert isinstance(eng.proposer, PromptLookupProposer) and eng.drafter_name == "d+lookup"
    alone = mtpspec.load(folder, drafter=str(tmp_path / "d"), draft_tree=None, prompt_lookup=False)
    assert isinstance(alone.proposer, MtpProposer) and alone.drafter_name == "d"
    ngram = mtpspec.load(folder, drafter="ngram", prompt_lookup=True)
    assert isinstance(ngram.proposer, NgramProposer)  # lookup alone is already lookup
    ids = _repetitive([14], seed=3)[0]
    a = eng.generate(ids, max_new_tokens=20, chat=False)
    b = alone.generate(ids, max_new_tokens=20, chat=False)
    assert a.token_ids == b.token_ids


def test_cli_no_prompt_lookup(tmp_path, tiny_with_tokenizer):
    from typer.testing import CliRunner

    from mtpspec.cli import app
    from mtpspec.drafter_checkpoint import save_drafter

    folder = tiny_with_tokenizer
    target = load_decoder(folder)
    save_drafter(random_drafter(target, seed=5), tmp_path / "d", draft_tokens=3)
    for flag, name in (("--prompt-lookup", "d+lookup"), ("--no-prompt-lookup", "d")):
        res = CliRunner().invoke(app, ["generate", "--raw", "hello hello hello", "-m", str(folder), "--drafter",
                                       str(tmp_path / "d"), flag, "-n", "8", "--compare"])
        assert res.exit_code == 0, res.output
        assert f"speculative ({name})" in res.output and "identical output: yes" in res.output
