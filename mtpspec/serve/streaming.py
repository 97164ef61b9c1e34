"""Server-sent events of a streamed generation: OpenAI's chunk objects, then `data: [DONE]`.

A chat stream opens with a chunk holding the assistant role. Each update of the job gives a chunk
with the text new since the last one (`IncrementalText` holds back a partial character or a
possible start of a stop string, so the pieces concatenate to the final text) and the new token
ids; the last chunk carries the finish reason and, with `stream_options.include_usage`, a chunk
with the usage and no choices follows. An error after the stream started is sent as an event of
OpenAI's error shape.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from .dispatch import Submission
from .errors import job_error
from .responses import Reply, finish_reason
from .scheduler import Update


def event(obj: dict, ensure_ascii: bool = False) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=ensure_ascii)}\n\n"


class ChunkWriter:
    """The chunk objects of one stream."""

    def __init__(self, reply: Reply, include_usage: bool) -> None:
        self.reply, self.include_usage = reply, include_usage
        self.object_type = "chat.completion.chunk" if reply.chat else "text_completion"

    def chunk(self, text: str | None, ids: list[int], reason: str | None, role: bool = False) -> str:
        if self.reply.chat:
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        choice["token_ids"] = ids
        obj = self.reply.envelope(self.object_type, [choice])
        if self.include_usage:
            obj["usage"] = None
        return event(obj)

    def usage(self, u: Update) -> str:
        obj = self.reply.envelope(self.object_type, [])
        obj["usage"] = self.reply.usage(u)
        return event(obj, ensure_ascii=True)


async def sse_events(sub: Submission, first: Update, writer: ChunkWriter, text, prompt_param: str,
                     on_finished: Callable[[], None]) -> AsyncIterator[str]:
    """The events of a job from its first update on; `text`: the stream's `IncrementalText`;
    `on_finished` is called once the last token is sent. If the client goes away (the server
    stops iterating) the job is cancelled."""
    u, sent_ids = first, 0
    try:
        if writer.reply.chat:
            yield writer.chunk("", [], None, role=True)
        while True:
            if u.error is not None:
                yield event(job_error(u.error, prompt_param).body(), ensure_ascii=True)
                break
            piece = text.delta(u.new_ids, u.finished)
            ids = list(u.new_ids[sent_ids:])
            sent_ids = max(sent_ids, len(u.new_ids))
            if u.finished:
                yield writer.chunk(piece, ids, finish_reason(u))
                if writer.include_usage:
                    yield writer.usage(u)
                on_finished()
                break
            if piece or ids:
                yield writer.chunk(piece, ids, None)
            u = await sub.next()
        yield "data: [DONE]\n\n"
    finally:
        if not u.finished:
            sub.cancel()
