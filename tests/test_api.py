"""The public API and the CLI on a tiny model with a tokenizer; bad input gets one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mtpspec
from mtpspec.cli import app
from mtpspec.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def engine(tiny_with_tokenizer):
    return mtpspec.load(tiny_with_tokenizer)


def test_generate_text_and_token_prompts(engine):
    r = engine.generate("hello world", max_new_tokens=12)
    assert isinstance(r, mtpspec.GenerationResult)
    assert r.text == engine.decode(r.token_ids)
    assert r.stats["new_tokens"] == len(r.token_ids) <= 12
    assert r.stats["target_forwards"] >= 1 and r.stats["prefill_time"] > 0
    chat_ids = engine.encode("hello world")
    assert r.prompt_token_ids == chat_ids
    assert engine.tokenizer.decode(chat_ids).startswith("<s>user: hello world")
    # the same ids given directly give the same tokens
    assert engine.generate(chat_ids, max_new_tokens=12).token_ids == r.token_ids
    raw = engine.generate("hello world", max_new_tokens=5, chat=False)
    assert raw.prompt_token_ids == engine.tokenizer.encode("hello world")


def test_batch_of_prompts_equals_each_alone_and_batch_size_splits(engine):
    prompts = ["the quick brown fox", "hello", "a b c d e f g the lazy dog jumps"]
    alone = [engine.generate(p, max_new_tokens=10).token_ids for p in prompts]
    assert [r.token_ids for r in engine.generate(prompts, max_new_tokens=10)] == alone
    assert [r.token_ids for r in engine.generate(prompts, max_new_tokens=10, batch_size=2)] == alone


def test_seeded_sampling_reproducible(engine):
    a = engine.generate("hello", max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    b = engine.generate("hello", max_new_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids


def test_eos_and_stop_strings(engine):
    free = engine.generate("hello", max_new_tokens=30, chat=False)
    assert free.finish_reason in ("length", "stop")
    # stop on a piece of the text the model produces anyway
    text = free.text
    assert len(text) > 6
    cut = text[3:6]
    stopped = engine.generate("hello", max_new_tokens=30, chat=False, stop=[cut])
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(cut)]
    assert cut in engine.decode(stopped.token_ids)
    assert cut not in engine.decode(stopped.token_ids[:-1])
    # EOS: the model's eos id ends generation and is not part of the output
    eos = next(iter(engine.eos_ids))
    ids = free.token_ids
    from mtpspec.decoding.loop import Request, decode

    seq = decode(engine.model, [Request(free.prompt_token_ids, 30, eos_ids=frozenset([ids[4]]))])[0]
    assert seq.finish_reason == "stop" and seq.new_ids == ids[: ids.index(ids[4])]
    assert isinstance(eos, int)


def test_stream_yields_the_same_text(engine):
    stream = engine.stream("hello world", max_new_tokens=16)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == engine.generate("hello world", max_new_tokens=16).text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=2.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_invalid_generation_parameters(engine, kwargs, match):
    with pytest.raises(InputError, match=match):
        engine.generate("hello", **kwargs)


def test_empty_and_too_long_prompts(engine):
    with pytest.raises(InputError, match="empty"):
        engine.generate("   ")
    with pytest.raises(InputError, match="empty"):
        engine.generate([[]])
    with pytest.raises(InputError, match="context is 512 tokens"):
        engine.generate([[5] * 600])
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.generate([[5, 99999]])


def test_bad_checkpoints(tmp_path, tiny_with_tokenizer):
    with pytest.raises(CheckpointError, match="does not exist"):
        mtpspec.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        mtpspec.load(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_with_tokenizer, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        mtpspec.load(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    sd = load_file(bad / "model.safetensors")
    missing = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}
    save_file(missing, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor.*1.*mlp\.up_proj\.weight"):
        mtpspec.load(bad)
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj.weight has shape \(3, 3\), expected \(64, 64\)"):
        mtpspec.load(bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        mtpspec.load(bad)


runner = CliRunner()


def test_cli_generate_streams_answer_and_summary(tiny_with_tokenizer, engine):
    res = runner.invoke(app, ["generate", "hello world", "--model", str(tiny_with_tokenizer), "-n", "8"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == engine.generate("hello world", max_new_tokens=8).text.strip()
    assert "tok/s" in res.stderr and "tok/s" not in res.stdout


def test_cli_json_prompts_file(tmp_path, tiny_with_tokenizer, engine):
    pf = tmp_path / "prompts.txt"
    pf.write_text("hello\n\nthe quick brown fox\n")
    res = runner.invoke(app, ["generate", "--prompts-file", str(pf), "--model", str(tiny_with_tokenizer),
                              "-n", "6", "--json", "--batch-size", "1"])
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [ln["prompt"] for ln in lines] == ["hello", "the quick brown fox"]
    assert lines[1]["token_ids"] == engine.generate("the quick brown fox", max_new_tokens=6).token_ids
    assert {"new_tokens", "target_forwards", "tokens_per_second", "prefill_time"} <= set(lines[0]["stats"])


@pytest.mark.parametrize(
    "args,match",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--dtype", "int3"], "dtype"),
        (["--device", "cuda"], "CUDA is not available"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(tiny_with_tokenizer, args, match):
    res = runner.invoke(app, ["generate", "hello", "--model", str(tiny_with_tokenizer), *args])
    assert res.exit_code == 2
    assert match in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_cli_missing_model_folder(tmp_path):
    res = runner.invoke(app, ["generate", "hi", "--model", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_ngram_speculation_is_lossless_through_api_and_cli(tiny_with_tokenizer, engine):
    spec = mtpspec.load(tiny_with_tokenizer, drafter="ngram")
    prompts = ["the quick brown fox jumps over the lazy dog the quick brown fox", "hello world hello world"]
    plain = [r.token_ids for r in engine.generate(prompts, max_new_tokens=24)]
    for k in (None, 1, 4):
        got = spec.generate(prompts, max_new_tokens=24, draft_tokens=k)
        assert [r.token_ids for r in got] == plain
        assert all(r.stats["mean_accepted_length"] >= 1.0 for r in got)
    assert spec.generate(prompts[0], max_new_tokens=24, draft_tokens=0).stats["acceptance_per_position"] == []
    res = runner.invoke(app, ["generate", prompts[0], "--model", str(tiny_with_tokenizer), "-n", "24", "--ngram",
                              "--draft-tokens", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    line = json.loads(res.stdout)
    assert line["token_ids"] == plain[0]
    assert {"new_tokens", "target_forwards", "mean_accepted_length", "acceptance_per_position",
            "drafter_time_share", "tokens_per_second"} <= set(line["stats"])
    assert len(line["stats"]["acceptance_per_position"]) == 3


def test_draft_tree_through_api_and_cli(tiny_with_tokenizer, engine, tmp_path):
    from mtpspec.drafter_checkpoint import save_drafter
    from mtpspec.models.drafter import DrafterConfig, MTPDrafter

    d = MTPDrafter(DrafterConfig.for_target(engine.model.cfg, num_layers=1, hidden_size=32)).init_random(2, std=0.2)
    save_drafter(d, tmp_path / "drafter", draft_tokens=3)
    prompts = ["the quick brown fox", "hello world"]
    plain = [r.token_ids for r in engine.generate(prompts, max_new_tokens=16)]
    spec = mtpspec.load(tiny_with_tokenizer, drafter=tmp_path / "drafter", draft_tree="6:2:2")
    assert str(spec.plan.tree) == "6:2:2" and not spec.plan.tree_only_lone_sampled  # every round
    for k in (None, 3):
        assert [r.token_ids for r in spec.generate(prompts, max_new_tokens=16, draft_tokens=k)] == plain
    res = runner.invoke(app, ["generate", prompts[0], "--model", str(tiny_with_tokenizer), "-n", "16", "--drafter",
                              str(tmp_path / "drafter"), "--tree", "5:1:2", "-k", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["token_ids"] == plain[0]
    for bad, msg in (("0", "nodes must be"), ("5:a", "NODES or NODES:BEAM:BRANCH")):
        res = runner.invoke(app, ["generate", "hi", "--model", str(tiny_with_tokenizer), "--drafter",
                                  str(tmp_path / "drafter"), "--tree", bad])
        assert res.exit_code == 2 and msg in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(mtpspec.InputError, match="needs an MTP drafter"):
        mtpspec.load(tiny_with_tokenizer, drafter="ngram", draft_tree="4")
    from mtpspec.decoding.plan import AUTO_TREE

    auto = mtpspec.load(tiny_with_tokenizer, drafter=tmp_path / "drafter")  # default: AUTO_TREE for one sampled row
    assert auto.plan.tree == AUTO_TREE and auto.plan.tree_only_lone_sampled
    assert [r.token_ids for r in auto.generate(prompts, max_new_tokens=16)] == plain
    assert auto.generate(prompts[0], max_new_tokens=16, temperature=0.8, seed=1).token_ids  # one sampled row: a tree
    assert mtpspec.load(tiny_with_tokenizer, drafter=tmp_path / "drafter", draft_tree="none").plan.tree is None


def test_drafter_dtype_through_api_and_cli(tiny_with_tokenizer, engine, tmp_path):
    """The drafter runs in bf16 on CPU by default (fp32 target), in the target's dtype with None;
    its dtype never changes the output."""
    import torch
    from mtpspec.drafter_checkpoint import save_drafter
    from mtpspec.models.drafter import DrafterConfig, MTPDrafter

    d = MTPDrafter(DrafterConfig.for_target(engine.model.cfg, num_layers=1, hidden_size=32)).init_random(3, std=0.2)
    save_drafter(d, tmp_path / "drafter", draft_tokens=3)
    prompts = ["the quick brown fox", "hello world"]
    plain = [r.token_ids for r in engine.generate(prompts, max_new_tokens=16)]
    for ddt, want in (("auto", torch.bfloat16), (None, torch.float32), ("float32", torch.float32)):
        spec = mtpspec.load(tiny_with_tokenizer, drafter=tmp_path / "drafter", drafter_dtype=ddt)
        assert spec.model.dtype == torch.float32 and spec.proposer.drafter.dtype == want
        for k in (None, 3):
            assert [r.token_ids for r in spec.generate(prompts, max_new_tokens=16, draft_tokens=k)] == plain
        assert spec.generate(prompts[0], max_new_tokens=16, temperature=0.8, seed=1).token_ids  # sampled chains run
    with pytest.raises(mtpspec.InputError, match="dtype must be one of"):
        mtpspec.load(tiny_with_tokenizer, drafter=tmp_path / "drafter", drafter_dtype="int8")
    res = runner.invoke(app, ["generate", prompts[0], "--model", str(tiny_with_tokenizer), "-n", "16", "--drafter",
                              str(tmp_path / "drafter"), "--drafter-dtype", "float32", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["token_ids"] == plain[0]
    res = runner.invoke(app, ["generate", "hi", "--model", str(tiny_with_tokenizer), "--drafter",
                              str(tmp_path / "drafter"), "--drafter-dtype", "int8"])
    assert res.exit_code == 2 and "dtype must be one of" in res.stderr and "Traceback" not in res.stderr


def test_adaptive_draft_length_learns_across_calls(tiny_with_tokenizer):
    spec = mtpspec.load(tiny_with_tokenizer, drafter="ngram")
    spec.generate("hello world hello world", max_new_tokens=16)
    policy = spec.plan.adaptive_state(greedy=True)
    rounds = policy.rounds
    assert rounds > 0 and spec.plan.adaptive_state(greedy=False) is None
    spec.generate("the lazy dog the lazy dog", max_new_tokens=16)
    assert spec.plan.adaptive_state(greedy=True) is policy and policy.rounds > rounds  # the same state, still learning
    spec.generate("the lazy dog the lazy dog", max_new_tokens=16, temperature=0.8)
    sampled = spec.plan.adaptive_state(greedy=False)
    assert sampled is not policy and sampled.rounds > 0  # sampling accepts differently: its own state
    before = (policy.rounds, sampled.rounds)
    spec.generate("the lazy dog the lazy dog", max_new_tokens=16, temperature=0.8, seed=1)  # seeded: fixed K
    spec.generate("the lazy dog the lazy dog", max_new_tokens=16, draft_tokens=3)  # a fixed K for one call
    assert (policy.rounds, sampled.rounds) == before


def test_bad_draft_options(tiny_with_tokenizer, engine):
    with pytest.raises(InputError, match="draft_tokens"):
        engine.generate("hello", draft_tokens=-1)
    res = runner.invoke(app, ["generate", "hi", "--model", str(tiny_with_tokenizer), "--ngram", "--no-drafter"])
    assert res.exit_code == 2 and "at most one" in res.stderr


def test_cli_compare_reports_speedup_and_identity(tiny_with_tokenizer):
    res = runner.invoke(app, ["generate", "hello world hello world", "--model", str(tiny_with_tokenizer), "-n", "12",
                              "--ngram", "--compare"])
    assert res.exit_code == 0, res.stderr
    assert "identical output: yes" in res.stderr and "plain" in res.stderr
    res = runner.invoke(app, ["generate", "hello", "--model", str(tiny_with_tokenizer), "--compare"])
    assert res.exit_code == 2 and "--compare needs a drafter" in res.stderr
