"""Typed model configuration: one `ModelConfig` per checkpoint, with a `LayerSpec` per layer.

Every family we run (Llama / SmolLM2 / Qwen2, Gemma 3, Gemma 4) is the same decoder block with
per-model and per-layer switches. Those switches live here as data, parsed from a Hugging Face
`config.json`; `models/decoder.py` reads them and never branches on the family name.

Parsing goes through transformers' own config classes (`AutoConfig`), so defaults, legacy field
names and RoPE standardisation are exactly the reference's; we then translate to our types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import CheckpointError

AttentionType = Literal["full_attention", "sliding_attention"]


@dataclass(frozen=True)
class MoESpec:
    """A sparse mixture-of-experts block run beside the dense MLP (Gemma 4 26B-A4B)."""

    n_experts: int
    top_k: int
    intermediate_size: int  # per expert


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is: its attention shape, RoPE, window, K/V source and MLP width."""

    attention_type: AttentionType
    n_heads: int
    n_kv_heads: int
    head_dim: int
    sliding_window: int | None  # number of visible positions including the current one
    inv_freq: torch.Tensor = field(repr=False, compare=False)  # RoPE inverse frequencies (fp32)
    rope_scale: float  # post-processing factor on cos/sin (1.0 except for some scaled RoPEs)
    kv_source: int  # the layer whose cached K/V this layer attends to (itself unless KV-shared)
    k_eq_v: bool  # values are the (un-rotated) keys: Gemma 4 `attention_k_eq_v` on full layers
    intermediate_size: int
    moe: MoESpec | None = None  # experts summed with the dense MLP's output (Gemma 4 MoE)


