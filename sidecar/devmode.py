"""`task-tracking dev`: the sidecar on embedded defaults, for trying it on a laptop.

A private Valkey (or redis-server) in a session of its own, so a terminal's Ctrl-C reaches
only the sidecar, which drains and flushes before the server is stopped; and all state in
one per-checkout folder, `.task-tracking-dev/` (`DevState`), so a restart keeps the
projection and the other commands find the running dev server without colliding with
another checkout's or another user's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis

from sidecar.config import ConfigError, Settings, load_settings
from sidecar.devserver import DevServer, free_port
from sidecar.logs import configure_logging


async def run_dev(
    archive_folder: Path | None, serve: Callable[[Settings, Callable[[], None]], Awaitable[None]]
) -> None:
    """`task-tracking dev`: the sidecar (`serve`, until Ctrl-C) on this folder's state."""
    configure_logging(os.environ.get("TASK_TRACKING_LOG_LEVEL", "info"), json=False)
    state = DevState.here()
    with contextlib.ExitStack() as stack:
        try:
            state.acquire()
        except DevAlreadyRunning as exc:
            raise ConfigError(str(exc)) from None
        stack.callback(state.release)
        url = os.environ.get("TASK_TRACKING_REDIS_URL")
        own_server = not url
        if not url:
            state.stop_orphaned_server()
            server = DevServer(folder=state.redis_folder, persistent=True, own_session=True)
            url = stack.enter_context(server).url
        folder = (archive_folder or state.archive_folder).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        settings = load_settings(
            redis_url=url,
            s3_archive_enabled=True,
            archive_sink="folder",
            archive_folder=folder,
            archive_flush_max_age_seconds=5,
            http_port=dev_port("TASK_TRACKING_HTTP_PORT", 9470),
            api_enabled=os.environ.get("TASK_TRACKING_API_ENABLED", "true"),
            api_port=dev_port("TASK_TRACKING_API_PORT", 9471),
        )

        def explain() -> None:
            state.publish(
                {"pid": os.getpid(), "redisUrl": url, "ownServer": own_server,
                 "archiveFolder": str(folder), "httpPort": settings.http_port,
                 "apiPort": settings.api_port if settings.api_enabled else None}
            )  # fmt: skip
            stack.callback(state.clear)
            print(
                DEV_HELP.format(
                    url=url, folder=shown_path(folder), port=settings.http_port,
                    state=shown_path(state.folder), cli=cli_invocation(),
                    board=f"http://127.0.0.1:{settings.api_port}/" if settings.api_enabled
                    else "off (TASK_TRACKING_API_ENABLED=false)",
                ),
                flush=True,
            )  # fmt: skip

        await serve(settings, explain)


def dev_port(variable: str, preferred: int) -> int:
    """The port `variable` sets, else `preferred` when free, else any free port (a second
    checkout's `dev` then runs beside the first one)."""
    configured = os.environ.get(variable)
    if configured:
        return int(configured) if configured.isdigit() else preferred  # Settings says why
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", preferred))
        except OSError:
            return free_port()
    return preferred


def shown_path(path: Path) -> str:
    """`path` relative to the current folder when it is under it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd())) + "/"
    except ValueError:
        return str(path) + "/"


def cli_invocation() -> str:
    """How to run this CLI from another terminal: the lines to type before the commands."""
    import shutil

    bin_folder = Path(sys.executable).parent
    script = bin_folder / "task-tracking"
    on_path = shutil.which("task-tracking")
    if on_path and script.exists() and Path(on_path).resolve() == script.resolve():
        return ""
    if (bin_folder / "activate").exists():
        activate = shown_path(bin_folder / "activate").rstrip("/")
        return f"  . {activate}          # or run {shown_path(script).rstrip('/')}\n"
    return f"  alias task-tracking='{sys.executable} -m sidecar'\n"


DEV_HELP = """
task-tracking dev is running.
  Redis (private Valkey): {url}
  archive folder:         {folder}
  state:                  {state}  (kept across restarts; delete it to start afresh)
  metrics / health:       http://127.0.0.1:{port}/metrics  /healthz  /readyz
  live task board:        {board}   (in a terminal: task-tracking watch)

In another terminal, in this folder (the commands find this dev server through {state}):
{cli}  task-tracking emit --execution-id demo-1 --task deploy --project my-org/my-repo \\
      --status in_progress
  task-tracking status demo-1
  task-tracking emit --execution-id demo-1 --task deploy --project my-org/my-repo --status success
  task-tracking status demo-1
  task-tracking list my-org/my-repo
  task-tracking replay            # rebuilds the projection from the archive folder
  task-tracking doctor
