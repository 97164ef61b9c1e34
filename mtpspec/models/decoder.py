"""One decoder for every supported family, driven by `ModelConfig` / `LayerSpec` data.

    tokens [B, T] --embed (* embed_scale)--> h          [+ per-layer inputs p_i, Gemma 4 PLE]
    for each layer i:
        h = h + [out_norm](attn([attn_norm](h)))      (K/V land in the static cache, unless the
                                                       layer reads another layer's: KV sharing)
        m = mlp([mlp_norm](h))
        [MoE: m = dense_out_norm(m) + moe(h)]         (router and experts see h itself)
        h = h + [out_norm](m)
        [PLE: h = h + ple_norm(ple_proj(act(ple_gate(h)) * p_i))]
        [h = h * layer_scalar]
    hidden = final_norm(h);  logits = [softcap](lm_head(hidden))

Optional parts are present only when the config asks for them; the block is the same for every
family.

A forward consumes T new tokens per row at positions cache.lengths[b] + t, writes their K/V into
the cache, advances the lengths by T, and returns the logits and the final (normed) hidden states
of the new positions. Rolling back is the caller's business: `cache.rollback(n)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..cache import CacheLayout, KVCache
from ..kernels import Linear, bulk_active, hugepages
from .config import ModelConfig
from .fused import FusedStack
from .layers import (MLP, ROW_ATTENTION_MAX_T, Attention, PerLayerInput, RMSNorm, StepContext, TreeMask, rope_cos_sin,
                     tree_visibility, visibility)
from .moe import MoE, MoEStats


@dataclass
class ForwardOutput:
    """logits: [B, T', vocab] (T' = T, or the number of positions asked for); hidden: [B, T, hidden];
    argmax: the logits' argmax [B, T'] when the step computed it anyway (whole C++ steps), else None."""

    logits: torch.Tensor
    hidden: torch.Tensor
    argmax: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        spec = cfg.layers[index]
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(cfg, spec, index)
        self.attn_out_norm = norm() if cfg.sandwich_norm else None
        self.mlp_norm = norm()
        self.mlp = MLP(cfg, spec.intermediate_size)
        self.mlp_out_norm = norm() if cfg.sandwich_norm else None
        self.index = index
        self.moe = None
        if spec.moe is not None:
            self.dense_out_norm = norm()
            self.moe = MoE(cfg.hidden_size, spec.moe, cfg.norm_eps, norm, self.mlp.act)
        self.ple = PerLayerInput(cfg) if cfg.per_layer_input_size else None
        self.layer_scalar = nn.Parameter(torch.ones(1)) if cfg.layer_scalar else None

    def forward(
        self, h: torch.Tensor, ctx: StepContext, cache: KVCache, per_layer_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        a = self.attn(self.attn_norm(h), ctx, cache)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        h = h + a
        m = self.mlp(self.mlp_norm(h))
        if self.moe is not None:
            experts_out, used = self.moe(h)
            m = self.dense_out_norm(m) + experts_out
            if ctx.moe_stats is not None:
                ctx.moe_stats.experts_touched[self.index] = used
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        h = h + m
        if self.ple is not None:
            h = self.ple(h, per_layer_input)
        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h


class Decoder(nn.Module):
    """A causal LM over the static KV cache. Build with `Decoder(cfg)`, load weights, then `prepare()`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.quantization: str | None = None  # what checkpoint.load_decoder quantized (None: dense)
        self.fused: FusedStack | None = None  # set by prepare() / fuse_blocks() for quantized blocks
        # hidden [..., H] -> (logits [..., V], argmax [...]) in place of the LM head while set: the
        # trainer's approximate head for answering training prompts (train/shortlist.py)
        self.head_shortlist = None
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        if cfg.per_layer_input_size:  # Gemma 4 PLE: packed table + projection of the embeddings
            width = cfg.n_layers * cfg.per_layer_input_size
            self.embed_per_layer = nn.Embedding(cfg.per_layer_vocab_size, width)
            self.per_layer_proj = Linear(cfg.hidden_size, width, bias=False)
            self.per_layer_proj_norm = RMSNorm(cfg.per_layer_input_size, cfg.norm_eps, cfg.norm_offset)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ---- set-up ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def prepare(self) -> "Decoder":
        """Call once after weights are loaded and moved: lets the linear kernels pack their weights
        and quantized blocks run fused (models/fused.py)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack()
        self.fuse_blocks()
        if self.cfg.tie_embeddings and self.lm_head.is_packed:
            # tied: the packed LM head is the only copy; embeddings read its rows
            self.embed.weight = nn.Parameter(self.embed.weight.new_empty(0), requires_grad=False)
        return self.eval().requires_grad_(False)

    def fuse_blocks(self) -> None:
        """Let quantized blocks of a supported shape run decode / verify steps in one C++ call
        (models/fused.py); call again after swapping layers. Packed weights move to huge pages
        first (kernels/hugepages.py): the fused stack keeps raw pointers to them."""
        hugepages.move_packed_weights(self)
        self.fused = FusedStack.build(self.layers)
        if self.fused is not None:
            self.fused.attach_io(self)

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """A cache in the model's dtype; in `kernels.bulk_matmuls` mode an fp32 model's CPU cache
        holds bfloat16 K/V instead: attention over many rows' caches is bound by reading them
        (the answers that feed drafter training, see `bulk_matmuls`)."""
        layouts = {
            i: CacheLayout(self.cfg.layers[i].n_kv_heads, self.cfg.layers[i].head_dim)
            for i in self.cfg.cache_layers()
        }
        dtype = self.dtype
        if bulk_active() and dtype == torch.float32 and self.device.type == "cpu":
            dtype = torch.bfloat16
        return KVCache(layouts, batch_size, capacity, dtype=dtype, device=self.device)

    def drafter_kv(self, cache: KVCache, attention_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached K/V an MTP drafter attends to for `attention_type`: those of the last layer of
        that type owning its K/V ([batch, kv_heads, capacity, head_dim]; valid up to cache.lengths).
        Works with and without KV sharing (31B / 26B-A4B have none)."""
        layer = self.cfg.last_cache_layer(attention_type)
        if layer is None:
            raise ValueError(f"the model has no {attention_type} layer")
        return cache.k[layer], cache.v[layer]

    # ---- forward -----------------------------------------------------------------------------
    def step_context(self, cache: KVCache, t: int, tree: TreeMask | None = None) -> StepContext:
        slots = cache.positions(t)
        positions = slots if tree is None else cache.lengths[:, None] + tree.depth
        first = cache.lengths
        start = int(first[0]) if bool((first == first[0]).all()) else None
        hi = int(slots[:, -1].max()) + 1
        rope, key_range, mask = {}, {}, {}
        for lt in {s.attention_type for s in self.cfg.layers}:
            spec = next(s for s in self.cfg.layers if s.attention_type == lt)
            rope[lt] = rope_cos_sin(spec, positions, self.dtype)
            window = spec.sliding_window
            lo = max(0, int(positions[:, 0].min()) - window + 1) if window else 0
            key_range[lt] = (lo, hi)
            if tree is None:
                mask[lt] = visibility(positions, lo, hi, window, self.dtype)
            else:
                mask[lt] = tree_visibility(tree, first, lo, hi, window, self.dtype)
        return StepContext(positions, slots, start, rope, key_range, mask)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings, times the family's embedding scale (Gemma: sqrt(hidden))."""
        if self.cfg.tie_embeddings and self.lm_head.is_packed:
            h = self.lm_head.weight_rows(tokens)
        else:
            h = self.embed(tokens)
        if self.cfg.embed_scale is not None:
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        return h

    def per_layer_inputs(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Gemma 4 PLE inputs [B, T, n_layers, P]: (norm(proj(embeds) / sqrt(hidden)) + table[token]
        * sqrt(P)) / sqrt(2), in transformers' order of operations."""
        cfg = self.cfg
        shape = (*tokens.shape, cfg.n_layers, cfg.per_layer_input_size)
        table = self.embed_per_layer(tokens) * torch.tensor(cfg.per_layer_input_size**0.5, dtype=h.dtype)
        proj = self.per_layer_proj(h) * cfg.hidden_size**-0.5
        proj = self.per_layer_proj_norm(proj.reshape(shape))
        return (proj + table.reshape(shape)) * 2.0**-0.5

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (+ final softcap) on final hidden states."""
        logits = self.lm_head(hidden)
        cap = self.cfg.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        logits_at: torch.Tensor | None = None,
        moe_stats: MoEStats | None = None,
        tree: TreeMask | None = None,
    ) -> ForwardOutput:
        """Run T new tokens per row ([B, T]) through the model, appending their K/V to the cache.

        logits_at: optional [B, n] indices into the T new positions; logits are computed only
        there (a prefill needs just each row's last prompt position). Default: every position.
        moe_stats: optional `MoEStats`; MoE layers record how many distinct experts the B*T tokens
        of this forward were routed to (every token counts, padding included).
        tree: the T tokens are a draft tree's nodes (decoding/tree.py): node i goes to cache slot
        cache.lengths + i but sits at position cache.lengths + tree.depth[:, i] and attends to the
        row's cache and its own ancestors. The caller keeps the accepted path with `cache.compact`.
        """
        b, t = tokens.shape
        cache.check_room(t)
        whole = (self.fused is not None and self.fused.io and moe_stats is None and t <= ROW_ATTENTION_MAX_T
                 and not bulk_active() and self.head_shortlist is None)
        if whole and tree is None:  # the whole step in one C++ call (models/fused.py)
            if (out := self.fused.step(tokens, cache, logits_at)) is not None:
                return ForwardOutput(*out)
        ctx = self.step_context(cache, t, tree)
        if whole and tree is not None and (out := self.fused.step(tokens, cache, logits_at, tree, ctx)) is not None:
            return ForwardOutput(*out)
        if moe_stats is not None:
            ctx.moe_stats = moe_stats
            moe_stats.tokens = b * t
        h = self.embed_tokens(tokens)
        ple = self.per_layer_inputs(tokens, h) if self.cfg.per_layer_input_size else None
        fused = (self.fused(h, ctx, cache) if self.fused is not None and t <= ROW_ATTENTION_MAX_T
                 and not bulk_active() else None)
        if fused is not None:
            h = fused
        else:
            for i, layer in enumerate(self.layers):
                h = layer(h, ctx, cache, ple[:, :, i] if ple is not None else None)
        hidden = self.norm(h)
        cache.advance(t)
        picked = hidden
        if logits_at is not None:
            picked = hidden.gather(1, logits_at[..., None].expand(-1, -1, hidden.shape[-1]))
        if self.head_shortlist is not None:
            logits, best = self.head_shortlist(picked)
            return ForwardOutput(logits, hidden, best)
        return ForwardOutput(self.logits(picked), hidden)
