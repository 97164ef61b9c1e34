"""An OpenAI-compatible HTTP server with continuous batching over speculative decoding.

`scheduler.Scheduler` owns the model and one `DecodeBatch` (token ids only); `app.create_app` is
the HTTP layer (FastAPI: `requests` validates, `dispatch` queues on the scheduler, `responses` and
`streaming` answer in JSON or server-sent events, `errors` in OpenAI's error shape); `metrics` is
its Prometheus registry; `server.build` / `server.serve` wire them up; `bench` measures a running
server.
"""

from .scheduler import Job, QueueFull, Scheduler, SchedulerStopped, Update

__all__ = ["Job", "QueueFull", "Scheduler", "SchedulerStopped", "Update"]
