"""MTP drafter: interop with transformers' gemma4_assistant (both directions), greedy losslessness
through the decoding loop for every target family, cache visibility (never past a row's length,
sliding window respected), clustered head, sampled drafts, checkpoint mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch
from drafter_helpers import TARGETS, hf_assistant, hf_drafts, our_drafts, random_drafter, tiny_target

from mtpspec.compat import transformers_gemma4_assistant as patched_kv_sharing
from safetensors.torch import load_file, save_file

from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.plan import DraftPlan
from mtpspec.decoding.mtp import MtpProposer
from mtpspec.decoding.sampling import SamplingParams, probabilities
from mtpspec.drafter_checkpoint import load_drafter, save_drafter
from mtpspec.errors import CheckpointError
from mtpspec.models.drafter import DrafterConfig, MTPDrafter

VOCAB = 320
WINDOW = 8


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_target(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- interop with transformers ----------------------------------------------------------------


@pytest.mark.parametrize("clustered", [False, True])
def test_transformers_drafter_loads_and_proposes_the_same_tokens(targets, tmp_path, clustered):
    hf, target = targets("e2b")
    with patched_kv_sharing():
        assistant = hf_assistant(hf, seed=3, clustered=clustered)
        assistant.save_pretrained(tmp_path)
        drafter = load_drafter(tmp_path, target)
        for n in (5, 7, 20):  # 20 crosses the sliding window: give transformers only our visible entries
            prompt = _prompt(n, n)
            keep = None if n < WINDOW else WINDOW - 1
            ref, first = hf_drafts(hf, assistant, prompt, 4, sliding_keep=keep)
            prop, inp = our_drafts(target, drafter, [prompt], 4)
            assert int(inp.last_tokens[0]) == first
            assert prop.tokens[0].tolist() == ref


def test_transformers_drafter_logits_match(targets, tmp_path):
    hf, target = targets("e2b")
    with patched_kv_sharing():
        assistant = hf_assistant(hf, seed=4)
        assistant.save_pretrained(tmp_path)
        drafter = load_drafter(tmp_path, target)
        prompt = _prompt(6, 1)
        with torch.no_grad():
            out = hf(torch.tensor([prompt]), output_hidden_states=True, return_shared_kv_states=True)
            first = out.logits[:, -1].argmax(-1)
            emb = hf.get_input_embeddings()(first[:, None])
            a = assistant(inputs_embeds=torch.cat([emb, out.hidden_states[-1][:, -1:]], -1),
                          position_ids=torch.tensor([[len(prompt)]]), shared_kv_states=out.shared_kv_states,
                          attention_mask=torch.ones(1, len(prompt) + 1, dtype=torch.long))
    _, inp = our_drafts(target, drafter, [prompt], 1)
    ctx = drafter.context(target.cfg, inp.cache)
    logits, nxt = drafter.step(target.embed_tokens(inp.last_tokens), inp.last_hidden, ctx)
    torch.testing.assert_close(logits, a.logits[:, 0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(nxt, a.last_hidden_state[:, 0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("clustered", [False, True])
def test_our_drafter_loads_in_transformers_and_drives_its_generation(targets, tmp_path, monkeypatch, clustered):
    import transformers as tf
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    hf, target = targets("e2b")
    ours = random_drafter(target, seed=5, clustered=clustered, num_centroids=16 if clustered else None,
                          centroid_top_k=3 if clustered else None)
    save_drafter(ours, tmp_path, draft_tokens=3, target_model_type="gemma4_text")
    assert json.loads((tmp_path / "generation_config.json").read_text())["num_assistant_tokens"] == 3
    calls = []
    orig = SinglePositionMultiTokenCandidateGenerator.get_candidates
    monkeypatch.setattr(SinglePositionMultiTokenCandidateGenerator, "get_candidates",
                        lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    with patched_kv_sharing():
        assistant = tf.Gemma4AssistantForCausalLM.from_pretrained(tmp_path).eval()
        prompt = _prompt(6, 2)
        ref, _ = hf_drafts(hf, assistant, prompt, 3)
        prop, _ = our_drafts(target, ours, [prompt], 3)
        assert prop.tokens[0].tolist() == ref
        calls.clear()
        out = hf.generate(torch.tensor([prompt]), assistant_model=assistant, max_new_tokens=20, do_sample=False)
    assert len(calls) > 1  # transformers really drafted with our drafter
    mine = decode(target, [Request(prompt, 20)], DraftPlan(MtpProposer(ours), 3, draft_tree=None))[0].new_ids
    assert out[0, len(prompt):].tolist() == mine == decode(target, [Request(prompt, 20)])[0].new_ids
    # and it round-trips through our loader
    again = load_drafter(tmp_path, target)
    assert again.draft_tokens == 3
    assert our_drafts(target, again, [prompt], 3)[0].tokens.tolist() == prop.tokens.tolist()


# ---- losslessness through the loop ---------------------------------------------------------------


def _prompts(batch: int) -> list[list[int]]:
    lens = [11] if batch == 1 else [5, 13, 2]
    return [_prompt(n, 10 + i) for i, n in enumerate(lens)]


@pytest.mark.parametrize("name", TARGETS)
def test_greedy_mtp_speculative_equals_plain(targets, name):
    _, target = targets(name)
    drafter = random_drafter(target, seed=7)
    new = 20  # with the prompts, crosses the sliding window (8)
    for batch in (1, 3):
        ps = _prompts(batch)
        ref = [s.new_ids for s in decode(target, [Request(p, new) for p in ps])]
        for k in (1, 3):
            seqs = decode(target, [Request(p, new) for p in ps], DraftPlan(MtpProposer(drafter), k, draft_tree=None))
            assert [s.new_ids for s in seqs] == ref, (name, batch, k)
            assert all(s.stats.rounds > 0 for s in seqs)


def test_clustered_drafter_is_lossless(targets):
    _, target = targets("gemma3")
    drafter = random_drafter(target, seed=8, clustered=True, num_centroids=20, centroid_top_k=2)
    ps = _prompts(3)
    ref = [s.new_ids for s in decode(target, [Request(p, 16) for p in ps])]
    plan = DraftPlan(MtpProposer(drafter), 3, draft_tree=None)
    assert [s.new_ids for s in decode(target, [Request(p, 16) for p in ps], plan)] == ref


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_quantized_drafter_is_lossless_and_cannot_be_saved(targets, name, quant, tmp_path):
    """A drafter quantized for inference (`MTPDrafter.quantize`, what `load` does on CPU) drafts
    through the quantized kernels; greedy output stays plain decoding's, chains and trees, batch 1
    and 3. Its full-head copy is quantized the same way; saving it is refused (its exact weights
    are gone), and an unknown scheme names the valid ones."""
    from mtpspec.decoding.tree import TreeShape
    from mtpspec.kernels.quant import QuantLinear

    _, target = targets(name)
    drafter = random_drafter(target, seed=7, clustered=True, num_centroids=20, centroid_top_k=4).quantize(quant)
    quantized = [m for m in drafter.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 + 5 * drafter.cfg.n_layers and {m.bits for m in quantized} == {int(quant[3:])}
    for batch in (1, 3):
        ps = _prompts(batch)
        ref = [s.new_ids for s in decode(target, [Request(p, 20) for p in ps])]
        for k, tree in ((3, None), (3, TreeShape.parse("5:1:2"))):
            seqs = decode(target, [Request(p, 20) for p in ps], DraftPlan(MtpProposer(drafter), k, draft_tree=tree))
            assert [s.new_ids for s in seqs] == ref, (batch, k, tree)
    full = drafter.full_head_copy()
    assert full.quantization == quant and not full.cfg.clustered
    torch.testing.assert_close(full.pre_projection.unpacked_weight(), drafter.pre_projection.unpacked_weight())
    with pytest.raises(ValueError, match="quantized"):
        save_drafter(drafter, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="int8, int4"):
        random_drafter(target).quantize("int3")


def test_sampled_mtp_run_is_reproducible(targets):
    _, target = targets("llama")
    drafter = random_drafter(target, seed=9)
    reqs = lambda: [Request(p, 12, SamplingParams(temperature=0.8, top_k=50, seed=3)) for p in _prompts(3)]  # noqa: E731
    a = [s.new_ids for s in decode(target, reqs(), DraftPlan(MtpProposer(drafter), 3, draft_tree=None))]
    b = [s.new_ids for s in decode(target, reqs(), DraftPlan(MtpProposer(drafter), 3, draft_tree=None))]
    assert a == b and all(len(x) == 12 for x in a)


# ---- what the drafter sees of the cache ---------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma3", "e2b", "31b"])
def test_drafter_never_reads_past_a_rows_length_and_respects_the_window(targets, name):
    _, target = targets(name)
    drafter = random_drafter(target, seed=11)
    ps = [_prompt(n, 20 + n) for n in (3, 19, 12)]
    clean, inp = our_drafts(target, drafter, ps, 3)
    snapshot = {i: (k.clone(), v.clone()) for i, (k, v) in enumerate(zip(inp.cache.k.values(), inp.cache.v.values()))}
    for i, (k, v) in enumerate(zip(inp.cache.k.values(), inp.cache.v.values())):  # the drafter wrote nothing
        assert torch.equal(k, snapshot[i][0]) and torch.equal(v, snapshot[i][1])
    # poison: NaN at/after each row's length, huge values before each row's sliding window
    lengths = inp.cache.lengths.tolist()
    for layer in inp.cache.k:
        for b, n in enumerate(lengths):
            for t in (inp.cache.k[layer], inp.cache.v[layer]):
                t[b, :, n:] = float("nan")
                if target.cfg.layers[layer].sliding_window:
                    t[b, :, : max(0, n - WINDOW + 1)] = 1e4
    from mtpspec.decoding.mtp import MtpProposer as P

    poisoned = P(drafter).propose(inp, 3)
    assert torch.equal(poisoned.tokens, clean.tokens)
    # each row alone drafts the same as in the ragged batch
    for b, p in enumerate(ps):
        alone, _ = our_drafts(target, drafter, [p], 3)
        assert alone.tokens[0].tolist() == clean.tokens[b].tolist()


def test_drafter_position_is_the_last_token_position(targets):
    """Constant position = cache.lengths (the last token's position) for every draft step; moving
    it changes the query RoPE and so the drafts' logits."""
    _, target = targets("llama")
    drafter = random_drafter(target, seed=12)
    _, inp = our_drafts(target, drafter, [_prompt(9, 1)], 1)
    emb = target.embed_tokens(inp.last_tokens)
    a, _ = drafter.step(emb, inp.last_hidden, drafter.context(target.cfg, inp.cache))
    b, _ = drafter.step(emb, inp.last_hidden, drafter.context(target.cfg, inp.cache, inp.cache.lengths + 1))
    assert not torch.allclose(a, b)


def test_fused_attention_path_equals_the_masked_path(targets):
    """A row that sees every key of its range (batch 1, no ragged tail) takes one fused attention
    op; it must give what the general masked path gives, and ragged batches keep the masked path."""
    import dataclasses

    for name in ("gemma3", "e2b"):
        _, target = targets(name)
        drafter = random_drafter(target, seed=15)
        _, inp = our_drafts(target, drafter, [_prompt(17, 3)], 1)
        ctx = drafter.context(target.cfg, inp.cache)
        assert all(t.all_visible for t in ctx.types.values())
        slow = dataclasses.replace(ctx, types={k: dataclasses.replace(t, all_visible=False) for k, t in ctx.types.items()})
        emb = target.embed_tokens(inp.last_tokens)
        with torch.inference_mode():
            a, ha = drafter.step(emb, inp.last_hidden, ctx)
            b, hb = drafter.step(emb, inp.last_hidden, slow)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)
        _, ragged = our_drafts(target, drafter, [_prompt(5, 1), _prompt(17, 3)], 1)
        assert not any(t.all_visible for t in drafter.context(target.cfg, ragged.cache).types.values())


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("isa", ["auto", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "gemma3", "e2b"])
def test_one_call_cpp_layer_matches_the_torch_modules(targets, name, dtype, isa, quant, monkeypatch):
    """Rows that see all of their K/V run each drafter layer as one C++ call (kernels.drafter_layer,
    the drafting hot path at batch 1), with dense or quantized (`MTPDrafter.quantize`) weights. It
    must give the torch modules' result to the dtype's rounding, for one draft per row and for a
    tree level's several drafts per row (GQA heads, sliding and full layers, partial RoPE), and
    follow in-place weight updates (cached fp32 norm weights must not go stale)."""
    from mtpspec import kernels
    from mtpspec.models.drafter import DrafterLayer

    if kernels.kernel_info()["path"] != "cpp":
        pytest.skip("C++ kernels not available")
    _, target = targets(name)
    drafter = random_drafter(target, seed=21).to(dtype).prepare()
    if quant:
        drafter.quantize(quant)
    _, inp = our_drafts(target, drafter, [_prompt(19, 4)], 1)
    ctx = drafter.context(target.cfg, inp.cache)
    assert all(t.all_visible for t in ctx.types.values())
    calls = []
    real = kernels.drafter_layer
    monkeypatch.setattr(kernels, "drafter_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch_path = DrafterLayer._fused_args

    def both(emb, hidden):
        monkeypatch.setattr(DrafterLayer, "_fused_args", torch_path)
        n = len(calls)
        fused = drafter.step_state(emb, hidden, ctx)
        assert len(calls) - n == drafter.cfg.n_layers  # the C++ path really ran, once per layer
        monkeypatch.setattr(DrafterLayer, "_fused_args", lambda self, dt: None)
        ref = drafter.step_state(emb, hidden, ctx)
        assert len(calls) - n == drafter.cfg.n_layers
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.03, atol=0.03)
        for a, b in zip(fused, ref):
            scale = float(b.float().abs().max())
            torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol)
        return fused

    kernels._ext().force_isa(isa)  # "avx2": the kernels of machines without AVX-512
    try:
        with torch.inference_mode():
            for w in (1, 3):  # one draft per row; three branches of a tree level
                tokens = torch.tensor([5, 9, 11][:w])
                hidden = inp.last_hidden.repeat(w, 1) * torch.linspace(1.0, 1.5, w)[:, None]
                first = both(target.embed_tokens(tokens), hidden)
            drafter.model.layers[-1].post_feedforward_layernorm.weight.mul_(3.0)  # an in-place update
            second = both(target.embed_tokens(tokens), hidden)
            # weights made under inference mode (e.g. MTPDrafter.full_head_copy() there) carry no
            # version counter: the C++ path must still run, uncached
            drafter = MTPDrafter(drafter.cfg)
            drafter.load_state_dict(random_drafter(target, seed=22).to(dtype).state_dict())
            drafter = drafter.to(dtype).prepare()
            if quant:
                drafter.quantize(quant)
            both(target.embed_tokens(tokens), hidden)
    finally:
        kernels._ext().force_isa("auto")
    assert not torch.allclose(first[0].float(), second[0].float())


