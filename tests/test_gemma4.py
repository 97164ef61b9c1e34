"""Gemma 4 text targets (E2B, E4B, 31B, 26B-A4B structures) against transformers 5.23's
`Gemma4ForCausalLM` on tiny random configs (see gemma4_configs.py for the exact variants)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from gemma4_configs import VARIANTS, VOCAB, WINDOW, randomise, tiny_gemma4, tiny_gemma4_config

from mtpspec.checkpoint import load_decoder, read_config
from mtpspec.decoding.loop import Request, decode
from mtpspec.errors import CheckpointError
from mtpspec.models.config import from_hf_config
from mtpspec.models.moe import MoEStats

# Logits of these random models (init 0.1: logits reach a few units) amplify float rounding through
# 6-12 layers: torch's attention lands within 5e-5 of transformers, the batch-invariant decode
# attention (kernels/attention.cpp, another summation order) within 2e-4.
TOL = 3e-4
NAMES = list(VARIANTS)
INIT = 0.1  # larger than transformers' 0.02, so logits reach a few units and the softcap matters


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """variant -> (transformers model, our decoder loaded from the saved checkpoint folder)."""
    out = {}
    for i, name in enumerate(NAMES):
        hf = tiny_gemma4(name, seed=10 + i, initializer_range=INIT)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        out[name] = (hf, load_decoder(folder))
    return out


def _ids(seed: int, b: int, t: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_whole_prompt_forward_matches_reference(name, gemma4):
    hf, ours = gemma4[name]
    ids = _ids(0, 2, 3 * WINDOW - 3)  # longer than the sliding window
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    out = ours(ids, ours.new_cache(2, 32))
    assert ref.logits.abs().max() > 1.0  # a non-trivial model
    torch.testing.assert_close(out.logits, ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(out.hidden, ref.hidden_states[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_step_by_step_and_chunked_forward_match_reference(name, gemma4):
    hf, ours = gemma4[name]
    ids = _ids(1, 2, 23)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    cache = ours.new_cache(2, 32)
    steps = [ours(ids[:, t : t + 1], cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat([s.hidden for s in steps], 1), ref.hidden_states[-1], atol=TOL, rtol=0)
    # a prefix, then chunks of 5 (the shape of a verify pass), crossing the sliding window
    cache = ours.new_cache(2, 32)
    chunks = [ours(ids[:, :3], cache)] + [ours(ids[:, t : t + 5], cache) for t in range(3, 23, 5)]
    torch.testing.assert_close(torch.cat([c.logits for c in chunks], 1), ref.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat([c.hidden for c in chunks], 1), ref.hidden_states[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_is_token_identical_to_transformers(name, gemma4):
    hf, ours = gemma4[name]
    prompt = _ids(2, 1, 11).tolist()[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=64)[0, len(prompt):].tolist()
    seq = decode(ours, [Request(prompt, max_new_tokens=64)])[0]
    assert len(ref) == 64
    assert seq.new_ids == ref


@pytest.mark.parametrize("name", ["e2b", "26b-a4b"])
def test_ragged_batch_equals_each_prompt_alone(name, gemma4):
    _, ours = gemma4[name]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 1)]
    alone = [decode(ours, [Request(p, max_new_tokens=12)])[0].new_ids for p in prompts]
    batch = [s.new_ids for s in decode(ours, [Request(p, max_new_tokens=12) for p in prompts])]
    assert batch == alone


def test_kv_shared_layers_store_nothing_and_read_the_right_layer(gemma4):
    hf, ours = gemma4["e2b"]
    modes = hf.config.kv_sharing_modes  # transformers: None / "store" / "reuse"
    cfg = ours.cfg
    cache = ours.new_cache(1, 8)
    for i, mode in enumerate(modes):
        assert (i in cache.k) == (mode != "reuse")
        if mode == "reuse":
            src = cfg.layers[i].kv_source
            assert modes[src] == "store" and cfg.layers[src].attention_type == cfg.layers[i].attention_type
            assert not hasattr(ours.layers[i].attn, "k_norm") or ours.layers[i].attn.k_norm is None
            # double-wide MLP on shared layers only
            assert ours.layers[i].mlp.intermediate == 2 * hf.config.intermediate_size
        else:
            assert ours.layers[i].mlp.intermediate == hf.config.intermediate_size
    for lt in ("sliding_attention", "full_attention"):
        assert modes[cfg.last_cache_layer(lt)] == "store"


@pytest.mark.parametrize("name", NAMES)
def test_drafter_kv_matches_reference_shared_kv_states(name, gemma4):
    hf, ours = gemma4[name]
    ids = _ids(7, 1, 19)
    cache = ours.new_cache(1, 24)
    ours(ids, cache)
    with torch.no_grad():
        ref = hf(ids, return_shared_kv_states=True).shared_kv_states
    for lt in ("sliding_attention", "full_attention"):
        k, v = ours.drafter_kv(cache, lt)
        if ref:  # transformers only returns them for KV-sharing models (E2B / E4B)
            torch.testing.assert_close(k[:, :, :19], ref[lt][0], atol=TOL, rtol=0)
            torch.testing.assert_close(v[:, :, :19], ref[lt][1], atol=TOL, rtol=0)
        else:
            assert k.shape[2] == 24 and bool(k[:, :, :19].abs().sum(-1).gt(0).all())


def test_moe_reports_distinct_experts_per_layer(gemma4):
    _, ours = gemma4["26b-a4b"]
    spec = VARIANTS["26b-a4b"]
    k, n_exp = spec["top_k_experts"], spec["num_experts"]
    cache = ours.new_cache(4, 40)
    stats = MoEStats()
    ours(_ids(4, 4, 9), cache, moe_stats=stats)
    assert stats.tokens == 36
    assert sorted(stats.experts_touched) == list(range(ours.cfg.n_layers))
    assert all(k <= n <= n_exp for n in stats.experts_touched.values())
    one = MoEStats()  # one token: exactly top_k distinct experts per layer
    ours(_ids(5, 1, 1), ours.new_cache(1, 4), moe_stats=one)
    assert set(one.experts_touched.values()) == {k}
    assert one.total() == k * ours.cfg.n_layers
    # not requested: nothing recorded, same result
    c1, c2 = ours.new_cache(1, 8), ours.new_cache(1, 8)
    ids = _ids(6, 1, 5)
    torch.testing.assert_close(ours(ids, c1).logits, ours(ids, c2, moe_stats=MoEStats()).logits, atol=0, rtol=0)


def test_published_structures_layer_specs():
    """Real shapes (no weights): head dims, KV heads, sharing and the drafter's layers."""
    import transformers as tf

    s, f = "sliding_attention", "full_attention"
    common = dict(vocab_size=262144, global_head_dim=512, head_dim=256, sliding_window=512)
    e2b = tf.Gemma4TextConfig(num_hidden_layers=35, hidden_size=1536, num_attention_heads=8, num_key_value_heads=1,
                              layer_types=[s, s, s, s, f] * 7, num_kv_shared_layers=20, use_double_wide_mlp=True,
                              intermediate_size=6144, **common)
    e4b = tf.Gemma4TextConfig(num_hidden_layers=42, hidden_size=2560, num_attention_heads=8, num_key_value_heads=2,
                              layer_types=([s] * 5 + [f]) * 7, num_kv_shared_layers=18, intermediate_size=10240,
                              **common)
    b31 = tf.Gemma4TextConfig(num_hidden_layers=60, hidden_size=5376, num_attention_heads=32, num_key_value_heads=16,
                              num_global_key_value_heads=4, attention_k_eq_v=True, layer_types=([s] * 5 + [f]) * 10,
                              hidden_size_per_layer_input=0, intermediate_size=21504, **common)
    moe = tf.Gemma4TextConfig(num_hidden_layers=30, hidden_size=2816, num_attention_heads=16, num_key_value_heads=8,
                              num_global_key_value_heads=2, attention_k_eq_v=True, layer_types=([s] * 5 + [f]) * 5,
                              hidden_size_per_layer_input=0, intermediate_size=2112, enable_moe_block=True,
                              num_experts=128, top_k_experts=8, moe_intermediate_size=704, **common)
    expect = {  # (last sliding cache layer, last full cache layer, layers owning K/V)
        "e2b": (e2b, 13, 14, 15), "e4b": (e4b, 22, 23, 24), "31b": (b31, 58, 59, 60), "26b": (moe, 28, 29, 30)}
    for name, (hf_cfg, ls, lf, n_owners) in expect.items():
        cfg = from_hf_config(hf_cfg)
        assert cfg.last_cache_layer("sliding_attention") == ls, name
        assert cfg.last_cache_layer("full_attention") == lf, name
        assert len(cfg.cache_layers()) == n_owners, name
        modes = hf_cfg.kv_sharing_modes
        for i, spec in enumerate(cfg.layers):
            assert (spec.kv_source != i) == (modes[i] == "reuse"), (name, i)
            assert spec.head_dim == (512 if spec.attention_type == f else 256)
            assert spec.k_eq_v == (hf_cfg.attention_k_eq_v and spec.attention_type == f)
            assert cfg.attn_scale == 1.0 and cfg.v_norm and cfg.final_softcap == hf_cfg.final_logit_softcapping
    full = lambda c: next(x for x in c.layers if x.attention_type == f)  # noqa: E731
    slid = lambda c: next(x for x in c.layers if x.attention_type == s)  # noqa: E731
    assert (full(from_hf_config(b31)).n_kv_heads, slid(from_hf_config(b31)).n_kv_heads) == (4, 16)
    assert (full(from_hf_config(moe)).n_kv_heads, slid(from_hf_config(moe)).n_kv_heads) == (2, 8)
    # proportional RoPE: 512 * 0.25 / 2 = 64 rotated frequencies, the rest zero (not rotated)
    inv = full(from_hf_config(e2b)).inv_freq
    assert inv.shape == (256,) and bool((inv[:64] > 0).all()) and bool((inv[64:] == 0).all())
    assert from_hf_config(e2b).layers[20].intermediate_size == 2 * 6144
    assert from_hf_config(e2b).per_layer_input_size == 256
    assert from_hf_config(moe).layers[0].moe.n_experts == 128


