"""Packed weights on transparent huge pages (kernels/hugepages.py): the same values in one 2 MB
aligned mapping advised MADV_HUGEPAGE, shared tensors kept shared, the fused stack reading the moved
weights, and generation unchanged."""

from __future__ import annotations

import pytest
import torch

from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import Request, decode
from mtpspec.kernels import Linear, hugepages
from mtpspec.kernels.quant import QuantLinear
from mtpspec.models.quantize import quantize_model
from tiny_models import VOCAB

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def _mapping_of(ptr: int) -> dict:
    """This process's /proc/self/smaps entry holding address ptr: {field: kB}."""
    entry, hit = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            if hit:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            hit, entry = lo <= ptr < hi, {}
        elif hit and head.endswith(":") and line.split()[-1] == "kB":
            entry[head[:-1]] = int(line.split()[1])
    return entry


def test_thp_mode_and_switch(monkeypatch, tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "THP_MODE", f)
    assert hugepages.thp_mode() == "madvise"
    f.write_text("always madvise [never]\n")
    assert hugepages.thp_mode() == "never" and not hugepages.available()
    f.write_text("[always] madvise never\n")
    assert hugepages.available() == hasattr(__import__("mmap"), "MADV_HUGEPAGE")
    monkeypatch.setenv("MTPSPEC_HUGEPAGES", "0")
    assert not hugepages.available()
    monkeypatch.setattr(hugepages, "THP_MODE", tmp_path / "missing")
    monkeypatch.delenv("MTPSPEC_HUGEPAGES")
    assert hugepages.thp_mode() is None and not hugepages.available()


@needs_thp
def test_to_hugepages_copies_into_one_aligned_mapping():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randint(0, 255, (3_000_001,), dtype=torch.uint8, generator=g),
          torch.randn(577, 33, generator=g), torch.randn(5, generator=g).to(torch.bfloat16)]
    out = hugepages.to_hugepages(ts)
    for t, o in zip(ts, out):
        assert o.dtype == t.dtype and o.shape == t.shape and torch.equal(o, t) and o.data_ptr() != t.data_ptr()
        assert o.data_ptr() % hugepages.ALIGN == 0
    assert out[0].data_ptr() % hugepages.HUGE == 0
    assert out[0].data_ptr() < out[1].data_ptr() < out[2].data_ptr() < out[0].data_ptr() + 2 * hugepages.HUGE + 3_000_001
    # the kernel backed the 2 MB-aligned part with huge pages (THP defrag on madvise compacts for it)
    assert _mapping_of(out[0].data_ptr()).get("AnonHugePages", 0) >= 2048


@needs_thp
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_a_prepared_model_decodes_the_same_from_huge_pages(tiny_checkpoints, scheme, monkeypatch):
    monkeypatch.setenv("MTPSPEC_HUGEPAGES", "0")
    plain = quantize_model(load_decoder(tiny_checkpoints["llama"][0]), scheme)
    monkeypatch.setenv("MTPSPEC_HUGEPAGES", "1")
    moved = quantize_model(load_decoder(tiny_checkpoints["llama"][0]), scheme)
    packs = [m.packed for m in moved.modules() if isinstance(m, QuantLinear)]
    packs += [m._packed for m in moved.modules() if isinstance(m, Linear) and m.is_packed]
    assert packs
    lo = min(p.data_ptr() for p in packs)
    assert lo % hugepages.HUGE == 0  # all in one mapping, from its 2 MB-aligned start
    assert all(lo <= p.data_ptr() < lo + sum(q.numel() * q.element_size() + 64 for q in packs) for p in packs)
    assert moved.fused is not None  # built after the move: reads the moved weights
    assert hugepages.move_packed_weights(moved) == 0  # already moved: left in place
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 13)]
    ref = [s.new_ids for s in decode(plain, [Request(p, 16) for p in ps])]
    assert [s.new_ids for s in decode(moved, [Request(p, 16) for p in ps])] == ref
    x = torch.randn(2, 5, plain.cfg.hidden_size)
    assert torch.equal(moved.lm_head(x), plain.lm_head(x))
    # the fused decode step reads the moved tensors themselves (not copies kept from before the move)
    step = lambda: moved(torch.tensor([[5]]), cache).logits  # noqa: E731
    cache = moved.new_cache(1, 32)
    moved(torch.tensor([ps[0]]), cache)
    before = step()
    cache.lengths -= 1
    moved.layers[0].mlp.down.packed.zero_()
    assert not torch.equal(step(), before)


def test_nothing_moves_when_switched_off(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("MTPSPEC_HUGEPAGES", "0")
    model = quantize_model(load_decoder(tiny_checkpoints["llama"][0]), "int8")
    assert hugepages.move_packed_weights(model) == 0


@needs_thp
def test_shared_weights_stay_shared_and_views_keep_their_size():
    from mtpspec.kernels.quant import quantize_weight

    a = QuantLinear(quantize_weight(torch.randn(64, 64), "int8"))
    b = QuantLinear(quantize_weight(torch.randn(64, 64), "int8"))
    c = QuantLinear(quantize_weight(torch.randn(64, 64), "int8"))
    b.packed = a.packed  # tied
    c.packed = a.packed[: a.packed.numel() // 2]  # same start, another tensor
    want_a, want_c = a.packed.clone(), c.packed.clone()
    assert hugepages.move_packed_weights(torch.nn.Sequential(a, b, c)) == want_a.numel() + want_c.numel()
    assert a.packed.data_ptr() == b.packed.data_ptr() and torch.equal(a.packed, want_a)
    assert c.packed.shape == want_c.shape and torch.equal(c.packed, want_c)
