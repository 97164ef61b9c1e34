"""Building blocks of the decoder: RMSNorm, RoPE, attention over the static cache, gated MLP.

Each block takes its switches from `LayerSpec` / `ModelConfig` (see config.py). Computation order
and dtypes follow the Hugging Face reference implementations, so fp32 outputs match them to
rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from .. import kernels
from ..kernels import Linear, attend_rows
from .config import LayerSpec, ModelConfig
from .moe import MoEStats


class RMSNorm(nn.Module):
    """RMS normalisation in fp32. `offset=1` gives Gemma's x * (1 + w); `scale=False` has no weight."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        # fp32 through the C++ kernel too (not bitwise torch's): set by MTPDrafter.prepare(), whose
        # ~10 norms per drafting step are a tenth of its cost; targets keep torch's exact fp32 norm
        self.fp32_kernel = False
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # runs 2-4 times per layer: bf16 on CPU takes one C++ pass; otherwise F.rms_norm computes
        # x * rsqrt(mean(x^2) + eps) * w in one op instead of five (fp32 stays token-identical to
        # transformers, see tests/test_equivalence.py)
        fused = kernels.rms_norm(x, self.weight, self.eps, self.offset, fp32=self.fp32_kernel)
        if fused is not None:
            return fused
        fp32 = x.dtype == torch.float32
        xf = x if fp32 else x.float()
        w = self.weight
        if w is not None:
            w = w if w.dtype == torch.float32 else w.float()
            if self.offset:
                w = w + self.offset
        y = F.rms_norm(xf, (xf.shape[-1],), w, self.eps)
        return y if fp32 else y.to(x.dtype)