def test_multimodal_gemma4_checkpoint_runs_its_text_part(tmp_path, caplog):
    import transformers as tf

    text = tiny_gemma4_config("e2b", initializer_range=INIT)
    vision = tf.Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=16)
    special = dict(image_token_id=VOCAB - 1, boi_token_id=VOCAB - 2, eoi_token_id=VOCAB - 3, video_token_id=VOCAB - 4,
                   boa_token_id=VOCAB - 5, eoa_token_index=VOCAB - 6, audio_token_id=VOCAB - 7)
    torch.manual_seed(7)
    hf = tf.Gemma4ForConditionalGeneration(
        tf.Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), **special)
    ).eval()
    randomise(hf, 8)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="mtpspec.checkpoint"):
        ours = load_decoder(tmp_path)
    assert any("vision/audio tensors" in r.getMessage() for r in caplog.records)
    ids = torch.randint(3, VOCAB - 10, (1, 19), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = hf(input_ids=ids)
    torch.testing.assert_close(ours(ids, ours.new_cache(1, 24)).logits, ref.logits, atol=TOL, rtol=0)


def _write_config(folder, variant: str, **changes):
    d = tiny_gemma4_config(variant).to_dict()
    d.pop("per_layer_config", None)
    d.update(changes)
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(d))
    return folder


