"""Static KV cache: preallocation, per-row lengths, rollback by moving lengths, sliding windows."""

from __future__ import annotations

import pytest
import torch

from mtpspec.checkpoint import load_decoder
from mtpspec.errors import InputError
from tiny_models import VOCAB


def _ids(n, seed, batch=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["llama", "gemma3"])
def model(request, tiny_checkpoints):
    return load_decoder(tiny_checkpoints[request.param][0])


def test_cache_is_preallocated_and_never_reallocated(model):
    cache = model.new_cache(2, 40)
    ptrs = {i: (k.data_ptr(), cache.v[i].data_ptr()) for i, k in cache.k.items()}
    assert all(k.shape[2] == 40 for k in cache.k.values())
    model(_ids(10, 0, 2), cache)
    model(_ids(1, 1, 2), cache)
    assert {i: (k.data_ptr(), cache.v[i].data_ptr()) for i, k in cache.k.items()} == ptrs
    assert cache.lengths.tolist() == [11, 11]


def test_rollback_one_row_is_moving_its_length(model):
    """Row 0 writes 5 wrong tokens, rolls back, writes the right ones: equals a run that never erred.
    Crosses the sliding window (8) of the Gemma 3 model."""
    prefix, good, bad = _ids(14, 2, 2), _ids(5, 3, 2), _ids(5, 4, 2)
    ref_cache = model.new_cache(2, 40)
    model(prefix, ref_cache)
    ref = model(good, ref_cache).logits

    cache = model.new_cache(2, 40)
    model(prefix, cache)
    model(bad, cache)
    cache.rollback(torch.tensor([5, 5]))
    assert cache.lengths.tolist() == [14, 14]
    out = model(good, cache).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_ragged_rows_roll_back_independently(model):
    """Rows at different lengths (ragged acceptance): each row's logits equal that row run alone."""
    a, b = _ids(12, 5)[0], _ids(7, 6)[0]
    nxt = _ids(4, 7, 2)
    cache = model.new_cache(2, 40)
    both = torch.zeros(2, 12, dtype=torch.long)
    both[0], both[1, :7] = a, b
    model(both, cache)
    cache.set_lengths([12, 7])
    model(_ids(3, 8, 2), cache)  # a draft that gets rejected in row 0 and half-accepted in row 1
    cache.rollback(torch.tensor([3, 1]))
    kept = _ids(3, 8, 2)[1, :2]
    out = model(nxt, cache).logits

    for row, seq in ((0, a), (1, torch.cat([b, kept]))):
        c = model.new_cache(1, 40)
        model(seq[None], c)
        alone = model(nxt[row : row + 1], c).logits
        torch.testing.assert_close(out[row : row + 1], alone, atol=1e-5, rtol=0)


def test_rollback_and_capacity_errors(model):
    cache = model.new_cache(1, 8)
    model(_ids(6, 9), cache)
    with pytest.raises(ValueError):
        cache.rollback(7)
    with pytest.raises(InputError, match="capacity"):
        model(_ids(3, 10), cache)


def test_bf16_decode_steps_match_the_whole_prompt_forward(tiny_checkpoints):
    """In bf16 a one-token step attends in fp32 (faster on CPU) while a multi-token forward stays
    in bf16: both must give the same logits within bf16 precision, in ragged batches and past the
    sliding window (8) of the Gemma 3 model."""
    for family in ("llama", "gemma3"):
        model = load_decoder(tiny_checkpoints[family][0], dtype=torch.bfloat16)
        ids = _ids(20, 7, 2)
        whole = model(ids, model.new_cache(2, 24)).logits.float()
        cache = model.new_cache(2, 24)
        model(ids[:, :10], cache)
        steps = [model(ids[:, i : i + 1], cache).logits.float() for i in range(10, 20)]
        stepped = torch.cat(steps, dim=1)
        scale = whole[:, 10:].abs().max()
        assert (stepped - whole[:, 10:]).abs().max() < 0.03 * scale, family
        assert (stepped.argmax(-1) == whole[:, 10:].argmax(-1)).float().mean() > 0.9, family
