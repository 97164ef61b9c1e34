"""Prompts written by the target itself, the Magpie method (Xu et al., 2024, "Magpie: Alignment
Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing").

An instruction-tuned model has learnt what its users write after the chat template's user-turn
markup. Rendering the template up to the start of a user message (the "pre-query template", e.g.
`<|im_start|>user\\n`) and letting the model continue makes it sample a user message, ended by its
end-of-turn token. No corpus is needed, and the prompts follow the distribution of requests the
target was tuned for: the traffic its drafter will see. The self-distillation then answers them
like any other prompt (harvest.py).

`generate_prompts`:
1. the pre-query template: the chat template applied to one user message whose content is a
   sentinel, cut at the sentinel. A system prompt the template inserts by default stays in it:
   the target writes the user message in the context it will answer in (`DataBuilder.render_prompt`
   inserts the same system prompt). The special tokens between a user message and the assistant's
   (e.g. `<|im_end|>`, `<|im_start|>`) end the user's turn, with the EOS tokens.
2. sampling, batched through our decoding loop (`decode`, `batch_size` rows refilled as they end),
   each request with its own seed (derived from `seed` and its index), so the same seed gives the
   same prompts whatever the batch.
3. filtering (`PromptFilter`): dropped are messages that did not end their turn within
   `max_tokens` (truncated), contain template markup or broken UTF-8, are empty, too short or
   repetitive, or duplicate a kept one after normalisation (case, punctuation, spacing).
Rounds of requests continue until `n` are kept or `max_attempts` were sampled; each round is
journaled (`load_or_generate`), so a generation killed part way resumes where it stopped.

A target without a chat template (a base model) has no user turn to write; its traffic is text
to continue. `generate_prompts(..., documents=True)` (the `self-text` recipe) makes it write the
openings of documents instead: sampled from the beginning-of-sequence token alone
(`document_turn`), up to `max_tokens` tokens, an opening cut by the length limit kept (it is a
prompt to continue, not a message to end), filtered as above. The self-distillation then
continues them as plain text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import InputError

SENTINEL = "MTPSPECUSERMESSAGE7Q"
REPLY = "MTPSPECASSISTANTREPLY7Q"
DROP_REASONS = ("truncated", "markup", "broken", "empty", "short", "repetitive", "duplicate")
# the share of sampled prompts kept, expected before any is sampled: the first round asks for
# n / this (+10%), so that one round usually suffices (a round's last rows decode with the batch
# draining: SmolLM2 wrote 350 prompts in two rounds at 350 tok/s against 795 tok/s for 1416 in one).
# Measured: SmolLM2-135M-Instruct kept 1416 of 1827 user messages (most of the rest truncated),
# Gemma 3 270M 2016 of 2112 openings of documents (never truncated)
EXPECTED_KEEP = {False: 0.75, True: 0.95}  # documents?


@dataclass
class UserTurn:
    """Where a user message starts and ends in a target's chat template."""

    prefix_ids: list[int]  # the template's tokens before a user message's content
    stop_ids: frozenset[int]  # tokens that end the user's turn: the template's turn markup and EOS
    stop_text: str | None  # a plain-text turn boundary, for templates that mark turns without special tokens
    document: bool = False  # a document opening (`document_turn`): the length limit ends it, not a turn marker


def _render(tokenizer, messages: list[dict]) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # the template itself may reject a conversation
        raise InputError(f"self-instruct: the chat template cannot render a user turn "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if SENTINEL not in text:
        raise InputError("self-instruct: the chat template does not show the user's message; cannot find where it starts")
    return text


def special_tokens(tokenizer) -> dict[int, str]:
    """The tokenizer's special tokens (id -> text): template markup, never part of a user message."""
    out = {i: t for i, t in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens)}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            out[i] = str(tok)
    return {i: t for i, t in out.items() if t}


def recipe(documents: bool) -> str:
    """The data recipe's name: `self-text` for openings of documents, `self-instruct` for user messages."""
    return "self-text" if documents else "self-instruct"