def test_prepare_moves_only_drafter_norms_to_the_fp32_kernel(targets):
    from mtpspec.models.layers import RMSNorm

    _, target = targets("llama")
    drafter = random_drafter(target, seed=16)
    assert all(m.fp32_kernel for m in drafter.modules() if isinstance(m, RMSNorm))
    assert not any(m.fp32_kernel for m in target.modules() if isinstance(m, RMSNorm))  # exact = the reference


# ---- clustered head and sampling -----------------------------------------------------------------


def test_clustered_head_logits_only_on_chosen_clusters(targets):
    _, target = targets("e2b")
    cfg = DrafterConfig.for_target(target.cfg, num_layers=1, hidden_size=32, clustered=True, num_centroids=16,
                                   centroid_top_k=3)
    drafter = MTPDrafter(cfg).init_random(13, std=0.2)
    me = drafter.masked_embedding
    order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    me.token_ordering.copy_(order)
    w = drafter.model.embed_tokens.weight.detach().clone()  # standard order
    s = torch.randn(4, drafter.cfg.hidden_size)
    unprepared = drafter.logits(s)
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    drafter.prepare()  # stores the LM weight cluster-major
    assert me.cluster_major
    logits = drafter.logits(s)
    torch.testing.assert_close(logits, unprepared)
    after = drafter.state_dict()  # still the standard order (what a checkpoint holds)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the greedy drafting path (no [B, V] logits) picks the same tokens, prepared or not
    assert torch.equal(drafter.argmax(s), logits.argmax(-1))
    assert torch.equal(drafter.argmax(s), unprepared.argmax(-1))
    top = torch.topk(me.centroids(s), 3, dim=-1).indices
    for r in range(4):
        chosen = order.view(16, VOCAB // 16)[top[r]].reshape(-1)
        finite = torch.isfinite(logits[r]).nonzero().view(-1)
        assert sorted(finite.tolist()) == sorted(chosen.tolist())
        torch.testing.assert_close(logits[r, chosen], w[chosen] @ s[r])


def test_sampled_rows_return_the_processed_drafter_distribution(targets):
    _, target = targets("e2b")
    drafter = random_drafter(target, seed=14, clustered=True, num_centroids=16, centroid_top_k=3)
    params = [SamplingParams(temperature=0.7, top_k=20, seed=1), SamplingParams(),
              SamplingParams(temperature=1.3, top_p=0.8, seed=2)]
    ps = [_prompt(n, n) for n in (4, 9, 6)]
    prop, inp = our_drafts(target, drafter, ps, 3, params=params)
    # replay the drafter by hand with the proposed tokens
    ctx = drafter.context(target.cfg, inp.cache)
    tok, h = inp.last_tokens, inp.last_hidden
    for i in range(3):
        logits, h = drafter.step(target.embed_tokens(tok), h, ctx)
        for r, p in enumerate(params):
            if p.greedy:
                assert int(prop.tokens[r, i]) == int(logits[r].argmax())
            else:
                q = probabilities(logits[r], p)
                torch.testing.assert_close(prop.probs[r, i], q)
                assert q[prop.tokens[r, i]] > 0
                assert (q[~torch.isfinite(logits[r])] == 0).all()  # masked clusters: probability 0
        tok = prop.tokens[:, i]


# ---- checkpoint errors -----------------------------------------------------------------------------


def _saved(target, folder, **kw):
    save_drafter(random_drafter(target, seed=15, **kw), folder, draft_tokens=2)
    return folder


def _edit_config(folder, fn):
    p = folder / "config.json"
    raw = json.loads(p.read_text())
    fn(raw)
    p.write_text(json.dumps(raw))


def test_drafter_for_another_target_is_rejected(targets, tmp_path):
    _, llama = targets("llama")
    _, gemma3 = targets("gemma3")
    _, e2b = targets("e2b")
    _, b31 = targets("31b")
    folder = _saved(e2b, tmp_path / "e2b")
    with pytest.raises(CheckpointError, match="sliding_attention"):
        load_drafter(folder, llama)  # Llama has no sliding layers
    with pytest.raises(CheckpointError, match="K/V layout of (sliding|full)_attention"):
        load_drafter(folder, b31)  # 2 kv heads vs 1
    with pytest.raises(CheckpointError, match="K/V layout of sliding_attention"):
        load_drafter(folder, gemma3)
    bad_vocab = tmp_path / "vocab"
    _saved(e2b, bad_vocab)
    _edit_config(bad_vocab, lambda r: r["text_config"].update(vocab_size=640))
    with pytest.raises(CheckpointError, match="vocabulary size: drafter 640, target 320"):
        load_drafter(bad_vocab, e2b)
    bad_hidden = tmp_path / "hidden"
    _saved(e2b, bad_hidden)
    _edit_config(bad_hidden, lambda r: r.update(backbone_hidden_size=96))
    with pytest.raises(CheckpointError, match="backbone hidden size: drafter expects 96, target has 64"):
        load_drafter(bad_hidden, e2b)
    bad_window = tmp_path / "window"
    _saved(e2b, bad_window)
    _edit_config(bad_window, lambda r: r["text_config"].update(sliding_window=16))
    with pytest.raises(CheckpointError, match="sliding window"):
        load_drafter(bad_window, e2b)


def test_malformed_drafter_folders(targets, tmp_path):
    _, target = targets("llama")
    with pytest.raises(CheckpointError, match="not found"):
        load_drafter(tmp_path / "nope", target)
    folder = _saved(target, tmp_path / "ok")
    assert load_drafter(folder, target).draft_tokens == 2
    wrong_type = _saved(target, tmp_path / "type")
    _edit_config(wrong_type, lambda r: r.update(model_type="llama"))
    with pytest.raises(CheckpointError, match="model_type is 'llama', expected 'gemma4_assistant'"):
        load_drafter(wrong_type, target)
    no_cfg = _saved(target, tmp_path / "nocfg")
    (no_cfg / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_drafter(no_cfg, target)
    no_w = _saved(target, tmp_path / "now")
    (no_w / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_drafter(no_w, target)
    missing = _saved(target, tmp_path / "missing")
    sd = load_file(missing / "model.safetensors")
    del sd["pre_projection.weight"]
    save_file(sd, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor\\(s\\) pre_projection.weight"):
        load_drafter(missing, target)
    shaped = _saved(target, tmp_path / "shape")
    sd = load_file(shaped / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, shaped / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj.weight has shape \\(3, 3\\)"):
        load_drafter(shaped, target)
    perm = _saved(target, tmp_path / "perm", clustered=True, num_centroids=20, centroid_top_k=2)
    sd = load_file(perm / "model.safetensors")
    sd["masked_embedding.token_ordering"] = torch.zeros(VOCAB, dtype=torch.long)
    save_file(sd, perm / "model.safetensors")
    with pytest.raises(CheckpointError, match="token_ordering is not a permutation"):
        load_drafter(perm, target)


def test_for_target_covers_every_family(targets):
    for name, types in [("llama", {"full_attention"}), ("gemma3", {"sliding_attention", "full_attention"}),
                        ("31b", {"sliding_attention", "full_attention"})]:
        _, t = targets(name)
        cfg = DrafterConfig.for_target(t.cfg, num_layers=3)
        assert set(cfg.layer_types) == types and cfg.layer_types[-1] == "full_attention"
        MTPDrafter(cfg).check_target(t.cfg)
    _, b31 = targets("31b")
    cfg = DrafterConfig.for_target(b31.cfg, 2)
    full = b31.cfg.layers[b31.cfg.last_cache_layer("full_attention")]
    assert cfg.kv("full_attention").n_kv_heads == full.n_kv_heads == 1 and cfg.kv("full_attention").head_dim == 32
    with pytest.raises(ValueError, match="num_centroids"):
        DrafterConfig.for_target(b31.cfg, 1, clustered=True, num_centroids=7)


def test_one_call_chain_arguments_are_kept_until_the_drafter_changes(tmp_path):
    """greedy_chain keeps its per-drafter arguments between rounds (building them cost ~0.19 ms a
    round); an in-place change to a norm it copies, quantize() and a new target each rebuild them,
    so the chain keeps drafting what the torch path drafts."""
    from mtpspec import kernels
    from mtpspec.models.quantize import quantize_model

    if kernels.kernel_info()["path"] != "cpp":
        pytest.skip("C++ kernels not available")
    target = quantize_model(tiny_target("llama", tmp_path)[1], "int4")
    # bf16: the chain takes fp32 copies of the norm weights (an fp32 drafter's would be the same tensors)
    drafter = random_drafter(target, seed=5, clustered=True, num_centroids=20, centroid_top_k=4)
    drafter = drafter.to(torch.bfloat16).prepare()
    _, inp = our_drafts(target, drafter, [_prompt(11, 0), _prompt(11, 1)], 1)

    def chain_and_reference(tgt=target):
        with torch.inference_mode():
            ctx = drafter.context(tgt.cfg, inp.cache)
            chain = drafter.greedy_chain(tgt, inp.last_tokens, inp.last_hidden, ctx, 4)
            tok, hid, ref = inp.last_tokens, inp.last_hidden, []
            for _ in range(4):
                s, hid = drafter.step_state(tgt.embed_tokens(tok), hid, ctx)
                tok = drafter.argmax(s)
                ref.append(tok)
        return chain, torch.stack(ref, 1)

    chain, before = chain_and_reference()
    assert torch.equal(chain, before)
    static = drafter.__dict__["_chain_cache"][2]
    assert torch.equal(chain_and_reference()[0], before) and drafter.__dict__["_chain_cache"][2] is static  # kept
    with torch.no_grad():  # an in-place update of copied weights (as an optimizer step makes)
        for layer in drafter.model.layers:
            layer.post_feedforward_layernorm.weight.mul_(-3.0)
    chain, after = chain_and_reference()
    assert not torch.equal(after, before)  # the change matters ...
    assert torch.equal(chain, after)  # ... and the chain sees it
    drafter.quantize("int8")
    chain, ref = chain_and_reference()
    assert torch.equal(chain, ref) and drafter.__dict__["_chain_cache"][2] is not static
    other = quantize_model(tiny_target("llama", tmp_path / "other")[1], "int8")  # another target, int8 weights
    chain, ref = chain_and_reference(other)
    assert torch.equal(chain, ref) and drafter.__dict__["_chain_cache"][0]() is other


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("target_quant", [None, "int4"])
def test_one_call_greedy_chain_equals_the_torch_path(targets, name, dtype, quant, target_quant, tmp_path):
    """`MTPDrafter.greedy_chain` (skinny_gemm.cpp `drafter_chain`: every drafting step of a greedy
    chain in one call) drafts exactly the tokens of `step_state` + `argmax` repeated, for fp32 and
    bf16 drafters, dense and quantized, reading the embedding of a quantized target (tied, packed)
    or of an untied dense one, at batch 1, 3 rows at one length and 3 rows at different lengths
    (a ragged batch: each row reads its own span of keys, a sliding window starting later for the
    longer rows; past a shorter row's length the cache holds NaN, which it must never read);
    MtpProposer takes it for all-greedy rounds. It declines (None) a full head."""
    from mtpspec import kernels
    from mtpspec.decoding.mtp import MtpProposer
    from mtpspec.models.quantize import quantize_model

    if kernels.kernel_info()["path"] != "cpp":
        pytest.skip("C++ kernels not available")
    _, target = targets(name) if not target_quant else tiny_target(name, tmp_path)  # quantize_model works in place
    if target_quant:
        target = quantize_model(target, target_quant)
    drafter = random_drafter(target, seed=5, clustered=True, num_centroids=20, centroid_top_k=4).to(dtype).prepare()
    if quant:
        drafter.quantize(quant)
    ran = 0
    for lengths in ([11], [11, 11, 11], [11, 6, 17]):
        _, inp = our_drafts(target, drafter, [_prompt(n, s) for s, n in enumerate(lengths)], 1)
        for layer in inp.cache.k:  # poison what lies past each row's length
            for b, n in enumerate(inp.cache.lengths.tolist()):
                inp.cache.k[layer][b, :, n:] = float("nan")
                inp.cache.v[layer][b, :, n:] = float("nan")
        with torch.inference_mode():
            ctx = drafter.context(target.cfg, inp.cache)
            chain = drafter.greedy_chain(target, inp.last_tokens, inp.last_hidden, ctx, 4)
            if chain is None:  # a dense tied target keeps its embedding only packed for its head
                assert target_quant is None and target.cfg.tie_embeddings
                continue
            tok, hid, ref = inp.last_tokens, inp.last_hidden, []
            for _ in range(4):
                s, hid = drafter.step_state(target.embed_tokens(tok), hid, ctx)
                tok = drafter.argmax(s)
                ref.append(tok)
            ragged = len(set(lengths)) > 1
            # the masked torch path sums a ragged row's attention in another order; in bf16 a last-bit
            # difference can flip a near-tie a few drafts on, so bf16 ragged rows are held to each row
            # drafted alone (one length: compared with the torch path above), bit for bit
            if dtype == torch.float32 or not ragged:
                assert torch.equal(chain, torch.stack(ref, 1)), (lengths, chain, torch.stack(ref, 1))
            if ragged:
                for b, n in enumerate(lengths):
                    _, one = our_drafts(target, drafter, [_prompt(n, b)], 1)
                    alone = drafter.greedy_chain(target, one.last_tokens, one.last_hidden,
                                                 drafter.context(target.cfg, one.cache), 4)
                    assert torch.equal(chain[b], alone[0]), (lengths, b, chain[b], alone[0])
            proposal = MtpProposer(drafter).propose(inp, 4)
            assert torch.equal(proposal.tokens, chain)
        ran += 1
    assert ran == 3 or (target_quant is None and target.cfg.tie_embeddings)
    if target_quant:
        with torch.inference_mode():
            full = drafter.full_head_copy()
            _, inp = our_drafts(target, full, [_prompt(11, 0)], 1)
            assert full.greedy_chain(target, inp.last_tokens, inp.last_hidden,
                                     full.context(target.cfg, inp.cache), 2) is None
