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

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def last_cache_layer(self, attention_type: AttentionType) -> int | None:
        """The last layer of `attention_type` that owns its K/V (what an MTP drafter attends to)."""
        owners = [i for i, s in enumerate(self.layers) if s.attention_type == attention_type and s.kv_source == i]
        return owners[-1] if owners else None

    def cache_layers(self) -> list[int]:
        """Layers that own K/V in the cache (KV-shared layers own nothing)."""
        return [i for i, s in enumerate(self.layers) if s.kv_source == i]


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma3_text", "gemma3")


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
    if model_type == "gemma3":  # multimodal wrapper: run its text part
        hf_config = hf_config.text_config
        model_type = hf_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
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
