"""Quantized targets: GGUF block types decoded exactly, the packed layout, the quantized matmul
kernel (both paths, against a reference and against dequantize-then-matmul), rows independent of
their batch, and speculative decoding on quantized targets equal to plain decoding of the same
quantized target, token for token.

Kernel tolerance: the kernel quantizes activations to int8 per block of 32 (as llama.cpp does), so
it differs from an fp32 matmul of the dequantized weight by about 0.5% (relative Frobenius norm)
on random data; the tests allow 2%. Against a reference of its own arithmetic (int8 activations,
exact integer sums, fp32 scaling) it agrees to 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.plan import DraftPlan
from mtpspec.gguf_weights import BLOCK_TYPES, decode_tensor
from mtpspec.kernels import _ext
from mtpspec.kernels.quant import QuantizedWeight, QuantLinear, pack, quantize_weight, scale_mode, unpack_rows
from mtpspec.models.quantize import check_quantize, quantize_model
from proposers_for_tests import proposer_of_kind
from tiny_models import VOCAB

FORMATS = [(4, 32), (8, 32), (8, 16)]
SCALE_MODES = [0, 1, 2]  # how d, m are packed: fp32 / fp16 / fp16 d only (kernels/quant.py scale_mode)


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Random raw GGUF data of block type `kind` for a [rows, cols] tensor, with finite fp16 scales."""
    elems, nbytes = BLOCK_TYPES[kind]
    n = rows * cols // elems
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)

    def f16(offset: int, lo: float, hi: float) -> None:
        raw[:, offset : offset + 2] = rng.uniform(lo, hi, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)

    if kind in ("Q4_0", "Q5_0", "Q8_0"):
        f16(0, -scale, scale)
    elif kind in ("Q4_1", "Q5_1"):
        f16(0, 0, scale / 4)
        f16(2, -scale, 0)
    elif kind in ("Q4_K", "Q5_K"):
        f16(0, 0, scale / 64)
        f16(2, 0, scale / 64)
    elif kind == "Q6_K":
        f16(208, 0, scale / 1024)
    return raw.reshape(rows, -1)


