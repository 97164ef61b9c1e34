"""The broad held-out benchmark (issue 15): chat prompts in twelve categories, in the spirit of
Spec-Bench and SPEED-Bench, for measuring how well a drafter does on traffic it was not trained on.

Provenance: every prompt, every passage and every earlier assistant turn in
`mtpspec/bench/heldout/*.jsonl` was written by hand for this repository. None is copied or
adapted from a dataset, benchmark or other corpus, and none comes from the corpora the shipped
drafter was trained on (chitchat-dataset, HumanEval, the `instructions` recipe's templates, the
Python standard library); `tests/test_heldout_prompts.py` checks that no prompt occurs in them or
in the older held-out sets `drafters/heldout-*.jsonl`, and that no two prompts of the set are near
duplicates. `mtpspec/bench/heldout/README.md` says more.

Most prompts are meant to be answerable by a small chat model (SmolLM2-135M-Instruct is the
default target): everyday explanations, emails, recipes, short code, simple math. Categories, in
`CATEGORIES` order:

    writing          emails, messages, listings, short stories, poems
    roleplay         "you are a ...": characters, games, practice conversations
    reasoning        small logic puzzles, common-sense and everyday decisions
    math             arithmetic, percentages, unit conversion, simple algebra
    coding           short code to write, explain or fix (mostly Python)
    extraction       pull facts out of a given text, sometimes as JSON or a table
    stem             everyday science explanations
    humanities       history, literature, philosophy, economics, civics
    summarization    summarize a passage of 120-300 words included in the prompt
    translation      to and from French, Spanish, German, Italian and others
    multi_turn       earlier user / assistant turns, then the final user message
    long_context_qa  a passage of 600-1200 words, then a question about it

Each file holds one JSON object per line: {"id": "writing-01", "messages": [{"role": "user",
"content": "..."}]}; multi_turn messages alternate user / assistant and end with the user's;
summarization and long_context_qa records also carry "passage", the passage exactly as it
appears in the user message (for length checks and analysis).

Scoring convention (what `eval-drafter` and `bench --suite spec` report): tau per category is the
category's mean accepted length over all its verification rounds, and the headline figure is the
unweighted mean of the per-category values (`mean_over_categories`), so a category's weight does
not depend on how many prompts or tokens it has. Render a prompt for a target with
`encode_prompt` (the target's chat template, as `Engine.encode` does for a single message).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Protocol, TypedDict

from ..errors import InputError

__all__ = [
    "CATEGORIES",
    "ChatMessage",
    "HeldoutError",
    "Prompt",
    "encode_prompt",
    "load_category",
    "load_heldout",
    "mean_over_categories",
]

CATEGORIES: tuple[str, ...] = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
    "summarization",
    "translation",
    "multi_turn",
    "long_context_qa",
)

_DATA_DIR = "heldout"  # beside this module: mtpspec/bench/heldout/<category>.jsonl


class ChatMessage(TypedDict):
    """One chat turn, as chat templates (`tokenizer.apply_chat_template`) take it."""

    role: Literal["user", "assistant"]
    content: str


class _Encoder(Protocol):
    """What `encode_prompt` needs of an engine (`mtpspec.Engine` has both)."""

    tokenizer: Any

    def encode(self, prompt: str, chat: bool = True) -> list[int]: ...


class HeldoutError(InputError, ValueError):
    """An unknown category or a bad argument (a ValueError, and an InputError for the CLI)."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: a conversation that ends with a user message.

    id: unique over the whole set, "<category>-NN". messages: the turns in order (user first,
    alternating, user last); treat them as read-only and use `chat()` for a mutable copy.
    passage: for summarization and long_context_qa, the passage the prompt includes, else None.
    """

    id: str
    category: str
    messages: tuple[ChatMessage, ...]
    passage: str | None = None

    def __hash__(self) -> int:  # messages holds dicts; the id identifies a prompt
        return hash((self.category, self.id))

    @property
    def text(self) -> str:
        """The final user message."""
        return self.messages[-1]["content"]

    @property
    def single_turn(self) -> bool:
        """True when the conversation is one user message."""
        return len(self.messages) == 1

    def chat(self) -> list[dict[str, str]]:
        """A fresh copy of the messages for `apply_chat_template`."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]


