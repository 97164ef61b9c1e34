"""The server's errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import InputError
from .scheduler import SchedulerStopped

# InputError messages that start with one of these name the request field at fault
_SAMPLING_FIELDS = {"temperature", "top_k", "top_p", "seed", "stop", "max_tokens", "min_tokens", "ignore_eos"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def input_error(e: InputError, default_param: str | None = None) -> ApiError:
    """A 400 for invalid input; `param` is the field the message names, else `default_param`."""
    msg = str(e)
    first = msg.split(" ", 1)[0]
    param = first if first in _SAMPLING_FIELDS else default_param
    code = "context_length_exceeded" if "context" in msg else None
    return ApiError(400, msg, param=param, code=code)


def unavailable(e: SchedulerStopped) -> ApiError:
    return ApiError(503, str(e), type="server_error", code="unavailable")


def job_error(e: Exception, prompt_param: str) -> ApiError:
    """The error a job failed with, as the client sees it (`prompt_param`: "prompt" or "messages")."""
    if isinstance(e, InputError):
        return input_error(e, prompt_param)
    if isinstance(e, SchedulerStopped):
        return unavailable(e)
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
