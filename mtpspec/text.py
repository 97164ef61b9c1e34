"""Output text with stop strings, final and streamed: the one implementation behind
`Engine.generate`, `Engine.stream`, the CLI and the server.

The decoding loop works on token ids only; stop strings reach it as a callback (`make_stop_check`)
that tells it where to cut a sequence. A sequence's final text is its decoded ids cut before the
first stop string (`cut_at_stop`). While it runs, `IncrementalText` turns its growing ids into text
pieces that always concatenate to the final text: it holds back a trailing partial UTF-8
character and a trailing piece that could be the start of a stop string, until later tokens show
what they are.

Nothing here knows about tokenizers: callers pass a `decode(ids) -> str` function (see the
`Engine` methods `stop_check`, `final_text` and `incremental_text`).
"""

from __future__ import annotations

from typing import Callable, Sequence

from .decoding.loop import StopCheck
from .errors import InputError

Decode = Callable[[list[int]], str]


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """`stop` as a list: None or empty -> [], a string -> [it]; raises InputError unless every
    entry is a non-empty string."""
    if not stop:
        return []
    if isinstance(stop, str):
        return [stop]
    stop = list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise InputError("stop must be a list of non-empty strings")
    return stop


def cut_at_stop(text: str, stop: Sequence[str], protected: int = 0) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string that ends after
    its first `protected` characters (min_tokens: those of the first min_tokens tokens)."""
    found = [i for i in (text.find(s, max(0, protected - len(s) + 1)) for s in stop) if i >= 0]
    return text[: min(found)] if found else text


def protected_chars(decode: Decode, ids: list[int], min_tokens: int) -> int:
    """How many leading characters of decode(ids) no stop string may end in: all of them while
    there are at most min_tokens ids, else those of the first min_tokens ids (a trailing partial
    character not counted)."""
    if min_tokens <= 0:
        return 0
    if len(ids) <= min_tokens:
        return len(decode(ids))
    return len(decode(ids[:min_tokens]).rstrip("\ufffd"))


def partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of `text` that is a proper prefix of a stop string (the
    characters a stream must hold back: later tokens may complete the stop string)."""
    hold = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def make_stop_check(decode: Decode, stop: Sequence[str], min_tokens: int = 0) -> StopCheck | None:
    """The decoding loop's stop-string callback (None without stop strings): given a sequence's
    new token ids, None while their text holds no stop string, else how many ids to keep (the
    shortest prefix whose text contains one; the loop drops the rest and ends the sequence). The
    loop calls it after every emitted token, including each token of a speculative round.
    min_tokens: occurrences ending within the text of the first min_tokens ids do not count
    (`protected_chars`), so the shortest prefix kept is longer than min_tokens."""
    if not stop:
        return None
    stop = list(stop)

    def found(ids: list[int], protected: int) -> bool:
        text = decode(ids)
        return len(text) > protected and cut_at_stop(text, stop, protected) != text

    def check(new_ids: list[int]) -> int | None:
        if len(new_ids) <= min_tokens:
            return None
        protected = protected_chars(decode, new_ids, min_tokens)
        if not found(new_ids, protected):
            return None
        for n in range(min_tokens + 1, len(new_ids) + 1):
            if found(new_ids[:n], protected):
                return n
        return len(new_ids)

    return check


class IncrementalText:
    """Text deltas of one sequence whose token ids grow (a stream).

    `final_text(ids)` is the sequence's final text (decoded, cut before the first stop string).
    `delta(ids, finished)` returns the text new since the last call. While the sequence runs, a
    trailing partial UTF-8 character (U+FFFD from an incomplete byte sequence) and a trailing
    piece that could start a stop string are held back, so no delta ever shows part of a stop
    string that the final text omits: the concatenated deltas always equal the final text.
    """

    def __init__(self, final_text: Callable[[list[int]], str], stop: Sequence[str] | None) -> None:
        self._final_text = final_text
        self._stop = stop_strings(stop)
        self.sent = ""

    def delta(self, ids: list[int], finished: bool) -> str:
        text = self._final_text(ids)
        if not finished:
            text = text.rstrip("\ufffd")
            hold = partial_stop_length(text, self._stop)
            if hold:
                text = text[:-hold]
        if len(text) > len(self.sent) and text.startswith(self.sent):
            out = text[len(self.sent):]
            self.sent = text
            return out
        return ""
