"""The accept/reject functions on hand-built cases."""

from __future__ import annotations

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
