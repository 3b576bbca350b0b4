"""task-tracking-sidecar: projects task lifecycle events from a Redis Stream into a
latest-status view in Redis and archives them as JSONL batches in S3."""

__version__ = "0.1.0"
