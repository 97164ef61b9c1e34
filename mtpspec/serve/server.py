"""Wiring: a loaded engine's model and drafting plan go to the scheduler, the engine and the
scheduler to the app; uvicorn runs it (in the foreground for `mtpspec serve`, or in a background
thread for tests and the bench)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from ..api import Engine
from .app import create_app
from .metrics import Metrics
from .scheduler import Scheduler


@dataclass
class Served:
    engine: Engine
    scheduler: Scheduler
    metrics: Metrics
    app: object


def build(engine: Engine, *, max_batch_size: int = 8, max_queue: int = 64, max_len: int = 2048,
          draft_tokens: int | None = None, model_name: str | None = None) -> Served:
    """Scheduler (started) + app for a loaded engine, drafting with the engine's plan (its
    adaptive state included). draft_tokens: a fixed K for this server (0 = plain); None = the
    plan's own."""
    metrics = Metrics()
    sched = Scheduler(engine.model, plan=engine.plan.with_draft_tokens(draft_tokens), max_batch_size=max_batch_size,
                      max_queue=max_queue, max_len=max_len, observer=metrics).start()
    return Served(engine, sched, metrics, create_app(engine, sched, metrics, model_name))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on host:port in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning") -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                                    lifespan="off", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, max_queue: int = 64,
          max_len: int = 2048, draft_tokens: int | None = None, model_name: str | None = None,
          log_level: str = "info") -> None:
    """Serve until interrupted."""
    served = build(engine, max_batch_size=max_batch_size, max_queue=max_queue, max_len=max_len,
                   draft_tokens=draft_tokens, model_name=model_name)
    try:
        uvicorn.run(served.app, host=host, port=port, log_level=log_level, lifespan="off")
    finally:
        served.scheduler.stop()
