"""`task-tracking`: run the sidecar, try it locally, publish and read events, replay the archive."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from sidecar import eventloop
from sidecar.config import ConfigError, Settings, load_settings, redact
from sidecar.events import describe_event_error
from sidecar.logs import configure_logging

# Where `task-tracking dev` leaves its Redis URL, so the other commands find it.
DEV_URL_FILE = Path(tempfile.gettempdir()) / "task-tracking-dev.url"
EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.command
    try:
        return eventloop.run(command(args))
    except ConfigError as exc:
        print(f"task-tracking: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RedisError as exc:
        print(f"task-tracking: Redis: {redact(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the HTTP port is taken
        if exc.errno == errno.EADDRINUSE:
            print(
                "task-tracking: TASK_TRACKING_HTTP_PORT: the port is in use;"
                " set another one (or stop what listens on it)",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        print(f"task-tracking: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="task-tracking",
        description="Task tracking sidecar: Redis Stream -> latest-status projection + S3 archive.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the sidecar (configured by TASK_TRACKING_* variables)"
    )
    run.set_defaults(command=cmd_run)

    dev = commands.add_parser(
        "dev", help="run the sidecar on embedded defaults: private Valkey, local-folder archive"
    )
    dev.add_argument("--archive-folder", type=Path, default=Path("task-tracking-archive"))
    dev.set_defaults(command=cmd_dev)

    emit = commands.add_parser("emit", help="publish one event")
    emit.add_argument("--execution-id", required=True)
    emit.add_argument("--task", dest="task_name", required=True, help="taskName")
    emit.add_argument("--project", required=True, help="owner/repo")
    emit.add_argument("--status", required=True, choices=["in_progress", "success", "error"])
    emit.add_argument("--occurred-at", help="ISO-8601 with timezone or epoch ms (default: now)")
    emit.add_argument("--flow")
    emit.add_argument("--pr-link", action="append", dest="pr_links")
    emit.add_argument(
        "--responsible-users-file", type=Path, help="JSON list for visibility.responsibleUsers"
    )
    emit.set_defaults(command=cmd_emit)

    status = commands.add_parser("status", help="show the projected state of one execution")
    status.add_argument("execution_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(command=cmd_status)

    listing = commands.add_parser("list", help="list a project's executions, newest first")
    listing.add_argument("project", help="owner/repo")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(command=cmd_list)

    watch = commands.add_parser(
        "watch", help="follow the projection's changes, a line each (like kubectl get -w)"
    )
    watch.add_argument("project", nargs="?", help="only this owner/repo")
    watch.add_argument("--api", help="through the read API at this URL (else straight from Redis)")
    watch.add_argument("--token", help="the API's token (default: TASK_TRACKING_API_TOKEN)")
    watch.add_argument("--count", type=int, help="stop after this many changes")
    watch.set_defaults(command=cmd_watch)

    api = commands.add_parser(
        "api", help="serve the read API and the board alone (no workers; any number of replicas)"
    )
    api.set_defaults(command=cmd_api)

    replay = commands.add_parser(
        "replay", help="rebuild the projection from the archive (idempotent, safe on a live one)"
    )
    replay.add_argument("--project", help="only this owner/repo")
    replay.add_argument("--since", help="first UTC day, YYYY-MM-DD")
    replay.add_argument("--until", help="last UTC day, YYYY-MM-DD")
    replay.add_argument("--no-progress", action="store_true")
    replay.set_defaults(command=cmd_replay)
    return parser


def client_settings(**overrides: Any) -> Settings:
    """Settings for the client commands: the environment, else the running `dev` sidecar."""
    if "TASK_TRACKING_REDIS_URL" not in os.environ and DEV_URL_FILE.exists():
        overrides.setdefault("redis_url", DEV_URL_FILE.read_text().strip())
    return load_settings(**overrides)


async def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    await serve(settings)
    return 0


async def serve(settings: Settings, on_started: Callable[[], None] | None = None) -> None:
    """Run a sidecar until SIGTERM or SIGINT, then drain and return."""
    from sidecar.runtime import Sidecar, run_until_signalled

    eventloop.tune_garbage_collector()  # after the imports: they live until exit

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        eventloop.add_signal_handler(signum, stop.set)  # remembered: kopf replaces it
    sidecar = Sidecar(settings)
    if on_started is None:
        await run_until_signalled(sidecar, stop)
        return
    await sidecar.start()
    try:
        on_started()
        await stop.wait()
    finally:
        await sidecar.stop()


async def cmd_dev(args: argparse.Namespace) -> int:
    from sidecar.devserver import DevServer

    configure_logging(os.environ.get("TASK_TRACKING_LOG_LEVEL", "info"), json=False)
    with contextlib.ExitStack() as stack:
        url = os.environ.get("TASK_TRACKING_REDIS_URL")
        if not url:
            server = stack.enter_context(DevServer())
            url = server.url
            DEV_URL_FILE.write_text(url)
            stack.callback(DEV_URL_FILE.unlink, missing_ok=True)
        folder = args.archive_folder.resolve()
        settings = load_settings(
            redis_url=url,
            s3_archive_enabled=True,
            archive_sink="folder",
            archive_folder=folder,
            archive_flush_max_age_seconds=5,
            api_enabled=os.environ.get("TASK_TRACKING_API_ENABLED", "true"),
        )

        def explain() -> None:
            board = f"http://127.0.0.1:{settings.api_port}/" if settings.api_enabled else "(off)"
            print(
                DEV_HELP.format(url=url, folder=folder, port=settings.http_port, board=board),
                flush=True,
            )

        await serve(settings, on_started=explain)
    return 0


DEV_HELP = """
task-tracking dev is running.
  Redis (private Valkey): {url}
  archive folder:         {folder}
  metrics / health:       http://127.0.0.1:{port}/metrics  /healthz  /readyz
  live task board:        {board}   (changes: task-tracking watch)

