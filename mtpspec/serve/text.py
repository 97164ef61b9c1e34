"""Text around the token-id scheduler: chat prompts from message lists and incremental text with
stop strings (what a streaming client receives must be a prefix of the final text)."""

from __future__ import annotations

from typing import Sequence

from ..errors import InputError


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation with the tokenizer's chat template and the generation prompt."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer; use /v1/completions with token-id prompts")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("this model's tokenizer has no chat template; use /v1/completions")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # the template itself may reject a conversation (e.g. role order)
        raise InputError(f"the chat template rejected the messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


class IncrementalText:
    """Turns a sequence's growing token ids into text deltas.

    `finish_text(ids)` is the final text (stop strings cut off). While the sequence runs, a trailing
    partial UTF-8 character and a trailing piece that could start a stop string are held back, so
    the concatenated deltas always equal the final text.
    """

    def __init__(self, finish_text, stop: Sequence[str] | None) -> None:
        self._finish_text = finish_text
        self._stop = list(stop or [])
        self.sent = ""

    def delta(self, ids: list[int], finished: bool) -> str:
        text = self._finish_text(ids)
        if not finished:
            text = text.rstrip("\ufffd")
            hold = 0
            for s in self._stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            if hold:
                text = text[:-hold]
        if len(text) > len(self.sent) and text.startswith(self.sent):
            out = text[len(self.sent):]
            self.sent = text
            return out
        return ""
