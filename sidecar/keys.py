"""Redis key names of the projection (contract: DESIGN.md) and of the read paths' feeds."""

from __future__ import annotations

KEY_PREFIX = "task-tracking"

# Sorted set: member a project (owner/repo), score 0, added when a projector first writes
# the project and again every minute (so a deleted index heals), not at every event.
# Readers take a project's execution count (ZCARD) and latest activity (top score) from its
# own index: kept here, they would cost Redis a ZADD per project per call, and drift from
# the index once retention trims it.
PROJECTS_KEY = f"{KEY_PREFIX}:projects"
# Stream of the changes that took effect, one entry per execution the compare-and-set
# wrote: one field, the execution's key, whose value is the JSON item the script wrote it
# from (sidecar.projector), or `reload` and the key for an item over 64 KiB. Capped with
# MAXLEN ~ CHANGES_MAXLEN; its entry IDs are the SSE ids of /api/v1/changes.
CHANGES_KEY = f"{KEY_PREFIX}:changes"
CHANGES_MAXLEN = 10_000
# Hash field listing, as a JSON array, the fields of the hash that are JSON-encoded
# (everything the event sent that is not a string); the projection's own, like
# occurredAtMs and streamId.
JSON_FIELDS_FIELD = "jsonFields"


def execution_key(execution_id: str) -> str:
    return f"{KEY_PREFIX}:execution:{execution_id}"


def project_index_key(project: str) -> str:
    return f"{KEY_PREFIX}:project:{project}:executions"


def dead_letter_key(stream_key: str) -> str:
    return f"{stream_key}:dead-letter"
