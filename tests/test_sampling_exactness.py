"""Sampled speculative decoding emits exactly the target's distribution: every token of every
round, through the real loop, with test proposers whose q depends on position, row and history,
and with the real MTP proposer's sampled chains and trees (exact_fit.py explains the test).

The target is sharp (a tiny 12-token Llama whose final norm is scaled up: the most likely token
has probability ~0.65 on average, far from uniform), so wrong distributions are far apart.

Power (measured over 20 seeded runs of the `close` configuration per line, by moving 0.02 of
probability from the target's most likely token to its second inside the verifier, i.e. a
total-variation bias of exactly 0.02 in the distribution the affected tokens are drawn from; each
fit test at level 1e-4; the power estimate comes from the mean statistic, a noncentral
chi-square):
- a bias only in the bonus token after an all-accepted chain (~9500 such tokens per run):
  caught 20/20, estimated power 99.6%;
- a bias only in the first token of every round: 20/20, > 99.9%;
- a bias in every emitted token: 20/20, > 99.9%;
- correct code: 0/20 runs rejected.
(`cd tests && ../.venv/bin/python measure_fit_power.py --bias last|first|all|none`.)
The `far` configuration (most drafts rejected) covers the residual draws.
"""

from __future__ import annotations

import pytest
import torch

import mtpspec.decoding.loop as loop
from drafter_helpers import random_drafter
from exact_fit import DistortedTargetProposer, failed_fits, run_and_observe
from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.lookup import PromptLookupProposer
from mtpspec.decoding.mtp import MtpProposer, TreeShape
from mtpspec.decoding.sampling import SamplingParams
from tiny_models import tiny_hf_model

V = 12
RUNS = {  # name: (rows, new tokens, K, proposer strength, sharpen)
    "close": (1200, 40, 3, 0.4, (1.0,)),
    "far": (400, 30, 4, 1.5, (0.6, 0.85, 1.1)),
}


@pytest.fixture(scope="module")
def sharp_target(tmp_path_factory):
    hf = tiny_hf_model("llama", vocab_size=V)
    with torch.no_grad():
        hf.model.norm.weight.mul_(4.0)  # logits x4: sharp distributions
    folder = tmp_path_factory.mktemp("sharp")
    hf.save_pretrained(folder)
    return load_decoder(folder)


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny per-row ops: one thread is several times faster than two here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (5,), generator=g).tolist() for _ in range(n)]


def _observe(model, run: str, params: SamplingParams, seed: int = 0, proposer=None, tree=None):
    rows, new, k, strength, sharpen = RUNS[run]
    params_rows = [SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed * 100_000 + i)
                   for i in range(rows)]
    proposer = proposer or DistortedTargetProposer(strength, sharpen, seed=seed)
    return run_and_observe(model, _prompts(rows, seed), params_rows, new, proposer, k, tree), k


def shift_top_mass(p: torch.Tensor, tv: float = 0.02) -> torch.Tensor:
    """p with `tv` probability moved from each row's most likely token to its second."""
    p = p.clone()
    top = p.topk(2, dim=-1).indices
    rows = torch.arange(p.shape[0])
    p[rows, top[:, 0]] -= tv
    p[rows, top[:, 1]] += tv
    return p


@pytest.mark.parametrize("run,params", [("close", SamplingParams(1.0)), ("far", SamplingParams(1.0)),
                                        ("far", SamplingParams(0.8, top_k=6, top_p=0.9))],
                         ids=["close", "far", "far-top-k-top-p"])
def test_every_emitted_token_follows_the_target(sharp_target, run, params):
    obs, k = _observe(sharp_target, run, params)
    counts = torch.bincount(obs.slots, minlength=k + 2)[1:].tolist()
    assert min(counts) > 150, f"every round slot must be observed often: {counts}"
    assert failed_fits(obs, k) == []


def test_the_fit_detects_a_002_bias_in_the_bonus_token_only(sharp_target, monkeypatch):
    """The weakest case the power statement covers: only the bonus token after an all-accepted
    chain is drawn from a distribution at total variation 0.02 from the target's."""
    real = loop.verify_sampled_row

    def biased(draft, q, p, g):
        p = p.clone()
        p[-1:] = shift_top_mass(p[-1:])
        return real(draft, q, p, g)

    monkeypatch.setattr(loop, "verify_sampled_row", biased)
    obs, k = _observe(sharp_target, "close", SamplingParams(1.0))
    assert any(f.startswith(f"slot {k + 1}") for f in failed_fits(obs, k))


@pytest.mark.parametrize("tree,params", [(None, SamplingParams(1.0)), (TreeShape(6, 2, 2), SamplingParams(1.0)),
                                         (TreeShape(6, 2, 2), SamplingParams(0.8, top_k=6, top_p=0.9))],
                         ids=["chains", "trees", "trees-top-k-top-p"])
def test_mtp_sampled_drafting_follows_the_target(sharp_target, tree, params):
    """The real MTP proposer: sampled chains (drafts drawn from the drafter's processed
    distribution, returned as q) and draft trees (deterministic nodes, walked by target draws)."""
    proposer = MtpProposer(random_drafter(sharp_target, seed=2))
    obs, k = _observe(sharp_target, "far", params, seed=1, proposer=proposer, tree=tree)
    counts = torch.bincount(obs.slots, minlength=k + 2)[1:].tolist()
    assert counts[1] > 300, f"drafts must be accepted often enough to test later slots: {counts}"
    assert failed_fits(obs, k) == []


def test_prompt_lookup_in_front_of_a_sampled_drafter_follows_the_target(sharp_target):
    """Sampled chains drafted by lookup (deterministic, q one-hot) in some rows and rounds and by
    the MTP drafter (sampled, its q) in the others, through the real loop."""
    proposer = PromptLookupProposer(MtpProposer(random_drafter(sharp_target, seed=2)))
    obs, k = _observe(sharp_target, "far", SamplingParams(1.0), seed=2, proposer=proposer)
    rows = RUNS["far"][0]
    assert 0.1 < proposer.lookup_rows / (proposer.rounds * rows) < 0.9, (proposer.lookup_rows, proposer.rounds)
    assert failed_fits(obs, k) == []