def has_chat_template(tokenizer) -> bool:
    """Whether a target can write user messages (`self-instruct`); without, it writes documents (`self-text`)."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def user_turn(tokenizer, eos_ids=()) -> UserTurn:
    """The pre-query template of a chat target and what ends a user turn (see the module doc).
    InputError if the target has no tokenizer or no chat template."""
    if not has_chat_template(tokenizer):
        raise InputError("self-instruct: the target's tokenizer has no chat template; the target can write its own "
                         "user prompts only if it is a chat model (for a base model use --data self-text: "
                         "openings of documents it writes, or other --data)")
    one = _render(tokenizer, [{"role": "user", "content": SENTINEL}])
    prefix = tokenizer.encode(one[: one.index(SENTINEL)], add_special_tokens=False)
    if not prefix:
        raise InputError("self-instruct: the chat template puts nothing before a user message; nothing to prompt with")
    two = _render(tokenizer, [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": REPLY}])
    start = two.index(SENTINEL) + len(SENTINEL)
    between = two[start : two.find(REPLY, start)] if REPLY in two[start:] else two[start:]
    special = special_tokens(tokenizer)
    markup = {i for i in tokenizer.encode(between, add_special_tokens=False) if i in special}
    stop_text = None if markup else (between.strip() or None)
    eos = set(eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    return UserTurn(list(prefix), frozenset(markup | eos), stop_text)


def document_turn(tokenizer, eos_ids=()) -> UserTurn:
    """What a target writes from the start of a sequence: prefix = its beginning-of-sequence token
    (or, without one, its end-of-sequence token, the document separator of GPT-2-style
    vocabularies), ended by EOS or the length limit. InputError if the tokenizer has neither."""
    if tokenizer is None:
        raise InputError("self-text: the target has no tokenizer")
    eos = set(eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InputError("self-text: the tokenizer has no beginning- or end-of-sequence token to start a document "
                         "from (use other --data for this target)")
    return UserTurn([int(start)], frozenset(eos), None, document=True)


# ---- filtering ---------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """The key of near-duplicate detection: NFKC, case-folded, letters and digits only, single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


_RUN = re.compile(r"(\w.{0,7}?)\1{7,}", re.S)  # a short unit (starting with a letter or digit) 8+ times in a row


def is_repetitive(text: str, n: int = 3, max_repeated: float = 0.3) -> bool:
    """A degenerate loop: a short unit repeated 8+ times in a row ("hahahaha..."), or more than
    `max_repeated` of the word n-grams repeating earlier ones (among at least 6 n-grams)."""
    if _RUN.search(text):
        return True
    words = re.findall(r"\w+", text.casefold())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) >= 6 and 1 - len(set(grams)) / len(grams) > max_repeated


class PromptFilter:
    """Keeps a generated user message unless it is degenerate or a (near-)duplicate of one kept;
    counts the kept ones and the dropped ones by reason (`DROP_REASONS`)."""

    def __init__(self, markup=(), min_chars: int = 8) -> None:
        self.markup = [m for m in markup if m]
        self.min_chars = min_chars
        self.seen: set[str] = set()
        self.kept = 0
        self.dropped: Counter = Counter()

    def reason(self, text: str, ended_turn: bool = True) -> str | None:
        """Why `text` would be dropped (one of DROP_REASONS), None if it would be kept."""
        if not ended_turn:
            return "truncated"
        if any(m in text for m in self.markup):
            return "markup"
        if "\ufffd" in text:
            return "broken"
        text = text.strip()
        if not text:
            return "empty"
        if len(text) < self.min_chars:
            return "short"
        if is_repetitive(text):
            return "repetitive"
        if normalize(text) in self.seen:
            return "duplicate"
        return None

    def add(self, text: str, ended_turn: bool = True) -> str | None:
        """The message, stripped, if kept (then later near-duplicates of it are dropped), else None."""
        why = self.reason(text, ended_turn)
        if why is not None:
            self.dropped[why] += 1
            return None
        self.kept += 1
        self.seen.add(normalize(text))
        return text.strip()


