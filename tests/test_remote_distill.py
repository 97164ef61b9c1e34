"""Self-distillation through an OpenAI-compatible server (mtpspec/train/remote.py): `mtpspec serve`
on 127.0.0.1 serving a tiny target answers the prompts; the shards equal local self-distillation's
for greedy answers; a killed run, restarted, asks for no stored answer again; the disagreement of
sampled answers with the target's greedy choice is measured; an unreachable server, another
model's vocabulary, a wrong model name, HTTP errors and timeouts get clear errors and keep what
was stored."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import mtpspec
from tiny_models import write_random_chats
from mtpspec.errors import InputError, MtpspecError
from mtpspec.serve.server import ServerThread, build, free_port
from mtpspec.train import TrainConfig, Trainer
from mtpspec.train.remote import AnswerCache, RemoteTeacher, Sampling, answer_key

pytestmark = pytest.mark.timeout(300)


class Recorder:
    """The server's ASGI app, wrapped: records the prompt of every /v1/completions request as it
    arrives and the token ids of every answer (`answers`: prompt -> ids); can delay requests, or
    answer some with an HTTP error (`fail(n)` -> status or None for the n-th request)."""

    def __init__(self, app) -> None:
        self.app, self.prompts, self.answers, self.delay, self.fail = app, [], {}, 0.0, None
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.prompts, self.answers = [], {}
        self.delay, self.fail = 0.0, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        with self.lock:
            self.prompts.append(tuple(json.loads(body)["prompt"]))
            n = len(self.prompts)
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.fail(n) if self.fail else None
        if status:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body",
                        "body": json.dumps({"error": {"message": f"injected failure {status}"}}).encode()})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        prompt, out = tuple(json.loads(body)["prompt"]), []

        async def keep(msg):
            if msg["type"] == "http.response.body":
                out.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    with self.lock:
                        self.answers[prompt] = json.loads(b"".join(out))["choices"][0]["token_ids"]
            await send(msg)

        await self.app(scope, replay, keep)


@pytest.fixture(scope="module")
def engine(tiny_with_tokenizer):
    return mtpspec.load(tiny_with_tokenizer)


@pytest.fixture(scope="module")
def server(engine):
    """`mtpspec serve`'s app for the tiny target on 127.0.0.1 (recorded)."""
    served = build(engine, max_batch_size=8, max_queue=256, max_len=512)
    rec = Recorder(served.app)
    srv = ServerThread(rec).start()
    yield srv.url, rec
    srv.stop()
    served.scheduler.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_random_chats(d / "chat.jsonl", 24, seed=0)
    return d


ARGS = dict(draft_tokens=2, hidden_size=32, distill_max_new_tokens=16, max_len=64, shard_size=8, batch_size=4,
            full_vocab_loss=True, max_steps=2)  # the CLI run in test_killed_run... uses the same


def _cfg(data, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=[str(data / "chat.jsonl")], out=str(out), progress=False, **{**ARGS, **kw})


def _all_shards(tr: Trainer) -> list:
    return [tr.shards[r] for r in range(tr.shards.n_shards)]


def _assert_same_shards(a: list, b: list) -> None:
    assert [len(s) for s in a] == [len(s) for s in b]
    for sa, sb in zip(a, b):
        for x, y in zip(sa, sb):
            assert x.loss_from == y.loss_from
            for f in ("ids", "hidden", "labels", "topk", "topk_logits"):
                assert torch.equal(getattr(x, f), getattr(y, f)), f
            for t in x.kv:
                assert torch.equal(x.kv[t][0], y.kv[t][0]) and torch.equal(x.kv[t][1], y.kv[t][1])


@pytest.fixture(scope="module")
def local_shards(engine, data, tmp_path_factory):
    """Local self-distillation's shards (the target's own greedy answers), harvested by a pass over
    the answers as a server's answers are (not recorded while answering: test_train.py checks that
    the two agree)."""
    import functools

    import mtpspec.train.trainer as trainer_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "build_shard", functools.partial(trainer_mod.build_shard, record=False))
        tr = Trainer(_cfg(data, tmp_path_factory.mktemp("local") / "d"), engine)
        return _all_shards(tr), tr