In another terminal (the commands find this Redis by themselves):
  task-tracking emit --execution-id demo-1 --task deploy --project my-org/my-repo \\
      --status in_progress
  task-tracking status demo-1
  task-tracking emit --execution-id demo-1 --task deploy --project my-org/my-repo --status success
  task-tracking status demo-1
  task-tracking list my-org/my-repo
Archive objects appear under the folder within 5 s. Ctrl-C stops (and flushes).
"""


async def cmd_emit(args: argparse.Namespace) -> int:
    from sidecar.connections import connect
    from sidecar.publisher import RedisTaskTrackingService, load_responsible_users

    settings = client_settings()
    users = None
    if args.responsible_users_file is not None:
        try:
            users = load_responsible_users(args.responsible_users_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--responsible-users-file: {exc}") from None
    redis = connect(settings.redis_url)
    try:
        service = RedisTaskTrackingService(
            redis,
            settings.redis_stream_key,
            responsible_users=users,
            limits=settings.event_limits,
        )
        extra: dict[str, Any] = {}
        if args.flow:
            extra["flow"] = args.flow
        if args.pr_links:
            extra["prLinks"] = args.pr_links
        occurred_at: str | int | None = args.occurred_at
        if isinstance(occurred_at, str) and occurred_at.isdigit():
            occurred_at = int(occurred_at)
        try:
            event = service.build(
                execution_id=args.execution_id,
                task_name=args.task_name,
                project=args.project,
                status=args.status,
                occurred_at=occurred_at,
                **extra,
            )
            entry_id = await service.emit(event)
        except ValidationError as exc:
            raise ConfigError(f"invalid event: {describe_event_error(exc)}") from None
        except ValueError as exc:  # refused before sending, as the sidecar would
            raise ConfigError(f"invalid event: {exc}") from None
    finally:
        await redis.aclose()
    print(f"{entry_id} {event.status} {event.execution_id}")
    return 0


@asynccontextmanager
async def projection_reader() -> AsyncIterator[Any]:
    """A decoding Redis client for the read commands, closed on exit."""
    from sidecar.connections import connect

    redis = connect(client_settings().redis_url, decode_responses=True)
    try:
        yield redis
    finally:
        await redis.aclose()


async def cmd_status(args: argparse.Namespace) -> int:
    from sidecar.read.terminal import show_status

    return await show_status(client_settings().redis_url, args.execution_id, as_json=args.json)


async def cmd_list(args: argparse.Namespace) -> int:
    from sidecar.read.terminal import show_list

    return await show_list(
        client_settings().redis_url, args.project, limit=args.limit, as_json=args.json
    )


async def cmd_watch(args: argparse.Namespace) -> int:
    from sidecar.read.terminal import watch

    token = args.token or os.environ.get("TASK_TRACKING_API_TOKEN") or None
    redis_url = None if args.api else client_settings().redis_url
    return await watch(
        redis_url=redis_url, api_url=args.api, token=token, project=args.project, count=args.count
    )


async def cmd_api(args: argparse.Namespace) -> int:
    from sidecar.read.terminal import serve_api

    settings = load_settings()
    configure_logging(settings.log_level)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        eventloop.add_signal_handler(signum, stop.set)
    await serve_api(
        settings.redis_url, settings.http_host, settings.api_port, settings.api_token, stop
    )
    return 0


async def cmd_replay(args: argparse.Namespace) -> int:
    from sidecar.replay import replay_archive
    from sidecar.sinks import SinkError

    settings = client_settings()
    configure_logging(settings.log_level, json=False)
    try:
        summary = await replay_archive(
            settings,
            project=args.project,
            since=args.since,
            until=args.until,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except SinkError as exc:
        raise ConfigError(str(exc)) from None
    print(summary.describe())
    return 0 if summary.failed_objects == 0 else 1
