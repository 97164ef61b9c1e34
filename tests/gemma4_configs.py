"""Tiny random Gemma 4 text models reproducing the structure of each published variant.

Shapes are scaled down (hidden 64, a few layers, vocab 320, sliding window 8) but keep what makes
each variant different; see `VARIANTS` and ../shared/reference/gemma4-mtp.md for the real shapes.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 320
WINDOW = 8
S, F = "sliding_attention", "full_attention"

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, head_dim=16, sliding_window=WINDOW,
    max_position_embeddings=512, final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
)

VARIANTS: dict[str, dict] = {
    # E2B: [s,s,s,s,f] layout, 1 KV head, PLE, the last layers reuse KV, double-wide MLP on them.
    # 10 layers, last 4 shared: sliding 6,7,8 read layer 5; full 9 reads layer 4.
    "e2b": dict(
        num_hidden_layers=10, num_key_value_heads=1, intermediate_size=96, global_head_dim=32,
        layer_types=[S, S, S, S, F] * 2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=4, use_double_wide_mlp=True,
    ),
    # E4B: [s x5, f] layout, 2 KV heads, PLE, last layers reuse KV (no double-wide MLP).
    # 12 layers, last 5 shared (first shared = 7): sliding 7..10 read layer 6, full 11 reads layer 5.
    "e4b": dict(
        num_hidden_layers=12, num_key_value_heads=2, intermediate_size=96, global_head_dim=32,
        layer_types=[S] * 5 + [F] + [S] * 5 + [F], hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB, num_kv_shared_layers=5,
    ),
    # 31B: [s x5, f], no PLE, no sharing; full layers use K as V with their own head dim / KV heads.
    "31b": dict(
        num_hidden_layers=8, num_key_value_heads=2, intermediate_size=96, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S] * 5 + [F] + [S, F],
        hidden_size_per_layer_input=0,
    ),
    # 26B-A4B: MoE (router + top-k experts, summed with the dense MLP) and K-as-V on full layers.
    "26b-a4b": dict(
        num_hidden_layers=6, num_key_value_heads=2, intermediate_size=48, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S] * 5 + [F],
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8, top_k_experts=2,
        moe_intermediate_size=16,
    ),
}


def tiny_gemma4_config(variant: str, **overrides):
    import transformers as tf

    kwargs = dict(_COMMON)
    kwargs.update(VARIANTS[variant])
    kwargs.update(overrides)
    return tf.Gemma4TextConfig(**kwargs)


def randomise(model, seed: int) -> None:
    """transformers initialises norms, layer scalars and router/expert scales to constants:
    perturb every parameter and buffer that is not a plain projection, so all of them are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or "embed_scale" in name:
                continue
            if "norm" in name or "scale" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + torch.randn(b.shape, generator=g) * 0.2)


def tiny_gemma4(variant: str, seed: int = 0, **overrides):
    """A tiny random `Gemma4ForCausalLM` of `variant` (eval mode, fp32)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Gemma4ForCausalLM(tiny_gemma4_config(variant, **overrides)).eval()
    randomise(model, seed + 100)
    return model
