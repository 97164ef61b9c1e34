"""Quantized blocks in one C++ call (models/fused.py, kernels/quant_block.cpp): the same block as
the per-op path to rounding, used for every decode / verify step of the supported families, and
still lossless (speculative == plain) through sliding windows, batches and draft trees. That a
fused verify step reproduces decode steps bit for bit is tested in test_row_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.plan import DraftPlan
from mtpspec.kernels import _ext
from mtpspec.models.fused import FusedStack
from mtpspec.models.quantize import quantize_model
from proposers_for_tests import proposer_of_kind
from tiny_models import VOCAB


@pytest.fixture(scope="module")
def ext():
    e = _ext()
    if e is None or not hasattr(e, "QuantStack"):
        pytest.skip("no compiled kernels")
    return e


def _model(tiny_checkpoints, family, scheme):
    return quantize_model(load_decoder(tiny_checkpoints[family][0]), scheme)


def _unfused(model):
    model.fused = None


def _steps(model, prompt, new):
    """Logits of a prefill, a 4-token verify-like step and 3 one-token steps on one cache."""
    cache = model.new_cache(prompt.shape[0], 64)
    out = [model(prompt, cache).logits, model(new[:, :4], cache).logits]
    out += [model(new[:, i : i + 1], cache).logits for i in range(4, 7)]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_fused_blocks_compute_the_per_op_block(ext, tiny_checkpoints, family, scheme, monkeypatch):
    model = _model(tiny_checkpoints, family, scheme)
    assert isinstance(model.fused, FusedStack) and model.fused.io
    calls = []
    real_call, real_step = FusedStack.__call__, FusedStack.step
    monkeypatch.setattr(FusedStack, "__call__", lambda self, *a: calls.append(real_call(self, *a)) or calls[-1])
    monkeypatch.setattr(FusedStack, "step", lambda self, *a, **k: calls.append(real_step(self, *a, **k)) or calls[-1])
    g = torch.Generator().manual_seed(2)
    # 13 + 7 positions cross gemma3's sliding window of 8; rows differ only in content
    prompt, new = torch.randint(3, VOCAB, (3, 13), generator=g), torch.randint(3, VOCAB, (3, 7), generator=g)
    fused, c1 = _steps(model, prompt, new)
    assert len(calls) == 5 and all(c is not None for c in calls)  # every step ran fused
    _unfused(model)
    ref, c2 = _steps(model, prompt, new)
    # the block differs from the per-op one only in its norms' and RoPE's rounding, which int8
    # activation rounding can turn into one quantization step of an activation now and then
    assert ((fused - ref).norm() / ref.norm()).item() < 5e-3
    assert (fused.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.95
    for layer in c1.k:  # the K/V written into the cache (RoPE'd keys at the right slots)
        for a, b in ((c1.k[layer], c2.k[layer]), (c1.v[layer], c2.v[layer])):
            assert ((a - b).norm() / b.norm()).item() < 5e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_whole_steps_equal_block_steps(ext, tiny_checkpoints, family):
    """FusedStack.step (embedding, blocks, final norm and head in one call; RoPE from tables, the
    causal / sliding-window mask worked out in C++) against the blocks alone (FusedStack.__call__)
    with torch's embedding, RoPE, mask, final norm and head: the same K/V bit for bit (so the same
    embeddings, positions, RoPE and masks), the same logits up to the final norm's rounding. Rows
    of different lengths (a ragged batch) cross gemma3's sliding window of 8."""
    model = _model(tiny_checkpoints, family, "int4")
    g = torch.Generator().manual_seed(3)
    prompt, new = torch.randint(3, VOCAB, (3, 13), generator=g), torch.randint(3, VOCAB, (3, 7), generator=g)

    def run(io):
        model.fused.io = io
        cache = model.new_cache(3, 64)
        out = [model(prompt, cache).logits]
        cache.rollback(torch.tensor([0, 4, 9]))  # ragged rows: lengths 13, 9, 4
        out += [model(new[:, :4], cache).logits]
        out += [model(new[:, i : i + 1], cache).logits for i in range(4, 7)]
        return torch.cat(out, dim=1), cache

    try:
        whole, c1 = run(True)
        blocks, c2 = run(False)
    finally:
        model.fused.io = True
    cache = model.new_cache(3, 64)
    out = model(prompt, cache)
    if model.cfg.final_softcap is None:  # the step's own argmax is torch's (first largest logit)
        assert torch.equal(out.argmax, out.logits.argmax(-1))
    else:  # capped logits can tie after rounding: the loop takes torch's argmax of them
        assert out.argmax is None
    assert torch.equal(c1.lengths, c2.lengths)
    for layer in c1.k:
        assert torch.equal(c1.k[layer], c2.k[layer]) and torch.equal(c1.v[layer], c2.v[layer])
    assert ((whole - blocks).norm() / blocks.norm()).item() < 2e-3
    assert (whole.argmax(-1) == blocks.argmax(-1)).float().mean().item() > 0.95


