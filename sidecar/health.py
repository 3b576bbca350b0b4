"""Event-loop stall detection for /healthz, measured from a thread.

A ticker task on the loop cannot see the loop stall: while the loop is blocked
the ticker does not run either, and the health check that reads it does not run
until the loop is free again. So a watchdog thread posts a probe callback into
the loop every `interval` seconds and measures how long the loop takes to run
it. A loop that is blocked for good cannot answer /healthz at all, so the
kubelet's probe times out (that is the failure); the watchdog logs the stall
from its thread meanwhile, so the log says why. A loop that is starved but
still turning answers /healthz with 503 while its probe delay is above the limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from prometheus_client import Gauge

log = logging.getLogger(__name__)


class LoopWatchdog:
    """Measures the event loop's responsiveness from a daemon thread."""

    def __init__(self, gauge: Gauge, *, interval: float = 1.0, warn_after: float = 10.0) -> None:
        self.gauge = gauge
        self.interval = interval
        self.warn_after = warn_after
        self.last_delay = 0.0  # how long the last answered probe waited for the loop
        self._sent: float | None = None  # when the unanswered probe was posted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="loop-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
            self._thread = None

    def stalled_for(self) -> float:
        """The loop's delay: the last probe's, or the unanswered probe's age if longer."""
        sent = self._sent
        waiting = 0.0 if sent is None else time.monotonic() - sent
        return max(self.last_delay, waiting)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stop.wait(self.interval):
            answered = threading.Event()
            sent = self._sent = time.monotonic()
            try:
                loop.call_soon_threadsafe(self._answer, sent, answered)
            except RuntimeError:  # the loop is closed
                return
            warned = False
            while not answered.wait(self.interval):
                if self._stop.is_set():
                    return
                waiting = time.monotonic() - sent
                self.gauge.set(waiting)
                if waiting >= self.warn_after and not warned:
                    warned = True
                    log.error("event loop blocked for %.0fs: /healthz cannot answer", waiting)

    def _answer(self, sent: float, answered: threading.Event) -> None:
        self.last_delay = time.monotonic() - sent
        self._sent = None
        self.gauge.set(self.last_delay)
        answered.set()
