"""OpenAI's response objects for one generation: the completion (JSON) and the envelope, usage and
finish reason that the streamed chunks share with it.

Non-standard additions: every choice carries `token_ids` (the generated token ids; in a stream,
the ids new in that chunk) and the completion carries `stats` (speculative-decoding statistics
of the sequence).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from .scheduler import Update


def finish_reason(u: Update) -> str:
    """OpenAI's finish reason of a finished update ("stop" or "length")."""
    return u.finish_reason if u.finish_reason in ("stop", "length") else "stop"


@dataclass
class Reply:
    """What every object answering one request shares: its id, creation time and model."""

    model: str
    chat: bool
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def envelope(self, object_type: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def usage(self, u: Update) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(u.new_ids),
                "total_tokens": self.prompt_tokens + len(u.new_ids)}

    def completion(self, u: Update, text: str) -> dict:
        """The non-streaming response to a finished update whose output text is `text`."""
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason(u), "token_ids": list(u.new_ids)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out = self.envelope("chat.completion" if self.chat else "text_completion", [choice])
        out["usage"] = self.usage(u)
        out["stats"] = u.stats.as_dict() if u.stats is not None else None
        return out