# ---- generation --------------------------------------------------------------------------------
def row_seed(seed: int, index: int) -> int:
    """The sampling seed of request `index` of a run seeded with `seed`."""
    return int(hashlib.sha1(f"self-instruct/{seed}/{index}".encode()).hexdigest()[:15], 16)


def _text_stop(tokenizer, marker: str):
    def check(ids: list[int]) -> int | None:
        return len(ids) if marker in tokenizer.decode(ids, skip_special_tokens=False) else None
    return check


def _sample(model, tokenizer, turn: UserTurn, indices: range, *, temperature: float, top_p: float, seed: int,
            max_tokens: int, batch_size: int) -> list[tuple[str, bool, int]]:
    """(text, ended its turn, tokens generated) of the user messages of requests `indices`."""
    from ..decoding.loop import Request, decode
    from ..decoding.sampling import SamplingParams

    stop = _text_stop(tokenizer, turn.stop_text) if turn.stop_text else None
    reqs = [Request(turn.prefix_ids, max_tokens, SamplingParams(temperature, 0, top_p, row_seed(seed, i)),
                    turn.stop_ids, stop) for i in indices]
    out = []
    for s in decode(model, reqs, None, slots=batch_size):
        text = tokenizer.decode(s.new_ids, skip_special_tokens=False)
        ended = s.finish_reason == "stop" or turn.document
        if turn.stop_text and turn.stop_text in text:
            text, ended = text[: text.index(turn.stop_text)], True
        out.append((text, ended, len(s.new_ids)))
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_journal(journal: Path | None) -> list[dict]:
    """The chunk records a killed generation left in `journal` (a torn last line is dropped)."""
    if journal is None or not journal.is_file():
        return []
    records = []
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # cut off by a kill: this chunk is sampled again
        records.append(rec)
    return records


