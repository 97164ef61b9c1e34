"""Weight-only quantized linear layers: weights stay 4- or 8-bit in memory, as in a GGUF file.

A quantized weight W [N, K] is integers q with one fp32 scale d and offset m per output row and
block of B inputs (B = 32, or 16 for GGUF's Q6_K):

    W[n, k] = d[n, k // B] * q[n, k] + m[n, k // B]

`QuantizedWeight` holds that form unpacked (int8 q, any GGUF type or `quantize_weight` yields it
exactly); `QuantLinear` holds it packed for the C++ kernel (`quant_gemm.cpp`), which reads each
weight byte once per step for all the step's rows:

    bits 4: 4-bit q in 0..15 (Q4_0, Q4_1, Q4_K, int4)
    bits 8: int8 q (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, int8)

with d and m packed in the smallest exact form (`scale_mode`): fp16 when every value is an fp16
value (GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and `quantize_weight`'s), m dropped when it is zero
(Q8_0, int8), else fp32 (the K-quants' d * sub-scale products). Bits per weight: Q4_1 5 (as in
the file), Q8_0 8.5 (as in the file), K-quants 6 (4-bit) or 10 / 12 (8-bit, B = 32 / 16).

The kernel quantizes each activation row to int8 per block (as llama.cpp does) and sums integer
products exactly, so a row's output does not depend on the other rows of the step: speculative
verification of k tokens gives the same logits as k plain decode steps. On CUDA, or without the
compiled extension, the layer dequantizes its weight once, keeps it (the dense model's memory)
and calls `F.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import bulk_active, bulk_linear

__all__ = ["QuantizedWeight", "QuantLinear", "QuantEmbedding", "quantize_weight", "SCHEMES"]

PANEL = 16
SCHEMES = ("int8", "int4")  # load-time quantization of float checkpoints (`quantize=`)


@dataclass
class QuantizedWeight:
    """W = d * q + m per row and block of `block` inputs. q: int8 [N, K] (0..15 when bits == 4),
    d, m: fp32 [N, K // block]."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    block: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: d * q + m (a product, then a sum, each rounded to fp32)."""
        n, k = self.q.shape
        q = self.q.float().view(n, k // self.block, self.block)
        return (q * self.d[..., None] + self.m[..., None]).view(n, k)

    def with_format(self, bits: int, block: int) -> "QuantizedWeight":
        """The same values with wider integers (4 -> 8 bits) and/or smaller blocks (32 -> 16): exact."""
        if bits < self.bits or block > self.block or self.block % block:
            raise ValueError(f"cannot hold {self.bits}-bit / block {self.block} as {bits}-bit / block {block}")
        r = self.block // block
        return QuantizedWeight(self.q, self.d.repeat_interleave(r, 1), self.m.repeat_interleave(r, 1), block, bits)

    def rows(self, index: torch.Tensor) -> "QuantizedWeight":
        return QuantizedWeight(self.q[index], self.d[index], self.m[index], self.block, self.bits)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack row blocks (e.g. q, k, v into one fused projection) in their common format."""
        bits = max(p.bits for p in parts)
        block = min(p.block for p in parts)
        parts = [p.with_format(bits, block) for p in parts]
        return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                               torch.cat([p.m for p in parts]), block, bits)


def _fp16_grid(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest fp16 value where that is finite and keeps a nonzero value nonzero."""
    h = t.half().float()
    return torch.where(torch.isfinite(h) & ((h != 0) | (t == 0)), h, t)


def quantize_weight(w: torch.Tensor, scheme: str, block: int = 32) -> QuantizedWeight:
    """Round-to-nearest quantization of a float weight [N, K] (K a multiple of `block`).

    int8: symmetric, q in -127..127, d = max|w| / 127 (like GGUF Q8_0).
    int4: asymmetric, q in 0..15, d = (max - min) / 15, m = min (like GGUF Q4_1).
    d and m are rounded to fp16 values first (as GGUF stores them), so they pack in fp16."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    n, k = w.shape
    if k % block:
        raise ValueError(f"cannot quantize a weight with {k} inputs in blocks of {block}")
    wb = w.detach().float().reshape(n, k // block, block)
    if scheme == "int8":
        d = _fp16_grid(wb.abs().amax(-1) / 127)
        q = torch.where(d[..., None] > 0, wb / d[..., None], torch.zeros_like(wb)).round().clamp(-127, 127)
        m = torch.zeros_like(d)
        bits = 8
    else:
        lo, hi = _fp16_grid(wb.amin(-1)), wb.amax(-1)
        d = _fp16_grid((hi - lo) / 15)
        q = torch.where(d[..., None] > 0, (wb - lo[..., None]) / d[..., None], torch.zeros_like(wb)).round().clamp(0, 15)
        m = lo
        bits = 4
    return QuantizedWeight(q.to(torch.int8).reshape(n, k), d.contiguous(), m.contiguous(), block, bits)


# ---- packed layout (see quant_gemm.cpp) ---------------------------------------------------------


def _qbytes(bits: int, block: int) -> int:
    return block * PANEL if bits == 8 else block * PANEL // 2


SCALE_BYTES = {0: 2 * PANEL * 4, 1: 2 * PANEL * 2, 2: PANEL * 2}  # per block: fp32 d, m / fp16 d, m / fp16 d


def _fp16_exact(t: torch.Tensor) -> bool:
    h = t.half()
    return bool(torch.isfinite(h).all()) and torch.equal(h.float(), t.float())


def scale_mode(w: QuantizedWeight) -> int:
    """How `pack` stores d and m: 2 = fp16 d and no m (m == 0), 1 = fp16 d and m, 0 = fp32 d and m;
    the smallest that holds them exactly."""
    if not _fp16_exact(w.d):
        return 0
    if not bool((w.m == 0).all()):
        return 1 if _fp16_exact(w.m) else 0
    return 2


def pack(w: QuantizedWeight) -> torch.Tensor:
    """uint8 [P * nb * (qbytes + scale bytes)]: panels of 16 rows, each its blocks in order, each
    block the integers ([B/4][16][4] int8, or [B/8][16][4] nibbles: low = k 8g+i, high = k 8g+4+i)
    then d[16], m[16] in the form `scale_mode(w)` gives (fp32; fp16; fp16 d only)."""
    n, k = w.shape
    if w.bits == 4 and w.block != 32:
        raise ValueError("4-bit weights are packed in blocks of 32")
    B, nb = w.block, k // w.block
    P = (n + PANEL - 1) // PANEL
    pad = P * PANEL - n
    q, d, m = w.q, w.d, w.m
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        d = F.pad(d, (0, 0, 0, pad))
        m = F.pad(m, (0, 0, 0, pad))
    if w.bits == 8:
        qb = q.view(P, PANEL, nb, B // 4, 4).permute(0, 2, 3, 1, 4).contiguous().view(torch.uint8)
    else:
        u = q.to(torch.uint8).view(P, PANEL, nb, B // 8, 2, 4)  # [.., g, lo/hi, i]
        nib = u[..., 0, :] | (u[..., 1, :] << 4)                  # [P, 16, nb, B/8, 4]
        qb = nib.permute(0, 2, 3, 1, 4).contiguous()
    qb = qb.reshape(P, nb, -1)
    sm = scale_mode(w)
    dm = torch.stack([d.view(P, PANEL, nb), m.view(P, PANEL, nb)], dim=2)  # [P, 16, 2, nb]
    dm = dm.permute(0, 3, 2, 1)                                           # [P, nb, 2, 16]
    if sm:
        dm = dm.half()[:, :, : 2 if sm == 1 else 1]
    dm = dm.contiguous().view(torch.uint8).reshape(P, nb, SCALE_BYTES[sm])
    return torch.cat([qb, dm], dim=2).reshape(-1).contiguous()


def packed_scale_mode(packed: torch.Tensor, n: int, k: int, bits: int, block: int) -> int:
    """The scale mode of a packed weight, from its size."""
    per_block = packed.numel() // ((n + PANEL - 1) // PANEL * (k // block)) - _qbytes(bits, block)
    modes = [sm for sm, b in SCALE_BYTES.items() if b == per_block]
    if not modes:
        raise ValueError(f"packed weight of {packed.numel()} bytes does not fit [{n}, {k}] {bits}-bit / block {block}")
    return modes[0]


def unpack_rows(packed: torch.Tensor, n: int, k: int, bits: int, block: int,
                ids: torch.Tensor | None = None) -> QuantizedWeight:
    """The rows `ids` (all rows if None) of a packed weight, unpacked (exact inverse of `pack`)."""
    B, nb = block, k // block
    P = (n + PANEL - 1) // PANEL
    qbytes = _qbytes(bits, B)
    sm = packed_scale_mode(packed, n, k, bits, block)
    blocks = packed.view(P, nb, qbytes + SCALE_BYTES[sm])
    if ids is None:
        return _unpack_all(blocks, n, k, bits, block, qbytes, sm)
    ids = ids.reshape(-1)
    p, j = ids // PANEL, ids % PANEL
    sel = blocks[p]                                               # [r, nb, bytes]
    dm = sel[..., qbytes:].contiguous().view(torch.float32 if sm == 0 else torch.float16)
    dm = dm.float().view(-1, nb, 1 if sm == 2 else 2, PANEL)
    jj = j[:, None].expand(-1, nb)
    d = dm[:, :, 0].gather(2, jj[..., None]).squeeze(2)
    m = dm[:, :, 1].gather(2, jj[..., None]).squeeze(2) if sm != 2 else torch.zeros_like(d)
    r = len(ids)
    ar = torch.arange(r, device=packed.device)
    if bits == 8:
        qb = sel[..., :qbytes].reshape(r, nb, B // 4, PANEL, 4)[ar, :, :, j]  # [r, nb, B/4, 4]
        q = qb.contiguous().view(torch.int8).reshape(r, k)
    else:
        qb = sel[..., :qbytes].reshape(r, nb, B // 8, PANEL, 4)[ar, :, :, j]  # [r, nb, B/8, 4]
        q = torch.stack([qb & 15, qb >> 4], dim=3).to(torch.int8).reshape(r, k)
    return QuantizedWeight(q, d.contiguous(), m.contiguous(), block, bits)


def _unpack_all(blocks: torch.Tensor, n: int, k: int, bits: int, block: int, qbytes: int, sm: int) -> QuantizedWeight:
    """`unpack_rows` of every row: the inverse permutations of `pack`, without per-row gathers
    (the gathers cost seconds on a 49152-row LM head)."""
    P, nb = blocks.shape[:2]
    raw = blocks[..., :qbytes]
    if bits == 8:
        q = raw.reshape(P, nb, block // 4, PANEL, 4).permute(0, 3, 1, 2, 4).contiguous().view(torch.int8)
    else:
        qb = raw.reshape(P, nb, block // 8, PANEL, 4).permute(0, 3, 1, 2, 4)   # [P, 16, nb, B/8, 4]
        q = torch.stack([qb & 15, qb >> 4], dim=4).to(torch.int8)               # [.., B/8, lo/hi, 4]
    q = q.reshape(P * PANEL, k)[:n]
    dm = blocks[..., qbytes:].contiguous().view(torch.float32 if sm == 0 else torch.float16).float()
    dm = dm.view(P, nb, 1 if sm == 2 else 2, PANEL).permute(0, 3, 2, 1)        # [P, 16, d/m, nb]
    d = dm[:, :, 0].reshape(P * PANEL, nb)[:n]
    m = dm[:, :, 1].reshape(P * PANEL, nb)[:n] if sm != 2 else torch.zeros_like(d)
    return QuantizedWeight(q.contiguous(), d.contiguous(), m.contiguous(), block, bits)


def _ext():
    from . import _ext as kernels_ext

    return kernels_ext()  # cached by kernels._ext after the first call


class QuantLinear(nn.Module):
    """y = x @ W.T + bias with W quantized (see module docstring). Inference only (no autograd)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.block = weight.bits, weight.block
        self.register_buffer("packed", pack(weight), persistent=False)
        self.scale_mode = packed_scale_mode(self.packed, self.out_features, self.in_features, self.bits, self.block)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self.is_packed = True  # like kernels.Linear after pack(): embeddings read rows (weight_rows)
        self.rows_dtype = torch.float32  # dtype of weight_rows (the model's activations)

    @classmethod
    def from_linear(cls, layer: nn.Module, scheme: str) -> "QuantLinear":
        w = layer.unpacked_weight() if hasattr(layer, "unpacked_weight") else layer.weight
        return cls(quantize_weight(w, scheme), getattr(layer, "bias", None))

    def pack(self) -> None:  # already packed (Decoder.prepare calls pack() on linear layers)
        pass

    def quantized(self, ids: torch.Tensor | None = None) -> QuantizedWeight:
        return unpack_rows(self.packed, self.out_features, self.in_features, self.bits, self.block, ids)

    def unpacked_weight(self) -> torch.Tensor:
        """The dequantized weight [out, in], fp32."""
        return self.quantized().dequantize()

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (any shape) -> [*ids.shape, in] in `rows_dtype`: a tied embedding lookup."""
        ext = _ext() if self.packed.device.type == "cpu" else None
        if ext is not None and hasattr(ext, "quant_rows"):  # the same values in one C++ call
            rows = ext.quant_rows(self.packed, ids, self.out_features, self.in_features, self.bits, self.block,
                                  self.scale_mode)
        else:
            rows = self.quantized(ids).dequantize()
        return rows.view(*ids.shape, self.in_features).to(self.rows_dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + (0 if self.bias is None else self.bias.numel() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if bulk_active() and (y := bulk_linear(self, x2, self.bias)) is not None:
            return y.view(*lead, self.out_features)
        ext = _ext() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) else None
        if ext is not None and hasattr(ext, "quant_linear"):
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            y = ext.quant_linear(x2, self.packed, self.bias, self.out_features, self.in_features, self.bits, self.block,
                                 self.scale_mode)
        else:
            y = F.linear(x2, self.dense(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*lead, self.out_features)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in `dtype`, made once and kept: the path without the quantized
        kernel (CUDA, or no C++ build) then costs a dense layer's memory and speed, instead of
        dequantizing every weight at every step (~6 s per token for the default model)."""
        key = (dtype, self.packed.device, self.packed.data_ptr())  # a moved or replaced weight: redo
        cached = getattr(self, "_dense", None)
        if cached is None or cached[0] != key:
            cached = (key, self.unpacked_weight().to(dtype))
            self._dense = cached
        return cached[1]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, block={self.block}, "
                f"scales={('fp32', 'fp16', 'fp16 d')[self.scale_mode]}")


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized (packed like QuantLinear); lookups dequantize the rows."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = QuantLinear(weight)
        # Decoder reads its device and dtype from embed.weight
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.weight_rows(ids).to(self.weight.dtype)
