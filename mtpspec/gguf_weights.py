"""Quantized GGUF tensors read as they are in the file: each block type decoded to integers q with
per-block scales d and offsets m (`QuantizedWeight`, W = d * q + m), exactly, without dequantizing.

Types and how they map (block = inputs sharing one d, m):

    Q4_0  d * (q - 8)          -> 4-bit q, m = -8 d           block 32
    Q4_1  d * q + m            -> 4-bit q                     block 32
    Q4_K  d*sc * q - dmin*mn   -> 4-bit q, 8 sub-blocks       block 32
    Q8_0  d * q                -> int8 q, m = 0               block 32
    Q5_0  d * (q - 16)         -> int8 q - 16, m = 0          block 32
    Q5_1  d * q + m            -> int8 q                      block 32
    Q5_K  d*sc * q - dmin*mn   -> int8 q                      block 32
    Q6_K  d*sc * (q - 32)      -> int8 q - 32, m = 0          block 16

fp16 scales times the K-quants' 6/8-bit sub-scales are exact in fp32, and every d * q + m above
rounds once, as the `gguf` package's reference dequantization does, so `QuantizedWeight.dequantize`
equals `gguf.quants.dequantize` bit for bit (tests/test_quantized.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels.quant import QuantizedWeight

# type name -> (elements per block, bytes per block)
BLOCK_TYPES = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
SUPPORTED_TYPES = tuple(BLOCK_TYPES)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32] bit i of it, as uint8."""
    bits = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """blocks [n, bytes] -> (q [n, elems] int8, d [n, subs] f32, m [n, subs] f32, block)."""
    n = blocks.shape[0]
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks[:, 0:2])
        if kind == "Q4_0":
            q, m = _nibbles_32(blocks[:, 2:18]), -8 * d
        else:
            q, m = _nibbles_32(blocks[:, 4:20]), _f16(blocks[:, 2:4])
        return q.astype(np.int8), d, m, 32
    if kind == "Q8_0":
        d = _f16(blocks[:, 0:2])
        return np.ascontiguousarray(blocks[:, 2:34]).view(np.int8), d, np.zeros_like(d), 32
    if kind in ("Q5_0", "Q5_1"):
        d = _f16(blocks[:, 0:2])
        off = 2 if kind == "Q5_0" else 4
        q = _nibbles_32(blocks[:, off + 4 : off + 20]) | (_high_bits_32(blocks[:, off : off + 4]) << 4)
        if kind == "Q5_0":
            return (q.astype(np.int16) - 16).astype(np.int8), d, np.zeros_like(d), 32
        return q.astype(np.int8), d, _f16(blocks[:, 2:4]), 32
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales(blocks[:, 4:16])
        qs = blocks[:, 16:144] if kind == "Q4_K" else blocks[:, 48:176]
        # 4 chunks of 32 bytes: low nibbles -> sub-block 2c, high nibbles -> 2c + 1
        ql = np.stack([qs.reshape(n, 4, 32) & 0x0F, qs.reshape(n, 4, 32) >> 4], axis=2).reshape(n, 8, 32)
        if kind == "Q5_K":
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            ql = ql | ((qh & 1) << 4)
        return ql.reshape(n, 256).astype(np.int8), d * sc, -(dmin * mn), 32
    if kind == "Q6_K":
        ql, qh = blocks[:, 0:128], blocks[:, 128:192]
        scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210]) * scales
        low = np.stack([ql.reshape(n, 2, 64) & 0x0F, ql.reshape(n, 2, 64) >> 4], axis=2).reshape(n, 2, 4, 32)
        high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (low | (high << 4)).astype(np.int16) - 32
        return q.reshape(n, 256).astype(np.int8), d, np.zeros_like(d), 16
    raise ValueError(f"unsupported GGUF block type {kind}")


def decode_tensor(kind: str, data: np.ndarray, rows: int, cols: int) -> QuantizedWeight:
    """A GGUF tensor of block type `kind` (raw bytes, [rows, row_bytes] or flat) as [rows, cols]."""
    elems, nbytes = BLOCK_TYPES[kind]
    if cols % elems or data.size != rows * cols // elems * nbytes:
        raise ValueError(f"{kind} data of {data.size} bytes does not hold a [{rows}, {cols}] tensor")
    q, d, m, block = _decode(kind, np.ascontiguousarray(data).reshape(-1, nbytes))
    return QuantizedWeight(
        torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32).reshape(rows, cols // block)),
        torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32).reshape(rows, cols // block)),
        block,
        4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8,
    )
