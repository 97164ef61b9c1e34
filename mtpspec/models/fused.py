"""A quantized target's decoder blocks in one C++ call for decode and verify steps
(kernels/quant_block.cpp).

A block of a 135M model decoding one token does ~0.3 ms of arithmetic but ~25 torch ops, whose
dispatch costs more than that. `FusedStack` runs all blocks (norms, the quantized qkv / o /
gate-up / down projections, q/k norms, RoPE, the cache writes, batch-invariant attention, the
activation and the residuals) in one call, for steps of at most `ROW_ATTENTION_MAX_T` new tokens
per row on CPU in fp32: every decode step, verify step and draft tree. Prefills keep the per-op
path. Each row is computed on its own, so speculative verification still reproduces plain decoding
bit for bit.

`Decoder.prepare()` builds one when every block has a supported shape (Llama, Qwen2 and Gemma 3
blocks: no per-layer inputs, KV sharing, MoE, v-norm or layer scalar; every projection a
`QuantLinear`); otherwise the model keeps `fused = None`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import quant
from ..kernels.quant import QuantLinear

_NONE = torch.empty(0)


def _opt(t: torch.Tensor | None) -> torch.Tensor:
    return _NONE if t is None else t.detach().float().contiguous()


def _supported(block) -> bool:
    attn, mlp = block.attn, block.mlp
    if not all(isinstance(lin, QuantLinear) for lin in (attn.qkv, attn.o, mlp.gate_up, mlp.down)):
        return False
    if block.moe is not None or block.ple is not None or block.layer_scalar is not None:
        return False
    spec = attn.spec
    if not attn.owns_kv or spec.k_eq_v or attn.v_norm is not None or spec.head_dim % 8 or spec.head_dim > 1024:
        return False
    norms = [n for n in (block.attn_norm, block.mlp_norm, attn.q_norm, attn.k_norm, block.attn_out_norm,
                         block.mlp_out_norm) if n is not None]
    first = block.attn_norm
    if any(n.weight is None or n.offset != first.offset or n.eps != first.eps for n in norms):
        return False
    return (mlp.gate_up.out_features == 2 * mlp.intermediate and attn.scale is not None
            and first.weight.device.type == "cpu")


class FusedStack:
    """The decoder blocks as one `QuantStack` (weights gathered and checked once)."""

    def __init__(self, blocks, ext) -> None:
        first = blocks[0]
        self.types = sorted({b.attn.spec.attention_type for b in blocks})
        self.layers = [b.attn.index for b in blocks]
        lin = lambda b: (b.attn.qkv, b.attn.o, b.mlp.gate_up, b.mlp.down)  # noqa: E731
        self.stack = ext.QuantStack(
            [[x.packed for x in lin(b)] for b in blocks],
            [[v for x in lin(b) for v in (x.out_features, x.in_features, x.bits, x.block, x.scale_mode)] for b in blocks],
            [[_opt(x.bias) for x in lin(b)] for b in blocks],
            [[_opt(None if n is None else n.weight) for n in (b.attn_norm, b.mlp_norm, b.attn.q_norm, b.attn.k_norm,
                                                               b.attn_out_norm, b.mlp_out_norm)] for b in blocks],
            [self.types.index(b.attn.spec.attention_type) for b in blocks],
            [b.attn.spec.n_heads for b in blocks], [b.attn.spec.n_kv_heads for b in blocks],
            first.attn.spec.head_dim, first.attn_norm.eps, first.attn_norm.offset, float(first.attn.scale),
            first.mlp.act is not F.silu)

    @staticmethod
    def build(blocks) -> "FusedStack | None":
        """A FusedStack for the blocks, or None if one of them has a shape QuantStack does not run
        (or the compiled kernels are unavailable)."""
        blocks = list(blocks)
        ext = quant._ext()
        if not blocks or ext is None or not hasattr(ext, "QuantStack") or not all(_supported(b) for b in blocks):
            return None
        if len({b.attn.spec.head_dim for b in blocks}) != 1:
            return None
        return FusedStack(blocks, ext)

    def __call__(self, h: torch.Tensor, ctx, cache) -> torch.Tensor | None:
        """All blocks applied to h [B, T, hidden], or None when this step cannot run fused."""
        if (h.dtype != torch.float32 or h.device.type != "cpu" or quant._ext() is None
                or (torch.is_grad_enabled() and h.requires_grad)):
            return None
        cos, sin, lo, hi, masks = [], [], [], [], []
        for lt in self.types:
            c, s = ctx.rope[lt]
            m = ctx.mask[lt]
            if c.dtype != torch.float32 or (m is not None and m.dtype != torch.float32):
                return None
            cos.append(c[:, 0])
            sin.append(s[:, 0])
            a, z = ctx.key_range[lt]
            lo.append(a)
            hi.append(z)
            masks.append(_NONE if m is None else m)
        b, t, d = h.shape
        out = self.stack.run(h.reshape(b * t, d).contiguous(), cos, sin, lo, hi, masks,
                             [cache.k[i] for i in self.layers], [cache.v[i] for i in self.layers],
                             ctx.slots.contiguous())
        return out.view(b, t, d)
