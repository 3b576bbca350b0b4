"""The CRD, the RBAC and the plain-YAML manifests: valid, consistent with the chart."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import (
    CHART_CRD_PATH,
    CRD_PATH,
    KUBE_VERSION,
    MANIFESTS,
    parse_documents,
    validate_object,
    validate_task_tracking,
)


def load(relative: str) -> list[dict[str, Any]]:
    return parse_documents((MANIFESTS / relative).read_text())


def test_chart_crd_is_byte_identical_to_the_manifest_crd() -> None:
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), (
        "charts/task-tracking/crds/ drifted: cp manifests/crd/tasktrackings.alakai.io.yaml "
        "charts/task-tracking/crds/"
    )


def test_crd_is_a_valid_custom_resource_definition(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    assert crd["metadata"]["name"] == "tasktrackings.alakai.io"
    spec = crd["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "TaskTracking",
        "listKind": "TaskTrackingList",
        "plural": "tasktrackings",
        "singular": "tasktracking",
        "shortNames": ["tt"],
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Archiving": ".spec.archive.enabled",
        "Bucket": ".spec.archive.bucket",
        "Applied": ".status.applied",
        "Age": ".metadata.creationTimestamp",
    }


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        found += _walk(extra, f"{path}.*")
    return found


def test_every_crd_field_has_a_description(crd_schema: dict[str, Any]) -> None:
    # metadata is described by Kubernetes itself.
    missing = [
        p or "<root>" for p, s in _walk(crd_schema) if "description" not in s and p != ".metadata"
    ]
    assert missing == []


def test_crd_schema_is_structural(crd_schema: dict[str, Any]) -> None:
    # The API server rejects non-structural schemas: every node needs a type
    # unless it preserves unknown fields.
    untyped = [
        p
        for p, s in _walk(crd_schema)
        if "type" not in s and not s.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert untyped == []


def test_crd_cel_rules_reference_only_declared_fields(crd_schema: dict[str, Any]) -> None:
    # No API server here to compile CEL; at least every `self.<field>` must exist,
    # and strings used in rules need a maxLength to bound their cost.
    archive = crd_schema["properties"]["spec"]["properties"]["archive"]
    rules = [r["rule"] for r in archive["x-kubernetes-validations"]]
    assert any("has(self.bucket)" in r and "self.enabled" in r for r in rules)
    assert any("startsWith('/')" in r and "endsWith('/')" in r for r in rules)
    for rule in rules:
        assert rule.count("(") == rule.count(")"), rule
        for field in re.findall(r"self\.(\w+)", rule):
            assert field in archive["properties"], f"{rule}: no field {field}"
            if archive["properties"][field]["type"] == "string":
                assert "maxLength" in archive["properties"][field]


def test_example_task_tracking_validates_against_the_crd(crd_schema: dict[str, Any]) -> None:
    (example,) = load("examples/tasktracking.yaml")
    assert example["apiVersion"] == "alakai.io/v1alpha1" and example["kind"] == "TaskTracking"
    validate_task_tracking(example, crd_schema)


def _example() -> dict[str, Any]:
    (example,) = load("examples/tasktracking.yaml")
    return example


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("archive", "bucket"), "UPPER_case"),
        (("archive", "bucket"), "ab"),
        (("archive", "endpointUrl"), "ftp://minio"),
        (("archive", "flush", "maxEvents"), 0),
        (("archive", "flush", "maxEvents"), 100001),
        (("archive", "flush", "maxBytes"), 1023),
        (("archive", "flush", "maxAgeSeconds"), 3601),
        (("archive", "enabled"), "yes"),
        (("retention", "projectionTtlSeconds"), -1),
        (("archive", "prefix"), ""),
    ],
)
def test_crd_schema_rejects_invalid_specs(
    crd_schema: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    resource = copy.deepcopy(_example())
    target = resource["spec"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_task_tracking(resource, crd_schema)


def test_crd_accepts_a_status_written_by_sidecars(crd_schema: dict[str, Any]) -> None:
    resource = _example()
    resource["status"] = {
        "applied": "1/2",
        "archiving": True,
        "sidecars": {
            "app-7d9f-abcde": {
                "observedGeneration": 3,
                "archiving": True,
                "bucket": "b-1",
                "prefix": "task-tracking",
                "lastError": "",
                "updatedAt": "2026-03-15T10:00:00Z",
            },
        },
    }
    validate_task_tracking(resource, crd_schema)
    resource["status"]["sidecars"]["app-7d9f-abcde"]["observedGeneration"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        validate_task_tracking(resource, crd_schema)


def test_plain_deployment_example_validates(crd_schema: dict[str, Any]) -> None:
    for doc in load("examples/deployment.yaml"):
        validate_object(doc, crd_schema)


def test_plain_deployment_sidecar_matches_the_chart(render: Any) -> None:
    (deployment,) = load("examples/deployment.yaml")
    plain = deployment["spec"]["template"]["spec"]
    charted = render({"fullnameOverride": "task-tracking"}).one("Deployment")
    chart_pod = charted["spec"]["template"]["spec"]
    assert plain["containers"] == chart_pod["containers"]
    assert plain["volumes"] == chart_pod["volumes"]
    assert plain["securityContext"] == chart_pod["securityContext"]
    assert plain["terminationGracePeriodSeconds"] == chart_pod["terminationGracePeriodSeconds"]
    assert plain["serviceAccountName"] == "task-tracking"


def test_plain_api_example_matches_the_chart(render: Any, crd_schema: dict[str, Any]) -> None:
    deployment, service = load("examples/api.yaml")
    for doc in (deployment, service):
        validate_object(doc, crd_schema)
    charted = render({"fullnameOverride": "task-tracking", "api": {"enabled": True}})
    [chart_deployment] = [
        d for d in charted.of_kind("Deployment") if d["metadata"]["name"] == "task-tracking-api"
    ]
    plain, chart_pod = (
        deployment["spec"]["template"]["spec"],
        chart_deployment["spec"]["template"]["spec"],
    )
    assert plain["containers"] == chart_pod["containers"]
    assert plain["securityContext"] == chart_pod["securityContext"]
    assert plain["automountServiceAccountToken"] is False
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_plain_rbac_matches_the_chart(render: Any) -> None:
    (role,) = load("rbac/role.yaml")
    assert role["rules"] == render().one("Role")["rules"]
    (binding,) = load("rbac/rolebinding.yaml")
    (account,) = load("rbac/serviceaccount.yaml")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]


def test_rbac_grants_exactly_what_kopf_and_status_patches_need() -> None:
    (role,) = load("rbac/role.yaml")
    grants = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert grants == {
        ("alakai.io", "tasktrackings", "get"),
        ("alakai.io", "tasktrackings", "list"),
        ("alakai.io", "tasktrackings", "watch"),
        ("alakai.io", "tasktrackings/status", "get"),
        ("alakai.io", "tasktrackings/status", "patch"),
        ("", "events", "create"),
        ("events.k8s.io", "events", "create"),
    }


def test_kustomization_lists_every_manifest_and_each_validates(
    crd_schema: dict[str, Any],
) -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {
        str(p.relative_to(MANIFESTS))
        for p in MANIFESTS.rglob("*.yaml")
        if p.name != "kustomization.yaml"
    }
    assert listed == on_disk
    for relative in sorted(listed):
        for doc in load(relative):
            if doc["kind"] == "CustomResourceDefinition":
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            else:
                validate_object(doc, crd_schema)