def test_whole_steps_bind_each_cache_once_and_release_it(ext, tiny_checkpoints):
    """The C++ stack keeps the cache it last ran on (rows 0..B-1 views included) and lets it go
    when the cache is collected; alternating caches and views of other rows give what each cache
    alone gives."""
    import gc

    model = _model(tiny_checkpoints, "llama", "int8")
    fs = model.fused
    g = torch.Generator().manual_seed(5)
    toks = torch.randint(3, VOCAB, (2, 6), generator=g)

    def alone(rows):
        cache = model.new_cache(len(rows), 32)
        return torch.cat([model(toks[rows, i : i + 1], cache).logits for i in range(6)], dim=1)

    ref_both, ref_second = alone([0, 1]), alone([1])
    a, b, c = model.new_cache(2, 32), model.new_cache(2, 32), model.new_cache(2, 32)
    outs_a, outs_b, outs_view = [], [], []
    for i in range(6):  # a, b, then row 1 of c (a view not starting at row 0: not bound)
        outs_a.append(model(toks[:, i : i + 1], a).logits)
        outs_b.append(model(toks[:, i : i + 1], b).logits)
        outs_view.append(model(toks[1:, i : i + 1], c.rows(1, 2)).logits)
        assert c.rows(1, 2) is c.rows(1, 2)  # views are kept
    assert torch.equal(torch.cat(outs_a, dim=1), ref_both)
    assert torch.equal(torch.cat(outs_b, dim=1), ref_both)
    assert torch.equal(torch.cat(outs_view, dim=1), ref_second)
    assert fs._bound is not None and fs._bound[1]() is b
    del b
    gc.collect()
    assert fs._bound is None  # released with its cache
    c = model.new_cache(1, 32)
    first = model(toks[:1, :1], c.rows(0, 1)).logits
    assert fs._bound[1]() is c and torch.equal(first, ref_both[:1, :1])


def test_the_portable_kernels_give_the_same_bits(ext, tiny_checkpoints):
    model = _model(tiny_checkpoints, "qwen2", "int4")
    g = torch.Generator().manual_seed(7)
    prompt, new = torch.randint(3, VOCAB, (2, 9), generator=g), torch.randint(3, VOCAB, (2, 7), generator=g)
    a, _ = _steps(model, prompt, new)
    ext.quant_force_isa("portable")
    ext.attend_force_portable(True)
    try:
        b, _ = _steps(model, prompt, new)
    finally:
        ext.quant_force_isa("auto")
        ext.attend_force_portable(False)
    assert torch.equal(a, b)


