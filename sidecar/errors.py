"""Errors shared across the workers' layers: the consumer-group runner, the archiver and its
sinks raise and handle them, so they live below all three."""

from __future__ import annotations


class WorkerError(Exception):
    """A failure the worker explains in its message (a bucket missing, say): logged as
    one line, without a traceback, and retried with backoff."""
