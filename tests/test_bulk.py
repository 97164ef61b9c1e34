"""Bulk mode (kernels.bulk_matmuls): bfloat16 GEMMs for the many-row passes that feed drafter
training, never for decoding; close to the exact kernels, switched off outside the context and on
CPUs without bfloat16, and used by the training harvest."""

from __future__ import annotations

import pytest
import torch

import mtpspec.kernels as kernels
from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import Request, decode
from mtpspec.kernels import BULK_MIN_ROWS, Linear, bulk_active, bulk_matmuls
from mtpspec.kernels.quant import QuantLinear, quantize_weight
from mtpspec.models.layers import ROW_ATTENTION_MAX_T
from mtpspec.models.quantize import quantize_model
from tiny_models import VOCAB


def _packed_linear(w: torch.Tensor) -> Linear:
    lin = Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    lin.pack()
    return lin


def _bf16_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float()


@pytest.mark.parametrize("kind", ["int8", "int4", "dense"])
def test_many_rows_use_the_bf16_gemm_and_few_rows_the_exact_kernel(kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.1
    layer = _packed_linear(w) if kind == "dense" else QuantLinear(quantize_weight(w, kind))
    dense = layer.unpacked_weight()
    many, few = torch.randn(BULK_MIN_ROWS + 3, 64, generator=g), torch.randn(BULK_MIN_ROWS - 1, 64, generator=g)
    exact_many, exact_few = layer(many), layer(few)
    with bulk_matmuls(True):
        assert bulk_active()
        got_many, got_few = layer(many), layer(few)
        assert layer(many.view(5, 7, 64)).shape == (5, 7, 96)  # leading dims kept, rows counted over them
    assert not bulk_active()
    assert torch.equal(got_few, exact_few)  # below the threshold: the decoding kernel, bit for bit
    assert torch.equal(got_many, _bf16_reference(many, dense))  # the bf16 GEMM on the dense weight
    assert (got_many - exact_many).abs().max() < 0.05 * exact_many.abs().max()
    assert torch.equal(layer(many), exact_many)  # after the context: the exact kernel again


def test_off_without_bfloat16_or_when_disabled(monkeypatch):
    layer = QuantLinear(quantize_weight(torch.randn(64, 64), "int8"))
    x = torch.randn(2 * BULK_MIN_ROWS, 64)
    want = layer(x)
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: False)
    with bulk_matmuls():
        assert not bulk_active() and torch.equal(layer(x), want)
    with bulk_matmuls(False):
        assert not bulk_active() and torch.equal(layer(x), want)
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: True)
    with bulk_matmuls():
        assert bulk_active() and not torch.equal(layer(x), want)


def test_nested_contexts_keep_the_outer_one_and_its_weights():
    layer = QuantLinear(quantize_weight(torch.randn(64, 64), "int8"))
    x = torch.randn(BULK_MIN_ROWS, 64)
    with bulk_matmuls(True):
        first = layer(x)
        with bulk_matmuls(True):
            assert bulk_active()
        assert bulk_active()  # the inner exit does not end the outer context
        layer.packed.zero_()  # the dense copy was made once for this context
        assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)