def test_greedy_answers_through_the_server_give_the_local_shards(engine, server, data, local_shards, tmp_path):
    url, rec = server
    rec.reset()
    local, local_tr = local_shards
    tr = Trainer(_cfg(data, tmp_path / "d", distill_url=url, distill_concurrency=4), engine)
    _assert_same_shards(_all_shards(tr), local)
    prompts = [tuple(s.ids) for s in tr.shards.samples if s.needs_response]
    assert sorted(rec.prompts) == sorted(prompts)  # every prompt asked once
    cached = [json.loads(ln) for ln in (tmp_path / "d.work" / "distill" / "answers.jsonl").read_text().splitlines()]
    assert len(cached) == len(prompts)
    # the target's greedy choice agrees with its own greedy answers, here through the server
    assert all(m["differ"] == 0 and m["answer_tokens"] > 0 for m in tr.shards.meta.values())
    res = tr.run()
    info = json.loads((res.out / "training.json").read_text())["distill"]
    assert info["answers_from"] == [url] and info["differ_fraction"] == 0.0
    assert info["answer_tokens"] == sum(m["answer_tokens"] for m in local_tr.shards.meta.values())
    assert len(info["shards"]) == 3
    # a new run over the same answers (its shards gone) asks the server for nothing
    rec.reset()
    for f in (tmp_path / "d.work" / "shards").glob("*"):
        f.unlink()
    again = Trainer(_cfg(data, tmp_path / "d2", work_dir=str(tmp_path / "d.work"), distill_url=url), engine)
    _assert_same_shards(_all_shards(again), local)
    assert rec.prompts == []
    # sampled answers are other answers: the greedy ones are not taken for them
    for f in (tmp_path / "d.work" / "shards").glob("*"):
        f.unlink()
    Trainer(_cfg(data, tmp_path / "d3", work_dir=str(tmp_path / "d.work"), distill_url=url,
                 distill_temperature=1.0), engine).shards[0]
    assert len(rec.prompts) == 8


def test_killed_run_restarts_without_asking_for_a_stored_answer_again(engine, server, data, local_shards, tmp_path,
                                                                      tiny_with_tokenizer):
    """`mtpspec train-drafter --distill-url` is killed (SIGKILL) while answers arrive; the restarted
    run requests only the answers the first one did not store, each once, and builds the same shards."""
    url, rec = server
    rec.reset()
    rec.delay = 0.15  # slow answers: the kill lands in the middle of the first shard
    out = tmp_path / "d"
    args = [sys.executable, "-m", "mtpspec.cli", "train-drafter", "--target", str(tiny_with_tokenizer),
            "--data", str(data / "chat.jsonl"), "--out", str(out), "--hidden-size", "32", "--draft-tokens", "2",
            "--distill-tokens", "16", "--max-len", "64", "--shard-size", "8", "--batch-size", "4", "--max-steps", "2",
            "--full-vocab-loss", "--distill-url", url, "--distill-concurrency", "2"]
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    answers = out.with_name("d.work") / "distill" / "answers.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (answers.is_file() and len(answers.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no answers stored"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stderr.close()
    first = list(rec.prompts)
    stored = AnswerCache(answers.parent)
    assert 3 <= len(stored) < 8  # killed inside the first shard of 8 prompts
    assert not (out.with_name("d.work") / "shards").exists()
    rec.reset()
    tr = Trainer(_cfg(data, out, distill_url=url, distill_concurrency=2), engine)  # the restarted run
    _assert_same_shards(_all_shards(tr), local_shards[0])
    second = rec.prompts
    keys = {p: answer_key(list(p), n, Sampling()) for p, n in
            zip([tuple(s.ids) for s in tr.shards.samples], [16] * len(tr.shards.samples))}
    assert not [p for p in second if keys[p] in stored]  # no stored answer requested again
    assert len(set(second)) == len(second)  # and none twice
    n_prompts = sum(s.needs_response for s in tr.shards.samples)
    assert len(second) == n_prompts - len(stored)
    assert len(first) >= len(stored)


