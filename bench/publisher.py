"""Publishers in their own process: at full speed, or at a fixed rate with the send time in
each event (`sentAt`, an extra field the contract preserves) for latency."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import orjson

from bench.workload import STREAM, RawConnection, events, pack


def _publish(port: int, count: int, rate: float | None, seed: int) -> None:
    connection = RawConnection(port)
    try:
        if rate is None:
            raw = [orjson.dumps(event) for event in events(count, seed=seed)]
            for start in range(0, count, 200):
                chunk = raw[start : start + 200]
                connection.run([pack("XADD", STREAM, "*", "event", item) for item in chunk])
            return
        start = time.perf_counter()
        for index, event in enumerate(events(count, seed=seed)):
            due = start + index / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.0005, due - now))
            event["sentAt"] = time.time()
            connection.run([pack("XADD", STREAM, "*", "event", orjson.dumps(event))])
    finally:
        connection.close()


def start(port: int, count: int, *, rate: float | None = None, seed: int = 11) -> Any:
    process = multiprocessing.get_context("spawn").Process(
        target=_publish, args=(port, count, rate, seed), daemon=True
    )
    process.start()
    return process