@pytest.mark.parametrize(
    "variant,changes,field",
    [
        ("e2b", {"layer_types": ["sliding_attention"] * 3 + ["full_attention"]}, "layer_types"),
        ("e2b", {"layer_types": ["sliding_attention"] * 9 + ["chunked_attention"]}, "layer_types[9]"),
        ("e2b", {"num_kv_shared_layers": 11}, "num_kv_shared_layers"),
        ("e2b", {"num_kv_shared_layers": 6}, "num_kv_shared_layers"),  # full layers 4, 9: no source left
        ("26b-a4b", {"num_experts": None}, "num_experts"),
        ("26b-a4b", {"top_k_experts": None}, "top_k_experts"),
        ("26b-a4b", {"moe_intermediate_size": None}, "moe_intermediate_size"),
        ("26b-a4b", {"top_k_experts": 9}, "top_k_experts"),
    ],
)
def test_inconsistent_config_names_the_field(tmp_path, variant, changes, field):
    folder = _write_config(tmp_path / "m", variant, **changes)
    with pytest.raises(CheckpointError, match=r"config\.json: .*" + field.replace("[", r"\[").replace("]", r"\]")):
        read_config(folder)
    # the same check, inside the text_config of a multimodal checkpoint
    text = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text}))
    with pytest.raises(CheckpointError, match=r"text_config\." + field.split("[")[0]):
        read_config(folder)
