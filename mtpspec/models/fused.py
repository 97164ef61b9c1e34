"""Quantized decoder blocks in one C++ call for decode and verify steps (kernels/quant_block.cpp).

A block of a 135M model decoding one token does ~2 ms of arithmetic but ~25 torch ops, whose
dispatch costs about as much again. `FusedBlock` runs the whole block (norms, the quantized qkv /
o / gate-up / down projections, q/k norms, RoPE, the cache write, batch-invariant attention, the
activation and both residuals) in one call, for steps of at most `ROW_ATTENTION_MAX_T` new tokens
per row on CPU in fp32: every decode step, verify step and draft tree. Prefills keep the per-op
path. Each row is computed on its own, so speculative verification still reproduces plain decoding
bit for bit.

`Decoder.prepare()` attaches one to every block that has the supported shape (Llama, Qwen2,
Gemma 3 and Gemma 4 blocks without per-layer inputs, KV sharing, MoE, v-norm or a layer scalar,
every projection a `QuantLinear`); other blocks keep `fused = None`.
"""

from __future__ import annotations

import torch

from ..kernels import quant
from ..kernels.quant import QuantLinear

_NONE = torch.empty(0)


def _opt(t: torch.Tensor | None) -> torch.Tensor:
    return _NONE if t is None else t.detach().float().contiguous()


def _norm_weight(norm) -> torch.Tensor:
    return _NONE if norm is None else norm.weight.detach().float().contiguous()


class FusedBlock:
    """The arguments of `quant_block` for one decoder block, gathered once."""

    def __init__(self, block) -> None:
        attn, mlp = block.attn, block.mlp
        linears = (attn.qkv, attn.o, mlp.gate_up, mlp.down)
        self.packed = [lin.packed for lin in linears]
        self.shapes = [v for lin in linears for v in (lin.out_features, lin.in_features, lin.bits, lin.block)]
        self.biases = [_opt(lin.bias) for lin in linears]
        self.norms = [_norm_weight(n) for n in (block.attn_norm, block.mlp_norm, attn.q_norm, attn.k_norm,
                                                 block.attn_out_norm, block.mlp_out_norm)]
        self.eps = block.attn_norm.eps
        self.offset = block.attn_norm.offset
        self.spec = attn.spec
        self.index = attn.index
        self.scale = attn.scale
        self.gelu = mlp.act is not torch.nn.functional.silu

    @staticmethod
    def build(block) -> "FusedBlock | None":
        """A FusedBlock for `block`, or None if its shape is not one quant_block runs."""
        attn, mlp = block.attn, block.mlp
        linears = (attn.qkv, attn.o, mlp.gate_up, mlp.down)
        if not all(isinstance(lin, QuantLinear) for lin in linears):
            return None
        if block.moe is not None or block.ple is not None or block.layer_scalar is not None:
            return None
        spec = attn.spec
        if not attn.owns_kv or spec.k_eq_v or attn.v_norm is not None or spec.head_dim % 8 or spec.head_dim > 1024:
            return None
        norms = [n for n in (block.attn_norm, block.mlp_norm, attn.q_norm, attn.k_norm, block.attn_out_norm,
                             block.mlp_out_norm) if n is not None]
        if any(n.weight is None or n.offset != block.attn_norm.offset or n.eps != block.attn_norm.eps for n in norms):
            return None
        if mlp.gate_up.out_features != 2 * mlp.intermediate or attn.scale is None:
            return None
        if block.attn_norm.weight.device.type != "cpu":
            return None
        return FusedBlock(block)

    def __call__(self, h: torch.Tensor, ctx, cache) -> torch.Tensor | None:
        """The block's output for h [B, T, hidden], or None when this step cannot run fused."""
        ext = quant._ext()  # the quantized layers' extension (tests turn both off together)
        if ext is None or not hasattr(ext, "quant_block") or h.dtype != torch.float32 or (torch.is_grad_enabled() and h.requires_grad):
            return None
        spec = self.spec
        cos, sin = ctx.rope[spec.attention_type]
        mask = ctx.mask[spec.attention_type]
        if cos.dtype != torch.float32 or (mask is not None and mask.dtype != torch.float32):
            return None
        lo, hi = ctx.key_range[spec.attention_type]
        b, t, d = h.shape
        out = ext.quant_block(h.reshape(b * t, d).contiguous(), self.packed, self.shapes, self.biases, self.norms,
                              self.eps, self.offset, cos[:, 0], sin[:, 0], cache.k[self.index], cache.v[self.index],
                              ctx.slots.contiguous(), lo, hi, _NONE if mask is None else mask, spec.n_heads,
                              spec.n_kv_heads, float(self.scale), self.gelu)
        return out.view(b, t, d)
