"""The `self-instruct` data recipe (Magpie: the target writes its own prompts): the pre-query
template of each family's chat template, prompts sampled through the decoding loop, seeded and
filtered, stored in the work dir and read again on resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest
import torch
from gemma4_configs import tiny_gemma4
from tiny_models import CHAT_FAMILIES, END_OF_TURN, save_family_tokenizer, tiny_hf_model

import mtpspec
from mtpspec.errors import InputError
from mtpspec.train import TrainConfig, Trainer, build_samples
from mtpspec.train import self_instruct as si
from mtpspec.train.checkpointing import RunState
from mtpspec.train.self_instruct import PromptFilter, generate_prompts, is_repetitive, normalize, user_turn

@pytest.fixture(scope="module")
def family_targets(tmp_path_factory):
    """family -> a tiny target folder (model + the family's tokenizer and chat template)."""
    out = {}
    for fam in CHAT_FAMILIES:
        folder = tmp_path_factory.mktemp(f"si-{fam}")
        (tiny_gemma4("e2b", seed=7) if fam == "gemma4" else tiny_hf_model(fam)).save_pretrained(folder)
        save_family_tokenizer(folder, fam)
        out[fam] = folder
    return out


@pytest.fixture(scope="module")
def engines(family_targets):
    return {fam: mtpspec.load(folder) for fam, folder in family_targets.items()}


def _generate(engine, n, **kw):
    opts = dict(temperature=1.0, seed=0, max_tokens=48, batch_size=16, eos_ids=engine.eos_ids, log=None)
    opts.update(kw)
    return generate_prompts(engine.model, engine.tokenizer, n, **opts)


@pytest.mark.parametrize("family", list(CHAT_FAMILIES))
def test_pre_query_template_is_the_template_up_to_the_user_message(family, engines):
    """The prompt the target continues is the template's text before a user message (a default
    system prompt included); the template's end-of-turn token ends the message."""
    tok = engines[family].tokenizer
    turn = user_turn(tok, engines[family].eos_ids)
    assert tok.decode(turn.prefix_ids, skip_special_tokens=False) == CHAT_FAMILIES[family][4]
    assert tok.convert_tokens_to_ids(END_OF_TURN[family]) in turn.stop_ids
    assert turn.stop_text is None
    # what the self-distillation renders for a generated prompt starts with the same tokens
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert rendered[: len(turn.prefix_ids)] == turn.prefix_ids


def test_plain_template_without_end_of_turn_token(tmp_path):
    """The tests' minimal template ("<s>role: content\\n") ends a turn with the next turn's <s>."""
    tiny_hf_model("llama").save_pretrained(tmp_path)
    save_family_tokenizer(tmp_path, "plain")
    eng = mtpspec.load(tmp_path)
    turn = user_turn(eng.tokenizer, eng.eos_ids)
    assert eng.tokenizer.decode(turn.prefix_ids, skip_special_tokens=False) == "<s>user: "
    assert eng.tokenizer.convert_tokens_to_ids("<s>") in turn.stop_ids
    assert _generate(eng, 3, max_tokens=64)


def test_template_with_plain_text_turn_markers(tmp_path):
    """A template marking turns with text only ("User: ...\\nAssistant: ..."): the user's message
    ends where the assistant's header starts (or at EOS)."""
    tok = save_family_tokenizer(tmp_path, "plain")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}Assistant:{% endif %}")
    turn = user_turn(tok)
    assert tok.decode(turn.prefix_ids) == "User: "
    assert turn.stop_text == "Assistant:" and turn.stop_ids == {tok.eos_token_id}
    check = si._text_stop(tok, turn.stop_text)
    assert check(tok.encode("the lazy dog\nAssis", add_special_tokens=False)) is None
    ids = tok.encode("the lazy dog\nAssistant: hello", add_special_tokens=False)
    assert check(ids) == len(ids)


