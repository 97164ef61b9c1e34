"""The server's scheduler: one thread owns the model and ONE `DecodeBatch` (continuous batching).

Requests (`Job`s holding a decoding `Request`) wait in a bounded queue; between decoding rounds the
scheduler prefills waiting jobs into free slots, runs one round (`DecodeBatch.step`) for every
active slot, and reports each job's progress through the job's callback. A job that finishes
leaves the batch; a cancelled job (its client went away) is dropped from the queue or cancelled in
the batch before the next round, which frees its slot. A failing request is reported to its job
only; if a round itself fails, the jobs in that round get the error and the batch is rebuilt, so
the loop keeps serving.

It works on token ids and knows nothing of HTTP (see `app.py`) or of text. How to draft is the
drafting plan's decision (decoding/plan.py): the server passes the engine's plan.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..decoding.loop import DecodeBatch, Request, SequenceStats, check_requests
from ..decoding.plan import DraftPlan
from ..errors import InputError
from ..models.decoder import Decoder

log = logging.getLogger("mtpspec.serve")


class QueueFull(Exception):
    """More requests are waiting than the configured limit."""


class SchedulerStopped(Exception):
    """The scheduler is not running (not started yet or shut down)."""


@dataclass
class Update:
    """A job's progress: all its new token ids so far; when finished, why and its statistics."""

    new_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once finished
    stats: SequenceStats | None = None
    error: Exception | None = None  # set (and finished) when the request failed


class Observer(Protocol):
    """Receives what the scheduler does (metrics); the default does nothing."""

    def on_finished(self, stats: SequenceStats, finish_reason: str) -> None: ...

    def on_round(self, batch_size: int, queue_length: int) -> None: ...


class _NoObserver:
    def on_finished(self, stats: SequenceStats, finish_reason: str) -> None:
        pass

    def on_round(self, batch_size: int, queue_length: int) -> None:
        pass


@dataclass(eq=False)
class Job:
    """One request in the scheduler. `on_update` is called from the scheduler thread."""

    request: Request
    on_update: Callable[[Update], None]
    cancelled: bool = False
    finished: bool = False
    slot: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    error: Exception | None = None
    _scheduler: "Scheduler | None" = None

    def cancel(self) -> None:
        """Ask the scheduler to stop this job (idempotent); its slot is freed before the next round."""
        if self._scheduler is not None and not self.finished:
            self._scheduler._cancel(self)

    def _send(self, update: Update) -> None:
        if self.finished:
            return
        self.finished = update.finished
        try:
            self.on_update(update)
        except Exception:  # a broken consumer must not take the loop down
            log.exception("job update callback failed")


