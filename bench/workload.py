"""Synthetic events and fast stream filling, shared by every benchmark case."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import hiredis
import orjson

STREAM = "task-events:v1"
PROJECTOR_GROUP = "task-status-projector"
ARCHIVER_GROUP = "task-history-archiver"
PROJECTS = [f"org-{i}/repo-{j}" for i in range(10) for j in range(10)]
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def events(
    count: int,
    *,
    seed: int = 7,
    per_execution: int = 3,
    projects: int = 100,
    adjacent: bool = False,
) -> Iterator[dict[str, object]]:
    """A realistic mix: executions of `per_execution` events (in_progress, then a terminal
    status) over `projects` projects, 1% of events late, ISO and epoch timestamps.

    Executions start one per slot and last 500 to 5,000 slots, so with 3 events per
    execution the events of one execution sit hundreds to thousands of entries apart in
    the stream (median about 4,000), interleaved with others': tasks that run for seconds
    in a busy stream (a batch of 500 rarely holds two of them). `adjacent`: each
    execution's events follow each other (short tasks; the projector's batches coalesce
    them)."""
    rng = random.Random(seed)
    executions = -(-count // per_execution)
    schedule: list[tuple[float, int, int]] = []
    for execution in range(executions):
        duration = 0 if adjacent else rng.uniform(500, 5000)
        for step in range(per_execution):
            at = execution + duration * step / max(1, per_execution - 1)
            schedule.append((at, execution, step))
    schedule.sort()
    for at, execution, step in schedule[:count]:
        status = "in_progress" if step < per_execution - 1 else rng.choice(("success", "error"))
        millis = BASE_MS + int(at * 37) + step * 5
        if rng.random() < 0.01:
            millis -= 1000  # a late event
        occurred: object = millis
        if rng.random() < 0.5:
            occurred = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis / 1000)) + (
                f".{millis % 1000:03d}Z"
            )
        event: dict[str, object] = {
            "eventId": f"evt-{seed}-{execution:08d}-{step}",
            "executionId": f"exec-{seed}-{execution:08d}",
            "taskName": "deploy",
            "status": status,
            "project": PROJECTS[execution % projects],
            "occurredAt": occurred,
            "actor": {"provider": "github", "id": "octocat", "displayName": "The Octocat"},
            "flow": "release",
        }
        if step == per_execution - 1:
            event["prLinks"] = [f"https://github.com/{event['project']}/pull/{execution}"]
        yield event


def encoded(
    count: int,
    *,
    seed: int = 7,
    projects: int = 100,
    per_execution: int = 3,
    adjacent: bool = False,
) -> list[bytes]:
    chosen = events(
        count, seed=seed, projects=projects, per_execution=per_execution, adjacent=adjacent
    )
    return [orjson.dumps(event) for event in chosen]


class RawConnection:
    """A plain socket speaking RESP: commands packed ahead, sent in large writes, replies
    parsed by hiredis. Measures what the server can take without client overhead."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def run(self, packed: list[bytes], window: int = 1000) -> list[object]:
        """Send packed commands `window` at a time, pipelined; return every reply."""
        replies: list[object] = []
        for start in range(0, len(packed), window):
            chunk = packed[start : start + window]
            self.sock.sendall(b"".join(chunk))
            wanted = len(replies) + len(chunk)
            while len(replies) < wanted:
                reply = self.reader.gets()
                if reply is False:
                    self.reader.feed(self.sock.recv(1 << 20))
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(str(reply))
                replies.append(reply)
        return replies

    def close(self) -> None:
        self.sock.close()


def pack(*args: object) -> bytes:
    return bytes(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]


def prefill(port: int, raw_events: list[bytes], stream: str = STREAM) -> None:
    """XADD every event to the stream, as fast as the server takes them."""
    connection = RawConnection(port)
    try:
        connection.run([pack("XADD", stream, "*", "event", raw) for raw in raw_events], 5000)
    finally:
        connection.close()