def generate_prompts(model, tokenizer, n: int, *, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     max_tokens: int = 128, batch_size: int = 32, eos_ids=(), max_attempts: int | None = None,
                     min_chars: int = 8, log: Callable[[str], None] | None = _stderr,
                     journal: Path | None = None, chunk: int | None = None, documents: bool = False,
                     exclude: Iterable[str] = ()) -> list[str]:
    """Up to `n` distinct user prompts written by the target (`model`: a Decoder, with its
    tokenizer) with the Magpie method (see the module doc): `temperature`/`top_p` sampling, one
    seed per request derived from `seed`, at most `max_tokens` tokens per message, `batch_size`
    rows decoded at once, at most `max_attempts` messages sampled (default: 8 n, at least
    4 batches). `eos_ids` (e.g. `Engine.eos_ids`) also end a message. Requests go in chunks of
    at most `chunk` (default 8 batches); after each, `log` gets a progress line, and the chunk's
    messages are appended to `journal` if given: a generation killed part way restarts after its
    last complete chunk, with the same result as an uninterrupted one. A last line gives the counts
    generated / kept / dropped by reason and the rate. InputError without a chat template, or if
    no message was usable. `documents=True`: openings of documents instead of user messages, for
    any target (the `self-text` recipe; see the module doc). `exclude`: prompts already had (an
    earlier batch of a run, its held-out ones): their near-duplicates are dropped as duplicates."""
    what = recipe(documents)
    if n < 1:
        raise InputError(f"{what}: the number of prompts must be >= 1, got {n}")
    if max_tokens < 1 or batch_size < 1:
        raise InputError(f"{what}: max_tokens and batch_size must be >= 1")
    turn = document_turn(tokenizer, eos_ids) if documents else user_turn(tokenizer, eos_ids)
    keep = PromptFilter(special_tokens(tokenizer).values(), min_chars)
    keep.seen.update(normalize(p) for p in exclude)
    budget = max_attempts if max_attempts is not None else max(8 * n, 4 * batch_size)
    chunk = chunk or 8 * batch_size
    kept: list[str] = []
    tried = tokens = 0

    def take(rows) -> None:
        nonlocal tokens
        for text, ended, n_tok in rows:
            tokens += n_tok
            if (p := keep.add(text, ended)) is not None:
                kept.append(p)

    records = _read_journal(journal)
    for rec in records:  # replay a killed run's chunks through the filter, in order
        take(rec["rows"])
        tried += len(rec["rows"])
    if journal is not None:  # rewritten without a torn last line, then appended to
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        if records and log is not None:
            log(f"{what}: resumed after {tried} sampled prompts ({len(kept)} kept) from {journal}")
    t0, resumed_tokens = time.perf_counter(), tokens
    while len(kept) < n and tried < budget:
        rate = max(len(kept) / tried, 0.05) if tried else EXPECTED_KEEP[documents]
        # as many requests as should give the prompts still missing (10% spare), not a full batch:
        # a round costs max_tokens steps whatever its rows, but a step's cost grows with its rows
        size = min(budget - tried, chunk, math.ceil(1.1 * (n - len(kept)) / rate))
        rows = _sample(model, tokenizer, turn, range(tried, tried + size), temperature=temperature, top_p=top_p,
                       seed=seed, max_tokens=max_tokens, batch_size=batch_size)
        take(rows)
        tried += size
        if journal is not None:
            with open(journal, "a", encoding="utf-8") as f:
                f.write(json.dumps({"rows": [list(r) for r in rows]}, ensure_ascii=False) + "\n")
        if log is not None:
            secs = max(time.perf_counter() - t0, 1e-9)
            log(f"{what}: {min(len(kept), n)}/{n} prompts kept of {tried} sampled "
                f"({(tokens - resumed_tokens) / secs:.0f} tok/s)")
    secs = max(time.perf_counter() - t0, 1e-9)
    dropped = ", ".join(f"{r} {keep.dropped[r]}" for r in DROP_REASONS if keep.dropped[r]) or "none"
    if log is not None:
        log(f"{what}: {tried} prompts generated, {len(kept)} kept, dropped: {dropped}; {min(n, len(kept))} used "
            f"({n} asked); {secs:.1f}s, {tried / secs:.1f} prompts/s ({(tokens - resumed_tokens) / secs:.0f} tok/s)")
    if not kept:
        raise InputError(f"{what}: none of the {tried} prompts the target wrote was usable "
                         f"(dropped: {dropped}); try a higher max_tokens or another temperature")
    return kept[:n]


# ---- storage -----------------------------------------------------------------------------------
def prompts_path(work_dir: Path, n: int, *, temperature: float, top_p: float, seed: int, max_tokens: int,
                 documents: bool = False) -> Path:
    """Where a run keeps its generated prompts (the recipe and the options that shape them are in the name)."""
    return Path(work_dir) / f"{recipe(documents)}-n{n}-seed{seed}-t{temperature:g}-p{top_p:g}-len{max_tokens}.jsonl"


def load_or_generate(path: Path, generate: Callable[[Path], list[str]],
                     log: Callable[[str], None] | None = _stderr, what: str = "self-instruct") -> list[str]:
    """The prompts stored at `path` ({"prompt": ...} per line, usable as --data), or
    `generate(journal)`'s, then stored (atomically: a resumed or repeated run reads them instead of
    generating again). `journal` (beside `path`, removed once `path` is written) is where the
    generation keeps its progress, for a run killed while generating."""
    path = Path(path)
    if path.is_file():
        prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if log is not None:
            log(f"{what}: {len(prompts)} prompts read from {path}")
        return prompts
    journal = path.with_suffix(".partial")
    prompts = generate(journal)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    os.replace(tmp, path)
    journal.unlink(missing_ok=True)
    return prompts
