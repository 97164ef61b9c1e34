"""The accept/reject functions on hand-built cases."""

from __future__ import annotations

import pytest
import torch

from mtpspec.decoding.verify import verify_greedy, verify_sampled_row

V = 6


def logits_for(argmaxes):
    """[B, T, V] logits whose argmax at each position is given."""
    t = torch.full((len(argmaxes), len(argmaxes[0]), V), -1.0)
    for b, row in enumerate(argmaxes):
        for i, a in enumerate(row):
            t[b, i, a] = 1.0
    return t


def test_greedy_all_match_first_mismatch_last_mismatch_ragged():
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3], [4, 2, 3]])
    target = logits_for([[1, 2, 3, 5], [0, 2, 3, 5], [1, 2, 0, 5], [4, 2, 1, 0]])
    n, tokens = verify_greedy(draft, target)
    assert n.tolist() == [3, 0, 2, 2]
    emitted = [tokens[b, : n[b] + 1].tolist() for b in range(4)]
    assert emitted == [[1, 2, 3, 5], [0], [1, 2, 0], [4, 2, 1]]


def test_greedy_empty_draft_is_plain_decoding():
    n, tokens = verify_greedy(torch.zeros(2, 0, dtype=torch.long), logits_for([[3], [4]]))
    assert n.tolist() == [0, 0] and tokens[:, 0].tolist() == [3, 4]


def test_greedy_mismatch_after_a_later_match_does_not_count():
    n, _ = verify_greedy(torch.tensor([[1, 9 % V, 3]]), logits_for([[1, 2, 3, 0]]))
    assert n.tolist() == [1]


def test_sampled_draft_equal_to_target_is_always_accepted():
    p = torch.softmax(torch.randn(4, V), -1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        draft = torch.multinomial(p[:3], 1, generator=g)[:, 0]
        n, emitted = verify_sampled_row(draft, p[:3], p, g)
        assert n == 3 and emitted[:3] == draft.tolist() and len(emitted) == 4


def test_sampled_rejects_a_token_the_target_excludes_and_resamples_from_residual():
    p = torch.tensor([[0.0, 0.5, 0.5, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]])
    q = torch.tensor([[0.5, 0.5, 0, 0, 0, 0]])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        n, emitted = verify_sampled_row(torch.tensor([0]), q, p, g)
        assert n == 0 and len(emitted) == 1
        seen.add(emitted[0])
    assert seen == {2}  # residual max(p - q, 0) is all on token 2
    # deterministic proposer (q = one-hot): accept with probability p(d)
    acc = sum(verify_sampled_row(torch.tensor([1]), None, p, g)[0] for _ in range(2000)) / 2000
    assert abs(acc - 0.5) < 0.05


# ---- sampled chains with position-dependent p_i and q_i ---------------------------------------

def _slot_fit(p: torch.Tensor, q: torch.Tensor | None, trials: int, seed: int,
              verify=verify_sampled_row) -> dict[int, tuple[float, int]]:
    """Runs verify_sampled_row `trials` times on drafts d_i ~ q_i (or d_i = argmax p_i, a
    deterministic proposer's guess, when q is None) and returns, per round slot i = 1..K+1, the
    p-value of "the token emitted at slot i follows p_i" and how many rounds reached slot i."""
    from exact_fit import fit_pvalue

    k = p.shape[0] - 1
    g = torch.Generator().manual_seed(seed)
    fixed = p[:k].argmax(-1)
    emitted_at: list[list[int]] = [[] for _ in range(k + 1)]
    for _ in range(trials):
        draft = fixed if q is None else torch.multinomial(q, 1, generator=g)[:, 0]
        n, emitted = verify(draft, q, p, g)
        assert len(emitted) == n + 1 and emitted[:n] == draft[:n].tolist()
        for i, tok in enumerate(emitted):
            emitted_at[i].append(tok)
    return {i + 1: (fit_pvalue(p[i].expand(len(e), -1), torch.tensor(e, dtype=torch.long), by_rank=False)[0], len(e))
            for i, e in enumerate(emitted_at)}


def _position_dependent(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharp target distributions p_1..p_{K+1} and drafter distributions q_1..q_K, all different:
    q_i = 0.75 p_i + 0.25 (something else), so whole chains are often accepted."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 2.5, -1)
    other = torch.softmax(torch.randn(k, V, generator=g) * 2.5, -1)
    return p, 0.75 * p[:k] + 0.25 * other


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled-drafts", "one-hot-drafts"])
def test_sampled_chain_emits_p_i_at_every_slot_including_the_bonus(k, deterministic):
    """Given that a round reached slot i, the token it emits there follows p_i exactly: an
    accepted draft or the residual draw for i <= K, and p_{K+1} for the bonus token after an
    all-accepted chain. 12000 rounds; each slot's fit test at level 1e-4."""
    p, q = _position_dependent(k, seed=k)
    fits = _slot_fit(p, None if deterministic else q, 12000, seed=k)
    assert fits[k + 1][1] > 1000, "too few all-accepted rounds to test the bonus token"
    for i, (pvalue, n) in fits.items():
        assert pvalue > 1e-4, f"slot {i} ({n} rounds): p-value {pvalue:.2e}"


def test_slot_fit_catches_the_verifier_bugs_it_is_for():
    """The fit above fails when the bonus after an all-accepted chain is drawn from p_K instead of
    p_{K+1}, when the residual max(p_i - q, 0) is built with q_{i+1}, or when the token after a
    rejection is drawn from p_i instead of the residual."""
    k = 3
    p, q = _position_dependent(k, seed=k)
    real_multinomial = torch.multinomial

    def bonus_from_last_draft_position(draft, draft_probs, target_probs, generator):
        shifted = target_probs.clone()
        shifted[-1] = target_probs[-2]
        return verify_sampled_row(draft, draft_probs, shifted, generator)

    def residual_with_next_q(draft, draft_probs, target_probs, generator):
        nxt = torch.cat([draft_probs[1:], draft_probs[-1:]])  # q_{i+1} (q_K for the last)
        n, emitted = verify_sampled_row(draft, draft_probs, target_probs, generator)
        if n < len(draft):
            residual = (target_probs[n] - nxt[n]).clamp_min(0)
            emitted[-1] = int(real_multinomial(residual / residual.sum(), 1, generator=generator))
        return n, emitted

    def bonus_from_p_instead_of_the_residual(draft, draft_probs, target_probs, generator):
        n, emitted = verify_sampled_row(draft, draft_probs, target_probs, generator)
        if n < len(draft):
            emitted[-1] = int(real_multinomial(target_probs[n], 1, generator=generator))
        return n, emitted

    for broken, slot in ((bonus_from_last_draft_position, k + 1), (residual_with_next_q, None),
                         (bonus_from_p_instead_of_the_residual, None)):
        fits = _slot_fit(p, q, 8000, seed=k, verify=broken)
        bad = [i for i, (pvalue, _) in fits.items() if pvalue < 1e-4]
        assert bad and (slot is None or slot in bad), (broken.__name__, fits)