class Scheduler:
    """Continuous batching over one `DecodeBatch` of `max_batch_size` slots, in its own thread.

    plan: how to draft (`Engine.plan`, or `engine.plan.with_draft_tokens(k)`); None = plain
    decoding. max_len: the context of every slot (prompt + generated tokens). max_queue: how many
    jobs may wait for a slot; `submit` raises `QueueFull` beyond that.
    """

    def __init__(
        self,
        model: Decoder,
        *,
        plan: DraftPlan | None = None,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_len: int = 2048,
        observer: Observer | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise InputError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue < 0:
            raise InputError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model
        self.plan = plan if plan is not None else DraftPlan()
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_len = min(max_len, model.cfg.max_position)
        self.observer = observer or _NoObserver()
        self._batch = self._new_batch()
        self._queue: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # slot -> job
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.rounds = 0

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.model, self.max_batch_size, self.max_len, self.plan)

    # ---- public, any thread --------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mtpspec-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        """Stop the loop after the current round; waiting and running jobs get `SchedulerStopped`."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        err = SchedulerStopped("the server is shutting down")
        for job in list(self._queue) + list(self._running.values()):
            job._send(Update([], True, None, None, err))
        self._queue.clear()
        self._running.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    def validate(self, request: Request) -> None:
        """Raise `InputError` if `request` cannot run here (empty, out-of-vocabulary, too long)."""
        check_requests(self.model, [request])
        if len(request.prompt_ids) + 1 > self.max_len:
            raise InputError(
                f"the prompt has {len(request.prompt_ids)} tokens; the context is {self.max_len} tokens "
                f"(at most {self.max_len - 1} prompt tokens)"
            )

    def submit(self, request: Request, on_update: Callable[[Update], None]) -> Job:
        """Queue a request; `on_update` gets its progress (from the scheduler thread).

        Raises `InputError` for an invalid request, `QueueFull` when the queue is full, and
        `SchedulerStopped` when the loop is not running."""
        self.validate(request)
        job = Job(request, on_update, _scheduler=self)
        if request.stop_check is not None:  # a failing stop check ends its own request only
            check = request.stop_check

            def guarded(ids: list[int]) -> int | None:
                try:
                    return check(ids)
                except Exception as e:
                    job.error = e
                    return len(ids)

            request.stop_check = guarded
        with self._cv:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise SchedulerStopped("the scheduler is not running")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (limit {self.max_queue})")
            self._queue.append(job)
            self._cv.notify_all()
        return job

    def _cancel(self, job: Job) -> None:
        with self._cv:
            job.cancelled = True
            self._cv.notify_all()

    # ---- the loop, scheduler thread only ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not self._running:
                    self._cv.wait()
                if self._stopping:
                    return
                dropped = [j for j in self._queue if j.cancelled]
                if dropped:
                    self._queue = deque(j for j in self._queue if not j.cancelled)
                cancel_running = [(s, j) for s, j in self._running.items() if j.cancelled]
            for job in dropped:
                job._send(Update([], True, "cancelled"))
            for slot, job in cancel_running:
                self._batch.cancel(slot)
                self._finish(slot, job)
            with self._cv:
                free = [s for s in self._batch.free_slots() if s not in self._running]
                admit = [self._queue.popleft() for _ in range(min(len(free), len(self._queue)))]
            if admit:
                self._admit(admit, free[: len(admit)])
            if self._running:
                self._round()

    def _admit(self, jobs: list[Job], slots: list[int]) -> None:
        ok_jobs, ok_slots = [], []
        for job, slot in zip(jobs, slots):
            try:
                self.validate(job.request)
            except InputError as e:
                job._send(Update([], True, None, None, e))
                continue
            ok_jobs.append(job)
            ok_slots.append(slot)
        if not ok_jobs:
            return
        try:
            events = self._batch.add([j.request for j in ok_jobs], ok_slots)
        except Exception as e:
            log.exception("prefill failed")
            for job, slot in zip(ok_jobs, ok_slots):
                self._batch.seqs[slot] = None
                job._send(Update([], True, None, None, e))
            return
        for job, slot in zip(ok_jobs, ok_slots):
            job.slot = slot
            self._running[slot] = job
        self._dispatch(events)

    def _round(self) -> None:
        self.observer.on_round(len(self._running), len(self._queue))
        try:
            events = self._batch.step()
        except Exception as e:
            log.exception("decoding round failed; failing its requests and rebuilding the batch")
            for slot, job in list(self._running.items()):
                job._send(Update(list(self._batch.seqs[slot].new_ids), True, None, None, e))
            self._running.clear()
            self._batch = self._new_batch()
            return
        self.rounds += 1
        self._dispatch(events)

    def _dispatch(self, events) -> None:
        for ev in events:
            job = self._running.get(ev.row)
            if job is None:
                continue
            if ev.finished:
                self._finish(ev.row, job)
            else:
                job._send(Update(list(ev.new_ids)))

    def _finish(self, slot: int, job: Job) -> None:
        seq = self._batch.seqs[slot]
        del self._running[slot]
        reason = seq.finish_reason or "length"
        try:
            self.observer.on_finished(seq.stats, reason)
        except Exception:
            log.exception("observer failed")
        job._send(Update(list(seq.new_ids), True, reason, seq.stats, job.error))
