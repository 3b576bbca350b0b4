"""The same test surface as `KubeAPI`, backed by a real cluster through `kubectl`.

Used by the `k8s`-marked variants of the resource tests (`pytest -m k8s`), with
KUBECONFIG pointing at kind, minikube or any cluster where the CRD may be applied.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLURAL = "tasktrackings.alakai.io"


class ClusterAPI:
    """create / patch_spec / delete / get / events over kubectl; no request log."""

    requests = None  # a real API server's requests cannot be observed from here

    def __init__(self) -> None:
        if not os.environ.get("KUBECONFIG") or shutil.which("kubectl") is None:
            pytest.fail(
                "the k8s tests need KUBECONFIG pointing at a cluster and kubectl on PATH"
                " (for example: kind create cluster; export KUBECONFIG=~/.kube/config)",
                pytrace=False,
            )
        self._kubectl("apply", "-f", str(ROOT / "manifests/crd"))
        self._kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}", "--timeout=60s")

    def _kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            ["kubectl", *args], input=stdin, capture_output=True, text=True, check=False
        )
        if result.returncode != 0 and "NotFound" not in result.stderr:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def ensure_namespace(self, namespace: str) -> None:
        manifest = json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        )
        self._kubectl("apply", "-f", "-", stdin=manifest)

    async def create(self, namespace: str, body: dict[str, Any]) -> None:
        self._kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(body))

    async def patch_spec(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self._kubectl(
            "patch",
            PLURAL,
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": patch}),
        )

    async def delete(self, namespace: str, name: str) -> None:
        self._kubectl("delete", PLURAL, name, "-n", namespace, "--ignore-not-found", "--wait")

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        out = self._kubectl("get", PLURAL, name, "-n", namespace, "-o", "json")
        return json.loads(out) if out.strip() else None

    def events_in(self, namespace: str) -> list[dict[str, Any]]:
        out = self._kubectl("get", "events", "-n", namespace, "-o", "json")
        items: list[dict[str, Any]] = json.loads(out).get("items", [])
        return items
