"""`ignore_eos` and `min_tokens` (vLLM's names): the semantics, and speculative decoding (n-gram,
MTP chains and trees) giving plain decoding's tokens under them; through the loop, the API, the
CLI and the server.

min_tokens masks EOS in the target's distribution at output positions 0..min_tokens-1 (as
transformers' `min_new_tokens` and vLLM's min_tokens); ignore_eos keeps EOS as an ordinary token.

The tiny random target (conftest `tiny_with_tokenizer`) continues the raw prompt "here g" with
token 290 (" g") 22 times and then token 280 ("ow") ever after. With EOS = 280 plain decoding
stops after the 22 " g"; with min_tokens = m > 22 the masked target says " g" at positions
22..m-1 and EOS at m, so the EOS the mask suppresses sits inside the accepted runs of the drafts
(`copying_drafter` and n-gram drafting both draft repeats). With EOS = 290 plain decoding stops at
once; min_tokens masks the prefill's token (the target then says 190 forever).
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from typer.testing import CliRunner

import mtpspec
from drafter_helpers import copying_drafter, drafting_engines
from mtpspec.cli import app
from mtpspec.decoding.loop import Request, decode
from mtpspec.decoding.sampling import SamplingParams
from mtpspec.drafter_checkpoint import save_drafter
from mtpspec.serve.server import ServerThread, build

K = 4
PROMPT, G, OW = "here g", 290, 280  # the raw prompt continues G x 22, then OW ...
N = 40
DRAFTING = ["ngram", "mtp-chain", "mtp-tree"]


@pytest.fixture(scope="module")
def tiny(tiny_with_tokenizer, tmp_path_factory):
    """(plain engine, {drafting: engine}, drafter folder, checkpoint folder) of the tiny target
    whose generation_config adds token 280 ("ow") to the EOS ids."""
    folder = tmp_path_factory.mktemp("eos-ow") / "model"
    shutil.copytree(tiny_with_tokenizer, folder)
    gen = folder / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    cfg["eos_token_id"] = [OW]
    gen.write_text(json.dumps(cfg))
    plain = mtpspec.load(folder)
    assert OW in plain.eos_ids
    dfolder = tmp_path_factory.mktemp("copying-drafter-eos")
    save_drafter(copying_drafter(plain.model), dfolder, draft_tokens=K)
    spec = drafting_engines(folder, dfolder, K)
    return plain, spec, dfolder, folder


def _run(engine, requests, k=0):
    return decode(engine.model, requests, engine.plan.with_draft_tokens(k))


def _req(engine, eos, **kw) -> Request:
    return Request(engine.encode(PROMPT, chat=False), kw.pop("max_new_tokens", N), eos_ids=frozenset({eos}), **kw)


# ---- semantics (plain decoding) --------------------------------------------------------------
@pytest.mark.parametrize("eos,m", [(G, 1), (G, 5), (OW, 22), (OW, 23), (OW, 25), (OW, 27)])
def test_min_tokens_is_transformers_min_new_tokens(tiny, tiny_with_tokenizer, eos, m):
    """Plain decoding with min_tokens = transformers' greedy generate with min_new_tokens (an
    independent implementation of 'mask EOS for the first m new tokens')."""
    from transformers import AutoModelForCausalLM

    plain = tiny[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer)
    ids = plain.encode(PROMPT, chat=False)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=m, do_sample=False, eos_token_id=eos,
                      pad_token_id=eos)[0, len(ids):].tolist()
    ref = out[: out.index(eos)] if eos in out else out
    seq = _run(plain, [_req(plain, eos, min_tokens=m)])[0]
    assert seq.new_ids == ref
    unmasked = _run(plain, [_req(plain, eos)])[0]
    # EOS really came inside the window (m = 22: just after it, the boundary: nothing to mask)
    assert unmasked.finish_reason == "stop" and len(unmasked.new_ids) <= m
    assert (seq.new_ids == unmasked.new_ids) == (len(unmasked.new_ids) == m)
    assert len(seq.new_ids) >= m and eos not in seq.new_ids


def test_ignore_eos_keeps_eos_tokens(tiny):
    plain = tiny[0]
    free = _run(plain, [Request(plain.encode(PROMPT, chat=False), N)])[0]
    for eos in (G, OW):
        seq = _run(plain, [_req(plain, eos, ignore_eos=True)])[0]
        assert seq.new_ids == free.new_ids and eos in seq.new_ids and seq.finish_reason == "length"
        # min_tokens leaves EOS alone under ignore_eos (vLLM: min_tokens masks stop tokens only)
        assert _run(plain, [_req(plain, eos, ignore_eos=True, min_tokens=5)])[0].new_ids == free.new_ids


# ---- lossless with drafting ------------------------------------------------------------------
CASES = [dict(eos=G, min_tokens=1), dict(eos=G, min_tokens=7), dict(eos=OW, min_tokens=23),
         dict(eos=OW, min_tokens=25), dict(eos=OW, min_tokens=26), dict(eos=OW, min_tokens=N),
         dict(eos=G, ignore_eos=True), dict(eos=OW, ignore_eos=True), dict(eos=OW, ignore_eos=True, min_tokens=30)]


@pytest.mark.parametrize("drafting", DRAFTING)
def test_greedy_speculative_equals_plain(tiny, drafting):
    plain, spec = tiny[0], tiny[1][drafting]
    accepted = []
    for case in CASES:
        case = dict(case)
        eos = case.pop("eos")
        ref = _run(plain, [_req(plain, eos, **case)])[0]
        got = _run(spec, [_req(spec, eos, **case)], K)[0]
        assert (got.new_ids, got.finish_reason) == (ref.new_ids, ref.finish_reason), (drafting, eos, case)
        accepted.append(got.stats.mean_accepted_length)
    assert max(accepted) > 2  # the drafts were accepted in runs (the mask sits inside them)


@pytest.mark.parametrize("drafting", DRAFTING)
def test_mixed_batch_equals_each_alone(tiny, drafting):
    """Rows with different settings in one speculative batch give each row's plain output."""
    plain, spec = tiny[0], tiny[1][drafting]
    settings = [dict(eos=OW), dict(eos=OW, min_tokens=25), dict(eos=OW, ignore_eos=True), dict(eos=G, min_tokens=3),
                dict(eos=G), dict(eos=OW, min_tokens=24, max_new_tokens=30)]

    def reqs(engine):
        out = []
        for s in settings:
            s = dict(s)
            out.append(_req(engine, s.pop("eos"), **s))
        return out

    refs = [_run(plain, [r])[0] for r in reqs(plain)]
    got = _run(spec, reqs(spec), K)
    assert [(s.new_ids, s.finish_reason) for s in got] == [(s.new_ids, s.finish_reason) for s in refs]
    assert len({len(s.new_ids) for s in refs}) > 3


