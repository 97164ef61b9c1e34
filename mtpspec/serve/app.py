"""The HTTP layer: an OpenAI-compatible FastAPI app over the scheduler.

It parses and validates requests, turns text into token ids and back, and speaks OpenAI's JSON and
server-sent events; the `Scheduler` does the decoding. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON, wrong field types,
invalid values or a prompt longer than the context; 404 for an unknown model or path; 429 when the
queue is full; 503 when the decoding loop is not running; 500 for an unexpected failure.

Non-standard additions: every choice carries `token_ids` (the generated token ids; in a stream,
the ids new in that chunk), non-streaming responses carry `stats` (speculative-decoding
statistics of the sequence), and `top_k` is accepted as a sampling parameter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding.loop import Request
from ..decoding.sampling import SamplingParams
from ..errors import InputError
from .metrics import Metrics
from .scheduler import QueueFull, Scheduler, SchedulerStopped, Update
from .text import chat_prompt_ids

log = logging.getLogger("mtpspec.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _input_error(e: InputError, default_param: str | None = None) -> ApiError:
    msg = str(e)
    first = msg.split(" ", 1)[0]
    param = first if first in {"temperature", "top_k", "top_p", "seed", "stop", "max_tokens", "min_tokens",
                                      "ignore_eos"} else default_param
    code = "context_length_exceeded" if "context" in msg else None
    return ApiError(400, msg, param=param, code=code)


# ---- field validation --------------------------------------------------------------------------
_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _field(body: dict, name: str, check, what: str, default=None):
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not check(v):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    return v


def _stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of non-empty strings", param="stop",
                       code="invalid_type")
    if len(stop) > 16:
        raise ApiError(400, "'stop' takes at most 16 strings", param="stop")
    return stop


@dataclass
class GenParams:
    max_tokens: int | None
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False
    min_tokens: int = 0


def _gen_params(body: dict, max_tokens_default: int | None, max_tokens_names: tuple[str, ...]) -> GenParams:
    max_tokens = max_tokens_default
    for name in max_tokens_names:
        v = _field(body, name, _is_int, "an integer")
        if v is not None:
            if v < 1:
                raise ApiError(400, f"'{name}' must be >= 1, got {v}", param=name)
            max_tokens = v
    temperature = _field(body, "temperature", _is_num, "a number", 1.0)
    if temperature > 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    top_p = _field(body, "top_p", _is_num, "a number", 1.0)
    top_k = _field(body, "top_k", _is_int, "an integer", 0)
    if top_k == -1:
        top_k = 0
    seed = _field(body, "seed", _is_int, "an integer")
    n = _field(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, _is_num, "a number", 0) != 0:
            raise ApiError(400, f"'{name}' is not supported (only 0)", param=name)
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    opts = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = bool(_field(opts, "include_usage", lambda v: isinstance(v, bool), "a boolean", False))
    stop = _stop_list(body)
    ignore_eos = _field(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False)
    min_tokens = _field(body, "min_tokens", _is_int, "an integer", 0)
    if min_tokens < 0:
        raise ApiError(400, f"'min_tokens' must be >= 0, got {min_tokens}", param="min_tokens")
    if max_tokens is not None and min_tokens > max_tokens:
        raise ApiError(400, f"'min_tokens' ({min_tokens}) must be <= max_tokens ({max_tokens})", param="min_tokens")
    try:
        sampling = SamplingParams(float(temperature), top_k, float(top_p), seed)
    except InputError as e:
        raise _input_error(e) from None
    return GenParams(max_tokens, sampling, stop, stream, include_usage, ignore_eos, min_tokens)


def _completion_prompt(engine, body: dict) -> list[int]:
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "one prompt per request is supported (send several requests)", param="prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(_is_int(t) for t in prompt))):
        raise ApiError(400, "'prompt' must be a string or a list of token ids", param="prompt", code="invalid_type")
    try:
        return engine.encode(prompt, chat=False)
    except InputError as e:
        raise _input_error(e, "prompt") from None


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]",
                           code="invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content", code="invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


# ---- the app -------------------------------------------------------------------------------------
def create_app(engine, scheduler: Scheduler, metrics: Metrics | None = None, model_name: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `engine` (an `mtpspec.Engine`) through a running `scheduler`."""
    metrics = metrics or Metrics()
    name = model_name or engine.name
    eos_ids = engine.eos_ids
    created = int(time.time())
    app = FastAPI(title="mtpspec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.scheduler, app.state.engine = metrics, scheduler, engine

    def count(endpoint: str, status: int) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), param=None, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: HttpRequest, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    async def _body(request: HttpRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
        if model is not None and model != name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{name}'", param="model",
                           code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": name,
                             "drafter": getattr(engine, "drafter_name", None),
                             "batch_size": scheduler.batch_size, "queue_length": scheduler.queue_length,
                             "max_batch_size": scheduler.max_batch_size, "max_queue": scheduler.max_queue,
                             "context_length": scheduler.max_len}, status_code=200 if ok else 503)

    def _model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "mtpspec",
                "context_length": scheduler.max_len, "drafter": getattr(engine, "drafter_name", None)}

    @app.get("/v1/models")
    async def models():
        count("/v1/models", 200)
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            count("/v1/models", 404)
            return ApiError(404, f"the model '{model_id}' does not exist", param="model",
                            code="model_not_found").response()
        count("/v1/models", 200)
        return _model_card()

    @app.get("/metrics")
    async def prometheus():
        data, ctype = metrics.render(scheduler.batch_size, scheduler.queue_length)
        return Response(data, media_type=ctype)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        endpoint = "/v1/completions"
        try:
            body = await _body(request)
            params = _gen_params(body, 16, ("max_tokens",))
            for flag in ("echo",):
                if body.get(flag):
                    raise ApiError(400, f"'{flag}' is not supported", param=flag)
            if body.get("logprobs") is not None:
                raise ApiError(400, "'logprobs' is not supported", param="logprobs")
            prompt_ids = _completion_prompt(engine, body)
        except ApiError as e:
            count(endpoint, e.status)
            return e.response()
        return await _serve(request, endpoint, prompt_ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        endpoint = "/v1/chat/completions"
        try:
            body = await _body(request)
            params = _gen_params(body, None, ("max_tokens", "max_completion_tokens"))
            if body.get("logprobs"):
                raise ApiError(400, "'logprobs' is not supported", param="logprobs")
            if body.get("tools"):
                raise ApiError(400, "'tools' is not supported", param="tools")
            messages = _chat_messages(body)
            try:
                prompt_ids = chat_prompt_ids(engine.tokenizer, messages)
            except InputError as e:
                raise _input_error(e, "messages") from None
        except ApiError as e:
            count(endpoint, e.status)
            return e.response()
        return await _serve(request, endpoint, prompt_ids, params, chat=True)

    async def _serve(request: HttpRequest, endpoint: str, prompt_ids: list[int], p: GenParams, chat: bool):
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()

        def on_update(u: Update) -> None:  # scheduler thread
            try:
                loop.call_soon_threadsafe(updates.put_nowait, u)
            except RuntimeError:  # event loop closed
                pass

        max_new = max(1, p.max_tokens if p.max_tokens is not None else scheduler.max_len - len(prompt_ids))
        min_tokens = min(p.min_tokens, max_new)  # without max_tokens: capped by the context, as it is
        try:
            stop_check = engine.stop_check(p.stop, min_tokens)
            req = Request(prompt_ids, max_new, p.sampling, eos_ids, stop_check, min_tokens, p.ignore_eos)
            job = scheduler.submit(req, on_update)
        except InputError as e:
            err = _input_error(e, "messages" if chat else "prompt")
            count(endpoint, err.status)
            return err.response()
        except QueueFull as e:
            count(endpoint, 429)
            return ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                            code="rate_limit_exceeded").response()
        except SchedulerStopped as e:
            count(endpoint, 503)
            return ApiError(503, str(e), type="server_error", code="unavailable").response()

        async def next_update(timeout: float | None = None) -> Update:
            u = await (asyncio.wait_for(updates.get(), timeout) if timeout else updates.get())
            while not u.finished and not updates.empty():  # coalesce: ids are cumulative
                u = updates.get_nowait()
            return u

        # wait for the first tokens (or an error) before answering, so errors get a status code
        try:
            while True:
                try:
                    first = await next_update(1.0)
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        count(endpoint, 499)
                        return Response(status_code=499)
        except BaseException:
            job.cancel()
            raise
        if first.error is not None:
            err = _job_error(first.error, chat)
            count(endpoint, err.status)
            return err.response()
        metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created_at = int(time.time())
        text = engine.incremental_text(p.stop, min_tokens)  # streamed deltas concatenate to the final text

        def usage(u: Update) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(u.new_ids),
                    "total_tokens": len(prompt_ids) + len(u.new_ids)}

        if not p.stream:
            u = first
            try:
                while not u.finished:
                    try:
                        u = await next_update(1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel()
                            count(endpoint, 499)
                            return Response(status_code=499)
            finally:
                if not u.finished:
                    job.cancel()
            if u.error is not None:
                err = _job_error(u.error, chat)
                count(endpoint, err.status)
                return err.response()
            final_text = engine.final_text(u.new_ids, p.stop, min_tokens)
            reason = u.finish_reason if u.finish_reason in ("stop", "length") else "stop"
            choice = {"index": 0, "logprobs": None, "finish_reason": reason, "token_ids": list(u.new_ids)}
            if chat:
                choice["message"] = {"role": "assistant", "content": final_text}
            else:
                choice["text"] = final_text
            out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created_at,
                   "model": name, "system_fingerprint": None, "choices": [choice], "usage": usage(u),
                   "stats": u.stats.as_dict() if u.stats is not None else None}
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            count(endpoint, 200)
            return JSONResponse(out)

        def chunk(delta_text: str | None, ids: list[int], reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": delta_text or ""} if role else (
                    {"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": reason}
            choice["token_ids"] = ids
            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created_at, "model": name, "system_fingerprint": None, "choices": [choice]}
            if p.include_usage:
                obj["usage"] = None
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            u, sent_ids = first, 0
            try:
                if chat:
                    yield chunk("", [], None, role=True)
                while True:
                    if u.error is not None:
                        err = _job_error(u.error, chat)
                        yield "data: " + json.dumps({"error": {"message": err.message, "type": err.type,
                                                                "param": err.param, "code": err.code}}) + "\n\n"
                        break
                    piece = text.delta(u.new_ids, u.finished)
                    ids = list(u.new_ids[sent_ids:])
                    sent_ids = max(sent_ids, len(u.new_ids))
                    if u.finished:
                        reason = u.finish_reason if u.finish_reason in ("stop", "length") else "stop"
                        yield chunk(piece, ids, reason)
                        if p.include_usage:
                            obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                   "created": created_at, "model": name, "system_fingerprint": None,
                                   "choices": [], "usage": usage(u)}
                            yield f"data: {json.dumps(obj)}\n\n"
                        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
                        break
                    if piece or ids:
                        yield chunk(piece, ids, None)
                    u = await next_update()
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slot at the next round
                if not u.finished:
                    job.cancel()

        count(endpoint, 200)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _job_error(e: Exception, chat: bool) -> ApiError:
    if isinstance(e, InputError):
        return _input_error(e, "messages" if chat else "prompt")
    if isinstance(e, SchedulerStopped):
        return ApiError(503, str(e), type="server_error", code="unavailable")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
