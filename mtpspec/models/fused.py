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

When the LM head is quantized too, `FusedStack.step` runs a whole
step (embedding lookup, every block, the final norm and the LM head) in that one call, the mask and
key range worked out in C++ for chains. Between steps the weight stream has flushed the CPU caches,
so every torch op and Python line of a step runs cold (~20-100 us each, against a few warm): one
call instead of ~30 ops per step saves ~0.5 ms of a ~5 ms step of the default model.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F

from ..kernels import quant
from ..kernels.quant import QuantLinear
from .layers import RopeTables

_NONE = torch.empty(0)
_LONG = torch.empty(0, dtype=torch.long)


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
        self.io = False  # attach_io: step() can run
        self.rope_tables: list[RopeTables] = []  # per attention type (attach_io)
        self._bound: tuple[int, weakref.ref] | None = None  # (token, cache) the C++ stack holds
        self._tokens = itertools.count()
        self.norm_eps, self.norm_offset = first.attn_norm.eps, first.attn_norm.offset

    def attach_io(self, model) -> bool:
        """Let `step` run whole steps of `model` (a Decoder): needs a quantized LM head without bias,
        fp32 embeddings (from the tied head, a quantized or a dense table) and a
        final norm like the blocks' norms. Returns whether it can."""
        cfg, head, norm = model.cfg, model.lm_head, model.norm
        if (not isinstance(head, QuantLinear) or head.bias is not None
                or norm.weight is None or norm.eps != self.norm_eps or norm.offset != self.norm_offset
                or cfg.per_layer_input_size):
            return False
        meta = lambda q: [q.out_features, q.in_features, q.bits, q.block, q.scale_mode]  # noqa: E731
        table = getattr(model.embed, "table", None)  # a QuantEmbedding
        if model.embed.weight.dtype != torch.float32:
            return False
        if cfg.tie_embeddings and head.is_packed:
            embed, embed_meta = head.packed, meta(head)
        elif isinstance(table, QuantLinear):
            embed, embed_meta = table.packed, meta(table)
        elif model.embed.weight.numel():
            embed, embed_meta = model.embed.weight.detach().contiguous(), []
        else:
            return False
        self.softcap = cfg.final_softcap
        specs = [next(s for s in cfg.layers if s.attention_type == t) for t in self.types]
        windows = [spec.sliding_window or 0 for spec in specs]
        self.stack.set_io(embed, embed_meta, float(cfg.embed_scale or 1.0), norm.weight.detach().float().contiguous(),
                          head.packed, meta(head), windows)
        self.rope_tables = [RopeTables(spec) for spec in specs]
        self.io = True
        return True

    def _rope(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """cos / sin tables [>= n positions, rotary dims] per attention type (rope_cos_sin's values)."""
        tables = [t.upto(n) for t in self.rope_tables]
        return [c for c, _ in tables], [s for _, s in tables]

    def _bind(self, cache) -> bool:
        """Bind the cache `cache` views (its rows 0..B-1) in the C++ stack, once per cache: handing it
        the 2 x blocks tensors at every step costs ~50 us. The binding holds the cache's tensors until
        the cache object is collected. Returns False for views of other rows (pass them instead)."""
        base = getattr(cache, "base", None) or cache
        if getattr(cache, "row0", 0) != 0:
            return False
        if self._bound is not None and self._bound[1]() is base:
            return True
        token = next(self._tokens)
        self.stack.bind_cache([base.k[i] for i in self.layers], [base.v[i] for i in self.layers])
        self._bound = (token, weakref.ref(base))
        weakref.finalize(base, self._unbind, token)
        return True

    def _unbind(self, token: int) -> None:
        if self._bound is not None and self._bound[0] == token:
            self.stack.bind_cache([], [])
            self._bound = None

    def step(self, tokens: torch.Tensor, cache, logits_at: torch.Tensor | None = None, tree=None,
             ctx=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(logits [B, T', V], final hidden [B, T, hidden], argmax of the logits [B, T'] or None
        with a final softcap) of a whole step of tokens [B, T] (logits
        at logits_at [B, n] or every position), writing the K/V to `cache` and advancing its lengths
        by T, or None when this step cannot run here. A tree step passes its `StepContext`
        (ctx: the tree's masks and key ranges)."""
        if not self.io or tokens.device.type != "cpu" or cache.k[self.layers[0]].dtype != torch.float32:
            return None
        b, t = tokens.shape
        cos, sin = self._rope(cache.capacity)
        if tree is None:
            depth, lo, hi, masks = _LONG, [], [], []
        else:
            depth = tree.depth.contiguous()
            lo = [ctx.key_range[lt][0] for lt in self.types]
            hi = [ctx.key_range[lt][1] for lt in self.types]
            masks = [_NONE if ctx.mask[lt] is None else ctx.mask[lt] for lt in self.types]
            if any(m.numel() and m.dtype != torch.float32 for m in masks):
                return None
        rows = _LONG
        if logits_at is not None:
            rows = (logits_at + torch.arange(b)[:, None] * t).reshape(-1)
        k, v = ([], []) if self._bind(cache) else ([cache.k[i] for i in self.layers], [cache.v[i] for i in self.layers])
        logits, hidden, best = self.stack.step(tokens.contiguous(), cache.lengths, depth, cos, sin, lo, hi, masks, k,
                                               v, rows)
        n = t if logits_at is None else logits_at.shape[1]
        if self.softcap is not None:  # as Decoder.logits; rounding may tie capped logits: no argmax
            logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits.view(b, n, -1), hidden.view(b, t, -1), None
        return logits.view(b, n, -1), hidden.view(b, t, -1), best.view(b, n)

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