def _check_category(name: object) -> str:
    if not isinstance(name, str) or name not in CATEGORIES:
        raise HeldoutError(f"unknown held-out category {name!r}; valid categories: {', '.join(CATEGORIES)}")
    return name


def _parse_record(obj: object, category: str, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    pid, msgs, passage = obj.get("id"), obj.get("messages"), obj.get("passage")
    if not isinstance(pid, str) or not pid.startswith(category + "-"):
        raise ValueError(f"{where}: 'id' must be a string starting with {category + '-'!r}, got {pid!r}")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    turns: list[ChatMessage] = []
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"{where}: message {i} must be an object with exactly 'role' and 'content'")
        if m["role"] != want:
            raise ValueError(f"{where}: message {i} has role {m['role']!r}, expected {want!r} (roles alternate, user first)")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{where}: message {i} has empty or non-string content")
        turns.append(ChatMessage(role=want, content=m["content"]))
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user's")
    if passage is not None and (not isinstance(passage, str) or passage not in turns[-1]["content"]):
        raise ValueError(f"{where}: 'passage' must be a string contained in the last user message")
    return Prompt(id=pid, category=category, messages=tuple(turns), passage=passage)


def _read_category(name: str) -> list[Prompt]:
    res = resources.files(__package__).joinpath(_DATA_DIR, f"{name}.jsonl")
    text = res.read_text(encoding="utf-8")
    out: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{_DATA_DIR}/{name}.jsonl:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        out.append(_parse_record(obj, name, where))
    if not out:
        raise ValueError(f"{_DATA_DIR}/{name}.jsonl has no prompts")
    return out


def load_category(name: str) -> list[Prompt]:
    """The prompts of one category, in file order (read afresh on every call: the caller owns
    them). Raises HeldoutError (a ValueError) for an unknown category name."""
    return _read_category(_check_category(name))


def load_heldout(categories: str | Iterable[str] | None = None,
                 per_category: int | None = None) -> dict[str, list[Prompt]]:
    """Prompts by category.

    categories: names (an iterable, or one comma-separated string such as "math,coding"), in the
    order wanted; None = all of `CATEGORIES`, in that order. per_category: keep the first N of
    each category (a fixed, reproducible subset); None = all. Raises HeldoutError (a ValueError)
    for an unknown or repeated category, an empty selection or per_category < 1.
    """
    if categories is None:
        names: list[str] = list(CATEGORIES)
    else:
        if isinstance(categories, str):
            names = [c.strip() for c in categories.split(",") if c.strip()]
        else:
            names = list(categories)
        for c in names:
            _check_category(c)
        if not names:
            raise HeldoutError(f"no held-out category selected; valid categories: {', '.join(CATEGORIES)}")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise HeldoutError(f"held-out categories given more than once: {', '.join(dup)}")
    if per_category is not None and (isinstance(per_category, bool) or not isinstance(per_category, int)
                                     or per_category < 1):
        raise HeldoutError(f"per_category must be an integer >= 1 or None, got {per_category!r}")
    return {c: load_category(c)[:per_category] for c in names}


def plain_conversation(messages) -> str:
    """A conversation as plain text for a target without a chat template: the contents joined by
    blank lines (what such a target is given at inference, and trained on)."""
    return "\n\n".join(m["content"] for m in messages)


def encode_prompt(engine: _Encoder, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of a prompt for `engine` (an `mtpspec.Engine`, or anything with `.encode` and
    `.tokenizer`), ready for `engine.generate`.

    Single-turn prompts go through `engine.encode(prompt.text, chat)`, exactly like a prompt
    given on the command line. Multi-turn prompts are rendered with the tokenizer's chat template
    and the generation prompt (`apply_chat_template(messages, add_generation_prompt=True)`); with
    chat=False or a tokenizer without a chat template, the turns are joined with blank lines and
    encoded as plain text.
    """
    if prompt.single_turn:
        return engine.encode(prompt.text, chat=chat)
    tok = engine.tokenizer
    if chat and tok is not None and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(prompt.chat(), add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return engine.encode(plain_conversation(prompt.messages), chat=False)


def mean_over_categories(per_category: Mapping[str, float] | Sequence[float]) -> float:
    """The headline figure: the unweighted mean of per-category values (e.g. tau per category)."""
    vals = list(per_category.values()) if isinstance(per_category, Mapping) else list(per_category)
    if not vals:
        raise HeldoutError("no per-category values to average")
    return sum(vals) / len(vals)
