"""`task-tracking dev` as a user meets it: Ctrl-C in its terminal loses nothing, a restart
keeps the projection, `replay` works on its archive without settings, and two checkouts
(or a second start in the same one) never disturb each other.

Each dev server runs in a process group of its own, and Ctrl-C is played as a terminal
plays it: SIGINT to the whole foreground process group."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
BANNER = "Ctrl-C stops"  # the last line of the banner


def environment() -> dict[str, str]:
    """No TASK_TRACKING_* from the caller; this checkout's package first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_TRACKING_")}
    env["PYTHONPATH"] = str(ROOT)
    env["TASK_TRACKING_HTTP_PORT"] = "0"  # never 9470: other test runs may hold it
    return env


def cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=cwd,
        env=environment(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Dev:
    """`task-tracking dev` started in `checkout`, in its own process group (a terminal's
    foreground job)."""

    def __init__(self, checkout: Path) -> None:
        checkout.mkdir(parents=True, exist_ok=True)
        self.checkout = checkout
        self.output = ""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "dev"],
            cwd=checkout,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    async def started(self) -> Dev:
        assert self.process.stdout is not None
        while BANNER not in self.output:
            line = await asyncio.to_thread(self.process.stdout.readline)
            assert line, f"dev exited: {self.output}"
            self.output += line
        return self

    def info(self) -> dict[str, object]:
        info: dict[str, object] = json.loads(
            (self.checkout / ".task-tracking-dev/server.json").read_text()
        )
        return info

    async def ctrl_c(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)  # what the terminal does
        code = await asyncio.to_thread(self.process.wait, 30)
        assert self.process.stdout is not None
        self.output += self.process.stdout.read()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def devs() -> Iterator[list[Dev]]:
    started: list[Dev] = []
    yield started
    for dev in started:
        dev.kill()
        # a private server left by a killed dev process: shut it down through its folder
        from sidecar.devmode import DevState

        DevState(dev.checkout / ".task-tracking-dev").stop_orphaned_server()


def answers(url: object) -> bool:
    assert isinstance(url, str)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may not reap an orphan at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def status_of(execution_id: str, cwd: Path) -> str | None:
    result = cli("status", execution_id, "--json", cwd=cwd)
    return json.loads(result.stdout)["status"] if result.returncode == 0 else None


async def shows(execution_id: str, cwd: Path, status: str) -> bool:
    return await asyncio.to_thread(status_of, execution_id, cwd) == status


def lines(count: int, status: str) -> str:
    return "".join(
        orjson.dumps(
            {"executionId": f"x{i}", "taskName": "deploy", "project": "my-org/my-repo",
             "status": status}
        ).decode() + "\n"
        for i in range(count)
    )  # fmt: skip


async def test_ctrl_c_loses_nothing_and_a_restart_keeps_the_projection(
    tmp_path: Path, devs: list[Dev]
) -> None:
    checkout = tmp_path / "checkout"
    dev = await Dev(checkout).started()
    devs.append(dev)
    url = dev.info()["redisUrl"]
    assert isinstance(url, str)
    with redis.Redis.from_url(url) as client:
        server_pid = int(client.info("server")["process_id"])
    # what makes Ctrl-C safe: the terminal's SIGINT goes to dev's process group, not the server's
    assert os.getpgid(server_pid) != os.getpgid(dev.process.pid)
    assert "bin/activate" in dev.output and "bin/task-tracking" in dev.output  # the CLI
    assert ".task-tracking-dev/archive/" in dev.output

    published = await asyncio.to_thread(
        cli, "emit", "--stdin", cwd=checkout, stdin=lines(50, "success")
    )
    assert published.returncode == 0 and "published 50 events" in published.stdout, published
    await wait_for(lambda: shows("x49", checkout, "success"), message="x49 projected")
    # The archiver holds these 50 in its buffer (flush after 5 s): Ctrl-C now must flush them.
    assert await dev.ctrl_c() == 0, dev.output
    assert "Redis unavailable" not in dev.output, dev.output
    archived = [
        line
        for path in (checkout / ".task-tracking-dev/archive").rglob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted(json.loads(line)["executionId"] for line in archived) == sorted(
        f"x{i}" for i in range(50)
    )
    assert not answers(url), "the private server outlived dev"
    assert not (checkout / ".task-tracking-dev/server.json").exists()
    stopped = await asyncio.to_thread(cli, "status", "x1", cwd=checkout)
    assert stopped.returncode == 2 and "task-tracking dev" in stopped.stderr, stopped.stderr

    again = await Dev(checkout).started()
    devs.append(again)
    assert await asyncio.to_thread(status_of, "x49", checkout) == "success"  # from the AOF
    replay = await asyncio.to_thread(cli, "replay", "--no-progress", cwd=checkout)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1 objects, 50 events" in replay.stdout, replay.stdout
    assert await again.ctrl_c() == 0


async def test_a_second_checkout_runs_beside_the_first_and_a_second_start_is_refused(
    tmp_path: Path, devs: list[Dev]
) -> None:
    first_checkout, second_checkout = tmp_path / "a", tmp_path / "b"
    first = await Dev(first_checkout).started()
    devs.append(first)
    emitted = await asyncio.to_thread(
        cli, "emit", "--stdin", cwd=first_checkout, stdin=lines(1, "in_progress")
    )
    assert emitted.returncode == 0, emitted.stderr
    await wait_for(lambda: shows("x0", first_checkout, "in_progress"), message="x0 projected")

    twice = await asyncio.to_thread(cli, "dev", cwd=first_checkout)
    assert twice.returncode == 2 and twice.stderr.count("\n") == 1, twice.stderr
    assert "already running" in twice.stderr

    second = await Dev(second_checkout).started()
    devs.append(second)
    assert second.info()["redisUrl"] != first.info()["redisUrl"]
    assert await asyncio.to_thread(status_of, "x0", second_checkout) is None
    assert await second.ctrl_c() == 0

    # the first one is undisturbed: found through its folder, from a subfolder too
    (first_checkout / "sub").mkdir()
    assert await asyncio.to_thread(status_of, "x0", first_checkout / "sub") == "in_progress"
    assert first.process.poll() is None
    assert await first.ctrl_c() == 0


async def test_a_server_left_by_a_killed_dev_is_stopped_at_the_next_start(
    tmp_path: Path, devs: list[Dev]
) -> None:
    checkout = tmp_path / "checkout"
    dev = await Dev(checkout).started()
    devs.append(dev)
    emitted = await asyncio.to_thread(
        cli, "emit", "--stdin", cwd=checkout, stdin=lines(1, "success")
    )
    assert emitted.returncode == 0, emitted.stderr
    await wait_for(lambda: shows("x0", checkout, "success"), message="x0 projected")
    url = dev.info()["redisUrl"]
    assert isinstance(url, str)
    with redis.Redis.from_url(url) as client:
        server_pid = int(client.info("server")["process_id"])
    dev.kill()  # kill -9: its private server, in a session of its own, lives on
    assert answers(url)

    again = await Dev(checkout).started()
    devs.append(again)
    assert not running(server_pid), "the orphaned server still runs"
    assert await asyncio.to_thread(status_of, "x0", checkout) == "success"
    assert await again.ctrl_c() == 0
