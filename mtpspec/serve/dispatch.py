"""Queueing a validated request on the scheduler and waiting for its progress from the event loop.

The scheduler calls a job's callback from its own thread; `Submission` hands every update to an
asyncio queue, and waits on it while checking once a second whether the client went away (then
the job is cancelled, which frees its slot before the next round).
"""

from __future__ import annotations

import asyncio

from fastapi import Request as HttpRequest

from ..decoding.loop import Request
from ..errors import InputError
from .errors import ApiError, input_error, unavailable
from .requests import Generation
from .scheduler import Job, QueueFull, Scheduler, SchedulerStopped, Update

DISCONNECT_POLL_S = 1.0


class Submission:
    """A `Generation` submitted to the scheduler as a job; raises `ApiError` if the request is
    invalid for this model (400), the queue is full (429) or the scheduler is not running (503).

    max_new_tokens: max_tokens, or without it the rest of the context. min_tokens: capped by it.
    """

    def __init__(self, scheduler: Scheduler, engine, gen: Generation) -> None:
        p = gen.params
        self.max_new_tokens = max(1, p.max_tokens if p.max_tokens is not None
                                  else scheduler.max_len - len(gen.prompt_ids))
        self.min_tokens = min(p.min_tokens, self.max_new_tokens)
        self._loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        try:
            stop_check = engine.stop_check(p.stop, self.min_tokens)
            req = Request(gen.prompt_ids, self.max_new_tokens, p.sampling, engine.eos_ids, stop_check,
                          self.min_tokens, p.ignore_eos)
            self.job: Job = scheduler.submit(req, self._on_update)
        except InputError as e:
            raise input_error(e, gen.prompt_param) from None
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except SchedulerStopped as e:
            raise unavailable(e) from None

    def _on_update(self, u: Update) -> None:  # the scheduler's thread
        try:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, u)
        except RuntimeError:  # event loop closed
            pass

    def cancel(self) -> None:
        self.job.cancel()

    async def next(self, timeout: float | None = None) -> Update:
        """The latest update (waiting for one; asyncio.TimeoutError after `timeout` seconds).
        Updates waiting in the queue are coalesced: their ids are cumulative."""
        u = await (asyncio.wait_for(self._updates.get(), timeout) if timeout else self._updates.get())
        while not u.finished and not self._updates.empty():
            u = self._updates.get_nowait()
        return u

    async def wait(self, client: HttpRequest, *, finished: bool, current: Update | None = None) -> Update | None:
        """The next update (finished=False) or the final one (finished=True; `current`: the latest
        update already received), or None if the client disconnected first. The job is cancelled
        when the client went away or the wait is interrupted."""
        u = current
        try:
            while u is None or (finished and not u.finished):
                try:
                    u = await self.next(DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await client.is_disconnected():
                        self.cancel()
                        return None
        except BaseException:
            self.cancel()
            raise
        return u