def rope_cos_sin(spec: LayerSpec, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [batch, 1, T, rotary_dim] for the given positions [batch, T]."""
    inv_freq = spec.inv_freq.to(positions.device)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return (emb.cos() * spec.rope_scale).to(dtype), (emb.sin() * spec.rope_scale).to(dtype)


class RopeTables:
    """`rope_cos_sin`'s cos / sin of one layer spec at positions 0..n-1, [n, rotary_dim], computed in
    `dtype` and held as contiguous fp32, made once and grown by doubling: a step then takes its rows
    with one index op instead of recomputing them (models/fused.py, the drafter's context)."""

    def __init__(self, spec: LayerSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.spec, self.dtype, self.device = spec, dtype, device
        self.size = 0
        self.cos = self.sin = None

    def upto(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables, covering at least positions 0..n-1."""
        if self.size < n:
            self.size = max(256, n, 2 * self.size)
            pos = torch.arange(self.size, device=self.device)[None]
            self.cos, self.sin = (t[0, 0].float().contiguous() for t in rope_cos_sin(self.spec, pos, self.dtype))
        return self.cos, self.sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [batch, heads, T, head_dim] (rotate-half convention)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class StepContext:
    """Everything a forward over T new tokens per row shares across layers.

    positions: [batch, T] absolute (RoPE) positions of the new tokens.
    slots: [batch, T] the cache slots their K/V go to: equal to positions, except for a draft tree
        whose nodes share positions (node i of a tree goes to slot cache.lengths + i).
    start: the common first slot when all rows are aligned (fast contiguous cache writes),
        else None (per-row scatter).
    rope: per attention type, cos/sin tables.
    key_range / mask: per attention type, the slice [lo, hi) of cache positions attention reads and
        the boolean visibility mask [batch, 1, T, hi - lo] (None when every key is visible).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    start: int | None
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    key_range: dict[str, tuple[int, int]]
    mask: dict[str, torch.Tensor | None]
    moe_stats: "MoEStats | None" = None  # filled by MoE layers when the caller asks for it


def visibility(positions: torch.Tensor, lo: int, hi: int, window: int | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Key j in [lo, hi) is visible from a query at position p iff j <= p and (no window or j > p - window).
    Returns None when every key is visible, else an additive mask [B, 1, T, hi - lo] (0 / -inf) in
    `dtype`, built once per forward (a boolean mask would be converted again in every layer)."""
    keys = torch.arange(lo, hi, device=positions.device)
    p = positions[:, :, None]
    visible = keys <= p
    if window is not None:
        visible &= keys > p - window
    if bool(visible.all()):
        return None
    return torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill_(~visible, float("-inf"))[:, None]


def tree_visibility(tree: "TreeMask", lengths: torch.Tensor, lo: int, hi: int, window: int | None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive mask [B, 1, T, hi - lo] of a forward over tree nodes: node i of row b (position
    p = lengths[b] + depth[b, i], slot lengths[b] + i) sees the row's cached keys j < lengths[b]
    (and, with a window, j > p - window) and the slots of its ancestors and itself."""
    b, t = tree.depth.shape
    keys = torch.arange(lo, hi, device=lengths.device)
    p = (lengths[:, None] + tree.depth)[:, :, None]  # [B, T, 1]
    cached = (keys < lengths[:, None, None]).expand(b, t, -1)
    if window is not None:
        cached = cached & (keys > p - window)
    node = keys - lengths[:, None, None]  # key slot -> node index (valid in 0..T-1)
    in_tree = (node >= 0) & (node < t)
    idx = node.clamp(0, t - 1).expand(b, t, -1)
    anc = tree.visible.gather(2, idx) & in_tree
    if window is not None:
        anc = anc & (tree.depth.gather(1, idx.reshape(b, -1)).view(b, t, -1) > tree.depth[:, :, None] - window)
    visible = cached | anc
    return torch.zeros(visible.shape, dtype=dtype, device=lengths.device).masked_fill_(~visible, float("-inf"))[:, None]


@dataclass
class TreeMask:
    """A draft tree for a target forward (see decoding/tree.py). depth: [B, T] (root 0); visible: [B, T, T]
    bool, visible[b, i, j] iff node j is node i or one of its ancestors."""

    depth: torch.Tensor
    visible: torch.Tensor

    @staticmethod
    def from_parents(parents: torch.Tensor) -> "TreeMask":
        """parents: [B, N] (decoding/tree.py); the mask covers the root and the N nodes."""
        b, n = parents.shape
        depth, visible = [], []
        for row in parents.tolist():  # small (tens of nodes): Python lists, one tensor per field
            d, anc = [0], [[0]]  # anc[i]: node i and its ancestors
            for j, p in enumerate(row):  # parents precede children, so one pass suffices
                d.append(d[p] + 1)
                anc.append(anc[p] + [j + 1])
            mask = [[False] * (n + 1) for _ in range(n + 1)]
            for i, a in enumerate(anc):
                for j in a:
                    mask[i][j] = True
            depth.append(d)
            visible.append(mask)
        dev = parents.device
        return TreeMask(torch.tensor(depth, dtype=torch.long, device=dev).view(b, n + 1),
                        torch.tensor(visible, dtype=torch.bool, device=dev).view(b, n + 1, n + 1))


# Steps of up to this many new tokens per row (decode, verify, draft trees) attend with
# kernels.attend_rows, whose result for a query does not depend on the step's other queries or rows
# (speculative verification then reproduces plain decoding bit for bit); prefills use torch's SDPA.
ROW_ATTENTION_MAX_T = 64


class Attention(nn.Module):
    """Multi-head / grouped-query attention that writes its K/V into the static cache and reads it back.

    A KV-shared layer (spec.kv_source != its own index) projects only queries and reads the cache of
    its source layer.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, index: int) -> None:
        super().__init__()
        self.spec = spec
        self.index = index
        self.owns_kv = spec.kv_source == index
        self.scale = cfg.attn_scale
        hd = spec.head_dim
        n_kv_proj = 0 if not self.owns_kv else (1 if spec.k_eq_v else 2) * spec.n_kv_heads
        self.q_size = spec.n_heads * hd
        self.kv_size = spec.n_kv_heads * hd
        self.qkv = Linear(cfg.hidden_size, self.q_size + n_kv_proj * hd, bias=cfg.qkv_bias)
        self.o = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm and self.owns_kv else None
        self.v_norm = RMSNorm(hd, cfg.norm_eps, scale=False) if cfg.v_norm and self.owns_kv else None

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        spec, hd = self.spec, self.spec.head_dim
        qkv = self.qkv(x)
        cos, sin = ctx.rope[spec.attention_type]
        if self.owns_kv and self.q_norm is None and not spec.k_eq_v:
            # Llama-style: rotate queries and keys together (they are adjacent in qkv), one op set
            qk = qkv[..., : self.q_size + self.kv_size].view(b, t, spec.n_heads + spec.n_kv_heads, hd)
            qk = apply_rope(qk.transpose(1, 2), cos, sin)
            q, k = qk[:, : spec.n_heads], qk[:, spec.n_heads :]
            v = qkv[..., self.q_size + self.kv_size :].view(b, t, spec.n_kv_heads, hd)
            if self.v_norm is not None:
                v = self.v_norm(v)
            cache.write(self.index, ctx.slots, ctx.start, k, v.transpose(1, 2))
            return self._attend(q, ctx, cache, b, t)
        q = qkv[..., : self.q_size].view(b, t, spec.n_heads, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        if self.owns_kv:
            k = qkv[..., self.q_size : self.q_size + self.kv_size].view(b, t, spec.n_kv_heads, hd)
            v = k if spec.k_eq_v else qkv[..., self.q_size + self.kv_size :].view(b, t, spec.n_kv_heads, hd)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.v_norm is not None:
                v = self.v_norm(v)
            k = apply_rope(k.transpose(1, 2), cos, sin)
            cache.write(self.index, ctx.slots, ctx.start, k, v.transpose(1, 2))
        return self._attend(q, ctx, cache, b, t)

    def _attend(self, q: torch.Tensor, ctx: StepContext, cache: KVCache, b: int, t: int) -> torch.Tensor:
        """Attention of q [b, heads, t, hd] over the cached keys/values of this layer's K/V source."""
        spec = self.spec
        lo, hi = ctx.key_range[spec.attention_type]
        keys = cache.k[spec.kv_source][:, :, lo:hi]
        values = cache.v[spec.kv_source][:, :, lo:hi]
        mask = ctx.mask[spec.attention_type]
        dtype = q.dtype
        if t <= ROW_ATTENTION_MAX_T:
            out = attend_rows(q, keys, values, mask, self.scale)
            if out is not None:
                return self.o(out.transpose(1, 2).reshape(b, t, self.q_size))
        if keys.dtype != dtype:  # a bfloat16 cache under an fp32 model (Decoder.new_cache, bulk mode)
            keys, values = keys.to(dtype), values.to(dtype)
        low_precision_step = t == 1 and dtype != torch.float32 and q.device.type == "cpu"
        if low_precision_step:
            # torch's CPU attention for one bf16/fp16 query is 2x (100 keys) to 4.5x (1000 keys)
            # slower than casting to fp32 and back (torch 2.13, measured): decode steps take fp32
            q, keys, values = q.float(), keys.float(), values.float()
            mask = mask.float() if mask is not None else None
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=spec.n_heads != spec.n_kv_heads,
        )
        if low_precision_step:
            out = out.to(dtype)
        return self.o(out.transpose(1, 2).reshape(b, t, self.q_size))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, cfg: ModelConfig, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = Linear(cfg.hidden_size, 2 * intermediate, bias=cfg.mlp_bias)
        self.down = Linear(intermediate, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = F.silu if cfg.activation == "silu" else (lambda h: F.gelu(h, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(self.act(gate) * up)


class PerLayerInput(nn.Module):
    """Gemma 4 per-layer input (PLE) residual of one block:
    h + norm(proj(act(gate(h)) * per_layer_input)), with per_layer_input [B, T, P] from the decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        p = cfg.per_layer_input_size
        self.gate = Linear(cfg.hidden_size, p, bias=False)
        self.proj = Linear(p, cfg.hidden_size, bias=False)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
        self.act = F.silu if cfg.activation == "silu" else (lambda h: F.gelu(h, approximate="tanh"))

    def forward(self, h: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        return h + self.norm(self.proj(self.act(self.gate(h)) * per_layer_input))
