"""Decode/verify attention (kernels/attention.cpp) gives each query the same bits whatever the
step's other queries, rows and padding are, so speculative verification reproduces plain decoding
bit for bit (a near-tie cannot flip between them), dense or quantized."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtpspec.checkpoint import load_decoder
from mtpspec.kernels import _ext, attend_rows
from mtpspec.models.layers import visibility
from mtpspec.models.quantize import quantize_model


def _inputs(b=3, h=4, kvh=2, t=5, length=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, kvh, length, d, generator=g)
    v = torch.randn(b, kvh, length, d, generator=g)
    return q, k, v


@pytest.fixture
def ext():
    e = _ext()
    if e is None:
        pytest.skip("no compiled kernels")
    return e


@pytest.mark.parametrize("window", [None, 7])
def test_matches_torch_attention(ext, window):
    q, k, v = _inputs()
    positions = torch.tensor([[30, 31, 32, 33, 34], [10, 11, 12, 13, 14], [35, 36, 37, 38, 39]])
    mask = visibility(positions, 0, 40, window)
    out = attend_rows(q, k, v, mask, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
def test_a_query_gets_the_same_bits_alone_and_in_a_padded_batch(ext, window):
    """The kernel skips the masked keys at either end of a query's row (a shorter row's padding, a
    sliding window's start): the visible keys alone, without a mask, give the same bits."""
    q, k, v = _inputs()
    positions = torch.tensor([[30, 31, 32, 33, 34], [10, 11, 12, 13, 14], [35, 36, 37, 38, 39]])
    full = attend_rows(q, k, v, visibility(positions, 0, 40, window), 0.25)
    # row 1, query 2 (position 12) alone, with only the keys it sees: the same bits
    first = 0 if window is None else 12 - window + 1
    alone = attend_rows(q[1:2, :, 2:3], k[1:2, :, first:13], v[1:2, :, first:13], None, 0.25)
    assert torch.equal(alone, full[1:2, :, 2:3])


# head dims under 64, 64 + 8, 2 x 64; windows of 9 keys, and 300 / 298 keys without a window (the
# vectorised scale, mask, max and fp64 sums over many 8-key blocks and a ragged tail)
@pytest.mark.parametrize("d,length,window", [(16, 40, 9), (72, 43, 9), (128, 21, 9), (64, 300, None), (64, 298, None)])
def test_portable_path_gives_the_same_bits(ext, d, length, window):
    q, k, v = _inputs(seed=3, d=d, length=length)
    q = q * 3  # peaked softmaxes: weights spanning many orders of magnitude
    mask = visibility(torch.arange(length - 5, length).expand(3, 5), 0, length, window)
    a = attend_rows(q, k, v, mask, 0.3)
    a2 = attend_rows(q, k, v, None, 0.3)  # no mask: every key visible to every query
    ext.attend_force_portable(True)
    try:
        b = attend_rows(q, k, v, mask, 0.3)
        b2 = attend_rows(q, k, v, None, 0.3)
    finally:
        ext.attend_force_portable(False)
    assert torch.equal(a, b) and torch.equal(a2, b2)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(a, ref, atol=1e-5, rtol=1e-5)


# bfloat16 K/V (bulk mode's caches, Decoder.new_cache): each element widens exactly to fp32, so the
# result is the fp32 kernel's on the same values, in both paths; head dims 16 (one 8-lane step at a
# time), 72 (the values' 64-wide block and a tail) and 128
@pytest.mark.parametrize("d,length,window", [(16, 40, 9), (72, 43, None), (128, 300, None)])
def test_bf16_keys_and_values_read_as_their_fp32_values(ext, d, length, window):
    q, k, v = _inputs(seed=5, d=d, length=length)
    kb, vb = k.bfloat16(), v.bfloat16()
    mask = visibility(torch.arange(length - 5, length).expand(3, 5), 0, length, window)
    want = attend_rows(q, kb.float(), vb.float(), mask, 0.3)
    assert torch.equal(attend_rows(q, kb, vb, mask, 0.3), want)
    ext.attend_force_portable(True)
    try:
        assert torch.equal(attend_rows(q, kb, vb, mask, 0.3), want)
    finally:
        ext.attend_force_portable(False)
    assert attend_rows(q, kb, v, mask, 0.3) is None  # mixed K/V dtypes: the caller's torch path


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("scheme", [None, "int4"])
def test_a_verify_step_reproduces_decode_steps_bit_for_bit(tiny_checkpoints, family, scheme):
    model = load_decoder(tiny_checkpoints[family][0])
    if scheme:  # quantized blocks run fused (models/fused.py): one C++ call per step
        model = quantize_model(model, scheme)
        assert model.fused is not None
    g = torch.Generator().manual_seed(1)
    prompt, new = torch.randint(3, 300, (4, 9), generator=g), torch.randint(3, 300, (4, 5), generator=g)
    c1 = model.new_cache(4, 32)
    model(prompt, c1)
    verify = model(new, c1).logits
    c2 = model.new_cache(4, 32)
    model(prompt, c2)
    steps = torch.cat([model(new[:, i : i + 1], c2).logits for i in range(5)], dim=1)
    assert torch.equal(verify, steps)
    c3 = model.new_cache(1, 32)
    model(prompt[2:3], c3)
    assert torch.equal(model(new[2:3], c3).logits, verify[2:3])
