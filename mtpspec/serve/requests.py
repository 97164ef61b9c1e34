"""Validation of the server's requests: a JSON body, its generation parameters and its prompt,
checked field by field with OpenAI's error shape (`ApiError`, 400) for what is malformed or not
supported, and turned into token ids (`Generation`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from fastapi import Request as HttpRequest

from ..decoding.sampling import SamplingParams
from ..errors import InputError
from .errors import ApiError, input_error

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


def gen_params(body: dict, max_tokens_default: int | None, max_tokens_names: tuple[str, ...]) -> GenParams:
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
        raise input_error(e) from None
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
        raise input_error(e, "prompt") from None


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


@dataclass
class Generation:
    """A validated generation request: the prompt's token ids and the parameters."""

    prompt_ids: list[int]
    params: GenParams
    chat: bool

    @property
    def prompt_param(self) -> str:
        """The field errors about the prompt name."""
        return "messages" if self.chat else "prompt"


async def read_body(request: HttpRequest, served_model: str) -> dict:
    """The request's JSON object; its `model`, if given, must be the one this server serves."""
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
    if model is not None and model != served_model:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{served_model}'", param="model",
                       code="model_not_found")
    return body


def completion_request(engine, body: dict) -> Generation:
    """/v1/completions: a prompt (text, used as is, or token ids); max_tokens defaults to 16."""
    params = gen_params(body, 16, ("max_tokens",))
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported", param="echo")
    if body.get("logprobs") is not None:
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")
    return Generation(_completion_prompt(engine, body), params, chat=False)


def chat_request(engine, body: dict) -> Generation:
    """/v1/chat/completions: messages rendered with the chat template; no max_tokens default."""
    params = gen_params(body, None, ("max_tokens", "max_completion_tokens"))
    if body.get("logprobs"):
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")
    if body.get("tools"):
        raise ApiError(400, "'tools' is not supported", param="tools")
    messages = _chat_messages(body)
    try:
        return Generation(engine.encode_chat(messages), params, chat=True)
    except InputError as e:
        raise input_error(e, "messages") from None
