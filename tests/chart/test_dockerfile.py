"""The Dockerfile, checked by parsing it: no Docker engine on the build machines."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from .conftest import REPO

COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|cc|make|build-essential|python3-dev|libc6-dev)\b")


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(text: str) -> list[Stage]:
    """Stages of a Dockerfile, with line continuations joined and ARGs substituted."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and "=" in rest and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
            continue
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse((REPO / "Dockerfile").read_text())


def test_is_multi_stage_with_a_builder_that_builds_a_wheel(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    builder = stages[0]
    assert builder.name == "builder"
    run = " ".join(builder.all("RUN"))
    assert "pip wheel" in run
    assert "/opt/venv" in run


def test_every_base_image_is_a_pinned_python_311_slim(stages: list[Stage]) -> None:
    for stage in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", stage.image), (
            f"base image {stage.image!r} is not pinned to a 3.11.x slim version"
        )


def test_final_stage_copies_only_the_venv(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.all("COPY") == ["--from=builder /opt/venv /opt/venv"]
    assert not final.all("ADD")
    assert any("/opt/venv/bin" in env for env in final.all("ENV"))


def test_final_stage_installs_no_compilers(stages: list[Stage]) -> None:
    final = stages[-1]
    for command in final.all("RUN"):
        assert not COMPILERS.search(command), command
        assert "apt-get install" not in command and "pip install" not in command, command


def test_final_stage_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    (user,) = stages[-1].all("USER")
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"USER {user!r} must be numeric so runAsNonRoot can verify it"
    assert int(match[1]) != 0 and (match[2] is None or int(match[2]) != 0)
    assert int(match[1]) == 10001  # the chart's runAsUser


def test_entrypoint_runs_the_sidecar_and_exposes_its_port(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.all("ENTRYPOINT") == ['["task-tracking"]']
    assert final.all("CMD") == ['["run"]']
    assert final.all("EXPOSE") == ["9470"]


def test_dockerignore_keeps_the_build_context_to_the_package() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # deny by default: no .git, .venv, tests or secrets in the context
    assert {"!pyproject.toml", "!sidecar/", "!README.md"} <= set(lines)


def test_parser_sees_a_compiler_and_a_root_user() -> None:
    # The checks above must be able to fail.
    (stage,) = parse("ARG B=python:3.11.9-slim\nFROM ${B}\nRUN apt-get install -y gcc\nUSER root\n")
    assert stage.image == "python:3.11.9-slim"
    assert COMPILERS.search(stage.all("RUN")[0])
    assert not re.fullmatch(r"\d+(:\d+)?", stage.all("USER")[0])