@pytest.mark.parametrize("drafting", DRAFTING)
def test_sampled_rows_respect_the_controls(tiny, drafting):
    """Sampled rows (seeded, temperature 0.05: the tiny target is flat): min_tokens rows never end before min_tokens and
    never emit EOS, ignore_eos rows run to max_new_tokens; without the controls EOS does end
    rows early (so the mask had work to do)."""
    spec = tiny[1][drafting]
    rows = []
    for seed in range(6):
        p = SamplingParams(temperature=0.05, seed=seed)
        rows += [_req(spec, OW, params=p, min_tokens=26), _req(spec, G, params=p, min_tokens=6),
                 _req(spec, OW, params=p, ignore_eos=True, max_new_tokens=32), _req(spec, OW, params=p),
                 _req(spec, G, params=p)]
    seqs = _run(spec, rows, K)
    early = 0
    for r, s in zip(rows, seqs):
        eos = next(iter(r.eos_ids))
        if r.ignore_eos:
            assert len(s.new_ids) == r.max_new_tokens and s.finish_reason == "length"
        else:
            assert eos not in s.new_ids
            assert len(s.new_ids) >= r.min_tokens, (r.min_tokens, s.new_ids)
            early += r.min_tokens == 0 and s.finish_reason == "stop" and len(s.new_ids) < 26
    assert early >= 6
    assert max(s.stats.mean_accepted_length for s in seqs) > 1.5


