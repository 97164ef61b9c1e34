"""Sampling parameters and processed distributions (temperature, top-k, top-p)."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mtpspec.decoding.sampling import SamplingParams, next_token, probabilities
from mtpspec.errors import InputError


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-2),
                                 dict(top_k=1.5), dict(top_p=0), dict(top_p=1.5), dict(seed=-3)])
def test_invalid_parameters_are_rejected_with_the_parameter_named(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize("t,k,p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9)])
def test_processed_distribution_matches_transformers_warpers(t, k, p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(t)(None, logits.clone())
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(None, ref)
    ours = probabilities(logits, SamplingParams(t, k, p))
    torch.testing.assert_close(ours, ref.softmax(-1), atol=1e-6, rtol=0)
    if k:
        assert int((ours[0] > 0).sum()) <= k


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(100)
    params = SamplingParams(1.0, seed=123)
    a = [next_token(logits, params, g) for g in [params.generator()] for _ in range(20)]
    b = [next_token(logits, params, g) for g in [params.generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    assert next_token(logits, SamplingParams(), None) == int(logits.argmax())


def test_sample_draws_each_token_in_proportion_to_its_weight_and_never_a_zero_weight():
    from exact_fit import fit_pvalue

    from mtpspec.decoding.sampling import sample

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 0.0])  # unnormalised, zeros inside and at the ends
    g = torch.Generator().manual_seed(5)
    draws = torch.tensor([sample(weights, g) for _ in range(20000)])
    counts = torch.bincount(draws, minlength=len(weights))
    assert counts[weights == 0].sum() == 0
    pvalue, _ = fit_pvalue((weights / weights.sum()).expand(len(draws), -1), draws, by_rank=False)
    assert pvalue > 1e-4, counts.tolist()


def test_sample_never_returns_past_the_last_token_of_non_zero_weight(monkeypatch):
    from mtpspec.decoding import sampling

    weights = torch.tensor([0.2, 0.8, 0.0, 0.0])
    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))  # u = total
    assert sampling.sample(weights, None) == 1
