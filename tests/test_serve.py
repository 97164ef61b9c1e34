"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 (random free port, in a
thread), real HTTP clients (httpx and the official `openai` client), the default model with its
drafter (the shipped MTP drafter if present, else n-gram lookup).

Losslessness is checked on token ids: every choice carries a non-standard `token_ids` field (in a
stream, the ids new in each chunk), compared with the same prompt generated alone by the plain
decoding loop without a drafter; the text is checked too.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mtpspec
from mtpspec.decoding.loop import Request, decode
from mtpspec.serve.scheduler import Scheduler, Update
from mtpspec.serve.server import ServerThread, build

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOPICS = ["the sea", "a cat", "Python lists", "the moon", "bread", "trains", "rain", "music", "chess",
          "volcanoes", "bees", "winter", "coffee", "bicycles", "clouds", "maps"]


@pytest.fixture(scope="module")
def engine():
    return mtpspec.load()  # the default model and its shipped drafter ("auto")


@pytest.fixture(scope="module")
def plain(engine):
    """The same weights without a drafter."""
    return engine.plain()


@pytest.fixture(scope="module")
def server(engine):
    served = build(engine, max_batch_size=8, max_queue=64, max_len=1024)
    srv = ServerThread(served.app).start()
    yield srv
    srv.stop()
    served.scheduler.stop()


@pytest.fixture(scope="module")
def small_server(plain):
    """One slot, one queue place: for cancellation and 429."""
    served = build(plain, max_batch_size=1, max_queue=1, max_len=1024)
    srv = ServerThread(served.app).start()
    yield srv
    srv.stop()
    served.scheduler.stop()


def alone(engine, prompt_ids, max_tokens):
    return decode(engine.model, [Request(prompt_ids, max_tokens, eos_ids=engine.eos_ids)])[0].new_ids


