"""Helpers for MTP drafter tests: tiny targets of every family, random drafters, the transformers
assistant (with the patch 5.23 needs to even build it) and direct draft comparisons."""

from __future__ import annotations



import torch

from mtpspec.checkpoint import load_decoder
from mtpspec.decoding.proposers import DraftInput
from mtpspec.decoding.sampling import SamplingParams
from mtpspec.models.drafter import DrafterConfig, MTPDrafter

TARGETS = ["llama", "gemma3", "e2b", "31b", "26b-a4b"]


def tiny_target(name: str, folder):
    """(transformers model, our Decoder) for a tiny random target of `name`."""
    if name in ("llama", "gemma3", "qwen2"):
        from tiny_models import tiny_hf_model

        hf = tiny_hf_model(name)
    else:
        from gemma4_configs import tiny_gemma4

        hf = tiny_gemma4(name)
    hf.save_pretrained(folder)
    return hf, load_decoder(folder)


def random_drafter(target, seed: int = 0, **kw) -> MTPDrafter:
    kw.setdefault("num_layers", 2)
    kw.setdefault("hidden_size", 32)
    cfg = DrafterConfig.for_target(target.cfg, **kw)
    return MTPDrafter(cfg).init_random(seed, std=0.2).prepare()




def copying_drafter(target) -> MTPDrafter:
    """An MTP drafter (the target's width, random weights) rewired to draft a repeat of its input
    token: the pre-projection passes the token embedding through, the layers add nothing (zero
    post-norms) and the head is the target's embedding, whose rows are each their own argmax."""
    h = target.cfg.hidden_size
    d = MTPDrafter(DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=h)).init_random(0, std=0.2)
    emb = target.embed_tokens(torch.arange(target.cfg.vocab_size)).detach().float()
    with torch.no_grad():
        d.pre_projection.weight.copy_(torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1))
        for layer in d.model.layers:
            layer.post_attention_layernorm.weight.zero_()
            layer.post_feedforward_layernorm.weight.zero_()
        d.model.norm.weight.fill_(1.0)
        d.model.embed_tokens.weight.copy_(emb)
    assert torch.equal((emb @ emb.T).argmax(-1), torch.arange(len(emb)))
    return d


def drafting_engines(target_folder, drafter_folder, k: int) -> dict:
    """The target with each drafting mode at a fixed K: n-gram, MTP chains, MTP 6:2:3 trees."""
    import mtpspec

    spec = {"ngram": mtpspec.load(target_folder, drafter="ngram", draft_tokens=k),
            "mtp-chain": mtpspec.load(target_folder, drafter=drafter_folder, draft_tree=None, draft_tokens=k),
            "mtp-tree": mtpspec.load(target_folder, drafter=drafter_folder, draft_tree="6:2:3", draft_tokens=k)}
    assert spec["mtp-tree"].plan.tree is not None and spec["mtp-chain"].plan.tree is None
    return spec


def hf_assistant(target_hf, seed: int = 0, clustered: bool = False, hidden: int = 32, layers=("sliding_attention", "full_attention")):
    """A random transformers Gemma4AssistantForCausalLM for a tiny Gemma 4 target (call inside
    `mtpspec.compat.transformers_gemma4_assistant()`)."""
    import transformers as tf

    tc = target_hf.config
    s = tc.per_layer_config[tc.layer_types.index("sliding_attention")]
    f = tc.per_layer_config[tc.layer_types.index("full_attention")]
    text = tf.Gemma4TextConfig(
        vocab_size=tc.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=tc.num_attention_heads,
        num_hidden_layers=len(layers), layer_types=list(layers), num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim, global_head_dim=f.head_dim, sliding_window=tc.sliding_window,
        attention_k_eq_v=tc.attention_k_eq_v,
        num_global_key_value_heads=f.num_key_value_heads if tc.attention_k_eq_v else None,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=len(layers),
        rope_parameters=tc.rope_parameters, rms_norm_eps=tc.rms_norm_eps,
    )
    cfg = tf.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=tc.hidden_size, use_ordered_embeddings=clustered,
                                   num_centroids=16, centroid_intermediate_top_k=3)
    torch.manual_seed(seed)
    m = tf.Gemma4AssistantForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in m.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + 0.2 * torch.randn(b.shape, generator=g))
        if clustered:
            m.masked_embedding.token_ordering.copy_(torch.randperm(tc.vocab_size, generator=g))
    m.tie_weights()
    return m


def our_drafts(target, drafter, prompts: list[list[int]], k: int, params=None, seed: int = 0):
    """Prefill `prompts` (ragged) in our target, take the greedy first token, and draft k tokens."""
    from mtpspec.decoding.mtp import MtpProposer

    b = len(prompts)
    lengths = [len(p) for p in prompts]
    cache = target.new_cache(b, max(lengths) + k + 4)
    toks = torch.zeros(b, max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = torch.tensor(p)
    last = torch.tensor(lengths)[:, None] - 1
    with torch.inference_mode():
        out = target(toks, cache, logits_at=last)
    cache.set_lengths(lengths)
    hidden = out.hidden[torch.arange(b), last[:, 0]]
    first = out.logits[:, 0].argmax(-1)
    params = params or [SamplingParams() for _ in prompts]
    gens = [p.generator() if not p.greedy else None for p in params]
    for g, p in zip(gens, params):
        if g is not None:
            g.manual_seed(seed)
    inp = DraftInput(target, cache, first, hidden, [p + [int(f)] for p, f in zip(prompts, first)], params, gens, [True] * b)
    return MtpProposer(drafter).propose(inp, k), inp


def hf_drafts(target_hf, assistant, prompt: list[int], k: int, sliding_keep: int | None = None):
    """transformers' own MTP drafting after a prefill of `prompt` (batch 1): the target's
    return_shared_kv_states + SinglePositionMultiTokenCandidateGenerator.get_candidates.
    sliding_keep: keep only the last n sliding K/V entries (our visibility; transformers' mask
    would otherwise show window+1 entries)."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = target_hf(ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=True)
    if sliding_keep is not None:
        k_, v_ = out.shared_kv_states["sliding_attention"]
        out.shared_kv_states["sliding_attention"] = (k_[:, :, -sliding_keep:], v_[:, :, -sliding_keep:])
    first = out.logits[:, -1].argmax(-1)
    ext = torch.cat([ids, first[:, None]], dim=1)
    assistant.generation_config.num_assistant_tokens = k
    gen = SinglePositionMultiTokenCandidateGenerator(assistant, target_hf.get_input_embeddings(),
                                                     GenerationConfig(max_length=ext.shape[1] + k + 1))
    cand, _ = gen.get_candidates(ext, {"attention_mask": torch.ones_like(ext)}, out, False, 0)
    return cand[0, ext.shape[1]:].tolist(), int(first)
