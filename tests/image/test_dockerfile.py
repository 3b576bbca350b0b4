"""The Dockerfile and its locks, checked by reading them (test_image_run.py builds and runs it)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import REPO

COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|cc|make|build-essential|python3-dev|libc6-dev)\b")
LOCK = REPO / "requirements.lock"
BUILD_LOCK = REPO / "requirements-build.lock"


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def args(self) -> set[str]:
        return {a.partition("=")[0].strip() for a in self.all("ARG")}


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined and ARGs substituted."""
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
        if keyword == "FROM":
            rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def stages(dockerfile: tuple[dict[str, str], list[Stage]]) -> list[Stage]:
    return dockerfile[1]


def locked(lock: str) -> dict[str, tuple[Requirement, list[str]]]:
    """name -> (pinned requirement, hashes) of a `--generate-hashes` lock."""
    text = re.sub(r"\\\n", " ", (REPO / lock).read_text())
    pins: dict[str, tuple[Requirement, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *hashes = (part.strip() for part in line.split("--hash="))
        requirement = Requirement(spec)
        pins[canonicalize_name(requirement.name)] = (requirement, hashes)
    return pins


def test_no_syntax_line_so_the_build_fetches_no_frontend() -> None:
    first = (REPO / "Dockerfile").read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first


def test_default_base_is_a_pinned_public_python_311_slim(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    args, stages = dockerfile
    assert re.fullmatch(
        r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", args["BASE_IMAGE"]
    ), args["BASE_IMAGE"]
    # Every stage but the final scratch one starts from that one base argument.
    assert [s.image for s in stages[:-1]] == [args["BASE_IMAGE"]] * (len(stages) - 1)
    assert stages[-1].image == "scratch"


def test_builder_installs_only_hash_checked_locked_wheels(stages: list[Stage]) -> None:
    builder = stages[0]
    assert builder.name == "builder"
    run = " ".join(builder.all("RUN"))
    assert run.count("--require-hashes") == 2
    assert "-r requirements.lock" in run and "-r requirements-build.lock" in run
    assert "--only-binary :all:" in run  # no sdist, so no build script runs for a dependency
    assert "venv --without-pip /opt/venv" in run
    # This repo's own wheel is built and installed offline.
    assert "wheel --quiet --no-index" in run and "install --quiet --no-index" in run


def test_index_and_ca_bundle_arguments_reach_the_builder_only(stages: list[Stage]) -> None:
    builder, final = stages[0], stages[-1]
    assert {"PIP_INDEX_URL", "CA_BUNDLE"} <= builder.args()
    assert not {"PIP_INDEX_URL", "CA_BUNDLE"} & final.args()
    for env in final.all("ENV"):
        assert "PIP_" not in env and "CA_BUNDLE" not in env


def test_runtime_root_removes_every_installer_of_the_base(stages: list[Stage]) -> None:
    root = next(s for s in stages if s.name == "runtime-root")
    removed = " ".join(root.all("RUN"))
    for path in (
        "/usr/local/bin/pip*",
        "/usr/local/lib/python3*/site-packages/pip*",
        "/usr/local/lib/python3*/site-packages/setuptools*",
        "/usr/local/lib/python3*/site-packages/wheel*",
        "/usr/local/lib/python3*/ensurepip",
        "/usr/lib/python3/dist-packages/pip*",
    ):
        assert path in removed, path


def test_final_stage_is_the_flattened_root_and_the_venv_only(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.all("COPY") == ["--from=runtime-root / /", "--from=builder /opt/venv /opt/venv"]
    assert not final.all("ADD") and not final.all("RUN")
    assert any("/opt/venv/bin" in env for env in final.all("ENV"))


def test_no_stage_installs_a_compiler(stages: list[Stage]) -> None:
    for stage in stages:
        for command in stage.all("RUN"):
            assert not COMPILERS.search(command), command
            assert "apt-get install" not in command, command


def test_final_stage_carries_the_oci_labels(stages: list[Stage]) -> None:
    final = stages[-1]
    labels = " ".join(final.all("LABEL"))
    for key, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels, key
        assert arg in final.args()
    (version,) = (a for a in final.all("ARG") if a.startswith("VERSION="))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert version == f"VERSION={project['version']}"  # the default matches the package


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


def test_dockerignore_keeps_the_build_context_to_the_package_and_its_locks() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # deny by default: no .git, .venv, tests or secrets in the context
    assert {
        "!pyproject.toml",
        "!sidecar/",
        "!README.md",
        "!requirements.lock",
        "!requirements-build.lock",
    } <= set(lines)


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-build.lock"])
def test_every_locked_package_is_pinned_with_hashes(lock: str) -> None:
    pins = locked(lock)
    assert pins
    for name, (requirement, hashes) in pins.items():
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{name} is not pinned: {requirement}"
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_lock_satisfies_every_declared_dependency_for_python_311() -> None:
    # A dependency added to pyproject.toml without `make lock` fails here, not in the build.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    linux_311 = {
        "python_version": "3.11",
        "python_full_version": "3.11.14",
        "sys_platform": "linux",
    }
    for lock, declared in (
        (LOCK, project["project"]["dependencies"]),
        (BUILD_LOCK, project["build-system"]["requires"]),
    ):
        pins = locked(lock.name)
        for text in declared:
            wanted = Requirement(text)
            if wanted.marker and not wanted.marker.evaluate(linux_311):
                continue
            name = canonicalize_name(wanted.name)
            assert name in pins, f"{wanted.name} is not in {lock.name}: run `make lock`"
            (pin,) = pins[name][0].specifier
            assert Version(pin.version) in wanted.specifier, (
                f"{lock.name} pins {name} {pin.version}, not {wanted.specifier}: run `make lock`"
            )


def test_parser_and_lock_reader_see_what_they_must_refuse() -> None:
    # The checks above must be able to fail.
    args, (stage,) = parse(
        "ARG B=python:3.11.9-slim\nFROM ${B}\nRUN apt-get install -y gcc\nUSER root\n"
    )
    assert stage.image == "python:3.11.9-slim" and args == {"B": "python:3.11.9-slim"}
    assert COMPILERS.search(stage.all("RUN")[0])
    assert not re.fullmatch(r"\d+(:\d+)?", stage.all("USER")[0])
    assert Marker("python_full_version < '3.11.3'").evaluate({"python_full_version": "3.11.2"})
