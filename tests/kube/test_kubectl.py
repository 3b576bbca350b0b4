"""The README's kubectl commands, run by the real ``kubectl`` against the tests' API.

kubectl (Debian's ``kubernetes-client``; ``.ci/run`` installs it) talks to the in-memory API
through a kubeconfig, with its default validation (``--validate=strict``): it reads
discovery and ``/openapi/v3``, then leaves the checking to the server, which admits the
object against the shipped CRD. What kubectl prints here is what it prints in a cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from .api import KubeAPI
from .crd import ROOT

EXAMPLE = ROOT / "manifests/examples/tasktracking.yaml"
NS = "default"  # the kubeconfig's namespace, as the README's commands use it


@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Kubectl:
    """Runs kubectl with a kubeconfig for the given API and a private cache."""

    def __init__(self, api: KubeAPI, tmp_path: Path) -> None:
        binary = shutil.which("kubectl")
        if binary is None:
            pytest.fail(
                "kubectl is not on PATH: apt-get install kubernetes-client (.ci/run does)",
                pytrace=False,
            )
        self.binary = binary
        self.kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
        self.cache = tmp_path / "kube-cache"
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HOME": str(tmp_path)}

    async def __call__(self, *args: str, stdin: str | None = None) -> Result:
        process = await asyncio.create_subprocess_exec(
            self.binary,
            f"--cache-dir={self.cache}",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin else None), timeout=60
        )
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())


@pytest.fixture
async def api() -> AsyncIterator[KubeAPI]:
    async with KubeAPI(watch_timeout=2) as server:
        yield server


@pytest.fixture
def kubectl(api: KubeAPI, tmp_path: Path) -> Kubectl:
    return Kubectl(api, tmp_path)


def table(text: str) -> list[list[str]]:
    """kubectl's rows, cut at the header's column starts (an empty cell stays a cell)."""
    lines = [line for line in text.splitlines() if line.strip()]
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    bounds = [*starts[1:], None]
    return [[line[a:b].strip() for a, b in zip(starts, bounds, strict=True)] for line in lines]


HEADER = ["NAME", "ARCHIVING", "BUCKET", "APPLIED", "AGE"]
AGE = re.compile(r"^\d+s$")


async def test_apply_the_example_then_get_shows_the_printer_columns(
    api: KubeAPI, kubectl: Kubectl
) -> None:
    applied = await kubectl("apply", "-f", str(EXAMPLE))
    assert applied.code == 0, applied.err
    assert applied.out.strip() == "tasktracking.alakai.io/task-tracking created"
    stored = api.get(NS, "task-tracking")
    assert stored is not None
    assert stored["spec"]["archive"]["bucket"] == "my-task-history"

    await api.patch_status(NS, "task-tracking", {"applied": "2/3", "archiving": True})
    got = await kubectl("get", "tt")
    assert got.code == 0, got.err
    rows = table(got.out)
    assert rows[0] == HEADER
    assert rows[1][:4] == ["task-tracking", "true", "my-task-history", "2/3"]
    assert AGE.match(rows[1][4]), rows
    tables = [r for r in api.requests if r.method == "GET" and r.path.endswith("/tasktrackings")]
    assert tables, "kubectl listed the resource"

    again = await kubectl("apply", "-f", str(EXAMPLE))
    assert again.out.strip() == "tasktracking.alakai.io/task-tracking unchanged"


async def test_patch_merge_switches_archival_off(api: KubeAPI, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", str(EXAMPLE))
    patched = await kubectl(
        "patch", "tt", "task-tracking", "--type", "merge",
        "-p", '{"spec":{"archive":{"enabled":false}}}',
    )  # fmt: skip
    assert patched.code == 0, patched.err
    assert patched.out.strip() == "tasktracking.alakai.io/task-tracking patched"
    stored = api.get(NS, "task-tracking")
    assert stored is not None
    assert stored["spec"]["archive"]["enabled"] is False
    assert stored["metadata"]["generation"] == 2
    rows = table((await kubectl("get", "tt")).out)
    assert rows[1][:3] == ["task-tracking", "false", "my-task-history"]


async def test_get_watch_prints_each_change_as_a_row(api: KubeAPI, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", str(EXAMPLE))
    watching = asyncio.create_task(kubectl("get", "tt", "-w"))
    await _until(lambda: any(r.query.get("watch") == "true" for r in api.requests))
    await api.patch_spec(NS, "task-tracking", {"archive": {"enabled": False}})
    await api.patch_status(NS, "task-tracking", {"applied": "1/1"})
    watched = await watching  # the server ends the watch after 2 s
    rows = table(watched.out)
    assert rows[0] == HEADER  # once: later events carry no column definitions
    assert [row[:4] for row in rows[1:]] == [
        ["task-tracking", "true", "my-task-history", ""],
        ["task-tracking", "false", "my-task-history", ""],
        ["task-tracking", "false", "my-task-history", "1/1"],
    ]


async def test_a_spec_refused_by_a_cel_rule_prints_the_rules_message(
    api: KubeAPI, kubectl: Kubectl
) -> None:
    bad = {
        "apiVersion": "alakai.io/v1alpha1",
        "kind": "TaskTracking",
        "metadata": {"name": "task-tracking"},
        "spec": {"archive": {"enabled": True, "prefix": "history"}},
    }
    refused = await kubectl("apply", "-f", "-", stdin=json.dumps(bad))
    assert refused.code == 1
    assert refused.err.strip() == (
        'The TaskTracking "task-tracking" is invalid: spec.archive.bucket: Required value:'
        " spec.archive.bucket is required when spec.archive.enabled is true"
    )
    assert api.get(NS, "task-tracking") is None

    await kubectl("apply", "-f", str(EXAMPLE))
    broken = await kubectl(
        "patch", "tt", "task-tracking", "--type", "merge",
        "-p", '{"spec":{"archive":{"prefix":"/history/","bucket":null}}}',
    )  # fmt: skip
    assert broken.code == 1
    assert broken.err.strip().splitlines() == [
        'The TaskTracking "task-tracking" is invalid: ',
        "* spec.archive.bucket: Required value: spec.archive.bucket is required when"
        " spec.archive.enabled is true",
        '* spec.archive.prefix: Invalid value: "object": spec.archive.prefix must not start or'
        " end with a slash",
    ]
    stored = api.get(NS, "task-tracking")
    assert stored is not None
    assert stored["spec"]["archive"]["prefix"] == "task-tracking"  # nothing was written


async def test_replace_is_admitted_too(api: KubeAPI, kubectl: Kubectl) -> None:
    await kubectl("apply", "-f", str(EXAMPLE))
    replacement = {
        "apiVersion": "alakai.io/v1alpha1",
        "kind": "TaskTracking",
        "metadata": {"name": "task-tracking"},
        "spec": {"archive": {"enabled": True, "bucket": "other-history", "prefix": "x/"}},
    }
    refused = await kubectl("replace", "-f", "-", stdin=json.dumps(replacement))
    assert refused.code == 1
    assert refused.err.strip() == (
        'The TaskTracking "task-tracking" is invalid: spec.archive.prefix: Invalid value:'
        ' "object": spec.archive.prefix must not start or end with a slash'
    )
    replacement["spec"]["archive"]["prefix"] = "x"
    replaced = await kubectl("replace", "-f", "-", stdin=json.dumps(replacement))
    assert replaced.code == 0, replaced.err
    assert replaced.out.strip() == "tasktracking.alakai.io/task-tracking replaced"
    stored = api.get(NS, "task-tracking")
    assert stored is not None
    assert stored["spec"] == {
        "archive": {"enabled": True, "bucket": "other-history", "prefix": "x"}
    }


async def test_an_unknown_field_is_refused_or_pruned_with_a_warning(
    api: KubeAPI, kubectl: Kubectl
) -> None:
    """kubectl 1.25+ asks for strict field validation: refused. Older ones (Debian 12's
    kubernetes-client is 1.20) send no fieldValidation: pruned, with the server's warning."""
    typo = {
        "apiVersion": "alakai.io/v1alpha1",
        "kind": "TaskTracking",
        "metadata": {"name": "task-tracking"},
        "spec": {"archive": {"enabled": False, "bukket": "history"}},
    }
    first = await kubectl("apply", "-f", "-", stdin=json.dumps(typo))
    post = next(r for r in api.requests if r.method == "POST")
    if post.query.get("fieldValidation") == "Strict":
        assert first.code == 1
        assert first.err.strip() == (
            'Error from server (BadRequest): error when creating "STDIN": TaskTracking in'
            ' version "v1alpha1" cannot be handled as a TaskTracking: strict decoding error:'
            ' unknown field "spec.archive.bukket"'
        )
        assert api.get(NS, "task-tracking") is None
        first = await kubectl("apply", "--validate=warn", "-f", "-", stdin=json.dumps(typo))
    else:
        assert "fieldValidation" not in post.query
    assert first.code == 0, first.err
    assert first.err.strip() == 'Warning: unknown field "spec.archive.bukket"'
    stored = api.get(NS, "task-tracking")
    assert stored is not None
    assert "bukket" not in stored["spec"]["archive"]


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for kubectl")
        await asyncio.sleep(0.02)
