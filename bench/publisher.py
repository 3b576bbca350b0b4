"""Publishers in their own process: at full speed, or at a fixed rate with the send time in
each event (`sentAt`, an extra field the contract preserves) for latency."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import orjson

from bench.workload import STREAM, RawConnection, events, pack


def _publish(
    port: int, count: int, rate: float | None, seed: int, ready: Any, seconds: Any
) -> None:
    connection = RawConnection(port)
    try:
        if rate is None:
            raw = [orjson.dumps(event) for event in events(count, seed=seed)]
            ready.set()  # events generated: publishing starts now
            started = time.perf_counter()
            for start in range(0, count, 200):
                chunk = raw[start : start + 200]
                connection.run([pack("XADD", STREAM, "*", "event", item) for item in chunk])
            seconds.value = time.perf_counter() - started
            return
        ready.set()
        start = time.perf_counter()
        for index, event in enumerate(events(count, seed=seed)):
            due = start + index / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.0005, due - now))
            event["sentAt"] = time.time()
            connection.run([pack("XADD", STREAM, "*", "event", orjson.dumps(event))])
    finally:
        connection.close()


class Publisher:
    """A publishing process, started once it is about to send its first event (generating
    the events is not part of what is measured)."""

    def __init__(self, port: int, count: int, rate: float | None, seed: int) -> None:
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        self._seconds = context.Value("d", 0.0)
        self.process = context.Process(
            target=_publish, args=(port, count, rate, seed, ready, self._seconds), daemon=True
        )
        self.process.start()
        while not ready.wait(0.1):
            if not self.process.is_alive():
                raise RuntimeError("the publisher exited before publishing")

    def join(self) -> float:
        """Wait for the end; seconds spent publishing at full speed (0 at a fixed rate)."""
        self.process.join()
        return float(self._seconds.value)


def start(port: int, count: int, *, rate: float | None = None, seed: int = 11) -> Publisher:
    return Publisher(port, count, rate, seed)