# ---- API, stop strings, CLI, server ----------------------------------------------------------
def test_api_generate_and_stream(tiny):
    plain, spec = tiny[0], tiny[1]
    assert plain.generate(PROMPT, max_new_tokens=N, chat=False).token_ids == [G] * 22  # EOS (280) ends it
    for engine in (plain, *spec.values()):
        r = engine.generate(PROMPT, max_new_tokens=N, chat=False, min_tokens=25)
        assert (r.token_ids, r.finish_reason) == ([G] * 25, "stop")
        r = engine.generate(PROMPT, max_new_tokens=30, chat=False, ignore_eos=True)
        assert r.token_ids == [G] * 22 + [OW] * 8 and r.finish_reason == "length"
        assert r.text == engine.decode(r.token_ids)
        st = engine.stream(PROMPT, max_new_tokens=30, chat=False, ignore_eos=True)
        assert "".join(st) == r.text and st.result.token_ids == r.token_ids
        st = engine.stream(PROMPT, max_new_tokens=N, chat=False, min_tokens=24)
        assert "".join(st) == st.result.text and st.result.token_ids == [G] * 24


def test_min_tokens_with_stop_strings(tiny):
    """As vLLM: a stop string completed within the first min_tokens tokens does not count (and
    stays in the text); the first one ending after them ends the sequence, cut before it."""
    plain, spec = tiny[0], tiny[1]
    g = plain.decode([G])
    ref0 = plain.generate(PROMPT, max_new_tokens=N, chat=False, stop=[g])
    assert ref0.token_ids == [G] and ref0.text == ""
    for engine in (plain, *spec.values()):
        r = engine.generate(PROMPT, max_new_tokens=N, chat=False, stop=[g], min_tokens=5)
        assert r.token_ids == [G] * 6 and r.text == g * 5 and r.finish_reason == "stop"
        # a stop string starting inside the protected tokens and ending after them counts
        st = engine.stream(PROMPT, max_new_tokens=N, chat=False, stop=[g + g], min_tokens=5)
        assert "".join(st) == st.result.text == g * 4 and st.result.token_ids == [G] * 6
        r = engine.generate(PROMPT, max_new_tokens=N, chat=False, stop=[g * 4], min_tokens=5, ignore_eos=True)
        assert r.token_ids == [G] * 6 and r.text == g * 2
        r = engine.generate(PROMPT, max_new_tokens=N, chat=False, stop=["ow"], min_tokens=3, ignore_eos=True)
        assert r.token_ids == [G] * 22 + [OW] and r.text == g * 22


