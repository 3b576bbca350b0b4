"""Fixtures for the image tests: a real Docker engine, the stand-in base image, the built image.

No registry is reachable where these tests run, so the base is made from Debian's packages
(debian-base.sh, cached between runs) and passed as BASE_IMAGE. Without an engine the tests
fail naming what to install: an image test that skips proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_SCRIPT = Path(__file__).with_name("debian-base.sh")
IMAGE_TAG = "task-tracking-sidecar:test"
# Extra certificate authorities for pip in the builder stage: a file named by
# TASK_TRACKING_IMAGE_CA_BUNDLE, else Debian's local ones (a TLS-inspecting proxy's live there).
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
# The container's hardening, as the chart's securityContext has it; no tmpfs, no volume.
HARDENED = (
    "--read-only",
    "--user",
    "10001:10001",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
)
# Figures measured during the run, printed in the terminal summary (never asserted).
MEASURED: list[str] = []
NO_ENGINE = (
    "no Docker engine answers `docker info`: install Debian's docker.io "
    "(apt-get install -y docker.io debootstrap) and start dockerd as root "
    "(bash .ci/run does both)"
)


def measured(line: str) -> None:
    """Record one figure for the summary at the end of the run."""
    MEASURED.append(line)
    print(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASURED:
        terminalreporter.section("image figures")
        for line in MEASURED:
            terminalreporter.write_line(line)


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """One docker CLI call; a failure shows the command's stderr, not a traceback."""
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} failed: {result.stderr.strip()[-2000:]}")
    return result


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    base: str
    version: str
    revision: str


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def git_revision() -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def extra_cas() -> str:
    named = os.environ.get("TASK_TRACKING_IMAGE_CA_BUNDLE")
    if named:
        return Path(named).read_text()
    return "".join(p.read_text() for p in sorted(LOCAL_CAS.glob("*.crt")))


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if shutil.which("docker") is None:
        pytest.fail(f"the docker CLI is missing: {NO_ENGINE}", pytrace=False)
    if docker("info", timeout=30, check=False).returncode != 0:
        pytest.fail(NO_ENGINE, pytrace=False)


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    """The debootstrap stand-in for python:3.11-slim, built once per machine."""
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(BASE_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"the base image could not be made: {result.stderr.strip()[-1500:]}", pytrace=False
        )
    tag = result.stdout.strip().splitlines()[-1]
    how = (
        "made: " + " / ".join(result.stderr.strip().splitlines()[-2:])
        if result.stderr
        else "cached"
    )
    measured(f"base image {tag}: {time.monotonic() - started:.1f} s ({how})")
    return tag


@pytest.fixture(scope="session")
def image(base_image: str) -> Iterator[BuiltImage]:
    """The Dockerfile built on the stand-in base, with the build arguments a release passes."""
    built = BuiltImage(IMAGE_TAG, base_image, project_version(), git_revision())
    started = time.monotonic()
    # --network host: the engine here runs without a bridge (.ci/run), and pip needs the index.
    docker(
        "build",
        "--quiet",
        "--network",
        "host",
        "--tag",
        built.tag,
        "--build-arg",
        f"BASE_IMAGE={base_image}",
        "--build-arg",
        f"CA_BUNDLE={extra_cas()}",
        "--build-arg",
        f"VERSION={built.version}",
        "--build-arg",
        f"REVISION={built.revision}",
        str(REPO),
        timeout=900,
    )
    # The previous build of the tag, now untagged, is dead weight (the layer cache stays).
    label = "label=org.opencontainers.image.title=task-tracking-sidecar"
    docker("image", "prune", "--force", "--filter", label, check=False)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", built.tag).stdout)
    measured(f"image {built.tag}: built in {time.monotonic() - started:.1f} s, {size / 1e6:.0f} MB")
    yield built