def test_autograd_inputs_bypass_bulk_mode():
    lin = _packed_linear(torch.randn(64, 64))
    x = torch.randn(BULK_MIN_ROWS, 64, requires_grad=True)
    with bulk_matmuls(True):
        y = lin(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and x.grad is not None


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decoder_runs_op_by_op_in_bulk_mode_close_to_the_exact_engine(tiny_checkpoints, scheme, monkeypatch):
    model = quantize_model(load_decoder(tiny_checkpoints["llama"][0]), scheme)
    assert model.fused is not None
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(3, VOCAB, (3, 24), generator=g)
    exact = model(toks, model.new_cache(3, 24)).logits
    monkeypatch.setattr(type(model.fused), "__call__", lambda *a: pytest.fail("fused stack used in bulk mode"))
    caches = [model.new_cache(1, 24), model.new_cache(1, 24)]
    with bulk_matmuls(True):
        bulk = model(toks, model.new_cache(3, 24)).logits
        for c in caches:
            model(toks[:1, :23], c)
        # one-row steps (decoding) fall below the threshold and give the exact kernels' result
        one_row = model(toks[:1, 23:], caches[0]).logits
    model.fused = None  # the same op-by-op step outside bulk mode, on the same prefilled cache
    assert torch.equal(one_row, model(toks[:1, 23:], caches[1]).logits)
    assert not torch.equal(bulk, exact)
    assert (bulk - exact).abs().max() < 0.05 * exact.abs().max()
    assert (bulk.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers, q/k norms
def test_bulk_mode_caches_hold_bfloat16_and_decode_close_to_the_exact_engine(tiny_checkpoints, family):
    """In bulk mode an fp32 model's caches hold bfloat16 K/V (half the bytes attention reads over
    many rows); prefill (torch's attention, the keys widened) and decode steps (the row kernel)
    both read them; outside the context caches are fp32 again."""
    model = quantize_model(load_decoder(tiny_checkpoints[family][0]), "int8")
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, VOCAB, (BULK_MIN_ROWS, ROW_ATTENTION_MAX_T + 6), generator=g)  # prefill: SDPA
    reqs = [Request(p.tolist(), 12) for p in prompt]
    exact = [r.new_ids for r in decode(model, reqs)]
    with bulk_matmuls(True):
        cache = model.new_cache(2, 8)
        assert all(k.dtype == torch.bfloat16 for k in cache.k.values())
        bulk = [r.new_ids for r in decode(model, reqs, slots=len(reqs))]
        logits = model(prompt, model.new_cache(*prompt.shape)).logits
    assert model.new_cache(2, 8).k[0].dtype == torch.float32
    ref = model(prompt, model.new_cache(*prompt.shape)).logits
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    first = [a[0] == b[0] for a, b in zip(bulk, exact)]  # after a near-tie flips, the answers part
    assert sum(first) >= 0.9 * len(first)


def test_a_cache_write_casts_to_the_cache_dtype():
    from mtpspec.cache import CacheLayout, KVCache

    cache = KVCache({0: CacheLayout(2, 8)}, 2, 6, dtype=torch.bfloat16, device="cpu")
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    cache.write(0, torch.tensor([[0, 1, 2], [0, 1, 2]]), 0, k, v)  # rows at one length: a slice write
    assert torch.equal(cache.k[0][:, :, :3], k.bfloat16()) and torch.equal(cache.v[0][:, :, :3], v.bfloat16())
    cache.write(0, torch.tensor([[3, 4, 5], [2, 3, 4]]), None, k, v)  # ragged rows: scattered
    assert torch.equal(cache.k[0][0, :, 3:6], k[0].bfloat16()) and torch.equal(cache.v[0][1, :, 2:5], v[1].bfloat16())


def test_training_shards_are_built_in_bulk_mode(tiny_with_tokenizer, monkeypatch):
    """build_shard answers and harvests inside bulk_matmuls; outside it decoding is untouched."""
    import mtpspec.train.harvest as harvest_mod
    from mtpspec.api import load
    from mtpspec.train.data import Sample

    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: True)
    seen = {}
    real_distill, real_harvest = harvest_mod.distill_recorded, harvest_mod.harvest

    def spy_distill(*a, **k):
        seen["distill"] = bulk_active()
        return real_distill(*a, **k)

    def spy_harvest(*a, **k):
        seen["harvest"] = bulk_active()
        return real_harvest(*a, **k)

    monkeypatch.setattr(harvest_mod, "distill_recorded", spy_distill)
    monkeypatch.setattr(harvest_mod, "harvest", spy_harvest)
    eng = load(str(tiny_with_tokenizer), drafter=None, quantize="int8")
    samples = [Sample(ids=[5, 6, 7, 8], loss_from=1, needs_response=True), Sample(ids=list(range(3, 40)), loss_from=1)]
    acts = harvest_mod.build_shard(eng, samples, ["full_attention"], max_new_tokens=6, max_len=64, slots=4)
    assert seen == {"distill": True, "harvest": True} and not bulk_active()
    assert len(acts) == 2 and len(acts[1]) == 37
    # the labels are the target's argmax, as the exact engine gives them on all but near-ties
    with torch.inference_mode():
        exact = eng.model(torch.tensor([samples[1].ids]), eng.model.new_cache(1, 40)).logits[0].argmax(-1)
    assert (acts[1].labels == exact).float().mean() > 0.9
    ref = decode(eng.model, [Request([5, 6, 7, 8], 6)])[0].new_ids
    assert list(acts[0].ids[4:]) == list(ref)[: len(acts[0]) - 4]