@pytest.mark.parametrize("family", list(CHAT_FAMILIES))
def test_recipe_yields_distinct_prompts_for_each_family(family, engines):
    eng = engines[family]
    written: list[str] = []

    def write(n):
        written.extend(_generate(eng, n))
        return list(written)

    samples = build_samples(eng.tokenizer, ["self-instruct:6"], self_distill=True, max_len=256, self_instruct=write)
    assert 1 <= len(samples) == len(written) <= 6
    markup = set(CHAT_FAMILIES[family][0])
    for p in written:
        assert p.strip() == p and len(p) >= 8
        assert not any(m in p for m in markup)
        assert p != CHAT_FAMILIES[family][4].strip()
    assert len({normalize(p) for p in written}) == len(written)
    assert all(s.needs_response and s.loss_from == len(s.ids) for s in samples)
    rendered = {tuple(eng.encode(p)) for p in written}  # each sample is a generated prompt as a user message
    assert {tuple(s.ids) for s in samples} == rendered


def test_same_seed_same_prompts(engines):
    eng = engines["qwen2"]
    a = _generate(eng, 6, seed=3)
    assert _generate(eng, 6, seed=3) == a
    assert _generate(eng, 6, seed=3, batch_size=5) == a  # each request has its own seed: the batch does not matter
    assert _generate(eng, 6, seed=4) != a


def test_target_without_chat_template_is_a_clear_error(tmp_path):
    folder = tmp_path / "no-template"
    tiny_hf_model("llama").save_pretrained(folder)
    save_family_tokenizer(folder, "llama", template=False)
    eng = mtpspec.load(folder)
    with pytest.raises(InputError, match="no chat template"):
        _generate(eng, 4)
    with pytest.raises(InputError, match="no chat template"):
        Trainer(TrainConfig(data=["self-instruct:4"], out=str(tmp_path / "o"), hidden_size=32, progress=False), eng)
    with pytest.raises(InputError, match="needs the target model"):
        build_samples(eng.tokenizer, ["self-instruct:4"], self_distill=True, max_len=64)


