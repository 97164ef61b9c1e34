"""Measures the power of test_sampling_exactness.py's fit tests (the figures in its docstring and
the README's Testing section): runs the `close` configuration with different seeds while the
verifier draws some tokens from a distribution at total variation 0.02 from the target's, and
counts how often the fit rejects.

    cd tests && ../.venv/bin/python measure_fit_power.py --bias last --seeds 20

--bias: none (correct code: the false-alarm rate), last (only the bonus token after an
all-accepted chain), first (only the first token of each round), all (every token).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import mtpspec.decoding.loop as loop
from exact_fit import ALPHA, failed_fits, fit_pvalue
from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.sampling import SamplingParams
from test_sampling_exactness import V, _observe, shift_top_mass
from tiny_models import tiny_hf_model


def chi2_quantile(p: float, df: int) -> float:
    """The statistic whose upper tail probability is p (bisection on the regularised gamma)."""
    lo, hi, a = 0.0, 5000.0, torch.tensor(df / 2, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(torch.special.gammaincc(a, torch.tensor(mid / 2, dtype=torch.float64))) > p else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bias", choices=["none", "last", "first", "all"], default="last")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)

    hf = tiny_hf_model("llama", vocab_size=V)
    with torch.no_grad():
        hf.model.norm.weight.mul_(4.0)  # as the test's sharp_target fixture
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    model = load_decoder(folder)

    real = loop.verify_sampled_row
    rows = {"last": slice(-1, None), "first": slice(0, 1), "all": slice(None)}.get(args.bias)

    def biased(draft, q, p, g):
        p = p.clone()
        p[rows] = shift_top_mass(p[rows])
        return real(draft, q, p, g)

    if rows is not None:
        loop.verify_sampled_row = biased
    rejected, stats = 0, []
    for seed in range(args.seeds):
        obs, k = _observe(model, "close", SamplingParams(1.0), seed=seed + 1)
        slot = {"last": k + 1, "first": 1}.get(args.bias)  # the tokens the bias affects
        sel = obs.slots == slot if slot else torch.ones_like(obs.slots, dtype=torch.bool)
        bad = failed_fits(obs, k)
        rejected += bool(bad)
        p, df = fit_pvalue(obs.probs[sel], obs.tokens[sel], by_rank=True)
        stats.append((chi2_quantile(max(p, 1e-300), df), df))
        print(f"seed {seed}: {'rejected' if bad else 'passed'}; affected group by rank p = {p:.2e}", flush=True)
    df = stats[0][1]
    lam = max(0.0, sum(s for s, _ in stats) / len(stats) - df)  # E[noncentral chi2] = df + lambda
    z = torch.randn(200_000, df, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[:, 0] += lam**0.5
    power = float(((z**2).sum(1) > chi2_quantile(ALPHA, df)).double().mean())
    print(f"bias {args.bias}: {rejected}/{args.seeds} runs rejected; noncentrality ~{lam:.1f}, "
          f"estimated power of one fit test at {ALPHA:g}: {power:.3f}")


if __name__ == "__main__":
    main()