def random_weight(bits: int, block: int, n: int, k: int, seed: int = 0, scales: int = 0) -> QuantizedWeight:
    """scales: 0 = fp32 d and m (packed as fp32), 1 = fp16 values (packed as fp16), 2 = fp16 d, m = 0."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
    d = torch.rand(n, k // block, generator=g) * 0.02
    m = (torch.rand(n, k // block, generator=g) - 0.5) * 0.1
    if scales:
        d = d.half().float()
        m = m.half().float() if scales == 1 else torch.zeros_like(m)
    w = QuantizedWeight(q, d, m, block, bits)
    assert scale_mode(w) == scales
    return w


# ---- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_gguf_block_types_decode_exactly_as_the_gguf_package_dequantizes(kind):
    import gguf

    rows, cols = 5, 512
    raw = random_blocks(kind, rows, cols, np.random.default_rng(1))
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(rows, cols)
    w = decode_tensor(kind, raw, rows, cols)
    assert np.array_equal(w.dequantize().numpy(), ref.astype(np.float32))
    assert w.bits == (4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8)
    # and the packed layout the kernel reads holds the same values
    back = unpack_rows(pack(w), rows, cols, w.bits, w.block)
    assert torch.equal(back.dequantize(), w.dequantize())


def test_truncated_gguf_tensor_data_is_an_error():
    raw = random_blocks("Q4_1", 4, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"Q4_1 data of .* bytes does not hold a \[4, 64\] tensor"):
        decode_tensor("Q4_1", raw.reshape(-1)[:-20], 4, 64)


@pytest.mark.parametrize("kind,mode,bits_per_weight", [("Q4_0", 1, 5.0), ("Q4_1", 1, 5.0), ("Q5_0", 2, 8.5),
                                                        ("Q5_1", 1, 9.0), ("Q8_0", 2, 8.5), ("Q4_K", 0, 6.0),
                                                        ("Q6_K", 0, 12.0)])
def test_packed_scales_take_no_more_room_than_needed(kind, mode, bits_per_weight):
    rows, cols = 32, 512
    w = decode_tensor(kind, random_blocks(kind, rows, cols, np.random.default_rng(2)), rows, cols)
    assert scale_mode(w) == mode
    assert pack(w).numel() * 8 / (rows * cols) == bits_per_weight
    for scheme, want in (("int8", 2), ("int4", 1)):  # load-time quantization stores fp16 scales
        assert scale_mode(quantize_weight(torch.randn(8, 64), scheme)) == want


@pytest.mark.parametrize("bits,block", FORMATS)
@pytest.mark.parametrize("n", [1, 16, 37])
@pytest.mark.parametrize("scales", SCALE_MODES)
def test_packed_layout_round_trips_and_reads_rows(bits, block, n, scales, monkeypatch):
    import mtpspec.kernels.quant as quant

    w = random_weight(bits, block, n, 96, scales=scales)
    packed = pack(w)
    back = unpack_rows(packed, n, 96, bits, block)
    assert torch.equal(back.q, w.q) and torch.equal(back.d, w.d) and torch.equal(back.m, w.m)
    rows = unpack_rows(packed, n, 96, bits, block, torch.arange(n))  # the per-row (gather) path
    assert torch.equal(rows.q, w.q) and torch.equal(rows.d, w.d) and torch.equal(rows.m, w.m)
    ids = torch.tensor([[n - 1, 0], [n // 2, n - 1]])
    lin = QuantLinear(w)
    assert torch.equal(lin.weight_rows(ids), w.dequantize()[ids])  # C++ lookup (quant_rows)
    monkeypatch.setattr(quant, "_ext", lambda: None)
    assert torch.equal(lin.weight_rows(ids), w.dequantize()[ids])  # torch lookup


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_the_kernel_a_layer_dequantizes_its_weight_once(dtype, monkeypatch):
    """CUDA or no C++ build: F.linear on the dequantized weight, made once and kept (dequantizing
    every weight at every step made the default model ~6 s per token)."""
    import mtpspec.kernels.quant as quant

    w = random_weight(4, 32, 37, 96, scales=1)
    lin = QuantLinear(w, torch.randn(37))
    monkeypatch.setattr(quant, "_ext", lambda: None)
    calls = []
    real = QuantLinear.unpacked_weight
    monkeypatch.setattr(QuantLinear, "unpacked_weight", lambda self: calls.append(1) or real(self))
    x = torch.randn(3, 96, dtype=dtype)
    dense = w.dequantize().to(dtype)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, dense, lin.bias.to(dtype)))
    assert torch.equal(lin(x[:1]), torch.nn.functional.linear(x[:1], dense, lin.bias.to(dtype)))
    assert len(calls) == 1
    lin.packed = lin.packed.clone()  # a replaced weight is dequantized again
    lin(x)
    assert len(calls) == 2


def test_formats_widen_exactly():
    w4 = random_weight(4, 32, 20, 64)
    w8 = w4.with_format(8, 16)
    assert torch.equal(w8.dequantize(), w4.dequantize())
    both = QuantizedWeight.cat([w4, random_weight(8, 16, 3, 64, seed=1)])
    assert (both.bits, both.block) == (8, 16)
    assert torch.equal(both.dequantize()[:20], w4.dequantize())
    with pytest.raises(ValueError):
        w8.with_format(4, 32)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_load_time_quantization_error_is_small(scheme):
    w = torch.randn(64, 128)
    q = quantize_weight(w, scheme)
    err = (q.dequantize() - w).abs().max() / w.abs().max()
    assert err < (0.005 if scheme == "int8" else 0.07)


def test_unknown_quantization_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: auto, none, gguf, int8, int4"):
        check_quantize("int3")
    with pytest.raises(ValueError, match="valid: int8, int4"):
        quantize_weight(torch.randn(4, 32), "fp8")


# ---- kernel -------------------------------------------------------------------------------------


def reference_activations(x: torch.Tensor, block: int):
    """int8 per-block activation quantization, as the kernel's header defines it."""
    m, k = x.shape
    xb = x.float().view(m, k // block, block)
    dx = xb.abs().amax(-1) / 127
    safe = torch.where(dx > 0, dx, torch.ones_like(dx))
    qx = torch.where(dx[..., None] > 0, torch.round(xb / safe[..., None]), torch.zeros_like(xb)).clamp(-127, 127)
    return qx.to(torch.int8).view(m, k), dx, dx * qx.sum(-1)


def reference_quant_linear(x, w: QuantizedWeight, bias=None):
    """y = sum_b d * dx * (q . qx) + m * xs, in float64 from exact integer sums."""
    qx, dx, xs = reference_activations(x, w.block)
    m, k = x.shape
    n, nb = w.shape[0], k // w.block
    dots = torch.einsum("nbk,mbk->mnb", w.q.double().view(n, nb, w.block), qx.double().view(m, nb, w.block))
    y = (dots * w.d.double()[None] * dx.double()[:, None] + w.m.double()[None] * xs.double()[:, None]).sum(-1)
    return y if bias is None else y + bias.double()


ISAS = ["avx512vnni", "avx2", "portable"]  # best first: quant_force_isa never goes above what the CPU has


def _has_isa(ext, name: str) -> bool:
    best = ext.quant_force_isa("auto")
    return ISAS.index(best) <= ISAS.index(name)


@pytest.fixture(params=ISAS)
def isa(request):
    ext = _ext()
    if ext is None:
        pytest.skip("no compiled kernels")
    if not _has_isa(ext, request.param):
        pytest.skip(f"CPU without {request.param}")
    assert ext.quant_force_isa("auto" if request.param == "avx512vnni" else request.param) == request.param
    yield request.param
    ext.quant_force_isa("auto")


def test_activation_quantization_matches_its_definition():
    ext = _ext()
    if ext is None:
        pytest.skip("no compiled kernels")
    x = torch.randn(7, 96) * torch.logspace(-3, 2, 96)
    x[3, :32] = 0  # an all-zero block
    for block in (16, 32):
        q, d, s = ext.quant_activations(x, block)
        rq, rd, rs = reference_activations(x, block)
        assert torch.equal(q, rq) and torch.equal(d, rd)
        assert torch.allclose(s, rs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits,block", FORMATS)
@pytest.mark.parametrize("n,k", [(16, 32), (37, 96), (100, 256)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17, 70])  # 1-16: rows streamed 1-3 at a time; 70: two chunks (MC = 64)
@pytest.mark.parametrize("scales", SCALE_MODES)
def test_kernel_matches_its_reference_and_dequantized_matmul(isa, bits, block, n, k, m, scales):
    w = random_weight(bits, block, n, k, seed=n + m, scales=scales)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    y = QuantLinear(w, bias)(x)
    ref = reference_quant_linear(x, w, bias)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    dense = F.linear(x, w.dequantize(), bias)
    assert ((y - dense).norm() / dense.norm()).item() < 0.02


@pytest.mark.parametrize("bits,block", FORMATS)
@pytest.mark.parametrize("scales", SCALE_MODES)
def test_all_paths_give_identical_bits_and_rows_do_not_depend_on_their_batch(bits, block, scales):
    ext = _ext()
    if ext is None or not _has_isa(ext, "avx2"):
        pytest.skip("needs a SIMD path")
    w = random_weight(bits, block, 53, 160, scales=scales)
    lin = QuantLinear(w, torch.randn(53))
    x = torch.randn(137, 160)  # chunks of 64 + 64 + 9 rows, 4-row groups and single rows
    x[4, 32:64] = 0  # an all-zero activation block
    x[5] *= 1e3  # activations at the int8 extremes (+-127), weights at theirs (random_weight)
    y = lin(x)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(y, alone)
    for m in (2, 3, 4, 5, 7, 8, 9, 12):  # VNNI: 8 rows a pass, their sums in registers
        for start in (0, 3):
            assert torch.equal(lin(x[start : start + m]), y[start : start + m]), (m, start)
    try:
        for other in ("avx2", "portable"):
            ext.quant_force_isa(other)
            assert torch.equal(lin(x), y), other
    finally:
        ext.quant_force_isa("auto")


def test_bf16_activations():
    w = random_weight(4, 32, 40, 64)
    x = torch.randn(3, 64)
    lin = QuantLinear(w)
    y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), lin(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_fallback_without_the_extension_dequantizes(monkeypatch):
    import mtpspec.kernels.quant as quant

    w = random_weight(8, 32, 24, 64)
    x = torch.randn(2, 64)
    monkeypatch.setattr(quant, "_ext", lambda: None)
    y = QuantLinear(w)(x)
    assert torch.allclose(y, F.linear(x, w.dequantize()), rtol=1e-5, atol=1e-6)


# ---- whole models -------------------------------------------------------------------------------

NEW = 24


def _prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    out = []
    for n in [11, 5, 13, 2, 9][:batch]:
        base = torch.randint(3, VOCAB, (max(1, n // 2),), generator=g).tolist()
        out.append((base * 3)[:n])
    return out


@pytest.fixture(scope="module", params=[("llama", "int4"), ("qwen2", "int8"), ("gemma3", "int4"),
                                        ("llama-untied", "int8"), ("e2b", "int8"), ("26b-a4b", "int8")])
def quantized_target(request, tiny_checkpoints, tmp_path_factory):
    family, scheme = request.param
    if family in tiny_checkpoints:
        folder = tiny_checkpoints[family][0]
    else:  # Gemma 4: per-layer inputs and KV sharing (e2b), MoE experts (26b-a4b)
        from gemma4_configs import tiny_gemma4

        folder = tmp_path_factory.mktemp(family)
        tiny_gemma4(family, moe_intermediate_size=32).save_pretrained(folder)
    dense = load_decoder(folder)
    model = quantize_model(load_decoder(folder), scheme)
    if family == "26b-a4b":
        assert all(m.quantized is not None for m in model.modules() if hasattr(m, "quantized"))
    return dense, model, scheme, family


def test_quantized_models_are_close_to_dense_and_hold_no_dense_matrices(quantized_target, monkeypatch):
    import mtpspec.kernels.quant as quant

    dense, model, scheme, family = quantized_target
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    # no dense matrix left but the tiny PLE projections (8 inputs: not a multiple of the block of 32)
    big = [n for n, p in model.named_parameters() if p.dim() >= 2 and p.numel() > 0 and "ple.proj" not in n
           and "embed_per_layer" not in n]
    assert big == []
    ids = torch.tensor([_prompts(1)[0]])
    a = model(ids, model.new_cache(1, 32)).logits
    b = dense(ids, dense.new_cache(1, 32)).logits
    monkeypatch.setattr(quant, "_ext", lambda: None)  # the same quantized weights, fp32 activations
    c = model(ids, model.new_cache(1, 32)).logits
    # the kernel's int8 activations cost little next to the weights' own quantization (not so for
    # MoE: a small difference flips the tiny random router's top-k choices, changing everything)
    if family != "26b-a4b":
        assert ((a - c).norm() / c.norm()).item() < 0.15
    assert torch.isfinite(a).all()
    if scheme == "int8" and family in ("llama", "llama-untied", "qwen2", "gemma3"):
        assert ((a - b).norm() / b.norm()).item() < 0.05
    # (random tiny Gemma 4 models, with random layer scalars over 6-12 layers, amplify weight
    # rounding to ~10% (int8) even with fp32 activations; int4 is coarse on random weights)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kind", ["agree", "never", "partial", "ngram"])
def test_speculative_decoding_of_a_quantized_target_equals_its_plain_decoding(quantized_target, kind, batch):
    model = quantized_target[1]
    ps = _prompts(batch)
    ref = [s.new_ids for s in decode(model, [Request(p, NEW) for p in ps])]
    full = [p + r for p, r in zip(ps, ref)]
    proposer = proposer_of_kind(kind, full, VOCAB, seed=batch)
    seqs = decode(model, [Request(p, NEW) for p in ps], DraftPlan(proposer, 3))
    assert [s.new_ids for s in seqs] == ref


# ---- GGUF files ---------------------------------------------------------------------------------


def _tiny_quantized_gguf(tmp_path, kind: str, **kw):
    from test_default_model import write_tiny_gguf

    hidden = 256 if kind.endswith("_K") else 64
    return write_tiny_gguf(tmp_path / f"{kind}.gguf", hidden=hidden, ffn=2 * hidden,
                           weight_types={"*": kind, "attn_v.weight": "Q8_0"}, **kw)


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_a_gguf_loads_with_its_matrices_quantized_as_in_the_file(tmp_path, kind, caplog):
    from mtpspec.gguf_convert import cached_gguf_checkpoint

    path = _tiny_quantized_gguf(tmp_path, kind)
    folder = cached_gguf_checkpoint(path, tmp_path / "cache", progress=False)
    with caplog.at_level("INFO"):
        model = load_decoder(folder, quantize="gguf", gguf=path)
    assert "kept dense" not in caplog.text
    # 2 layers x (qkv, o, gate_up, down) + the tied LM head / embedding
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 9
    assert f" {kind}" in model.quantization
    dense = load_decoder(folder)
    ids = torch.tensor([[5, 17, 33, 2, 99, 100, 7]])
    a = model(ids, model.new_cache(1, 16)).logits
    b = dense(ids, dense.new_cache(1, 16)).logits
    # same weights; only the int8 activations differ
    assert ((a - b).norm() / b.norm()).item() < 0.03


def test_a_quantized_gguf_target_decodes_speculatively_as_plainly(tmp_path):
    import mtpspec

    path = _tiny_quantized_gguf(tmp_path, "Q4_K")
    plain_engine = mtpspec.load(path, drafter=None, cache_dir=tmp_path / "cache")
    assert plain_engine.model.quantization is not None
    spec = mtpspec.load(path, drafter="ngram", draft_tokens=3, cache_dir=tmp_path / "cache")
    ps = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12, 9, 10]]
    a = plain_engine.generate(ps, max_new_tokens=20, chat=False)
    b = spec.generate(ps, max_new_tokens=20, chat=False)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    dense = mtpspec.load(path, drafter=None, quantize="none", cache_dir=tmp_path / "cache")
    assert dense.model.quantization is None


def test_a_truncated_gguf_names_the_tensor(tmp_path):
    from mtpspec.errors import CheckpointError
    from mtpspec.gguf_convert import open_gguf

    path = _tiny_quantized_gguf(tmp_path, "Q4_1")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 3000])
    with pytest.raises(CheckpointError, match=r"truncated: tensor 'blk\.1\.\w+\.weight' ends at byte"):
        open_gguf(cut)


def test_a_gguf_whose_shapes_contradict_its_metadata_names_the_tensor(tmp_path):
    import mtpspec
    from mtpspec.errors import CheckpointError

    path = _tiny_quantized_gguf(tmp_path, "Q4_1", ffn_metadata=96)
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_\w+\.weight' has shape \[\d+, \d+\], but the "
                                              r"metadata says llama\.feed_forward_length = 96"):
        mtpspec.load(path, drafter=None, cache_dir=tmp_path / "cache")


def test_cli_quantize_option(tmp_path):
    from typer.testing import CliRunner

    from mtpspec.cli import app

    path = _tiny_quantized_gguf(tmp_path, "Q8_0")
    runner = CliRunner()
    bad = runner.invoke(app, ["generate", "hi", "-m", str(path), "--quantize", "int3", "--cache-dir", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "valid: auto, none, gguf, int8, int4" in bad.output
    bad = runner.invoke(app, ["generate", "hi", "-m", str(path), "--drafter-quantize", "int3", "--cache-dir",
                              str(tmp_path / "c")])
    assert bad.exit_code == 2 and "unknown drafter quantization 'int3'; valid: auto, none, int8, int4" in bad.output
    ok = runner.invoke(app, ["generate", "the", "-m", str(path), "--quantize", "int4", "-n", "4", "--no-drafter",
                             "--json", "--cache-dir", str(tmp_path / "c")])
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout.strip().splitlines()[0])["token_ids"]) == 4


def test_quant_bench_candidates_compute_the_same_shape():
    from mtpspec.kernels.bench_quant import candidates

    ext = _ext()
    if ext is None:
        pytest.skip("no compiled kernels")
    for name, fn in candidates(48, 64, 3, ext).items():
        assert fn().shape == (3, 48), name