@dataclass(frozen=True)
class ModelConfig:
    """Per-model switches of the shared decoder, plus the per-layer specs."""

    family: str  # informational only ("llama", "qwen2", "gemma3", ...); never branched on
    model_type: str
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    norm_eps: float
    norm_offset: float  # RMSNorm weight offset: 0 (Llama: x*w) or 1 (Gemma: x*(1+w))
    sandwich_norm: bool  # Gemma: extra norms after attention and around the MLP
    qk_norm: bool  # RMS-norm on each query/key head (Gemma 3/4)
    v_norm: bool  # scale-free RMS-norm on each value head (Gemma 4)
    attn_scale: float  # multiplier on q.k
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    activation: Literal["silu", "gelu_tanh"]
    embed_scale: float | None  # Gemma multiplies embeddings by sqrt(hidden), in the weight dtype
    final_softcap: float | None  # logits = cap * tanh(logits / cap)
    tie_embeddings: bool
    max_position: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    # Gemma 4 per-layer inputs (PLE): a packed [per_layer_vocab, n_layers * per_layer_input_size]
    # table, a projection of the embeddings, and a gated residual per layer. 0 = none.
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    layer_scalar: bool = False  # Gemma 4: each block's output is multiplied by a learned scalar

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def last_cache_layer(self, attention_type: AttentionType) -> int | None:
        """The last layer of `attention_type` that owns its K/V (what an MTP drafter attends to)."""
        owners = [i for i, s in enumerate(self.layers) if s.attention_type == attention_type and s.kv_source == i]
        return owners[-1] if owners else None

    def is_kv_shared(self, layer: int) -> bool:
        return self.layers[layer].kv_source != layer

    def cache_layers(self) -> list[int]:
        """Layers that own K/V in the cache (KV-shared layers own nothing)."""
        return [i for i, s in enumerate(self.layers) if s.kv_source == i]


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma3_text", "gemma3", "gemma4_text", "gemma4")
MULTIMODAL_WRAPPERS = ("gemma3", "gemma4")  # configs whose `text_config` is the model we run


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(hf_config: Any, layer_type: str | None, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor, computed by transformers' own RoPE functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = hf_config.rope_parameters
    if layer_type is not None and isinstance(params, dict) and layer_type in params:
        params_for_layer = params[layer_type]
    else:
        params_for_layer = params
        layer_type = None
    rope_type = params_for_layer.get("rope_type", "default")
    if rope_type == "default":
        base = params_for_layer["rope_theta"]
        dim = int(head_dim * params_for_layer.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(f"config.json: unsupported rope_type {rope_type!r}")
    if rope_type == "dynamic":
        raise CheckpointError("config.json: dynamic RoPE scaling is not supported (it depends on sequence length)")
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(factor)


def from_hf_config(hf_config: Any) -> ModelConfig:
    """Translate a transformers config object into our `ModelConfig` (raises CheckpointError)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in MULTIMODAL_WRAPPERS:  # multimodal wrapper: run its text part
        hf_config = hf_config.text_config
        model_type = hf_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type == "gemma4_text":
        return _gemma4_from_hf(hf_config)
    c = hf_config
    n_layers = c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    gemma = model_type.startswith("gemma")
    layer_types = list(getattr(c, "layer_types", None) or ["full_attention"] * n_layers)
    if len(layer_types) != n_layers:
        raise CheckpointError(f"config.json: layer_types has {len(layer_types)} entries for {n_layers} layers")
    window = getattr(c, "sliding_window", None)
    if not gemma and not getattr(c, "use_sliding_window", True):
        window = None
    layers = []
    rope_by_type: dict[str, tuple[torch.Tensor, float]] = {}
    for i, lt in enumerate(layer_types):
        if lt not in ("full_attention", "sliding_attention"):
            raise CheckpointError(f"config.json: layer_types[{i}] = {lt!r} is not supported")
        if lt not in rope_by_type:
            rope_by_type[lt] = _rope(c, lt if gemma else None, head_dim)
        inv_freq, factor = rope_by_type[lt]
        sliding = lt == "sliding_attention"
        if sliding and not window:
            raise CheckpointError(f"config.json: layer {i} is sliding_attention but sliding_window is not set")
        layers.append(
            LayerSpec(
                attention_type=lt,
                n_heads=c.num_attention_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                sliding_window=window if sliding else None,
                inv_freq=inv_freq,
                rope_scale=factor,
                kv_source=i,
                k_eq_v=False,
                intermediate_size=c.intermediate_size,
            )
        )
    if gemma:
        attn_scale = c.query_pre_attn_scalar**-0.5
        act = c.hidden_activation
    else:
        attn_scale = head_dim**-0.5
        act = c.hidden_act
    activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
    if activation is None:
        raise CheckpointError(f"config.json: unsupported activation {act!r}")
    if getattr(c, "attn_logit_softcapping", None):
        raise CheckpointError("config.json: attention logit softcapping (Gemma 2) is not supported")
    qkv_bias = bool(getattr(c, "attention_bias", False)) or model_type == "qwen2"
    return ModelConfig(
        family=model_type.removesuffix("_text"),
        model_type=model_type,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        layers=tuple(layers),
        norm_eps=c.rms_norm_eps,
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norm=gemma,
        qk_norm=gemma,
        v_norm=False,
        attn_scale=attn_scale,
        qkv_bias=qkv_bias,
        o_bias=bool(getattr(c, "attention_bias", False)),
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        activation=activation,
        embed_scale=math.sqrt(c.hidden_size) if gemma else None,
        final_softcap=getattr(c, "final_logit_softcapping", None),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        max_position=c.max_position_embeddings,
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_ids=_eos_ids(getattr(c, "eos_token_id", None)),
        pad_token_id=getattr(c, "pad_token_id", None),
    )


# ---- Gemma 4 ------------------------------------------------------------------------------------


def check_gemma4_fields(text: dict) -> None:
    """Consistency checks on a raw `gemma4_text` config dict (before transformers parses it), so a
    bad config gets an error naming the field instead of a validator trace or a KeyError later."""
    n = text.get("num_hidden_layers", 30)
    if not isinstance(n, int) or n <= 0:
        raise CheckpointError(f"config.json: num_hidden_layers must be a positive integer, got {n!r}")
    lt = text.get("layer_types")
    if lt is not None:
        if not isinstance(lt, list) or len(lt) != n:
            got = len(lt) if isinstance(lt, list) else repr(lt)
            raise CheckpointError(f"config.json: layer_types has {got} entries for num_hidden_layers={n}")
        for i, t in enumerate(lt):
            if t not in ("full_attention", "sliding_attention"):
                raise CheckpointError(f"config.json: layer_types[{i}] = {t!r} is not supported")
    shared = text.get("num_kv_shared_layers", 0) or 0
    if not isinstance(shared, int) or not 0 <= shared <= n:
        raise CheckpointError(
            f"config.json: num_kv_shared_layers = {shared!r} must be between 0 and num_hidden_layers ({n})"
        )
    if lt is None:  # transformers' default: 5 sliding then 1 full, and the last layer is always full
        lt = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    gemma4_kv_sources(list(lt[:-1]) + ["full_attention"], shared)
    if text.get("enable_moe_block"):
        for f in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            v = text.get(f)
            if not isinstance(v, int) or v <= 0:
                raise CheckpointError(
                    f"config.json: {f} = {v!r}, but enable_moe_block is true and needs it as a positive integer"
                )
        if text["top_k_experts"] > text["num_experts"]:
            raise CheckpointError(
                f"config.json: top_k_experts ({text['top_k_experts']}) is larger than num_experts ({text['num_experts']})"
            )
    if text.get("use_bidirectional_attention") == "all":
        raise CheckpointError("config.json: use_bidirectional_attention='all' (a non-causal encoder) is not supported")


def gemma4_kv_sources(layer_types: list[str], n_shared: int) -> list[int]:
    """Which layer's cache each layer reads (transformers' `kv_sharing_modes`): the last
    `n_shared` layers reuse the K/V of the last non-shared layer of the same attention type."""
    n = len(layer_types)
    first_shared = n - n_shared
    sources = list(range(n))
    for i in range(first_shared, n):
        owners = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
        if not owners:
            raise CheckpointError(
                f"config.json: num_kv_shared_layers = {n_shared}: layer {i} ({layer_types[i]}) is KV-shared but no "
                f"earlier non-shared {layer_types[i]} layer exists to share from"
            )
        sources[i] = owners[-1]
    return sources


def _gemma4_from_hf(c: Any) -> ModelConfig:
    """Gemma 4 text (E2B / E4B / 31B / 26B-A4B): per-layer head dims and KV heads (full layers:
    `global_head_dim`, `num_global_key_value_heads`), proportional partial RoPE on full layers,
    QK norm + scale-free V norm, attention scale 1, PLE, KV sharing, double-wide MLP on shared
    layers, K-as-V on full layers, MoE beside the dense MLP, layer scalars, final softcap."""
    raw = {k: getattr(c, k, None) for k in ("num_hidden_layers", "layer_types", "num_kv_shared_layers",
                                            "enable_moe_block", "num_experts", "top_k_experts",
                                            "moe_intermediate_size", "use_bidirectional_attention")}
    raw = {k: v for k, v in raw.items() if v is not None}
    check_gemma4_fields(raw)
    layer_types = list(c.layer_types)
    sources = gemma4_kv_sources(layer_types, c.num_kv_shared_layers or 0)
    moe = MoESpec(c.num_experts, c.top_k_experts, c.moe_intermediate_size) if c.enable_moe_block else None
    layers: list[LayerSpec] = []
    rope_by_type: dict[str, tuple[torch.Tensor, float]] = {}
    head_dim_by_type: dict[str, int] = {}
    for i, lt in enumerate(layer_types):
        per_layer = c.per_layer_config[i]  # transformers resolves global_head_dim etc. per layer
        head_dim = per_layer.head_dim
        n_kv = per_layer.num_key_value_heads
        if head_dim_by_type.setdefault(lt, head_dim) != head_dim:
            raise CheckpointError(f"config.json: {lt} layers have different head dims ({head_dim_by_type[lt]} and {head_dim})")
        if c.num_attention_heads % n_kv:
            raise CheckpointError(
                f"config.json: layer {i}: num_attention_heads ({c.num_attention_heads}) is not a multiple of its "
                f"key/value heads ({n_kv})"
            )
        if lt not in rope_by_type:
            rope_by_type[lt] = _gemma4_rope(c, lt, head_dim)
        inv_freq, factor = rope_by_type[lt]
        sliding = lt == "sliding_attention"
        shared = sources[i] != i
        if shared:
            src = layers[sources[i]]
            if (src.n_kv_heads, src.head_dim) != (n_kv, head_dim):
                raise CheckpointError(f"config.json: layer {i} shares K/V of layer {sources[i]} but their shapes differ")
        layers.append(
            LayerSpec(
                attention_type=lt,
                n_heads=c.num_attention_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                sliding_window=c.sliding_window if sliding else None,
                inv_freq=inv_freq,
                rope_scale=factor,
                kv_source=sources[i],
                k_eq_v=bool(c.attention_k_eq_v) and not sliding,
                intermediate_size=c.intermediate_size * (2 if c.use_double_wide_mlp and shared else 1),
                moe=moe,
            )
        )
    activation = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}.get(c.hidden_activation)
    if activation is None:
        raise CheckpointError(f"config.json: unsupported hidden_activation {c.hidden_activation!r}")
    ple = c.hidden_size_per_layer_input or 0
    return ModelConfig(
        family="gemma4",
        model_type="gemma4_text",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        layers=tuple(layers),
        norm_eps=c.rms_norm_eps,
        norm_offset=0.0,  # Gemma 4 norms are x * w (weights stored as the scale itself)
        sandwich_norm=True,
        qk_norm=True,
        v_norm=True,
        attn_scale=1.0,
        qkv_bias=bool(c.attention_bias),
        o_bias=bool(c.attention_bias),
        mlp_bias=False,
        activation=activation,
        embed_scale=math.sqrt(c.hidden_size),
        final_softcap=c.final_logit_softcapping,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        max_position=c.max_position_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_ids=_eos_ids(c.eos_token_id),
        pad_token_id=c.pad_token_id,
        per_layer_input_size=ple,
        per_layer_vocab_size=c.vocab_size_per_layer_input if ple else 0,
        layer_scalar=True,
    )


def _gemma4_rope(c: Any, layer_type: str, head_dim: int) -> tuple[torch.Tensor, float]:
    """Gemma 4 RoPE per layer type. "default" uses the layer type's head dim and ignores
    partial_rotary_factor (as transformers' Gemma4TextRotaryEmbedding does); other types
    ("proportional": zero frequencies past the rotary part, so cos=1/sin=0 there) go through
    transformers' own functions with the per-layer-type config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = c.rope_parameters.get(layer_type) if isinstance(c.rope_parameters, dict) else None
    if params is None:
        raise CheckpointError(f"config.json: rope_parameters has no entry for {layer_type}")
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise CheckpointError(f"config.json: unsupported rope_type {rope_type!r} for {layer_type}")
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](c.per_layer_config[layer_type], torch.device("cpu"),
                                                      layer_type=layer_type)
    return inv_freq.float(), float(factor)