def _prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [(torch.randint(3, VOCAB, (n // 2 + 1,), generator=g).tolist() * 3)[:n] for n in [14, 5, 12, 3][:batch]]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["agree", "never", "partial"])
def test_speculative_decoding_through_fused_blocks_equals_plain(ext, tiny_checkpoints, family, batch, kind):
    from test_tree import ReferenceTreeProposer

    model = _model(tiny_checkpoints, family, "int4")
    ps = _prompts(batch)
    ref = [s.new_ids for s in decode(model, [Request(p, 20) for p in ps])]
    full = [p + r for p, r in zip(ps, ref)]
    chains = decode(model, [Request(p, 20) for p in ps], DraftPlan(proposer_of_kind(kind, full, VOCAB, seed=batch), 3))
    assert [s.new_ids for s in chains] == ref
    corrupt = {"agree": 0.0, "never": 1.0, "partial": 0.4}[kind]
    trees = decode(model, [Request(p, 20) for p in ps], DraftPlan(ReferenceTreeProposer(full, corrupt, seed=batch), 3))
    assert [s.new_ids for s in trees] == ref


def test_unsupported_blocks_keep_the_per_op_path(tiny_checkpoints):
    dense = load_decoder(tiny_checkpoints["llama"][0])
    assert dense.fused is None  # dense weights: no quantized block


@pytest.mark.parametrize("gelu", [False, True])
def test_the_blocks_mlp_activation_is_silu_or_gelu_tanh_in_every_path(ext, gelu):
    # gu = [g | u]: g over the range activations take (and beyond: exp underflows past -87)
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.randn(999) * 3, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    u = torch.randn(g.numel())
    gu = torch.cat([g, u])[None]
    out = ext.glu_rows(gu, gelu)
    ref = (F.gelu(g.double(), approximate="tanh") if gelu else F.silu(g.double())) * u.double()
    assert torch.allclose(out[0].double(), ref, rtol=2e-6, atol=1e-5)  # fp32 exp: ~1e-7 relative; gelu loses its relative precision where 1 + tanh cancels (as in fp32 torch)
    ext.attend_force_portable(True)  # the vectorized exp and its portable form give the same bits
    try:
        assert torch.equal(ext.glu_rows(gu, gelu), out)
    finally:
        ext.attend_force_portable(False)


@pytest.mark.parametrize("n", [1, 7, 8, 64, 576, 583])
def test_the_blocks_rms_norm_sums_squares_in_a_fixed_order_in_every_path(ext, n):
    """fp64 sum of squares (lane i % 8, then a fixed tree) and fp32 scaling: close to the fp64
    reference, and the vectorized and portable paths give the same bits, also for n not a multiple of 8."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    w = torch.randn(n, generator=g)
    out = ext.rms_norm_rows(x, w, 1e-6, 1.0)
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.double() + 1.0)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6)
    ext.attend_force_portable(True)
    try:
        assert torch.equal(ext.rms_norm_rows(x, w, 1e-6, 1.0), out)
    finally:
        ext.attend_force_portable(False)


def test_the_steps_argmax_is_torchs_in_every_path(ext):
    """The first largest value, the first NaN if any (torch.argmax), ties and +-0 included, at lengths
    around the vector widths."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in [1, 5, 15, 16, 17, 31, 49152, 49157]:
        base = torch.randn(n, generator=g)
        rows.append(base)
        tie = base.clone()
        tie[torch.randint(n, (3,), generator=g)] = base.max() + 1  # the first of equal maxima
        rows.append(tie)
        rows.append(torch.zeros(n))
        signed = torch.zeros(n)
        signed[: n // 2] = -0.0
        rows.append(signed)
        for at in {0, n // 3, n - 1}:
            nan = base.clone()
            nan[at] = float("nan")
            nan[-1] = float("nan")
            rows.append(nan)
        inf = base.clone()
        inf[n // 2] = float("inf")
        rows.append(inf)
        rows.append(torch.full((n,), -float("inf")))
    for r in rows:
        want = int(torch.argmax(r))
        assert int(ext.argmax_rows(r[None].contiguous())[0]) == want
        ext.attend_force_portable(True)
        try:
            assert int(ext.argmax_rows(r[None].contiguous())[0]) == want
        finally:
            ext.attend_force_portable(False)