Archive objects appear under the folder within 5 s. Ctrl-C stops (and flushes).
"""

DEV_FOLDER_NAME = ".task-tracking-dev"
# Points the dev server and the commands at another state folder than ./.task-tracking-dev.
DEV_FOLDER_VARIABLE = "TASK_TRACKING_DEV_DIR"


class DevAlreadyRunning(RuntimeError):
    """Another `task-tracking dev` holds this state folder."""


class DevState:
    """One checkout's `task-tracking dev` state, in `.task-tracking-dev/`: the private
    server's data (`redis/`, with its append-only file, so a restart keeps the stream, the
    groups and the projection), the folder archive (`archive/`), and while it runs
    `server.json` (where it listens) and a lock on `lock`. The commands find the running
    dev server through this folder, so two checkouts or two users never collide."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.absolute()
        self.redis_folder = self.folder / "redis"
        self.archive_folder = self.folder / "archive"
        self.info_file = self.folder / "server.json"
        self.lock_file = self.folder / "lock"
        self._lock: Any = None

    @classmethod
    def here(cls) -> DevState:
        """The folder `task-tracking dev` uses: $TASK_TRACKING_DEV_DIR, else
        ./.task-tracking-dev."""
        configured = os.environ.get(DEV_FOLDER_VARIABLE)
        return cls(Path(configured) if configured else Path.cwd() / DEV_FOLDER_NAME)

    @classmethod
    def find(cls) -> DevState | None:
        """The state folder of a running dev server for the commands: $TASK_TRACKING_DEV_DIR,
        else the nearest `.task-tracking-dev/` from the current folder upwards, else the one
        beside the installed package (an editable install's checkout). It may not run."""
        configured = os.environ.get(DEV_FOLDER_VARIABLE)
        if configured:
            return cls(Path(configured))
        cwd = Path.cwd()
        candidates = [*(folder / DEV_FOLDER_NAME for folder in (cwd, *cwd.parents))]
        candidates.append(Path(__file__).resolve().parents[1] / DEV_FOLDER_NAME)
        for candidate in candidates:
            if candidate.is_dir():
                return cls(candidate)
        return None

    def acquire(self) -> None:
        """Take the folder for this process (released at exit, also on kill -9)."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self.lock_file.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            info = self.read()
            pid = f" (pid {info['pid']})" if info and "pid" in info else ""
            raise DevAlreadyRunning(
                f"task-tracking dev is already running for {self.folder}{pid}: use that one,"
                f" stop it (Ctrl-C in its terminal), or run from another folder"
                f" (or set {DEV_FOLDER_VARIABLE})"
            ) from None
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def is_running(self) -> bool:
        """True while a dev server holds the lock (it dies with the process)."""
        import fcntl

        if self._lock is not None:
            return True
        try:
            with self.lock_file.open("a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def publish(self, info: dict[str, Any]) -> None:
        """Write `server.json` whole (a reader never sees half of it)."""
        partial = self.info_file.with_suffix(".json.partial")
        partial.write_text(json.dumps(info, indent=2) + "\n")
        partial.replace(self.info_file)

    def read(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return None
        return info

    def running(self) -> dict[str, Any] | None:
        """What the running dev server published, or None when none runs here."""
        return self.read() if self.is_running() else None

    def clear(self) -> None:
        self.info_file.unlink(missing_ok=True)

    def stop_orphaned_server(self) -> None:
        """Shut down a private server a killed dev server left running (its session is its
        own, so it outlives a kill -9 of the dev process), if it is the one on this folder."""
        info = self.read()
        url = info.get("redisUrl") if info else None
        if not info or not info.get("ownServer") or not isinstance(url, str):
            return
        client = redis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=5, decode_responses=True
        )
        try:
            folder = client.config_get("dir").get("dir")
            if folder is None or Path(folder).resolve() != self.redis_folder.resolve():
                return  # another server took the port since
            client.shutdown()  # writes its append-only file, then exits
        except redis.exceptions.RedisError:
            return  # gone already
        finally:
            client.close()
        # gone (its port closed) before a new server opens the same append-only file
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _answers(url):
            time.sleep(0.05)


def _answers(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=0.5).close()
    except OSError:
        return False
    return True
