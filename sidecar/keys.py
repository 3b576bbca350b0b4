"""Redis key names of the projection (contract: DESIGN.md)."""

from __future__ import annotations

KEY_PREFIX = "task-tracking"


def execution_key(execution_id: str) -> str:
    return f"{KEY_PREFIX}:execution:{execution_id}"


def project_index_key(project: str) -> str:
    return f"{KEY_PREFIX}:project:{project}:executions"


def dead_letter_key(stream_key: str) -> str:
    return f"{stream_key}:dead-letter"
