"""A stop request for a training run: SIGTERM (while `on_sigterm` is active) or `request()` asks
the run to finish its current step, checkpoint and return."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class StopRequest:
    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    @contextmanager
    def on_sigterm(self):
        """SIGTERM requests the stop inside this block (main thread only; elsewhere a no-op)."""
        try:
            old = signal.signal(signal.SIGTERM, lambda signum, frame: self.request())
        except ValueError:  # not the main thread
            old = None
        try:
            yield self
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