def test_sampled_answers_measure_disagreement_and_resume(engine, server, data, tmp_path):
    url, rec = server
    rec.reset()
    cfg = _cfg(data, tmp_path / "d", distill_url=url, distill_temperature=1.0, shard_size=24)
    tr = Trainer(cfg, engine)
    shard = tr.shards[0]
    meta = tr.shards.meta[0]
    assert len(rec.prompts) == 24
    # the fraction of answer tokens where the local target's argmax differs from the server's token
    n = differ = 0
    target = engine.model
    for a in shard:
        with torch.no_grad():
            logits = target.forward(a.ids[None], target.new_cache(1, len(a))).logits[0]
        start = a.loss_from  # the prompt's length: the answer starts there
        n += len(a) - start
        differ += int((logits[start - 1 : -1].argmax(-1) != a.ids[start:]).sum())
    assert (meta["answer_tokens"], meta["differ"]) == (n, differ)
    for a in shard:  # the answers trained on are the server's tokens
        assert a.ids[a.loss_from :].tolist() == rec.answers[tuple(a.ids[: a.loss_from].tolist())]
    assert 0.3 < differ / n < 1  # a random tiny model sampled at temperature 1 rarely picks its argmax
    res = tr.run()
    assert json.loads((res.out / "training.json").read_text())["distill"]["differ"] == differ
    # the same sampling settings again: every answer comes from the work dir
    rec.reset()
    (tmp_path / "d.work" / "shards" / "shard_00000.pt").unlink()
    again = Trainer(_cfg(data, tmp_path / "e", work_dir=str(tmp_path / "d.work"), distill_url=url,
                         distill_temperature=1.0, shard_size=24), engine)
    _assert_same_shards([again.shards[0]], [shard])
    assert rec.prompts == []


def test_a_failing_server_keeps_the_answers_it_gave(engine, server, data, local_shards, tmp_path):
    url, rec = server
    rec.reset()
    rec.fail = lambda n: 503 if n > 5 else None  # the server goes down after 5 answers
    with pytest.raises(MtpspecError, match=r"HTTP 503: injected failure 503 \(after 0 retries.*answers received so "
                                           r"far are kept in .*rerun with --resume") as e:
        Trainer(_cfg(data, tmp_path / "d", distill_url=url, distill_retries=0), engine).shards[0]
    assert "Traceback" not in str(e.value)
    stored = AnswerCache(tmp_path / "d.work" / "distill")
    assert 5 <= len(stored) < 8
    rec.reset()
    tr = Trainer(_cfg(data, tmp_path / "d", distill_url=url), engine)
    _assert_same_shards(_all_shards(tr), local_shards[0])
    assert len(rec.prompts) == 24 - len(stored)


def test_wrong_model_name_and_unreachable_server(engine, server, data, tmp_path, tiny_with_tokenizer):
    url, rec = server
    with pytest.raises(InputError, match=r"serves '[^']+', not 'llama-70b' \(--distill-model\)"):
        Trainer(_cfg(data, tmp_path / "a", distill_url=url, distill_model="llama-70b"), engine).shards[0]
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InputError, match=r"cannot reach the distillation server .*--distill-url.*connection failed "
                                         r"\(ConnectError"):
        Trainer(_cfg(data, tmp_path / "b", distill_url=dead, distill_retries=0), engine).shards[0]
    from typer.testing import CliRunner

    from mtpspec.cli import app

    r = CliRunner().invoke(app, ["train-drafter", "--target", str(tiny_with_tokenizer), "--data", str(data / "chat.jsonl"),
                                 "--out", str(tmp_path / "c"), "--hidden-size", "32", "--distill-url", dead,
                                 "--distill-retries", "0"])
    assert r.exit_code == 2 and "mtpspec: error: cannot reach the distillation server" in r.output, r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["train-drafter", "--target", str(tiny_with_tokenizer), "--data", str(data / "chat.jsonl"),
                                 "--out", str(tmp_path / "c"), "--distill-temperature", "0.7"])
    assert r.exit_code == 2 and "give --distill-url" in r.output


# ---- a scripted server: answers of another vocabulary, text only, HTTP errors, timeouts ----------------
@pytest.fixture(scope="module")
def scripted():
    """A stand-in OpenAI server whose /v1/completions runs `state["answer"](body, n)` (n: requests so far)."""
    state = {"n": 0, "answer": None}
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state["n"] += 1
        out = state["answer"](body, state["n"])
        if asyncio.iscoroutine(out):
            out = await out
        return out if isinstance(out, JSONResponse) else JSONResponse(out)

    srv = ServerThread(app).start()
    yield srv.url, state
    srv.stop()


def _completion(text, ids=None, finish="length"):
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "x", "object": "text_completion", "choices": [choice], "usage": {"prompt_tokens": 3}}


def _teacher(url, engine, tmp_path, **kw):
    return RemoteTeacher(url, engine.tokenizer, engine.model.cfg.vocab_size, AnswerCache(tmp_path / "cache"),
                         backoff=0.01, **kw)


