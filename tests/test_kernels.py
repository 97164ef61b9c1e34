"""Correctness of mtpspec.kernels.Linear (packed C++ path and torch path) vs F.linear."""

import io

import pytest
import torch
import torch.nn.functional as F

import mtpspec.kernels as K
from mtpspec.kernels import Linear, kernel_info

MS = [1, 2, 3, 5, 8, 16, 17, 64]
SHAPES = [(576, 192), (577, 33), (64, 1536)]  # (in, out); odd K and N exercise padding
DTYPES = [torch.float32, torch.bfloat16]


def _close(y, x, layer_w, bias, dtype):
    """Compare with an fp64 reference; tolerance relative to the output scale."""
    ref = F.linear(x.double(), layer_w.double(), None if bias is None else bias.double())
    scale = ref.abs().max().item() + 1e-12
    err = (y.double() - ref).abs().max().item() / scale
    # fp32: fp32 accumulation (spec: ~1e-5 relative). bf16: output rounding (2^-8) dominates.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch_err = (F.linear(x, layer_w, bias).double() - ref).abs().max().item() / scale
    assert err <= max(tol, 2 * torch_err), (err, torch_err)


def _make(i, o, bias, dtype, seed=0):
    torch.manual_seed(seed)
    layer = Linear(i, o, bias=bias, dtype=dtype)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    return layer


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def test_kernel_info_reports_path():
    info = kernel_info()
    assert info["path"] in ("cpp", "torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("M", MS)
def test_matches_f_linear(M, shape, bias, dtype):
    i, o = shape
    layer = _make(i, o, bias, dtype)
    w = layer.weight.detach().clone()
    x = torch.randn(M, i, dtype=dtype)
    before = layer(x)
    layer.pack()
    if kernel_info()["path"] == "cpp":
        assert layer.is_packed and layer.weight.numel() == 0
    y = layer(x)
    assert y.shape == (M, o) and y.dtype == dtype
    _close(y, x, w, layer.bias, dtype)
    _close(before, x, w, layer.bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_and_noncontiguous_input(dtype):
    layer = _make(577, 33, True, dtype)
    w = layer.weight.detach().clone()
    layer.pack()
    x = torch.randn(2, 3, 577, dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 3, 33)
    _close(y.reshape(-1, 33), x.reshape(-1, 577), w, layer.bias, dtype)
    xt = torch.randn(3, 2, 577, dtype=dtype).transpose(0, 1)  # [B, T, in], non-contiguous
    _close(layer(xt).reshape(-1, 33), xt.reshape(-1, 577), w, layer.bias, dtype)
    xs = torch.randn(4, 1200, dtype=dtype)[:, ::2][:, :577]  # strided inner dim
    _close(layer(xs), xs, w, layer.bias, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip_after_pack(dtype):
    a = _make(577, 33, True, dtype, seed=1)
    ref_sd = {k: v.clone() for k, v in a.state_dict().items()}
    a.pack()
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias"}
    assert sd["weight"].shape == (33, 577)
    assert torch.equal(sd["weight"], ref_sd["weight"]) and torch.equal(sd["bias"], ref_sd["bias"])
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    # Load into a fresh module, and into an already-packed module with different weights.
    b = _make(577, 33, True, dtype, seed=2).pack()
    b.load_state_dict(torch.load(buf))
    assert b.is_packed == a.is_packed
    assert torch.equal(b.unpacked_weight(), ref_sd["weight"])
    x = torch.randn(5, 577, dtype=dtype)
    assert torch.equal(a(x), b(x))
    c = torch.nn.Linear(577, 33, dtype=dtype)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.weight, ref_sd["weight"])


def test_load_from_nn_linear_and_weight_assignment():
    ref = torch.nn.Linear(576, 192)
    layer = Linear(576, 192)
    layer.load_state_dict(ref.state_dict())
    layer.pack()
    x = torch.randn(5, 576)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    # Assigning .weight.data after pack() re-packs on the next forward.
    new_w = torch.randn(192, 576)
    layer.weight.data = new_w.clone()
    torch.testing.assert_close(layer(x), F.linear(x, new_w, ref.bias), rtol=1e-5, atol=1e-4)
    assert torch.equal(layer.unpacked_weight(), new_w)


def test_weight_rows_and_to_dtype():
    layer = _make(577, 33, False, torch.float32).pack()
    w = layer.unpacked_weight().clone()
    ids = torch.tensor([[0, 32], [17, 5]])
    many = torch.randint(0, 33, (3, 50))  # > 64 ids: the element-gather path
    assert torch.equal(layer.weight_rows(ids), w[ids])
    assert torch.equal(layer.weight_rows(many), w[many])
    with pytest.raises(RuntimeError, match="row id 33 out of range"):  # 33 is in the last panel's padding
        layer.weight_rows(torch.tensor([5, 33]))
    layer.to(torch.bfloat16)  # re-packs in the bf16 layout
    assert torch.equal(layer.unpacked_weight(), w.to(torch.bfloat16))
    assert torch.equal(layer.weight_rows(ids), w.to(torch.bfloat16)[ids])
    assert torch.equal(layer.weight_rows(many), w.to(torch.bfloat16)[many])
    x = torch.randn(3, 577, dtype=torch.bfloat16)
    _close(layer(x), x, w.to(torch.bfloat16), None, torch.bfloat16)


def test_unsupported_dtype_falls_back():
    layer = Linear(64, 48, dtype=torch.float64).pack()
    assert not layer.is_packed
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_forced_torch_path(monkeypatch):
    monkeypatch.setenv("MTPSPEC_KERNELS", "torch")
    assert kernel_info()["path"] == "torch"
    layer = _make(577, 33, True, torch.float32).pack()
    assert not layer.is_packed  # torch path keeps the standard layout
    x = torch.randn(5, 577)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    monkeypatch.delenv("MTPSPEC_KERNELS")
    if K._ext() is not None:
        ref = layer(x)
        layer.pack()
        assert layer.is_packed
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_grad_mode_input_requiring_grad_uses_autograd_path():
    with torch.inference_mode(False), torch.enable_grad():
        layer = _make(64, 48, True, torch.float32).pack()
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(x.grad, layer.unpacked_weight().sum(0).expand(2, 64))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lower_isa_kernels(isa, dtype):
    """The AVX2 (and AVX-512 without BF16) fallback kernels, forced on this CPU."""
    ext = K._ext()
    if ext is None:
        pytest.skip("C++ kernel not available")
    try:
        ext.force_isa(isa)
        for i, o in [(577, 33), (576, 192)]:
            layer = _make(i, o, True, dtype).pack()
            w = layer.unpacked_weight()
            for M in (1, 5, 7, 16, 17):
                x = torch.randn(M, i, dtype=dtype)
                _close(layer(x), x, w, layer.bias, dtype)
    finally:
        ext.force_isa("auto")


@pytest.mark.parametrize("isa", ["auto", "avx512", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_result_does_not_depend_on_row_count(isa, dtype):
    """Lossless verification needs it: a row computed alongside 1..40 others (a verify step, a
    batch, a prefill chunk) is bit-identical to the same row computed alone (a decode step), on
    every instruction-set path; odd K exercises the k tail; cancelling inputs make any change in a
    row's summation order visible."""
    ext = K._ext()
    if ext is None:
        pytest.skip("C++ kernel not available")
    try:
        ext.force_isa(isa)
        for i, o in [(577, 40), (1536, 48), (1536, 1024)]:
            for wide in (False, True):
                layer = _make(i, o, True, dtype)
                rows = torch.randn(41, i, dtype=dtype)
                if wide:  # each row adds +2^27 and -2^27 (two of inputs 0..7, weights 1 there): the
                    # small terms survive or vanish depending on when the two meet, so any change in
                    # a row's summation order shows, even after rounding the outputs to bf16
                    with torch.no_grad():
                        layer.weight[:, :8] = 1.0
                    g = torch.Generator().manual_seed(1)
                    for m in range(41):
                        a, b = torch.randperm(8, generator=g)[:2].tolist()
                        rows[m, :8] = 0.0
                        rows[m, a], rows[m, b] = 2.0**27, -(2.0**27)
                layer.pack()
                alone = torch.cat([layer(rows[m : m + 1]) for m in range(41)])
                for M in [*range(2, 18), 24, 33, 41]:
                    assert torch.equal(layer(rows[:M]), alone[:M]), (i, M, wide)
    finally:
        ext.force_isa("auto")


@pytest.mark.parametrize("weighted,offset", [(True, 0.0), (True, 1.0), (False, 0.0)])
def test_bf16_rms_norm_matches_torch(weighted, offset):
    if K._ext() is None:
        pytest.skip("no compiled kernels")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 577, generator=g) * 3).bfloat16()  # odd width: the scalar tail
    w = torch.randn(577, generator=g) if weighted else None
    got = K.rms_norm(x, w, 1e-6, offset)
    xf = x.float()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    if weighted:
        ref = ref * (w + offset)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    torch.testing.assert_close(got.float(), ref.bfloat16().float(), atol=0, rtol=2 ** -7)  # within 1 bf16 ulp
    assert K.rms_norm(x.float(), w, 1e-6, offset) is None  # fp32 stays with torch (bitwise = the reference)


def test_fp32_rms_norm_on_request_matches_torch():
    """Drafters run their fp32 norms through the kernel (fp32=True); close to torch, not bitwise."""
    if K._ext() is None:
        pytest.skip("no compiled kernels")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 577, generator=g) * 3
    w = torch.randn(577, generator=g)
    got = K.rms_norm(x, w, 1e-6, 0.0, fp32=True)
    torch.testing.assert_close(got, F.rms_norm(x, (577,), w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,per_cluster", [(576, 128), (61, 13)])  # odd sizes: the scalar tails
def test_cluster_scores_match_per_cluster_products(dtype, hidden, per_cluster):
    if K._ext() is None:
        pytest.skip("no compiled kernels")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(20, per_cluster, hidden, generator=g).to(dtype)
    s = torch.randn(3, hidden, generator=g).to(dtype)
    top = torch.randint(0, 20, (3, 5), generator=g)
    got = K.cluster_scores(w, s, top)
    ref = torch.stack([torch.cat([w[c].double() @ s[b].double() for c in top[b]]) for b in range(3)])
    assert got.dtype == dtype and got.shape == (3, 5 * per_cluster)
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=1e-4 if dtype == torch.float32 else 2 ** -7)
    with pytest.raises(RuntimeError, match="out of range"):
        K.cluster_scores(w, s, torch.full((3, 1), 20))
    assert K.cluster_scores(w, s.to(torch.float64 if dtype == torch.float32 else torch.float32), top) is None
