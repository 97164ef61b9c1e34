"""drafters/ab_fixed_shards.py: equal-steps arms on stored shards, and its target-layer start."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import mtpspec
from mtpspec.train import Trainer
from test_train import _cfg, data_files, tiny_gemma3_tok  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("ab_fixed_shards", REPO / "drafters" / "ab_fixed_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gemma3_shards(tiny_gemma3_tok, data_files, tmp_path_factory):  # noqa: F811
    """A tiny Gemma 3 run's work dir holding its first shard (16 self-distilled chats)."""
    tmp = tmp_path_factory.mktemp("abfs")
    Trainer(_cfg(data_files, tmp, target=str(tiny_gemma3_tok), max_steps=1, eval_prompts=None)).run()
    work = tmp / "drafter.work"
    assert len(list((work / "shards").glob("shard_*.pt"))) == 1
    return work


def test_the_target_layer_start_computes_what_the_target_layer_computes(tiny_gemma3_tok):  # noqa: F811
    """The copied layer's MLP branch and attention queries are the target's own (Gemma 3 norms are
    x * (1 + w), the drafter's x * w; its attention has scale 1, so the query norm carries the
    target's scale); its final norm is the target's."""
    from mtpspec.models.drafter import DrafterConfig
    from mtpspec.train.drafter_init import starting_drafter

    target = mtpspec.load(tiny_gemma3_tok).model
    tc = target.cfg
    wide = tc.layers[tc.last_cache_layer("full_attention")].intermediate_size
    drafter = starting_drafter(DrafterConfig.for_target(tc, intermediate_size=wide), target, seed=0,
                               train_head=None, init_from=None)
    src = _script().copy_target_layer(drafter, target)
    assert src == 2  # the tiny Gemma 3's only full-attention layer, whose K/V the drafter reads
    blk, lay = target.layers[src], drafter.model.layers[-1]
    x = torch.randn(5, tc.hidden_size) * 3
    with torch.no_grad():
        want = blk.mlp_out_norm(blk.mlp(blk.mlp_norm(x)))
        got = lay.post_feedforward_layernorm(lay.mlp(lay.pre_feedforward_layernorm(x)))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        hd = blk.attn.spec.head_dim
        q_t = blk.attn.q_norm(blk.attn.qkv(blk.attn_norm(x))[:, : blk.attn.q_size].view(5, -1, hd)) * tc.attn_scale
        q_d = lay.self_attn.q_norm(lay.self_attn.q_proj(lay.input_layernorm(x)).view(5, -1, hd))
        torch.testing.assert_close(q_d, q_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lay.self_attn.o_proj.weight, blk.attn.o.unpacked_weight())
        torch.testing.assert_close(drafter.model.norm(x), target.norm(x), rtol=1e-5, atol=1e-5)


def test_arms_train_on_the_stored_shards_and_write_drafters(tiny_gemma3_tok, gemma3_shards, tmp_path):  # noqa: F811
    mod = _script()
    runs = {}
    for arm in ("base", "target-layer", "answers:3+shards:1", "prompt"):
        out = tmp_path / arm.replace(":", "").replace("+", "-")
        mod.main(["--target", str(tiny_gemma3_tok), "--shards", str(gemma3_shards), "--arm", arm, "--out", str(out),
                  "--batch-size", "4"])
        runs[arm] = json.loads(Path(str(out) + ".history.json").read_text())
        assert json.loads((out / "training.json").read_text())["arm"] == arm
        engine = mtpspec.load(tiny_gemma3_tok, drafter=str(out))  # a drafter the target accepts
        assert engine.drafter_name and engine.plan.proposer is not None
    assert [len(h) for h in runs.values()] == [4, 4, 4, 4]  # one pass: 16 sequences in batches of 4
    # answers cut after 3 tokens: at most 4 trained anchors per sequence (the prompt's last + 3)
    assert all(sum(h["positions"]) <= 4 * 4 * 4 for h in runs["answers:3+shards:1"])
    assert sum(runs["base"][0]["positions"]) > 4 * 4 * 4
    # the same batches: the arms differ only in the drafter, so the base arm's positions are equal
    assert [h["positions"] for h in runs["base"]] == [h["positions"] for h in runs["target-layer"]]
    assert runs["base"][0]["loss"] != runs["target-layer"][0]["loss"]
    # over the pass, the first drafting step trains the label (the target's next token) at every
    # position from loss_from - 1 on (base) or at every anchor, positions 1 .. L-1 (prompt): the
    # prompt's positions too
    shard = torch.load(gemma3_shards / "shards" / "shard_00000.pt", weights_only=False)
    assert min(a.loss_from for a in shard) > 2
    assert sum(h["positions"][0] for h in runs["base"]) == sum(len(a) - a.loss_from + 1 for a in shard)
    assert sum(h["positions"][0] for h in runs["prompt"]) == sum(len(a) - 1 for a in shard)


def test_replay_batches_follow_the_one_commands_schedule():
    """--replay 0.5: the first shard alone, then each later shard's samples once each, half of every
    batch, the other half drawn from the shards before it; 0: one shuffled pass, each shard once."""
    shards = [[(r, i) for i in range(8)] for r in range(3)]
    plain = list(_script().batches(shards, 4, 0, 0.0))
    assert len(plain) == 6 and sorted(x for b in plain for x in b) == sorted(x for s in shards for x in s)
    assert [{r for r, _ in b} for b in plain] == [{0}, {0}, {1}, {1}, {2}, {2}]
    replay = list(_script().batches(shards, 4, 0, 0.5))
    assert len(replay) == 2 + 4 + 4 and all(len(b) == 4 for b in replay)
    assert sorted(replay[0] + replay[1]) == shards[0]
    for r, steps in ((1, replay[2:6]), (2, replay[6:])):
        assert sorted(x for b in steps for x in b[:2]) == shards[r]  # each new sample once
        assert all(x[0] < r for b in steps for x in b[2:])  # the rest replayed from earlier shards
    assert replay == list(_script().batches(shards, 4, 0, 0.5))  # a pure function of the seed


def test_bad_arms_and_targets_are_refused(tiny_with_tokenizer, gemma3_shards, tmp_path):
    mod = _script()
    with pytest.raises(SystemExit, match="unknown arm part 'answers:0'"):
        mod.parse_arm("base+answers:0")
    with pytest.raises(SystemExit, match="unknown arm part 'prompt:2'"):
        mod.parse_arm("prompt:2")
    with pytest.raises(SystemExit, match="--replay must be in"):
        mod.main(["--target", str(tiny_with_tokenizer), "--shards", str(gemma3_shards), "--arm", "base",
                  "--out", str(tmp_path / "x"), "--replay", "1"])
    with pytest.raises(SystemExit, match="not Gemma-style"):
        mod.main(["--target", str(tiny_with_tokenizer), "--shards", str(gemma3_shards), "--arm", "target-layer",
                  "--out", str(tmp_path / "x")])
