"""`harvest.top_k`: the block-maximum top-k the activation recorder stores, against torch.topk."""

import torch

from mtpspec.train.harvest import top_k


def _same_as_torch(x: torch.Tensor, k: int) -> None:
    vals, ids = top_k(x, k)
    ref_vals, ref_ids = x.topk(k, dim=-1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(ids, ref_ids)


def test_random_rows_match_torch_topk():
    g = torch.Generator().manual_seed(0)
    _same_as_torch(torch.randn(16, 4096, generator=g), 8)
    _same_as_torch(torch.randn(3, 5, 1024, generator=g), 8)  # leading dims kept
    _same_as_torch(torch.randn(2, 256, generator=g), 2)  # exactly k blocks


def test_all_of_the_top_in_one_block():
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(1))
    x[:, 300:308] = torch.arange(8.0) + 100.0  # the top 8 share one block; other blocks hold the runners-up
    x[:, 5] = 50.0
    _same_as_torch(x, 8)
    vals, ids = top_k(x, 8)
    assert ids[0].tolist() == list(range(307, 299, -1))


def test_top_values_spread_over_blocks_with_large_runner_ups():
    # each block's maximum is large but only one of its values is in the top k: the k blocks with
    # the largest maxima still hold every top value
    x = torch.full((1, 1024), -5.0)
    for b in range(8):
        x[0, b * 128 + b] = 10.0 + b
        x[0, b * 128 + 100] = 9.0  # below every block maximum of the top blocks, above the rest
    _same_as_torch(x, 8)


def test_vocabulary_not_a_multiple_of_the_block_falls_back():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    _same_as_torch(x, 8)
    _same_as_torch(torch.randn(2, 384), 8)  # fewer blocks than k
