"""Settling the entries a group cannot use: to the dead-letter stream, or just counted.

The projector's group moves each invalid entry (and each event Redis refused to project)
to `<stream>:dead-letter` with the reason and acknowledges it; the archiver's group only
counts and acknowledges them (the projector already dead-letters the same entries).
"""

from __future__ import annotations

import orjson
from redis.asyncio import Redis, RedisCluster

from sidecar.events import InvalidEntry
from sidecar.logs import ContextLogger
from sidecar.metrics import Metrics

# KEYS[1] stream, KEYS[2] dead-letter stream; ARGV[1] group, ARGV[2] entry ID, ARGV[3]
# the dead-letter stream's approximate cap (0: none), ARGV[4…] the dead-letter entry's
# fields. Dead-letters only what this call acknowledged.
ACK_THEN_DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if ARGV[3] ~= '0' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
  else
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
  end
  return 1
end
return 0
"""


class DeadLetterer:
    """Settles one group's invalid entries."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        metrics: Metrics,
        log: ContextLogger,
        *,
        stream: str,
        group: str,
        dead_letter: bool,
        maxlen: int,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.log = log
        self.stream = stream
        self.group = group
        self.dead_letter = dead_letter
        self.maxlen = maxlen
        self.key = f"{stream}:dead-letter"

    async def settle(self, entries: list[InvalidEntry]) -> list[str]:
        """Dead-letter and acknowledge the entries; or, for a group that does not
        dead-letter, count them. Returns the IDs left for the caller to acknowledge.
        Safe to call again with the same entries after it raised."""
        if not entries:
            return []
        if not self.dead_letter:
            self.metrics.invalid_skipped.labels(self.group).inc(len(entries))
            return [entry.entry_id for entry in entries]
        for entry in entries:
            self.log.warning(
                "dead-lettering entry: %s",
                entry.reason,
                extra={"stream_id": entry.entry_id, "execution_id": _execution_id(entry.raw)},
            )
        # Standalone Redis: one script per entry acknowledges it and, only if that
        # acknowledgement took, dead-letters it: a retry after a lost reply, or an
        # entry someone else settled, adds nothing. A cluster keeps the two streams
        # on different slots: dead-letter first, then acknowledge (at least once).
        standalone = isinstance(self.redis, Redis)
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                fields = [*entry.dead_letter_fields(), "group", self.group]
                if standalone:
                    pipe.eval(
                        ACK_THEN_DEAD_LETTER,
                        2,
                        self.stream,
                        self.key,
                        self.group,
                        entry.entry_id,
                        self.maxlen,
                        *fields,
                    )
                else:
                    cap: list[str | int] = ["MAXLEN", "~", self.maxlen] if self.maxlen else []
                    pipe.execute_command("XADD", self.key, *cap, "*", *fields)
            results = await pipe.execute()
        if standalone:
            dead_lettered = sum(results)
        else:
            await self.redis.xack(self.stream, self.group, *(e.entry_id for e in entries))
            dead_lettered = len(entries)
        self.metrics.dead_lettered.labels(self.group).inc(dead_lettered)
        return []


def _execution_id(raw: bytes | None) -> str | None:
    """The executionId of an invalid event, when it has a readable one (for the log)."""
    try:
        data = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    value = data.get("executionId") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