def test_api_rejects_bad_values(tiny):
    plain = tiny[0]
    for kw, msg in [(dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
                    (dict(min_tokens=1.5), "min_tokens must be an integer >= 0"),
                    (dict(min_tokens=True), "min_tokens must be an integer >= 0"),
                    (dict(min_tokens=9, max_new_tokens=8), r"min_tokens \(9\) must be <= max_new_tokens \(8\)"),
                    (dict(ignore_eos="yes"), "ignore_eos must be a boolean")]:
        with pytest.raises(mtpspec.InputError, match=msg):
            plain.generate(PROMPT, chat=False, **kw)
        with pytest.raises(mtpspec.InputError, match=msg):
            plain.stream(PROMPT, chat=False, **kw)
    with pytest.raises(mtpspec.InputError, match="min_tokens"):
        _run(plain, [Request([1, 2], 4, min_tokens=5)])


runner = CliRunner()


@pytest.mark.parametrize("drafting", ["none", "ngram", "mtp-tree"])
def test_cli(tiny, drafting):
    _, _, dfolder, folder = tiny
    draft = {"none": ["--no-drafter"], "ngram": ["--ngram"], "mtp-tree": ["--drafter", str(dfolder), "--tree", "6:2:3"]}
    base = ["generate", PROMPT, "--model", str(folder), "--raw", "-n", "30", "-k", str(K), *draft[drafting]]
    res = runner.invoke(app, [*base, "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["token_ids"] == [G] * 22
    res = runner.invoke(app, [*base, "--json", "--ignore-eos"])
    line = json.loads(res.stdout)
    assert line["token_ids"] == [G] * 22 + [OW] * 8 and line["finish_reason"] == "length"
    res = runner.invoke(app, [*base, "--json", "--min-tokens", "25"])
    assert json.loads(res.stdout)["token_ids"] == [G] * 25
    res = runner.invoke(app, [*base, "--ignore-eos"])  # streamed text
    assert res.exit_code == 0 and res.stdout == line["text"] + "\n"
    res = runner.invoke(app, [*base, "--min-tokens", "31"])
    assert res.exit_code == 2 and "min_tokens (31) must be <= max_new_tokens (30)" in res.stderr


@pytest.fixture(scope="module")
def server(tiny):
    served = build(tiny[1]["mtp-chain"], max_batch_size=4, max_queue=8, max_len=256)
    srv = ServerThread(served.app).start()
    yield srv
    srv.stop()
    served.scheduler.stop()


def _completion(c, path, body):
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    return ch["token_ids"], ch["finish_reason"], ch.get("text", ch.get("message", {}).get("content"))


def test_server_fields(tiny, server):
    plain = tiny[0]
    messages = [{"role": "user", "content": "hello world"}]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        base = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
        assert _completion(c, "/v1/completions", base)[:2] == ([G] * 22, "stop")
        assert _completion(c, "/v1/completions", {**base, "ignore_eos": True})[:2] == ([G] * 22 + [OW] * 8, "length")
        assert _completion(c, "/v1/completions", {**base, "min_tokens": 25})[:2] == ([G] * 25, "stop")
        g = plain.decode([G])
        ids, reason, text = _completion(c, "/v1/completions", {**base, "min_tokens": 5, "stop": [g]})
        assert (ids, reason, text) == ([G] * 6, "stop", g * 5)
        with c.stream("POST", "/v1/completions", json={**base, "min_tokens": 5, "stop": [g], "stream": True}) as r:
            chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == g * 5
        for extra in ({"ignore_eos": True}, {"min_tokens": 10}):
            ref = plain.generate("hello world", max_new_tokens=12, **extra)
            chat = {"messages": messages, "temperature": 0, "max_tokens": 12, **extra}
            assert _completion(c, "/v1/chat/completions", chat)[0] == ref.token_ids
        # without max_tokens, min_tokens is capped by the context like the default max_tokens
        ids, reason, _ = _completion(c, "/v1/chat/completions", {"messages": messages, "min_tokens": 10 ** 6})
        assert reason == "length" and len(ids) == 256 - len(plain.encode("hello world"))
        bad = [({"min_tokens": -1}, "min_tokens"), ({"min_tokens": "3"}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens"),
               ({"min_tokens": True}, "min_tokens"), ({"min_tokens": 31}, "min_tokens"), ({"ignore_eos": "yes"}, "ignore_eos"),
               ({"ignore_eos": 1}, "ignore_eos")]
        for extra, param in bad:
            for path, body in (("/v1/completions", base), ("/v1/chat/completions", {"messages": messages, "max_tokens": 30})):
                r = c.post(path, json={**body, **extra})
                assert r.status_code == 400, (path, extra, r.text)
                err = r.json()["error"]
                assert err["param"] == param and err["type"] == "invalid_request_error", (path, extra, err)