def test_another_vocabulary_is_detected_on_the_first_answer(engine, scripted, tmp_path):
    url, state = scripted
    tok = engine.tokenizer
    ids = tok.encode(" hello world", add_special_tokens=False)
    state["n"], state["answer"] = 0, lambda body, n: _completion("hello world", [5000, 17])
    with pytest.raises(InputError, match=r"token id 5000 is outside the target's vocabulary \(320 tokens\)"):
        _teacher(url, engine, tmp_path).answers([[1, 5, 6]], [8])
    assert state["n"] == 1  # one probe, not `concurrency` requests
    state["n"], state["answer"] = 0, lambda body, n: _completion("bonjour le monde", ids)
    with pytest.raises(InputError, match="vocabulary mismatch: the answer's token ids decode to ' hello world'"):
        _teacher(url, engine, tmp_path).answers([[1, 5, 6], [1, 7, 8]], [8, 8])
    assert state["n"] == 1
    assert not (tmp_path / "cache" / "answers.jsonl").exists()  # nothing wrong was stored
    # the right vocabulary: ids stored as given; a text-only server: the text re-tokenized
    state["n"], state["answer"] = 0, lambda body, n: _completion(" hello world", ids)
    assert _teacher(url, engine, tmp_path).answers([[1, 5, 6]], [8]) == [ids]
    state["n"], state["answer"] = 0, lambda body, n: _completion(" hello world")
    assert _teacher(url, engine, tmp_path / "t").answers([[1, 9, 9]], [8]) == [ids]
    requests = []
    state["n"], state["answer"] = 0, lambda body, n: requests.append(body) or _completion(" hello world", ids)
    _teacher(url, engine, tmp_path / "s", sampling=Sampling(0.8, 0.9, 5, seed=3)).answers([[1, 2, 3]], [4])
    assert requests[0]["prompt"] == [1, 2, 3] and requests[0]["max_tokens"] == 4 and requests[0]["model"] == "scripted"
    assert (requests[0]["temperature"], requests[0]["top_p"], requests[0]["top_k"]) == (0.8, 0.9, 5)
    assert isinstance(requests[0]["seed"], int)


def test_http_errors_retries_and_timeouts(engine, scripted, tmp_path):
    url, state = scripted
    tok = engine.tokenizer
    ids = tok.encode(" hello", add_special_tokens=False)

    def flaky(body, n):  # two server errors, then answers
        if n <= 2:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        return _completion(" hello", ids)

    state["n"], state["answer"] = 0, flaky
    assert _teacher(url, engine, tmp_path / "a", retries=2).answers([[1, 2]], [4]) == [ids]
    assert state["n"] == 3
    state["n"], state["answer"] = 0, flaky
    with pytest.raises(MtpspecError, match=r"HTTP 500: overloaded \(after 1 retries"):
        _teacher(url, engine, tmp_path / "b", retries=1).answers([[1, 2]], [4])
    state["n"], state["answer"] = 0, lambda body, n: JSONResponse(
        {"error": {"message": "This model's maximum context length is 8 tokens"}}, status_code=400)
    with pytest.raises(InputError, match=r"answered HTTP 400: This model's maximum context length is 8 tokens"):
        _teacher(url, engine, tmp_path / "c", retries=3).answers([[1, 2]], [4])
    assert state["n"] == 1  # a client error is not retried

    async def slow(body, n):
        await asyncio.sleep(1.0)
        return _completion(" hello", ids)

    state["n"], state["answer"] = 0, slow
    t0 = time.monotonic()
    with pytest.raises(MtpspecError, match=r"no answer within 0.2s \(--distill-timeout\) \(after 1 retries"):
        _teacher(url, engine, tmp_path / "d", retries=1, timeout=0.2).answers([[1, 2]], [4])
    assert time.monotonic() - t0 < 3 and state["n"] == 2
    state["n"], state["answer"] = 0, lambda body, n: {"unexpected": True}
    with pytest.raises(InputError, match="did not return an OpenAI completion"):
        _teacher(url, engine, tmp_path / "e").answers([[1, 2]], [4])


def test_answer_cache_survives_a_line_cut_by_a_kill(tmp_path):
    (tmp_path / "answers.jsonl").write_text('{"key": "a", "ids": [1, 2]}\n{"key": "b", "ids": [3')
    (tmp_path / "answers.rank1.jsonl").write_text('{"key": "c", "ids": [4]}\n')
    cache = AnswerCache(tmp_path)
    assert (cache["a"], cache["c"], "b" in cache) == ([1, 2], [4], False)
    cache.put("b", [5, 6])
    cache.close()
    assert AnswerCache(tmp_path).answers == {"a": [1, 2], "b": [5, 6], "c": [4]}
