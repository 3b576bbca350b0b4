"""The image's install, without a Docker engine: the Dockerfile's builder steps in a clean
venv (wheels of this repo and its dependencies, installed with --no-index, pip removed),
then the entrypoint starts, refuses a bad environment in one line, and serves /readyz."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sidecar.devserver import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run(*args: str | Path, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=True, timeout=600, **options
    )  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("image")
    wheels, venv = work / "wheels", work / "venv"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", wheels, ROOT)
    run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    run(pip, "install", "--quiet", "--no-index", "--find-links", wheels, "task-tracking-sidecar")
    run(pip, "uninstall", "--yes", "--quiet", "setuptools", "pip")
    return venv


def clean_env(**variables: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **variables}


def test_entrypoint_refuses_a_bad_environment_in_one_line(image_venv: Path) -> None:
    result = subprocess.run(
        [image_venv / "bin" / "task-tracking", "run"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "task-tracking: TASK_TRACKING_REDIS_URL is required: set it"
        " (for example redis://localhost:6379/0)"
    )


def test_entrypoint_starts_and_becomes_ready(image_venv: Path, redis_url: str) -> None:
    port = free_port()
    process = subprocess.Popen(
        [image_venv / "bin" / "task-tracking", "run"],
        env=clean_env(TASK_TRACKING_REDIS_URL=redis_url, TASK_TRACKING_HTTP_PORT=str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert json.load(r) == {"ok": True}
                    break
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "not ready within 30 s"
                time.sleep(0.1)
        process.terminate()
        assert process.wait(timeout=15) == 0
        assert not os.path.exists(image_venv / "bin" / "pip")
    finally:
        process.kill()
