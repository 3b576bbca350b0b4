"""Redis's own ceiling: the projector's per-event write (replace the execution hash, ZADD GT
the index), commands packed ahead and pipelined over a plain socket, so the figure is
what the server itself can take, with no client work in it."""

from __future__ import annotations

import time

import orjson

from bench.workload import RawConnection, pack
from sidecar.keys import execution_key, project_index_key


def per_event_commands(raw_events: list[bytes]) -> list[bytes]:
    packed = []
    for index, raw in enumerate(raw_events):
        data = orjson.loads(raw)
        fields: list[object] = []
        for name, value in data.items():
            fields += [name, value if isinstance(value, str) else orjson.dumps(value)]
        millis = 1_767_225_600_000 + index
        fields += ["occurredAtMs", millis, "streamId", f"{millis}-0"]
        packed.append(pack("HSET", execution_key(data["executionId"]), *fields))
        packed.append(
            pack("ZADD", project_index_key(data["project"]), "GT", millis, data["executionId"])
        )
    return packed


def ceiling_rate(port: int, raw_events: list[bytes]) -> float:
    """Events per second the server takes for the per-event write, pipelined."""
    packed = per_event_commands(raw_events)
    connection = RawConnection(port)
    try:
        started = time.perf_counter()
        connection.run(packed, window=1000)
        return len(raw_events) / (time.perf_counter() - started)
    finally:
        connection.close()


def ceiling_latencies(port: int, raw_events: list[bytes], rate: float) -> list[float]:
    """Round-trip seconds of one event's write (HSET + ZADD, pipelined), sent at `rate`."""
    packed = per_event_commands(raw_events)
    connection = RawConnection(port)
    latencies = []
    try:
        start = time.perf_counter()
        for index in range(len(raw_events)):
            due = start + index / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.0005, due - now))
            sent = time.perf_counter()
            connection.run(packed[2 * index : 2 * index + 2])
            latencies.append(time.perf_counter() - sent)
    finally:
        connection.close()
    return latencies


def read_and_ack_seconds(port: int, stream: str, count: int, batch: int = 500) -> float:
    """Seconds to read `count` entries through a new consumer group and acknowledge them,
    `batch` at a time, with no decoding: what any archiver pays before writing a byte."""
    connection = RawConnection(port)
    try:
        connection.run([pack("XGROUP", "CREATE", stream, "raw-reader", "0")])
        started = time.perf_counter()
        done = 0
        while done < count:
            [reply] = connection.run(
                [
                    pack(
                        "XREADGROUP",
                        "GROUP",
                        "raw-reader",
                        "r",
                        "COUNT",
                        batch,
                        "STREAMS",
                        stream,
                        ">",
                    )
                ]
            )
            entries = reply[0][1]  # type: ignore[index]
            connection.run([pack("XACK", stream, "raw-reader", *(entry[0] for entry in entries))])
            done += len(entries)
        return time.perf_counter() - started
    finally:
        connection.close()