def test_self_instruct_needs_self_distillation(engines, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(si, "generate_prompts", lambda *a, **k: calls.append(a) or ["a prompt to answer"])
    with pytest.raises(InputError, match="have no answers: use self-distillation"):
        Trainer(TrainConfig(data=["self-instruct:4"], out=str(tmp_path / "o"), hidden_size=32, progress=False,
                            self_distill=False), engines["llama"])
    assert calls == []  # refused before generating anything


@pytest.mark.parametrize("text,ended,reason", [
    ("What is the capital of France?", True, None),
    ("What is the capital of Fra", False, "truncated"),
    ("", True, "empty"),
    ("  \n ", True, "empty"),
    ("Hi!", True, "short"),
    ("Tell me a joke<|im_end|>", True, "markup"),
    ("<|im_start|>assistant\nSure", True, "markup"),
    ("Caf\ufffd menu please", True, "broken"),
    ("hahahahahahahahahahaha", True, "repetitive"),
    ("please please please please please please please please", True, "repetitive"),
    ("tell me about cats. tell me about cats. tell me about cats. tell me about cats.", True, "repetitive"),
])
def test_degenerate_prompts_are_dropped(text, ended, reason):
    f = PromptFilter(["<|im_start|>", "<|im_end|>"])
    assert f.reason(text, ended) == reason
    assert (f.add(text, ended) is None) == (reason is not None)
    assert f.dropped[reason] == (reason is not None)


@pytest.mark.parametrize("documents", [False, True])
def test_first_round_asks_for_the_prompts_expected_to_be_dropped_too(engines, monkeypatch, documents):
    asked = []
    monkeypatch.setattr(si, "_sample", lambda *a, **k: asked.append(len(a[3])) or [("a prompt %d" % i, True, 5)
                                                                                  for i in a[3]])
    _generate(engines["llama"], 30, batch_size=4, chunk=100, documents=documents)
    assert asked == [math.ceil(1.1 * 30 / si.EXPECTED_KEEP[documents])] == [44 if not documents else 35]


def test_a_later_round_asks_only_for_the_prompts_still_missing(engines, monkeypatch):
    """Not a full batch: after 26 of 30 prompts kept from 44 requests, the next round sends
    ceil(1.1 * 4 / (26 / 44)) = 8 requests, though 16 rows fit in a step."""
    asked = []
    monkeypatch.setattr(si, "_sample", lambda *a, **k: asked.append(len(a[3])) or [("a prompt %d" % i, not 26 <= i < 44, 5)
                                                                                  for i in a[3]])
    assert len(_generate(engines["llama"], 30, batch_size=16, chunk=100)) == 30
    assert asked == [44, 8]


def test_prompts_already_had_are_not_written_again(engines):
    eng = engines["qwen2"]
    whole = _generate(eng, 6)
    again = _generate(eng, 6, exclude=[p.upper() + "!" for p in whole[:3]])  # near-duplicates count
    assert again[:3] == whole[3:] and not {normalize(p) for p in again} & {normalize(p) for p in whole[:3]}


def test_near_duplicates_are_dropped():
    f = PromptFilter()
    assert f.add("  What is the capital of France?\n") == "What is the capital of France?"
    for dup in ("What is the capital of France?", "what is the capital of france", "What is the  capital of FRANCE!!"):
        assert f.add(dup) is None
    assert f.add("What is the capital of Spain?") is not None
    assert (f.kept, f.dropped["duplicate"]) == (2, 3)
    assert not is_repetitive("Write a function that sorts a list of numbers and explain how it works.")


def test_counts_and_rate_are_logged(engines):
    lines: list[str] = []
    prompts = _generate(engines["gemma3"], 4, log=lines.append)
    assert len(lines) >= 2 and all(" prompts kept of " in ln for ln in lines[:-1])  # progress after each chunk
    msg = lines[-1]
    generated = int(msg.split(" prompts generated")[0].rsplit(" ", 1)[-1])
    kept = int(msg.split(" kept")[0].rsplit(" ", 1)[-1])
    dropped = sum(int(part.split()[-1]) for part in msg.split("dropped: ")[1].split(";")[0].split(", "))
    assert kept >= len(prompts) and generated == kept + dropped
    assert "truncated" in msg and "prompts/s" in msg


def test_a_killed_generation_resumes_after_its_last_chunk(engines, tmp_path, monkeypatch):
    """Each chunk of requests is journaled as it completes: a run killed part way samples only
    the requests after the last complete chunk (a torn last line is sampled again) and keeps
    exactly the prompts an uninterrupted run keeps."""
    eng = engines["qwen2"]
    whole = _generate(eng, 12, batch_size=4, chunk=8)
    journal = tmp_path / "p.partial"
    real, asked = si._sample, []

    def dying(*args, **kw):
        if len(asked) == 2:
            raise KeyboardInterrupt  # killed during the third chunk
        asked.append(list(args[3]))
        return real(*args, **kw)

    monkeypatch.setattr(si, "_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        _generate(eng, 12, batch_size=4, chunk=8, journal=journal)
    assert asked == [list(range(0, 8)), list(range(8, 16))]
    with open(journal, "a") as f:
        f.write('{"rows": [["cut off')  # a write cut by the kill
    monkeypatch.setattr(si, "_sample", lambda *a, **k: asked.append(list(a[3])) or real(*a, **k))
    lines: list[str] = []
    assert _generate(eng, 12, batch_size=4, chunk=8, journal=journal, log=lines.append) == whole
    assert asked[2][0] == 16 and all(a[0] >= 16 for a in asked[2:])  # nothing sampled twice
    assert "resumed after 16 sampled prompts" in lines[0]
    path = tmp_path / "prompts.jsonl"
    got = si.load_or_generate(path, lambda j: _generate(eng, 12, batch_size=4, chunk=8, journal=j), log=None)
    assert got == whole and path.is_file() and not path.with_suffix(".partial").exists()  # journal removed


def _cfg(tmp_path, **kw):
    base = dict(data=["self-instruct:5"], out=str(tmp_path / "drafter"), draft_tokens=2, num_layers=1,
                hidden_size=32, distill_max_new_tokens=16, distill_batch=16, max_len=96, shard_size=8, batch_size=4,
                warmup=1, progress=False, checkpoint_every=1e9, self_instruct_max_tokens=48, eval_limit=2)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_reads_the_stored_prompts(engines, tmp_path, monkeypatch):
    calls = []
    real = si.generate_prompts

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(si, "generate_prompts", counting)
    eng = engines["llama"]
    first = Trainer(_cfg(tmp_path, max_steps=4), eng)
    first.run(on_step=lambda rec: rec["step"] == 1 and first.request_stop())
    assert calls == [5 + 2]  # and eval_limit more, held out for evaluation
    stored = list((tmp_path / "drafter.work").glob("self-instruct-*.jsonl"))
    assert [p.name for p in stored] == ["self-instruct-n7-seed0-t1-p1-len48.jsonl"]
    prompts = [json.loads(line)["prompt"] for line in stored[0].read_text().splitlines()][:-2]
    assert prompts and all(isinstance(p, str) and p for p in prompts)
    second = Trainer(_cfg(tmp_path, max_steps=4), eng)
    second.run(resume=True)
    assert calls == [7]  # read from the work dir, not generated again
    assert second.state.step == 4
    assert {tuple(s.ids) for s in second.shards.samples} == {tuple(eng.encode(p)) for p in prompts}
    Trainer(_cfg(tmp_path / "other", max_steps=1, self_instruct_temperature=0.7), eng)
    assert calls == [7, 7]  # another run (other options, other work dir) generates its own


def test_cli_options(family_targets, tmp_path):
    from typer.testing import CliRunner

    from mtpspec.cli import app

    out = tmp_path / "d"
    r = CliRunner().invoke(app, ["train-drafter", "--target", str(family_targets["gemma4"]), "--data", "self-instruct:4",
                                 "--out", str(out), "--hidden-size", "32", "--draft-tokens", "2", "--max-steps", "2",
                                 "--distill-tokens", "8", "--shard-size", "8", "--batch-size", "2", "--seed", "5",
                                 "--self-instruct-temperature", "0.9", "--self-instruct-top-p", "0.95",
                                 "--self-instruct-tokens", "40", "--eval-limit", "3"])
    assert r.exit_code == 0, r.output
    assert "prompts generated" in r.output and "prompts/s" in r.output
    assert (tmp_path / "d.work" / "self-instruct-n7-seed5-t0.9-p0.95-len40.jsonl").is_file()  # 4 + 3 held out
    assert len(json.loads((out / "training.json").read_text())["evals"]) == 1  # evaluated on the 3 at the end
    r = CliRunner().invoke(app, ["train-drafter", "--target", str(family_targets["gemma4"]), "--data", "self-instruct",
                                 "--out", str(tmp_path / "e"), "--self-instruct-temperature", "0"])
    assert r.exit_code == 2 and "self_instruct_temperature must be > 0" in r.output
    r = CliRunner().invoke(app, ["train-drafter", "--target", str(family_targets["gemma4"]), "--out", str(tmp_path / "f"),
                                 "--prompts", "0"])
    assert r.exit_code == 2 and "the number of prompts (--prompts) must be >= 1, got 0" in r.output
    # --prompts sizes the one command's data: 7 of 10 written by the target (+ 3 held out), 3 `tasks`
    r = CliRunner().invoke(app, ["train-drafter", "--target", str(family_targets["gemma4"]), "--out", str(tmp_path / "g"),
                                 "--prompts", "10", "--hidden-size", "32", "--draft-tokens", "2", "--max-steps", "1",
                                 "--distill-tokens", "8", "--shard-size", "8", "--batch-size", "2", "--max-len", "512",
                                 "--self-instruct-tokens", "40", "--eval-limit", "3"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.work" / "self-instruct-n10-seed0-t1-p1-len40.jsonl").is_file()


def test_one_command_recipe_without_data(engines, tmp_path, monkeypatch):
    """No data: self_instruct_prompts prompts, 70% written by the target itself (plus eval_limit
    held out for evaluation, never trained on) and 30% from the `tasks` recipe, answered by the
    target; the drafter is evaluated on the held-out ones; the head is clustered only for a large
    vocabulary."""
    calls = []
    real = si.generate_prompts
    monkeypatch.setattr(si, "generate_prompts", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    eng = engines["llama"]
    with pytest.raises(InputError, match="tasks:2: no sample fits --max-len 96"):
        Trainer(_cfg(tmp_path / "short", data=[], self_instruct_prompts=6, eval_limit=3, max_steps=2), eng)
    with pytest.raises(InputError, match="--max-len 640 is longer than the target's context \\(512 tokens\\)"):
        Trainer(_cfg(tmp_path / "long", data=[], max_len=640), eng)
    calls.clear()
    t = Trainer(_cfg(tmp_path, data=[], self_instruct_prompts=6, eval_limit=3, max_steps=2, max_len=512), eng)
    assert calls == [4 + 3]
    held = t.generated_heldout
    assert len(held) == 3 and t.heldout is not None and t.heldout.prompts == held
    trained = {tuple(s.ids) for s in t.shards.samples}
    assert len(trained) == 6 and not trained & {tuple(eng.encode(p)) for p in held}
    stored = next((tmp_path / "drafter.work").glob("self-instruct-*.jsonl"))
    written = {tuple(eng.encode(json.loads(line)["prompt"])) for line in stored.read_text().splitlines()}
    assert len(trained & written) == 4  # the other 2 are `tasks` requests
    assert not t.drafter.cfg.clustered  # tiny vocabulary
    res = t.run()
    assert res.evals and res.evals[-1]["step"] == 2
    # the training curve beside training.json: one point per evaluation, minutes of training
    from mtpspec.train.curve import plot_training_curve

    png = t.out / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = plot_training_curve(t.out / "training.json", tmp_path / "again.png")
    assert points == [(e["elapsed"] / 60, e["mean_accepted_length"]) for e in res.evals]
    assert plot_training_curve({"evals": []}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    assert TrainConfig(data=[], out="x").data_specs() == ["self-instruct:1400", "tasks:600"]
    assert TrainConfig(data=[], out="x", self_instruct_prompts=1).data_specs() == ["self-instruct:1"]
    assert TrainConfig(data=[], out="x").clustered_for(49152) and not TrainConfig(data=[], out="x").clustered_for(1000)
    assert not TrainConfig(data=[], out="x", clustered=False).clustered_for(49152)
    # named self-instruct data, mixed with other data, without --eval-prompts: the same held-out split
    calls.clear()
    (tmp_path / "mix").mkdir()
    t = Trainer(_cfg(tmp_path / "mix", data=["self-instruct:5", "instructions:3"], eval_limit=2, max_steps=1), eng)
    assert calls == [7] and len(t.generated_heldout) == 2 and t.heldout.prompts == t.generated_heldout


def _grow_cfg(tmp_path, **kw):
    # 8 prompts (6 written + 2 tasks) = one shard of 8; a later chunk is max(a shard, 8 / 4) = 8 more.
    # Steps: round 0 takes 2 (4 new per batch), each later round 4 (2 new, 2 replayed)
    base = dict(data=[], self_instruct_prompts=8, eval_limit=2, max_steps=8, max_len=512, replay=0.5)
    base.update(kw)
    return _cfg(tmp_path, **base)


def test_one_command_writes_more_prompts_once_all_are_trained(engines, tmp_path, monkeypatch):
    """The one command in a run a budget ends: when every shard is trained on, the target writes
    more prompts (seed + 1, + 2, ...; none it wrote before, held-out ones included) and the run
    trains on their shards instead of replaying; without --more-prompts it replays."""
    calls = []
    real = si.generate_prompts
    monkeypatch.setattr(si, "generate_prompts", lambda *a, **k: calls.append((a[2], k["seed"], list(k["exclude"])))
                        or real(*a, **k))
    eng = engines["llama"]
    t = Trainer(_grow_cfg(tmp_path / "grow"), eng)
    assert t.grows and t.shards.n_shards == 1 and calls == [(6 + 2, 0, [])]
    first = list(t.shards.samples)
    t.run()
    assert t.state.step == 8 and t.state.chunks == 3 and t.shards.n_shards == 3
    assert [h["round"] for h in t.state.history] == [0, 0, 1, 1, 1, 1, 2, 2]  # every round a new shard
    assert [(n, seed) for n, seed, _ in calls] == [(8, 0), (6, 1), (6, 2)]
    assert t.shards.samples[:8] == first  # the shards before keep their samples
    work = tmp_path / "grow" / "drafter.work"
    written = [json.loads(line)["prompt"] for n, seed in ((8, 0), (6, 1), (6, 2))
               for line in (work / f"self-instruct-n{n}-seed{seed}-t1-p1-len48.jsonl").read_text().splitlines()]
    assert len(written) == 8 + 6 + 6 and len({normalize(p) for p in written}) == len(written)
    assert set(calls[1][2]) == set(written[:8]) and set(calls[2][2]) == set(written[:14])  # held-out ones too
    ids = [tuple(s.ids) for s in t.shards.samples]
    assert len(ids) == len(set(ids)) > 16 and not set(ids) & {tuple(eng.encode(p)) for p in t.generated_heldout}
    assert TrainConfig(data=[], out="x").data_specs(chunk=1) == ["self-instruct:350", "tasks:150"]
    assert TrainConfig(data=[], out="x", shard_size=128, self_instruct_prompts=100).data_specs(chat=False, chunk=2) \
        == ["self-text:64", "tasks:64"]
    # without --more-prompts, or without a limit (epochs end the run), the run replays its one shard
    calls.clear()
    fixed = Trainer(_grow_cfg(tmp_path / "fixed", more_prompts=False), eng)
    fixed.run()
    assert fixed.state.step == 8 and fixed.state.chunks == 1 and fixed.shards.n_shards == 1 and len(calls) == 1
    assert not TrainConfig(data=[], out="x").grows() and TrainConfig(data=[], out="x", time_budget=60).grows()
    assert not TrainConfig(data=["chitchat"], out="x", time_budget=60).grows()


def test_time_budget_is_the_whole_run_and_a_chunk_starts_only_with_room_for_it(engines, tmp_path, monkeypatch, capsys):
    """--time-budget counts the run's setup (writing the first prompts takes >= 2.5 s here) and
    keeps the final evaluation inside it; a chunk of more prompts is written only when the budget
    has room to write it (as long as the last chunk took, or the first prompts scaled to a chunk's
    size) and answer its first shard: otherwise the run replays instead of writing prompts it has
    no time to train on."""
    real = si.generate_prompts

    def slow(*a, **k):
        time.sleep(2.5)
        return real(*a, **k)

    monkeypatch.setattr(si, "generate_prompts", slow)
    t = Trainer(_grow_cfg(tmp_path, max_steps=None, time_budget=5.0), engines["llama"])
    assert t.data_seconds >= 2.5 and t.setup_seconds >= t.data_seconds
    # the room a chunk needs (8 prompts a chunk, as many as the first: the estimate is data_seconds)
    t.data_seconds, t.shard_seconds = 40.0, 5.0
    t.cfg = replace(t.cfg, time_budget=100.0)
    t.state.elapsed = 54.0
    assert t._room_for_more_data()  # 54 + 40 + 5 < 100
    t.state.elapsed = 56.0
    assert not t._room_for_more_data()
    t.chunk_seconds = 30.0  # a chunk written live: its time is the estimate
    assert t._room_for_more_data()
    t.state.evals = [{"eval_seconds": 10.0}]  # the final evaluation's time is kept too
    assert not t._room_for_more_data()
    assert not t._limit_reached() and t._reserve() == 10.0
    t.state.elapsed = 90.0
    assert t._limit_reached()  # 90 + 10 >= 100
    t.state.evals = [{"eval_seconds": 10.0}, {"eval_seconds": 9.0}, {"eval_seconds": 280.0}]
    assert t._reserve() == 10.0  # the median: one slow evaluation does not end training early
    # the run: no room for a chunk (its estimate exceeds the budget), so it replays shard 1
    budget = t.setup_seconds + 2.0  # the setup (seconds, by machine) and 2 s of steps
    t.cfg, t.state, t.chunk_seconds, t.data_seconds = replace(t.cfg, time_budget=budget), RunState(), None, 1e6
    t.run()
    st = t.state
    assert st.history[0]["elapsed"] >= 2.5  # the writing before the first step is in the budget
    assert st.chunks == 1 and t.shards.n_shards == 1 and not t.grows
    assert len({h["round"] for h in st.history}) > 1  # replay rounds
    # the budget (2 s of steps) ends before --eval-every (600 s): the run evaluated halfway through
    # what was left, kept that evaluation's time for the final one and so ends at its budget, not
    # past it by the final evaluation
    assert len(st.evals) >= 2 and st.evals[0]["step"] < st.step
    assert budget - 1.0 < st.elapsed < budget + 1.0 and st.elapsed < st.history[-1]["elapsed"] + 2.0
    ran = t.cfg  # the run's configuration, resumed below
    t.state.elapsed = budget - 3.0
    assert t._eval_interval() == pytest.approx(1.5)  # half of what is left
    t.cfg = replace(t.cfg, time_budget=3600.0)
    assert t._eval_interval() == 600.0  # --eval-every, when the budget has room for it
    t.cfg = replace(t.cfg, time_budget=None)
    assert t._eval_interval() == 600.0
    t.cfg = replace(t.cfg, eval_every=None)
    assert t._eval_interval() is None
    # a budget the setup used up: no step, and the run says why
    capsys.readouterr()
    late = Trainer(_grow_cfg(tmp_path / "late", max_steps=None, time_budget=1.0), engines["llama"])
    late.run()
    assert late.state.step == 0 and "ran out before the first step" in capsys.readouterr().err
    # a resumed run past its budget took steps before: it stops without that message
    again = Trainer(replace(ran, time_budget=1.0), engines["llama"])
    again.run(resume=True)
    assert again.state.step == st.step and "ran out before the first step" not in capsys.readouterr().err


def test_more_prompts_resume_exactly_and_stop_when_nothing_new_comes(engines, tmp_path, monkeypatch):
    eng = engines["llama"]
    straight = Trainer(_grow_cfg(tmp_path / "a"), eng)
    straight.run()
    calls = []
    real = si.generate_prompts
    monkeypatch.setattr(si, "generate_prompts", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    first = Trainer(_grow_cfg(tmp_path / "b"), eng)
    first.run(on_step=lambda rec: rec["step"] == 3 and first.request_stop())  # in chunk 1's round
    assert first.state.chunks == 2 and calls == [0, 1]
    second = Trainer(_grow_cfg(tmp_path / "b"), eng)
    second.run(resume=True)
    assert calls == [0, 1, 2]  # chunks 0 and 1 rebuilt from their stored prompts, then chunk 2 written
    assert (tmp_path / "b" / "drafter.work" / "self-instruct-n6-seed1-t1-p1-len48.jsonl").is_file()
    assert second.state.chunks == straight.state.chunks == 3
    assert second.shards.samples == straight.shards.samples
    for (n, a), (_, b) in zip(straight.drafter.state_dict().items(), second.drafter.state_dict().items()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in straight.state.history] == [h["loss"] for h in second.state.history]
    # a chunk the target can write nothing new for: the run replays from then on (and resumes so)
    def nothing_new(*a, **k):
        if k["seed"] == 1:
            raise InputError("self-instruct: none of the 48 prompts the target wrote was usable (dropped: duplicate 48)")
        return real(*a, **k)

    monkeypatch.setattr(si, "generate_prompts", nothing_new)
    stuck = Trainer(_grow_cfg(tmp_path / "c", max_steps=5), eng)
    lines = []
    stuck.run(on_step=lambda rec: lines.append(rec["round"]))
    assert lines == [0, 0, 1, 1, 2]  # replay rounds (of 8 / 4 steps) after shard 1
    assert stuck.state.chunks == 2 and stuck.shards.n_shards == 1 and not stuck.grows
    again = Trainer(_grow_cfg(tmp_path / "c", max_steps=7), eng)
    again.run(resume=True)
    assert again.state.chunks == 2 and again.shards.n_shards == 1 and again.state.step == 7


def test_more_prompts_keep_only_samples_not_trained_on(engines, tmp_path, monkeypatch):
    """A later chunk's samples that equal earlier ones (here: the target writes chunk 0's prompts
    again) are dropped; its new ones (the `tasks` draw of seed 1) are kept."""
    real = si.generate_prompts
    monkeypatch.setattr(si, "generate_prompts", lambda *a, **k: real(*a, **{**k, "seed": 0, "exclude": ()}))
    eng = engines["llama"]
    t = Trainer(_grow_cfg(tmp_path, max_steps=3), eng)
    t.run()
    assert t.state.chunks == 2 and t.shards.n_shards == 2
    ids = [tuple(s.ids) for s in t.shards.samples]
    assert len(ids) == len(set(ids)) and 0 < len(ids) - 8 < 8
    assert all(s.source.startswith("tasks/") for s in t.shards.samples[8:])


# ---- self-text: a target without a chat template writes openings of documents --------------------
@pytest.fixture(scope="module")
def base_engines(tmp_path_factory):
    """family -> a tiny target whose tokenizer has no chat template (a base model)."""
    out = {}
    for fam in ("llama", "gemma3"):
        folder = tmp_path_factory.mktemp(f"base-{fam}")
        tiny_hf_model(fam).save_pretrained(folder)
        save_family_tokenizer(folder, fam, template=False)
        out[fam] = mtpspec.load(folder)
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_self_text_documents_for_a_target_without_chat_template(family, base_engines):
    eng = base_engines[family]
    turn = si.document_turn(eng.tokenizer, eng.eos_ids)
    assert turn.prefix_ids == [eng.tokenizer.bos_token_id] and turn.document
    assert eng.tokenizer.eos_token_id in turn.stop_ids
    # 12 tokens: a random model almost never ends a document that soon; the length limit ends the
    # opening, which is kept (as a user message it would be dropped as truncated)
    written = _generate(eng, 6, max_tokens=12, documents=True)
    assert len(written) == 6 and len({normalize(p) for p in written}) == 6
    assert all(p.strip() == p and len(p) >= 8 for p in written)
    with pytest.raises(InputError, match="no chat template.*self-text"):
        _generate(eng, 6, max_tokens=12)
    samples = build_samples(eng.tokenizer, ["self-text:6"], self_distill=True, max_len=64,
                            self_instruct=lambda n, documents=False: written[:n] if documents else pytest.fail("not documents"))
    assert sorted(s.source for s in samples) == sorted(f"self-text/{i}" for i in range(6))
    # plain text, encoded as a raw prompt is for generation (special tokens as the tokenizer adds them)
    assert {tuple(s.ids) for s in samples} == {tuple(eng.encode(p)) for p in written}
    assert all(s.needs_response and s.loss_from == len(s.ids) for s in samples)
    with pytest.raises(InputError, match="have no answers"):
        build_samples(eng.tokenizer, ["self-text:6"], self_distill=False, max_len=64)


def test_document_turn_without_bos_starts_from_eos():
    class Tok:
        bos_token_id, eos_token_id = None, 5

    assert si.document_turn(Tok()).prefix_ids == [5]
    Tok.eos_token_id = None
    with pytest.raises(InputError, match="no beginning- or end-of-sequence token"):
        si.document_turn(Tok())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_base_models_training_prompts_are_rendered_as_inference_renders_them(family, base_engines, tmp_path):
    """Without a chat template, a training prompt is the text the target continues at inference
    (`Engine.encode`; a conversation joined by blank lines, `encode_prompt`), so that the drafter
    trains on the contexts the broad benchmark and the CLI give such a target."""
    from mtpspec.bench.heldout import Prompt, encode_prompt

    eng = base_engines[family]
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": "And another one?"}]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Write a haiku about rain."}) + "\n" + json.dumps({"messages": turns}) + "\n")
    samples = build_samples(eng.tokenizer, [str(data)], self_distill=True, max_len=256)
    assert sorted(s.ids for s in samples) == sorted([
        eng.encode("Write a haiku about rain."), encode_prompt(eng, Prompt("multi_turn-01", "multi_turn", tuple(turns)))])
    assert all(s.needs_response and s.loss_from == len(s.ids) for s in samples)


def test_one_command_recipe_on_a_base_model_writes_documents_and_adds_tasks(base_engines, tmp_path, monkeypatch):
    """No data and no chat template: the one command trains on openings the target writes
    (`self-text`, held out and evaluated as with self-instruct) and as many `tasks` requests,
    rendered as plain text."""
    from mtpspec.train.tasks import task_prompts

    calls = []
    real = si.generate_prompts
    monkeypatch.setattr(si, "generate_prompts", lambda *a, **k: calls.append((a[2], k.get("documents"))) or real(*a, **k))
    eng = base_engines["llama"]
    t = Trainer(_cfg(tmp_path, data=[], self_instruct_prompts=6, eval_limit=3, max_steps=2,
                     self_instruct_max_tokens=16), eng)
    assert calls == [(6, True)]
    assert [p.name for p in (tmp_path / "drafter.work").glob("self-*.jsonl")] == ["self-text-n6-seed0-t1-p1-len16.jsonl"]
    held = t.generated_heldout
    assert len(held) == 3 and t.heldout.prompts == held
    trained = {tuple(s.ids) for s in t.shards.samples}
    assert len(trained) == 6 and not trained & {tuple(eng.encode(p)) for p in held}
    tasks = {tuple(eng.encode(m[-1]["content"])) for _, m in task_prompts(0)}
    assert len(trained & tasks) == 3
    assert t.run().evals[-1]["step"] == 2
    assert TrainConfig(data=[], out="x").data_specs(chat=False) == ["self-text:1000", "tasks:1000"]
    assert TrainConfig(data=["chitchat"], out="x").data_specs(chat=False) == ["chitchat"]
