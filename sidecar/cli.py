"""`task-tracking`: run the sidecar, try it locally, publish and read events, replay the archive."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError
from redis.exceptions import RedisError

from sidecar import __version__, eventloop
from sidecar.config import RESOURCE_NAME_RE, ConfigError, Settings, load_settings, redact
from sidecar.connections import redis_hint
from sidecar.events import PROJECT_RE, describe_event_error
from sidecar.logs import configure_logging

EXIT_CONFIG = 2
# What a shell reports for a command killed by SIGPIPE (128 + 13): `list | head`.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    # aiohttp (S3, the watch, the read API) keeps its signal handlers in frozenlist, whose
    # C++ extension maps libstdc++: 1.0 MiB of every such process's RSS for lists that are
    # read a few times per request. Set before anything imports it; FROZENLIST_NO_EXTENSIONS=
    # (empty) in the environment keeps the extension.
    os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.command
    try:
        return eventloop.run(command(args))
    except ConfigError as exc:
        print(f"task-tracking: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except RedisError as exc:
        print(f"task-tracking: Redis: {redact(str(exc))}{redis_hint(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`list | head`): stop quietly
        # Python flushes stdout again at exit, which would complain once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a taken port is a ConfigError already (config.listen_problem)
        print(f"task-tracking: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class CommandLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (and exit 2) like a bad setting."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="task-tracking",
        description="Task tracking sidecar: Redis Stream -> latest-status projection + S3 archive.",
        epilog="Configuration: TASK_TRACKING_* environment variables (README 'Configuration').",
    )
    parser.add_argument(
        "--version", action="version", version=f"task-tracking {__version__}",
        help="print the version and exit",
    )  # fmt: skip
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the sidecar (configured by TASK_TRACKING_* variables)"
    )
    run.set_defaults(command=cmd_run)

    dev = commands.add_parser(
        "dev", help="run the sidecar on embedded defaults: private Valkey, local-folder archive"
    )
    dev.add_argument(
        "--archive-folder", type=Path, default=None,
        help="where archive objects are written (default: .task-tracking-dev/archive)",
    )  # fmt: skip
    dev.set_defaults(command=cmd_dev)

    emit = commands.add_parser(
        "emit", help="publish one event (or JSON lines from standard input with --stdin)"
    )
    emit.add_argument("--execution-id", help="executionId (required without --stdin)")
    emit.add_argument("--task", dest="task_name", help="taskName (required without --stdin)")
    emit.add_argument("--project", help="owner/repo (required without --stdin)")
    emit.add_argument(
        "--status", choices=["in_progress", "success", "error"],
        help="the lifecycle status (required without --stdin)",
    )  # fmt: skip
    emit.add_argument("--occurred-at", help="ISO-8601 with timezone or epoch ms (default: now)")
    emit.add_argument("--flow", help="the optional flow name")
    emit.add_argument(
        "--pr-link", action="append", dest="pr_links", help="a pull request URL (repeatable)"
    )
    emit.add_argument(
        "--responsible-users-file", type=Path, help="JSON list for visibility.responsibleUsers"
    )
    emit.add_argument(
        "--stdin", action="store_true",
        help="publish one event per line of standard input (camelCase JSON objects; eventId"
        " and occurredAt are filled in when absent), then print how many",
    )  # fmt: skip
    emit.set_defaults(command=cmd_emit)

    status = commands.add_parser("status", help="show the projected state of one execution")
    status.add_argument("execution_id", help="the executionId")
    status.add_argument("--json", action="store_true", help="print the hash as JSON")
    status.set_defaults(command=cmd_status)

    listing = commands.add_parser("list", help="list a project's executions, newest first")
    listing.add_argument("project", type=project_name, help="owner/repo")
    listing.add_argument(
        "--limit", type=positive_int, default=20, help="how many executions (default 20)"
    )
    listing.add_argument("--json", action="store_true", help="print the rows as JSON")
    listing.set_defaults(command=cmd_list)

    watch = commands.add_parser(
        "watch",
        help="list the newest executions, then follow the changes (like kubectl get -w)",
    )
    watch.add_argument("project", nargs="?", type=project_name, help="only this owner/repo")
    watch.add_argument(
        "--api", type=http_url, help="through the read API at this URL (else straight from Redis)"
    )
    watch.add_argument("--token", help="the API's token (default: TASK_TRACKING_API_TOKEN)")
    watch.add_argument(
        "--limit", type=positive_int, default=20, help="executions listed first (default 20)"
    )
    watch.add_argument(
        "--watch-only", action="store_true", help="list nothing first: the changes only"
    )
    watch.add_argument("--count", type=positive_int, help="stop after this many changes")
    watch.set_defaults(command=cmd_watch)

    api = commands.add_parser(
        "api", help="serve the read API and the board alone (no workers; any number of replicas)"
    )
    api.set_defaults(command=cmd_api)

    replay = commands.add_parser(
        "replay", help="rebuild the projection from the archive (idempotent, safe on a live one)"
    )
    replay.add_argument(
        "--project", type=project_name, metavar="OWNER/REPO", help="only this owner/repo"
    )
    replay.add_argument("--since", type=utc_day, metavar="DAY", help="first UTC day, YYYY-MM-DD")
    replay.add_argument("--until", type=utc_day, metavar="DAY", help="last UTC day, YYYY-MM-DD")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.set_defaults(command=cmd_replay)

    doctor = commands.add_parser(
        "doctor", help="check the settings, Redis permissions, the archive target and Kubernetes"
    )
    doctor.add_argument(
        "--resource", metavar="NAME", type=resource_name,
        help="also check this TaskTracking resource (default: TASK_TRACKING_RESOURCE_NAME)",
    )  # fmt: skip
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    doctor.set_defaults(command=cmd_doctor)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(command=cmd_version)
    return parser


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// or https:// URL (for example: http://localhost:9471)"
        )
    return text


def utc_day(text: str) -> str:
    """A `YYYY-MM-DD` day, as archive keys spell it."""
    import datetime

    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        text = ""
    if len(text) != 10:
        raise argparse.ArgumentTypeError("not a UTC day: use YYYY-MM-DD (e.g. 2026-03-15)")
    return text


def resource_name(text: str) -> str:
    if not RESOURCE_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Kubernetes name: lowercase letters, digits, '-' and '.'"
        )
    return text


def project_name(text: str) -> str:
    if not PROJECT_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a project: use owner/repo")
    return text


def client_settings(**overrides: Any) -> Settings:
    """Settings for the client commands: the environment, else the `dev` sidecar running
    for this folder (found through .task-tracking-dev/, with its archive folder)."""
    from sidecar.devmode import DevState

    if "TASK_TRACKING_REDIS_URL" not in os.environ:
        state = DevState.find()
        info = state.running() if state is not None else None
        if info is not None:
            overrides.setdefault("redis_url", info["redisUrl"])
            if "TASK_TRACKING_ARCHIVE_SINK" not in os.environ:
                overrides.setdefault("s3_archive_enabled", True)
                overrides.setdefault("archive_sink", "folder")
                overrides.setdefault("archive_folder", info["archiveFolder"])
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        if "TASK_TRACKING_REDIS_URL is required" in str(exc):
            raise ConfigError(
                f"{exc}, or start `task-tracking dev` (make dev) in this checkout"
            ) from None
        raise


async def cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    await serve(settings)
    return 0


async def serve(settings: Settings, on_started: Callable[[], None] | None = None) -> None:
    """Run a sidecar until SIGTERM or SIGINT, then drain and return."""
    from sidecar import allocator
    from sidecar.runtime import Sidecar

    allocator.pin_mmap_threshold()  # before the archiver's buffers: see the module
    eventloop.tune_garbage_collector()  # after the imports: they live until exit

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        eventloop.add_signal_handler(signum, stop.set)  # remembered: kopf replaces it
    sidecar = Sidecar(settings)
    await sidecar.start()
    try:
        if on_started is not None:
            on_started()
        await stop.wait()
    finally:
        await sidecar.stop()


async def cmd_dev(args: argparse.Namespace) -> int:
    from sidecar.devmode import run_dev

    await run_dev(args.archive_folder, serve)
    return 0


async def cmd_emit(args: argparse.Namespace) -> int:
    from sidecar.connections import connect
    from sidecar.publisher import RedisTaskTrackingService, load_responsible_users

    if not args.stdin:
        missing = [
            option
            for option, value in (
                ("--execution-id", args.execution_id), ("--task", args.task_name),
                ("--project", args.project), ("--status", args.status),
            )
            if value is None
        ]  # fmt: skip
        if missing:
            raise ConfigError(f"emit needs {', '.join(missing)} (or --stdin for JSON lines)")
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
        if args.stdin:
            return await emit_lines(service, sys.stdin)
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


async def emit_lines(service: Any, lines: Any) -> int:
    """`emit --stdin`: exit 0 when every line was published, else 1 (each refused line is
    reported on stderr by number)."""
    published, refused = await service.emit_lines(lines)
    for number, reason in refused:
        print(f"task-tracking: line {number}: invalid event: {reason}", file=sys.stderr)
    noun = "event" if published == 1 else "events"
    print(f"published {published} {noun}" + (f", {len(refused)} refused" if refused else ""))
    return 0 if not refused else 1


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
        redis_url=redis_url,
        api_url=args.api,
        token=token,
        project=args.project,
        count=args.count,
        rows=0 if args.watch_only else args.limit,
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
    """Exit 0 after a replay, 1 when objects failed or no archive object matched (a typo in
    --project or the days would otherwise look like a successful replay)."""
    from sidecar.replay import replay_archive
    from sidecar.sinks import SinkError

    if args.since and args.until and args.since > args.until:
        raise ConfigError(f"replay: --since {args.since} is after --until {args.until}")
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
    if summary.objects == 0 and summary.failed_objects == 0:
        where = f"under {settings.archive.prefix}/{args.project or ''}"
        days = f" from {args.since or 'the first day'} to {args.until or 'the last'}"
        print(
            f"task-tracking: nothing matched: no archive object {where}{days}",
            file=sys.stderr,
        )
        return 1
    return 0 if summary.failed_objects == 0 else 1


async def cmd_doctor(args: argparse.Namespace) -> int:
    from sidecar.doctor import run_doctor

    try:
        settings: Settings | ConfigError = client_settings()
    except ConfigError as exc:
        settings = exc
    report = await run_doctor(settings, resource=args.resource)
    print(report.to_json() if args.json else report.render(), flush=True)
    return 0 if report.ok else 1


async def cmd_version(args: argparse.Namespace) -> int:
    print(f"task-tracking {__version__}")
    return 0
