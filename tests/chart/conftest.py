"""Fixtures for the chart and manifest tests: the real Helm engine and schema validators.

The chart is rendered and linted by Helm itself: the `helm` binary when it is on
PATH, else the Helm Go SDK bound by the `helm-python-sdk` package. Without
either the tests fail: a chart test that silently skips proves nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "task-tracking"
MANIFESTS = REPO / "manifests"
CRD_PATH = MANIFESTS / "crd" / "tasktrackings.alakai.io.yaml"
CHART_CRD_PATH = CHART / "crds" / "tasktrackings.alakai.io.yaml"

RELEASE = "demo"
NAMESPACE = "tt-test"
# Kubernetes schemas shipped by kubernetes-validate; 1.30 covers native sidecars (1.29+).
KUBE_VERSION = "1.30.0"
# Values every render needs: the Secret with the Redis URL has no default.
REQUIRED_VALUES: dict[str, Any] = {"redis": {"existingSecret": "redis"}}

# Kinds that kubernetes-validate has no schema for; checked by the tests themselves.
CUSTOM_KINDS = {"TaskTracking", "PodMonitor", "ServiceMonitor", "PrometheusRule"}


class HelmRefused(Exception):
    """Helm rejected the values or failed to render (schema, `required`, `fail`)."""


@dataclass
class Rendered:
    """One render of the chart: the objects, by kind, and the NOTES.txt text."""

    objects: list[dict[str, Any]]
    notes: str | None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    @property
    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}


def parse_documents(text: str) -> list[dict[str, Any]]:
    """YAML documents of a manifest stream, empty documents dropped."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class HelmBinary:
    """The `helm` CLI."""

    description = "helm binary"

    def __init__(self, path: str) -> None:
        self.path = path

    def _values_file(self, values: dict[str, Any], tmp: Path) -> Path:
        path = tmp / "values.json"  # JSON is YAML, so -f accepts it
        path.write_text(json.dumps(values))
        return path

    def render(self, chart: Path, values: dict[str, Any]) -> Rendered:
        with tempfile.TemporaryDirectory() as tmp:
            vf = self._values_file(values, Path(tmp))
            args = [self.path, "template", RELEASE, str(chart), "--namespace", NAMESPACE]
            done = subprocess.run([*args, "-f", str(vf)], capture_output=True, text=True)
            if done.returncode != 0:
                raise HelmRefused(done.stderr)
            # `helm template` does not print NOTES.txt; a client-side dry-run install does.
            install = [self.path, "install", RELEASE, str(chart), "--namespace", NAMESPACE]
            dry = subprocess.run(
                [*install, "--dry-run=client", "-f", str(vf)], capture_output=True, text=True
            )
        notes = dry.stdout.split("NOTES:", 1)[1] if "NOTES:" in dry.stdout else None
        return Rendered(parse_documents(done.stdout), notes)

    def lint(self, chart: Path, values: dict[str, Any]) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            vf = self._values_file(values, Path(tmp))
            done = subprocess.run(
                [
                    self.path,
                    "lint",
                    "--strict",
                    str(chart),
                    "-f",
                    str(vf),
                    "--kube-version",
                    KUBE_VERSION,
                ],
                capture_output=True,
                text=True,
            )
        if done.returncode == 0:
            return []
        return [
            line
            for line in (done.stdout + done.stderr).splitlines()
            if "[ERROR]" in line or "[WARNING]" in line
        ] or [done.stdout + done.stderr]


class HelmSdk:
    """The Helm Go SDK through helm-python-sdk (helm_python), fully offline."""

    description = "helm-python-sdk"

    def __init__(self) -> None:
        import helm_python

        self.helm = helm_python

    def render(self, chart: Path, values: dict[str, Any]) -> Rendered:
        try:
            # Chart.render coalesces the defaults and validates values.schema.json,
            # like `helm template`.
            with self.helm.Chart.load(chart) as loaded:
                manifests = loaded.render(
                    values, name=RELEASE, namespace=NAMESPACE, is_install=True
                )
        except self.helm.HelmError as exc:
            raise HelmRefused(str(exc)) from exc
        objects: list[dict[str, Any]] = []
        notes = None
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                notes = text
            elif path.endswith((".yaml", ".yml")):
                objects.extend(parse_documents(text))
        return Rendered(objects, notes)

    def lint(self, chart: Path, values: dict[str, Any]) -> list[str]:
        report = self.helm.lint(chart, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        # Severity 2 = warning, 3 = error; strict mode counts warnings as failures.
        problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
        return problems + list(report.get("errors") or [])


def _find_engine() -> HelmBinary | HelmSdk:
    binary = shutil.which("helm")
    if binary:
        return HelmBinary(binary)
    try:
        return HelmSdk()
    except Exception as exc:  # ImportError, or HelmLibraryError: native library unusable
        pytest.fail(
            "No Helm engine: put the `helm` binary on PATH or install helm-python-sdk "
            f"(pip install -e '.[test]'); the chart must be rendered by real Helm ({exc})",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def helm() -> HelmBinary | HelmSdk:
    """The Helm engine, or a failing test naming what to install."""
    return _find_engine()


@pytest.fixture(scope="session")
def render(helm: HelmBinary | HelmSdk) -> Any:
    """render(overrides) -> Rendered; REQUIRED_VALUES are always included."""
    cache: dict[str, Rendered] = {}

    def _render(overrides: dict[str, Any] | None = None, chart: Path = CHART) -> Rendered:
        values = deep_merge(REQUIRED_VALUES, overrides or {})
        key = json.dumps([str(chart), values], sort_keys=True)
        if key not in cache:
            cache[key] = helm.render(chart, values)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="session")
def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def validate_task_tracking(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    """Validate a TaskTracking against the CRD's structural schema (CEL rules aside)."""
    # OpenAPI v3 schemas of CRDs are a JSON-Schema subset; the x-kubernetes-*
    # keywords are unknown to jsonschema and ignored.
    jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).validate(obj)


def validate_object(obj: dict[str, Any], crd_schema: dict[str, Any]) -> None:
    """Validate one object: Kubernetes kinds strictly, custom kinds as far as possible."""
    kind = obj["kind"]
    if kind == "TaskTracking":
        assert obj["apiVersion"] == "alakai.io/v1alpha1"
        validate_task_tracking(obj, crd_schema)
    elif kind in CUSTOM_KINDS:
        # prometheus-operator kinds: no schema shipped; structure is checked by the tests.
        assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
        assert obj["metadata"]["name"] and isinstance(obj["spec"], dict)
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.fixture
def tmp_chart_copy(tmp_path: Path) -> Iterator[Path]:
    """A writable copy of the chart (for parent-chart tests)."""
    dest = tmp_path / "task-tracking"
    shutil.copytree(CHART, dest)
    yield dest
