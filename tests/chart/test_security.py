"""Security defaults of every rendered object and plain manifest.

A small checker instead of a checkov dependency. Checks deliberately not applied:
- probes on the demo app container: it is a placeholder (pause) with no endpoint;
  the probes that matter are the sidecar's, which are checked;
- image digests: tags are pinned to a version (never `latest`); a digest is
  optional (image.digest) because the release process publishes tags first;
- CPU limits are checked (the sidecar's are set), memory limits too; no check on
  their size, which is a capacity decision.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from .conftest import MANIFESTS, parse_documents
from .test_chart_render import TOGGLES

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
SIDECAR = "task-tracking"
API = "task-tracking-api"  # the read API's own Deployment (api.enabled): no sidecar in it


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in POD_TEMPLATE_KINDS:
        spec: dict[str, Any] = obj["spec"]["template"]["spec"]
        return spec
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    return None


def container_findings(name: str, container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    where = f"{name}/{container['name']}"
    pod_ctx = pod.get("securityContext", {})
    ctx = container.get("securityContext", {})

    def effective(key: str) -> Any:
        return ctx.get(key, pod_ctx.get(key))

    found = []
    if effective("runAsNonRoot") is not True:
        found.append(f"{where}: runAsNonRoot is not true")
    user = effective("runAsUser")
    if not isinstance(user, int) or user == 0:
        found.append(f"{where}: runAsUser must be a numeric non-root UID, got {user!r}")
    if ctx.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: readOnlyRootFilesystem is not true")
    if ctx.get("allowPrivilegeEscalation") is not False:
        found.append(f"{where}: allowPrivilegeEscalation is not false")
    if ctx.get("privileged"):
        found.append(f"{where}: privileged")
    caps = ctx.get("capabilities", {})
    if "ALL" not in caps.get("drop", []):
        found.append(f"{where}: capabilities do not drop ALL")
    if caps.get("add"):
        found.append(f"{where}: adds capabilities {caps['add']}")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        found.append(f"{where}: seccompProfile is not RuntimeDefault")
    resources = container.get("resources", {})
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(section, {}):
                found.append(f"{where}: no {section}.{resource}")
    image = container.get("image", "")
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
        found.append(f"{where}: image {image!r} is not pinned to a version")
    if container["name"] in (SIDECAR, API):
        for probe in ("livenessProbe", "readinessProbe"):
            if probe not in container:
                found.append(f"{where}: no {probe}")
    return found


def findings(objects: list[dict[str, Any]]) -> list[str]:
    """Every security problem of a set of objects, one line each."""
    found: list[str] = []
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        where = f"{kind}/{name}"
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            found.append(f"{where}: cluster-scoped RBAC")
        if kind == "Role":
            for rule in obj["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    if "*" in rule.get(field, []):
                        found.append(f"{where}: wildcard in {field}")
                if rule.get("nonResourceURLs"):
                    found.append(f"{where}: nonResourceURLs are cluster-scoped")
        pod = pod_spec(obj)
        if pod is None:
            continue
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                found.append(f"{where}: {flag}")
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                found.append(f"{where}: hostPath volume {volume['name']}")
        if pod.get("securityContext", {}).get("runAsUser") == 0:
            found.append(f"{where}: pod runs as root")
        containers = pod.get("initContainers", []) + pod.get("containers", [])
        if not any(c["name"] in (SIDECAR, API) for c in containers):
            found.append(f"{where}: no {SIDECAR} sidecar container")
        for container in containers:
            found += container_findings(where, container, pod)
    return found


@pytest.mark.parametrize("toggle", TOGGLES)
def test_rendered_chart_passes_the_security_scan(render: Any, toggle: str) -> None:
    assert findings(render(TOGGLES[toggle][0]).objects) == []


def test_plain_manifests_pass_the_security_scan() -> None:
    objects = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects += parse_documents(path.read_text())
    assert objects
    assert findings(objects) == []


def _insecure_variants(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def variant(change: Any) -> dict[str, Any]:
        obj = copy.deepcopy(deployment)
        pod = obj["spec"]["template"]["spec"]
        sidecar = next(c for c in pod["containers"] if c["name"] == SIDECAR)
        change(pod, sidecar)
        return obj

    return {
        "runAsNonRoot": variant(lambda p, c: c["securityContext"].update(runAsNonRoot=False)),
        "runAsUser": variant(lambda p, c: c["securityContext"].update(runAsUser=0)),
        "readOnlyRootFilesystem": variant(
            lambda p, c: c["securityContext"].pop("readOnlyRootFilesystem")
        ),
        "allowPrivilegeEscalation": variant(
            lambda p, c: c["securityContext"].update(allowPrivilegeEscalation=True)
        ),
        "drop ALL": variant(lambda p, c: c["securityContext"]["capabilities"].update(drop=[])),
        "adds capabilities": variant(
            lambda p, c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"])
        ),
        "seccompProfile": variant(
            lambda p, c: (
                c["securityContext"].pop("seccompProfile"),
                p["securityContext"].pop("seccompProfile"),
            )
        ),
        "limits.memory": variant(lambda p, c: c["resources"]["limits"].pop("memory")),
        "requests.cpu": variant(lambda p, c: c["resources"]["requests"].pop("cpu")),
        "livenessProbe": variant(lambda p, c: c.pop("livenessProbe")),
        "readinessProbe": variant(lambda p, c: c.pop("readinessProbe")),
        "hostNetwork": variant(lambda p, c: p.update(hostNetwork=True)),
        "hostPID": variant(lambda p, c: p.update(hostPID=True)),
        "hostPath": variant(
            lambda p, c: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
        ),
        "not pinned": variant(
            lambda p, c: c.update(image="ghcr.io/alakai/task-tracking-sidecar:latest")
        ),
    }


def test_security_scan_flags_each_insecure_setting() -> None:
    # The checker itself must be able to fail.
    (deployment,) = parse_documents((MANIFESTS / "examples" / "deployment.yaml").read_text())
    assert findings([deployment]) == []
    for problem, obj in _insecure_variants(deployment).items():
        assert any(problem in line for line in findings([obj])), problem


def test_security_scan_flags_wildcard_and_cluster_rbac() -> None:
    role = {
        "kind": "Role",
        "metadata": {"name": "r"},
        "rules": [{"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]}],
    }
    cluster = {"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": []}
    assert findings([role]) == ["Role/r: wildcard in apiGroups"]
    assert findings([cluster]) == ["ClusterRole/c: cluster-scoped RBAC"]
