"""Stop strings while speculative rounds emit several tokens at once: n-gram drafting and an MTP
drafter (chains and trees), through the API (`generate`, `stream`), the CLI (`--stop`) and the
server (`/v1/completions`, `/v1/chat/completions`, streamed and not).

The tiny random target (conftest `tiny_with_tokenizer`) repeats its last token for a while and
then switches: the raw prompt "here g" continues " g g g ... g" (22 tokens), then "owowow...";
with the chat template it continues "::::...". So n-gram drafting accepts whole rounds, and so
does `copying_drafter`, an MTP drafter built to draft a repeat of its input token (a random
drafter accepts nothing on this target: every round would emit one token and test nothing).

A stop string for token position j is the shortest end of the plain text up to token j that
does not occur earlier, so plain decoding stops exactly at token j (asserted). The positions
cover, in every drafting mode, a stop string completed by a token inside an accepted run (not
the round's last token), one completed by the last token of a multi-token round, and stop
strings that started in an earlier round. Each case compares with plain decoding (no drafter) of
the same prompt and stop strings: the same token ids and text, cut at the same place, finish
reason "stop", and the speculative run ends in the round that completed the stop string (its
target forwards; a loop that skipped the stop check in a multi-token round would decode on).
Streams: the pieces concatenate to the final text and every prefix of the stream is a prefix of
the final text, so no piece ever shows part of a stop string the final text omits (the cases
include rounds that end inside a stop string, which a stream without hold-back would send).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from typer.testing import CliRunner

import mtpspec
from mtpspec.cli import app
from mtpspec.decoding.loop import Request, decode_events
from mtpspec.drafter_checkpoint import save_drafter
from drafter_helpers import copying_drafter, drafting_engines
from mtpspec.serve.server import ServerThread, build
from mtpspec.text import IncrementalText, cut_at_stop, make_stop_check, partial_stop_length, stop_strings

K = 4  # fixed draft length: the rounds of a run with a stop string are those of the run without
PROMPT, N = "here g", 28  # raw completion: " g" x 22, then "ow" x ...
POSITIONS = [3, 4, 8, 21, 22, 23, 24]  # tokens (0-based) that complete a stop string
CHAT, CHAT_N, CHAT_J = "hello world", 16, 6  # chat template: ":" x ... (the stop string: 7 x ":", final text "")
DRAFTING = ["ngram", "mtp-chain", "mtp-tree"]


@dataclass
class Tiny:
    plain: mtpspec.Engine
    spec: dict[str, mtpspec.Engine]
    drafter_dir: object
    full_ids: list[int]  # plain output of PROMPT without stop strings
    chat_ids: list[int]  # plain output of CHAT without stop strings
    refs: dict = field(default_factory=dict)

    def reference(self, prompt, stop: list[str], n: int, chat: bool = False) -> mtpspec.GenerationResult:
        """Plain decoding of the same prompt and stop strings (cached)."""
        key = (json.dumps(prompt), tuple(stop), n, chat)
        if key not in self.refs:
            self.refs[key] = self.plain.generate(prompt, max_new_tokens=n, chat=chat, stop=stop)
        return self.refs[key]


@pytest.fixture(scope="module")
def tiny(tiny_with_tokenizer, tmp_path_factory):
    """The tiny target plain and with each drafting mode (fixed K), and its plain outputs."""
    plain = mtpspec.load(tiny_with_tokenizer)
    folder = tmp_path_factory.mktemp("copying-drafter")
    save_drafter(copying_drafter(plain.model), folder, draft_tokens=K)
    spec = drafting_engines(tiny_with_tokenizer, folder, K)
    full = plain.generate(PROMPT, max_new_tokens=N, chat=False)
    chat = plain.generate(CHAT, max_new_tokens=CHAT_N)
    assert len(full.token_ids) == N and len(chat.token_ids) == CHAT_N
    return Tiny(plain, spec, folder, full.token_ids, chat.token_ids)


def stop_at(engine, ids: list[int], j: int) -> str:
    """The shortest end of the text of ids[:j + 1] that does not occur in the text of ids[:j]."""
    before, upto = engine.decode(ids[:j]), engine.decode(ids[: j + 1])
    return next(upto[-n:] for n in range(1, len(upto) + 1) if upto[-n:] not in before)


def round_ends(engine, prompt_ids: list[int], n: int) -> list[int]:
    """Tokens emitted so far after the prefill and after each round of a run without stop strings."""
    reqs = [Request(prompt_ids, n, eos_ids=engine.eos_ids)]
    return [len(ev.new_ids) for ev in decode_events(engine.model, reqs, engine.plan)]


def place(engine, ids: list[int], ends: list[int], j: int, stop: str) -> tuple[int, set[str]]:
    """(target forwards up to the round that emits token j, how that round completes `stop`)."""
    r = next(i for i, e in enumerate(ends) if e > j)
    start = ends[r - 1] if r else 0
    kinds = set()
    if ends[r] - start > 1:
        kinds.add("inside a run" if j < ends[r] - 1 else "last of a run")
    upto = engine.decode(ids[: j + 1])
    first_char = upto.rindex(stop)
    if len(engine.decode(ids[:start])) > first_char:  # an earlier round ended inside the stop string
        kinds.add("spans rounds")
    return r + 1, kinds


def assert_streamed(pieces: list[str], final: str, stop: list[str]) -> None:
    sofar = ""
    for piece in pieces:
        sofar += piece
        assert final.startswith(sofar), (sofar, final, stop)  # never text the final text omits
    assert sofar == final, (pieces, final, stop)
    assert not any(s in sofar for s in stop)


def cases(tiny: Tiny) -> list[tuple[list[str], int]]:
    """(stop strings, the token that completes the first of them) for PROMPT."""
    s = {j: stop_at(tiny.plain, tiny.full_ids, j) for j in POSITIONS}
    return [([s[j]], j) for j in POSITIONS] + [([s[23], s[8]], 8)]  # several: the earliest wins


# ---- the shared text module (mtpspec/text.py) ----------------------------------------------------
def test_incremental_text_holds_back_partial_stop_strings_and_characters():
    """The issue's example: with stop "###", ids whose text grows "ab", "ab#", "ab##", "ab###"
    stream "ab" and nothing more (the final text), never "ab##"."""
    def final(ids):
        return cut_at_stop("".join(ids), ["###", "END"])

    text = IncrementalText(final, ["###", "END"])
    pieces = [text.delta(list(t), False) for t in ("a", "ab", "ab#", "ab##")] + [text.delta(list("ab###"), True)]
    assert pieces == ["a", "b", "", "", ""]
    # a held-back start that turns out not to be a stop string is sent once settled
    text = IncrementalText(final, ["###", "END"])
    assert [text.delta(list(t), False) for t in ("ab#", "ab#c", "ab#cE", "ab#cEN")] == ["ab", "#c", "", ""]
    assert text.delta(list("ab#cEN"), True) == "EN"  # the end (length, EOS) sends what was held back
    assert text.sent == final(list("ab#cEN"))
    # a partial UTF-8 character (decoded as U+FFFD) waits for its remaining bytes
    text = IncrementalText(lambda ids: "".join(ids), [])
    assert [text.delta(t, False) for t in (["x", "\ufffd"], ["x", "é"])] == ["x", "é"]
    # the pieces: cut_at_stop cuts at the earliest stop string; partial_stop_length is the
    # longest end that starts a stop string; make_stop_check keeps the fewest ids that hold one
    assert cut_at_stop("a END b ###", ["###", "END"]) == "a "
    assert partial_stop_length("x ##", ["###", "#!"]) == 2 and partial_stop_length("x #", ["ab"]) == 0
    check = make_stop_check("".join, ["###"])
    assert check(list("ab##")) is None and check(list("ab###cd")) == 5
    assert make_stop_check("".join, []) is None and stop_strings("x") == ["x"] and stop_strings(None) == []
    with pytest.raises(mtpspec.InputError, match="non-empty strings"):
        stop_strings(["ok", ""])


def test_engine_text_methods_are_the_shared_implementation(tiny):
    """`Engine.stop_check`, `final_text` and `incremental_text` (what the server uses)."""
    plain, ids = tiny.plain, tiny.full_ids
    stop = stop_at(plain, ids, 23)
    assert plain.stop_check(None) is None and plain.stop_check([]) is None
    assert plain.stop_check(stop)(ids) == 24 and plain.stop_check([stop])(ids[:23]) is None
    assert plain.final_text(ids, stop) == plain.decode(ids[:24])[: -len(stop)] == tiny.reference(
        PROMPT, [stop], N).text
    assert plain.final_text(ids) == plain.decode(ids)
    text = plain.incremental_text([stop])
    pieces = [text.delta(ids[:n], False) for n in range(1, 24)] + [text.delta(ids[:24], True)]
    assert_streamed(pieces, plain.final_text(ids[:24], stop), [stop])
    with pytest.raises(mtpspec.InputError, match="stop"):
        plain.stop_check([""])


# ---- the Python API ------------------------------------------------------------------------------
@pytest.mark.parametrize("drafting", DRAFTING)
def test_api_stop_strings_completed_inside_speculative_rounds(tiny, drafting):
    spec, ids = tiny.spec[drafting], tiny.full_ids
    ends = round_ends(spec, spec.encode(PROMPT, chat=False), N)
    assert max(b - a for a, b in zip(ends, ends[1:])) > 1, ends  # rounds emit several tokens
    seen = set()
    for stop, j in cases(tiny):
        ref = tiny.reference(PROMPT, stop, N)
        assert ref.finish_reason == "stop" and ref.token_ids == ids[: j + 1], (stop, j)  # triggers mid-way
        forwards, kinds = place(spec, ids, ends, j, next(s for s in stop if s in spec.decode(ids[: j + 1])))
        seen |= kinds
        got = spec.generate(PROMPT, max_new_tokens=N, chat=False, stop=stop)
        assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, "stop"), (stop, j)
        assert got.stats["target_forwards"] == forwards, (stop, j, ends)  # stopped in that round
        stream = spec.stream(PROMPT, max_new_tokens=N, chat=False, stop=stop)
        assert_streamed(list(stream), ref.text, stop)
        res = stream.result
        assert (res.token_ids, res.text, res.finish_reason) == (ref.token_ids, ref.text, "stop"), (stop, j)
        assert res.stats["target_forwards"] == forwards
    assert seen == {"inside a run", "last of a run", "spans rounds"}, seen


def test_api_stream_holds_back_a_partial_stop_string(tiny):
    """The issue's example shape: a stop string whose first characters end a round is held back,
    and the stream never yields text that the final result omits."""
    spec = tiny.spec["ngram"]
    stop = stop_at(tiny.plain, tiny.full_ids, 23)  # starts in token 22 (the end of a round)
    pieces = list(stream := spec.stream(PROMPT, max_new_tokens=N, chat=False, stop=stop))
    assert stream.result.finish_reason == "stop" and stream.result.text == tiny.reference(PROMPT, [stop], N).text
    assert_streamed(pieces, stream.result.text, [stop])
    # adaptive draft length too (rounds vary with timing; the text may not)
    adaptive = spec.with_proposer(spec.proposer)
    pieces = list(stream := adaptive.stream(PROMPT, max_new_tokens=N, chat=False, stop=stop))
    assert stream.result.token_ids == tiny.reference(PROMPT, [stop], N).token_ids
    assert_streamed(pieces, stream.result.text, [stop])


# ---- the command line ----------------------------------------------------------------------------
runner = CliRunner()


@pytest.mark.parametrize("drafting", DRAFTING)
def test_cli_stop_strings_with_drafting(tiny, tiny_with_tokenizer, drafting):
    spec, ids = tiny.spec[drafting], tiny.full_ids
    ends = round_ends(spec, spec.encode(PROMPT, chat=False), N)
    draft = ["--ngram"] if drafting == "ngram" else [
        "--drafter", str(tiny.drafter_dir), "--tree", "none" if drafting == "mtp-chain" else "6:2:3"]
    base = ["generate", PROMPT, "--model", str(tiny_with_tokenizer), "--raw", "-n", str(N), "-k", str(K), *draft]
    for j in (8, 23):  # inside a run, from a round whose end starts the stop string
        stop = stop_at(tiny.plain, ids, j)
        ref = tiny.reference(PROMPT, [stop], N)
        forwards, _ = place(spec, ids, ends, j, stop)
        res = runner.invoke(app, [*base, "--stop", stop])  # streamed
        assert res.exit_code == 0, res.stderr
        assert res.stdout == ref.text + "\n", (res.stdout, ref.text)
        summary = res.stderr.strip().splitlines()[-1]
        assert summary.startswith(f"[{len(ref.token_ids)} tokens"), summary
        assert int(re.search(r"(\d+) target forwards", summary).group(1)) == forwards, summary
    stops = [stop_at(tiny.plain, ids, 23), stop_at(tiny.plain, ids, 4)]  # repeatable --stop
    res = runner.invoke(app, [*base, "--stop", stops[0], "--stop", stops[1], "--json"])
    assert res.exit_code == 0, res.stderr
    line, ref = json.loads(res.stdout), tiny.reference(PROMPT, stops, N)
    assert ref.token_ids == ids[:5]
    assert (line["token_ids"], line["text"], line["finish_reason"]) == (ref.token_ids, ref.text, "stop")
    assert line["stats"]["target_forwards"] == place(spec, ids, ends, 4, stops[1])[0]


# ---- the server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tiny):
    out, built = {}, []
    for name in DRAFTING:
        served = build(tiny.spec[name], max_batch_size=4, max_queue=8, max_len=256)
        built.append(served)
        out[name] = ServerThread(served.app).start()
    yield out
    for srv in out.values():
        srv.stop()
    for served in built:
        served.scheduler.stop()


def _post(url: str, path: str, body: dict, stream: bool) -> tuple[list[int], str, str, list[str], dict | None]:
    """(token ids, text, finish_reason, streamed pieces, stats) of one request."""
    chat = path.endswith("chat/completions")
    with httpx.Client(base_url=url, timeout=120) as c:
        if not stream:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            return ch["token_ids"], ch["message"]["content"] if chat else ch["text"], ch["finish_reason"], [], \
                r.json()["stats"]
        with c.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    pieces = [(ch["choices"][0]["delta"].get("content") or "") if chat else ch["choices"][0]["text"] for ch in chunks]
    ids = [t for ch in chunks for t in ch["choices"][0]["token_ids"]]
    return ids, "".join(pieces), chunks[-1]["choices"][0]["finish_reason"], pieces, None


@pytest.mark.parametrize("drafting", DRAFTING)
def test_server_stop_strings_with_drafting(tiny, servers, drafting):
    url, spec = servers[drafting].url, tiny.spec[drafting]
    messages = [{"role": "user", "content": CHAT}]
    chat_prompt = spec.encode_chat(messages)
    assert chat_prompt == spec.encode(CHAT)
    requests = []
    ends = round_ends(spec, spec.encode(PROMPT, chat=False), N)
    for j in (8, 22, 23):
        stop = [stop_at(tiny.plain, tiny.full_ids, j)]
        requests.append(("/v1/completions", {"prompt": PROMPT, "max_tokens": N}, tiny.reference(PROMPT, stop, N),
                         stop, place(spec, tiny.full_ids, ends, j, stop[0])[0]))
    chat_ends = round_ends(spec, chat_prompt, CHAT_N)
    stop = [stop_at(tiny.plain, tiny.chat_ids, CHAT_J)]
    ref = tiny.reference(CHAT, stop, CHAT_N, chat=True)
    assert ref.token_ids == tiny.chat_ids[: CHAT_J + 1]
    requests.append(("/v1/chat/completions", {"messages": messages, "max_tokens": CHAT_N}, ref, stop,
                     place(spec, tiny.chat_ids, chat_ends, CHAT_J, stop[0])[0]))
    for path, body, ref, stop, forwards in requests:
        assert ref.finish_reason == "stop"
        body = {**body, "temperature": 0, "stop": stop}
        for stream in (False, True):
            ids, text, reason, pieces, stats = _post(url, path, body, stream)
            assert (ids, text, reason) == (ref.token_ids, ref.text, "stop"), (path, stop, stream)
            if stream:
                assert_streamed(pieces, ref.text, stop)
            else:
                assert stats["target_forwards"] == forwards, (path, stop)