def sse(response: httpx.Response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def metrics(url: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


# ---- the official client ---------------------------------------------------------------------------
def test_openai_client_chat_and_completions(server, engine):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == [engine.name]
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model=engine.name, messages=msgs, max_tokens=8, temperature=0)
    ref = alone(engine, engine.encode_chat(msgs), 8)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == engine.decode(ref)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens == len(ref) and chat.usage.prompt_tokens > 0

    pieces, usage, reasons = [], None, []
    for ch in client.chat.completions.create(model=engine.name, messages=msgs, max_tokens=8, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == chat.choices[0].message.content
    assert reasons[-1] == chat.choices[0].finish_reason and usage.completion_tokens == len(ref)

    comp = client.completions.create(model=engine.name, prompt="Once upon a time", max_tokens=10, temperature=0)
    ref = alone(engine, engine.encode("Once upon a time", chat=False), 10)
    assert comp.choices[0].text == engine.decode(ref) and comp.usage.completion_tokens == len(ref)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=engine.name, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert streamed == comp.choices[0].text

    # sampling with a seed runs (reproducibility is only promised without a drafter / with fixed K)
    s = client.completions.create(model=engine.name, prompt="Hello", max_tokens=5, temperature=0.8, top_p=0.9,
                                  seed=3, extra_body={"top_k": 20})
    assert s.usage.completion_tokens >= 1

    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


# ---- losslessness under load ---------------------------------------------------------------------------
def test_32_concurrent_greedy_requests_are_lossless(server, engine):
    jobs = []
    for i in range(32):
        chat, stream = i % 2 == 0, i % 4 in (0, 3)
        n = 4 + (i * 7) % 21
        topic = TOPICS[i % len(TOPICS)]
        if chat:
            msgs = [{"role": "user", "content": f"Write {1 + i % 3} sentences about {topic}."}]
            ids = engine.encode_chat(msgs)
            body = {"messages": msgs}
        else:
            prompt = f"Here is a short note about {topic}, number {i}:"
            ids = engine.encode(prompt, chat=False)
            body = {"prompt": prompt}
        body.update(model=engine.name, max_tokens=n, temperature=0, stream=stream)
        jobs.append((chat, stream, ids, n, body))

    def call(job):
        chat, stream, _, _, body = job
        path = "/v1/chat/completions" if chat else "/v1/completions"
        with httpx.Client(base_url=server.url, timeout=180) as c:
            if not stream:
                r = c.post(path, json=body)
                assert r.status_code == 200, r.text
                ch = r.json()["choices"][0]
                return ch["token_ids"], ch["message"]["content"] if chat else ch["text"], ch["finish_reason"]
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                chunks = sse(r)
            ids = [t for ch in chunks for t in ch["choices"][0]["token_ids"]]
            text = "".join((ch["choices"][0]["delta"].get("content") or "") if chat else ch["choices"][0]["text"]
                           for ch in chunks)
            return ids, text, chunks[-1]["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, jobs, timeout=240))
    refs = [alone(engine, ids, n) for _, _, ids, n, _ in jobs]
    assert len(results) == 32
    for (chat, stream, _, n, _), (ids, text, reason), ref in zip(jobs, results, refs):
        assert ids == ref, (chat, stream)
        assert text == engine.decode(ref)
        assert reason == ("length" if len(ref) == n else "stop")


# ---- cancellation and the queue limit -------------------------------------------------------------------
def test_cancel_mid_stream_frees_the_slot_and_full_queue_gives_429(small_server, plain):
    url = small_server.url
    before = metrics(url)
    body = {"model": plain.name, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0,
            "stream": True}
    client = httpx.Client(base_url=url, timeout=120)
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:  # a few tokens arrive, then the client goes away
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
        # while the only slot is busy: one request waits in the queue, the next gets 429
        follower: dict = {}
        t = threading.Thread(target=lambda: follower.update(r=httpx.post(
            url + "/v1/completions", json={"model": plain.name, "prompt": "Hi", "max_tokens": 5, "temperature": 0},
            timeout=120)))
        t.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=10).json()["queue_length"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        busy = httpx.post(url + "/v1/completions", json={"model": plain.name, "prompt": "x", "max_tokens": 2},
                          timeout=30)
        assert busy.status_code == 429
        assert busy.json()["error"]["type"] == "rate_limit_error"
    client.close()  # disconnect mid-stream
    t.join(120)
    assert follower["r"].status_code == 200  # the following request was served
    assert follower["r"].json()["usage"]["completion_tokens"] >= 1
    after = metrics(url)
    assert delta(before, after, "mtpspec_sequences_finished_total", reason="cancelled") == 1
    # the cancelled sequence stopped early: far fewer than its 400 tokens were generated
    assert delta(before, after, "mtpspec_generation_tokens_total") < 400
    assert delta(before, after, "mtpspec_requests_total", endpoint="/v1/completions", status="429") == 1


# ---- errors --------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": 1.5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 1100}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 1100}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": 3}, 400, "model"),
]


def test_bad_requests_get_openai_errors_and_the_loop_keeps_serving(server, engine):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for path, body, status, param in BAD:
            if isinstance(body, bytes):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(path, json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            assert err["param"] == param, (body, err)
        assert c.get("/v1/nothing-here").status_code == 404
        assert c.get("/health").json()["status"] == "ok"
        ok = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200


def test_a_failing_request_fails_alone(engine):
    """A request whose stop check raises gets an error; the request beside it finishes intact."""
    sched = Scheduler(engine.model, plan=engine.plan.with_draft_tokens(3), max_batch_size=2, max_len=256).start()
    try:
        done: dict[str, Update] = {}
        events = {k: threading.Event() for k in ("bad", "good")}

        def collect(key):
            def on(u):
                if u.finished:
                    done[key] = u
                    events[key].set()
            return on

        def boom(ids):
            if len(ids) > 3:
                raise RuntimeError("boom")
            return None

        good_ids = engine.encode("Tell me about the sea.")
        sched.submit(Request(engine.encode("Count to ten."), 12, eos_ids=engine.eos_ids, stop_check=boom),
                     collect("bad"))
        sched.submit(Request(good_ids, 12, eos_ids=engine.eos_ids), collect("good"))
        assert events["bad"].wait(120) and events["good"].wait(120)
        assert isinstance(done["bad"].error, RuntimeError)
        assert done["good"].error is None and done["good"].new_ids == alone(engine, good_ids, 12)
        assert sched.alive
    finally:
        sched.stop()


# ---- metrics -------------------------------------------------------------------------------------------
def test_metrics_add_up(server, engine):
    before = metrics(server.url)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for i in range(3):
            r = c.post("/v1/completions", json={"prompt": f"The {i} best things about", "max_tokens": 6 + i,
                                                "temperature": 0})
            for k in usage:
                usage[k] += r.json()["usage"][k]
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 7, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}) as r:
            last = sse(r)[-1]
        for k in usage:
            usage[k] += last["usage"][k]
        assert c.post("/v1/completions", json={"prompt": "x", "top_p": 7}).status_code == 400
    after = metrics(server.url)
    assert delta(before, after, "mtpspec_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(before, after, "mtpspec_generation_tokens_total") == usage["completion_tokens"]
    assert delta(before, after, "mtpspec_requests_total", endpoint="/v1/completions", status="200") == 3
    assert delta(before, after, "mtpspec_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta(before, after, "mtpspec_requests_total", endpoint="/v1/completions", status="400") == 1
    proposed = delta(before, after, "mtpspec_draft_tokens_proposed_total")
    accepted = delta(before, after, "mtpspec_draft_tokens_accepted_total")
    assert 0 <= accepted <= proposed
    per_pos = sum(v for (n, _), v in after.items() if n == "mtpspec_draft_position_proposed_total")
    assert per_pos == after[("mtpspec_draft_tokens_proposed_total", ())]
    rounds = delta(before, after, "mtpspec_decode_rounds_total")
    emitted = delta(before, after, "mtpspec_decode_round_tokens_total")
    # every token after the prefill's first comes from a decode round (minus EOS tokens not kept)
    assert emitted >= usage["completion_tokens"] - 4 and rounds >= 1
    assert after[("mtpspec_mean_accepted_length", ())] >= 1
    assert ("mtpspec_queue_length", ()) in after and ("mtpspec_batch_size", ()) in after
