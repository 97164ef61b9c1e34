"""The HTTP layer: an OpenAI-compatible FastAPI app over the scheduler.

The routes are here; the rest is in modules named for what they do: `requests` validates a request
and turns its prompt into token ids, `dispatch` queues it on the scheduler and waits for its
progress (noticing a client that went away), `responses` builds the JSON answer and `streaming`
the server-sent events; the `Scheduler` does the decoding. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` (`errors`): 400 for malformed JSON, wrong field
types, invalid values or a prompt longer than the context; 404 for an unknown model or path; 429
when the queue is full; 503 when the decoding loop is not running; 500 for an unexpected failure.

Non-standard additions: every choice carries `token_ids` (the generated token ids; in a stream,
the ids new in that chunk), non-streaming responses carry `stats` (speculative-decoding
statistics of the sequence), and `top_k` is accepted as a sampling parameter.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .dispatch import Submission
from .errors import ApiError, job_error
from .metrics import Metrics
from .requests import Generation, chat_request, completion_request, read_body
from .responses import Reply
from .scheduler import Scheduler
from .streaming import ChunkWriter, sse_events

log = logging.getLogger("mtpspec.serve")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), param=None, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: HttpRequest, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def _add_info_routes(app: FastAPI, engine, scheduler: Scheduler, metrics: Metrics, name: str,
                     count: Callable[[str, int], None]) -> None:
    """/health, /v1/models and /metrics."""
    created = int(time.time())

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


def create_app(engine, scheduler: Scheduler, metrics: Metrics | None = None, model_name: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `engine` (an `mtpspec.Engine`) through a running `scheduler`."""
    metrics = metrics or Metrics()
    name = model_name or engine.name
    app = FastAPI(title="mtpspec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.scheduler, app.state.engine = metrics, scheduler, engine

    def count(endpoint: str, status: int) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()

    _add_error_handlers(app)
    _add_info_routes(app, engine, scheduler, metrics, name, count)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await _generate(request, "/v1/completions", completion_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await _generate(request, "/v1/chat/completions", chat_request)

    async def _generate(request: HttpRequest, endpoint: str, parse: Callable[[object, dict], Generation]) -> Response:
        """Validate, queue, wait for the first tokens (or an error) before answering so that
        errors get a status code, then answer with JSON or a stream."""
        t0 = time.perf_counter()
        try:
            gen = parse(engine, await read_body(request, name))
            sub = Submission(scheduler, engine, gen)
        except ApiError as e:
            count(endpoint, e.status)
            return e.response()
        first = await sub.wait(request, finished=False)
        if first is None or first.error is not None:
            return _failed(endpoint, first, gen)
        metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
        reply = Reply(name, gen.chat, len(gen.prompt_ids))
        p = gen.params

        def finished() -> None:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

        if p.stream:
            count(endpoint, 200)
            events = sse_events(sub, first, ChunkWriter(reply, p.include_usage),
                                engine.incremental_text(p.stop, sub.min_tokens), gen.prompt_param, finished)
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        u = await sub.wait(request, finished=True, current=first)
        if u is None or u.error is not None:
            return _failed(endpoint, u, gen)
        body = reply.completion(u, engine.final_text(u.new_ids, p.stop, sub.min_tokens))
        finished()
        count(endpoint, 200)
        return JSONResponse(body)

    def _failed(endpoint: str, u, gen: Generation) -> Response:
        """The answer when the client went away (u is None: 499, for the metrics) or the job failed."""
        if u is None:
            count(endpoint, 499)
            return Response(status_code=499)
        err = job_error(u.error, gen.prompt_param)
        count(endpoint, err.status)
        return err.response()

    return app
