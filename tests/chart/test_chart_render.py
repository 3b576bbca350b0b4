"""The chart renders, lints and validates for its defaults and for every toggle."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    REQUIRED_VALUES,
    HelmRefused,
    Rendered,
    deep_merge,
    validate_object,
)

FULLNAME = f"{RELEASE}-task-tracking"

# Each toggle and what it must add to the rendered kinds.
TOGGLES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "defaults": ({}, {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"}),
    "native-sidecar": ({"sidecar": {"native": True}}, {"Deployment"}),
    "pod-monitor": ({"podMonitor": {"enabled": True}}, {"PodMonitor"}),
    "service-monitor": ({"serviceMonitor": {"enabled": True}}, {"ServiceMonitor"}),
    "prometheus-rule": ({"prometheusRule": {"enabled": True}}, {"PrometheusRule"}),
    "grafana-dashboard": ({"grafanaDashboard": {"enabled": True}}, {"ConfigMap"}),
    "api": (
        {"api": {"enabled": True, "tokenSecret": {"name": "api-token"}}},
        {"Deployment", "Service"},
    ),
    "api-network-policy": (
        {"api": {"enabled": True}, "networkPolicy": {"enabled": True, "egress": {"enabled": True}}},
        {"NetworkPolicy"},
    ),
    "network-policy": (
        {"networkPolicy": {"enabled": True, "egress": {"enabled": True}}},
        {"NetworkPolicy"},
    ),
    "task-tracking-resource": (
        {"taskTracking": {"create": True, "spec": {"archive": {"enabled": True, "bucket": "b-1"}}}},
        {"TaskTracking"},
    ),
    "folder-sink": (
        {"archive": {"enabled": True, "sink": "folder", "folder": {"existingClaim": "archive"}}},
        {"Deployment"},
    ),
    "archive-enabled": (
        {
            "archive": {
                "enabled": True,
                "bucket": "my-archive",
                "region": "eu-west-1",
                "endpointUrl": "http://minio:9000",
            }
        },
        {"Deployment"},
    ),
    "demo-off": ({"demo": {"enabled": False}}, {"ServiceAccount", "Role", "RoleBinding"}),
    "everything-on": (
        {
            "sidecar": {"native": True},
            "podMonitor": {"enabled": True},
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
            "networkPolicy": {"enabled": True, "egress": {"enabled": True}},
            "taskTracking": {"create": True},
            "serviceAccount": {
                "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}
            },
        },
        {
            "PodMonitor",
            "ServiceMonitor",
            "PrometheusRule",
            "ConfigMap",
            "NetworkPolicy",
            "TaskTracking",
        },
    ),
}


def sidecar_of(rendered: Rendered) -> dict[str, Any]:
    containers = []
    for deployment in rendered.of_kind("Deployment"):  # the demo's, not the read API's
        pod = deployment["spec"]["template"]["spec"]
        containers += pod["containers"] + pod.get("initContainers", [])
    (sidecar,) = [c for c in containers if c["name"] == "task-tracking"]
    return sidecar


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("toggle", TOGGLES)
def test_every_toggle_renders_objects_valid_for_kubernetes(
    render: Any, crd_schema: dict[str, Any], toggle: str
) -> None:
    overrides, expected_kinds = TOGGLES[toggle]
    rendered = render(overrides)
    assert expected_kinds <= rendered.kinds
    for obj in rendered.objects:
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE
        validate_object(obj, crd_schema)


@pytest.mark.parametrize("toggle", ["defaults", "everything-on", "folder-sink", "demo-off"])
def test_helm_lint_reports_no_errors_or_warnings(helm: Any, toggle: str) -> None:
    overrides, _ = TOGGLES[toggle]
    assert helm.lint(CHART, deep_merge(REQUIRED_VALUES, overrides)) == []


def test_plain_install_shows_a_working_pod_with_sidecar(render: Any) -> None:
    rendered = render()
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["app", "task-tracking"]
    assert "initContainers" not in pod
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["serviceAccountName"] == FULLNAME
    sidecar = sidecar_of(rendered)
    assert sidecar["image"] == "ghcr.io/alakai/task-tracking-sidecar:0.1.0"
    assert sidecar["args"] == ["run"]
    assert sidecar["ports"] == [{"name": "tt-metrics", "containerPort": 9470, "protocol": "TCP"}]
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "task-tracking-tmp", "mountPath": "/tmp"} in sidecar["volumeMounts"]
    assert "restartPolicy" not in sidecar
    service = rendered.one("Service")
    assert service["spec"]["ports"][0]["port"] == 9470


def test_defaults_set_every_environment_variable_of_the_contract(render: Any) -> None:
    env = env_of(sidecar_of(render()))
    assert env == {
        "TASK_TRACKING_REDIS_URL": {"secretKeyRef": {"name": "redis", "key": "redis-url"}},
        "TASK_TRACKING_REDIS_STREAM_KEY": "task-events:v1",
        "TASK_TRACKING_REDIS_PROJECTOR_CONSUMER_GROUP": "task-status-projector",
        "TASK_TRACKING_REDIS_ARCHIVER_CONSUMER_GROUP": "task-history-archiver",
        "TASK_TRACKING_REDIS_CONSUMER_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
        "TASK_TRACKING_REDIS_BATCH_SIZE": "500",
        "TASK_TRACKING_REDIS_BLOCK_MS": "5000",
        "TASK_TRACKING_REDIS_CLAIM_IDLE_MS": "60000",
        "TASK_TRACKING_REDIS_STREAM_MAXLEN": "0",
        "TASK_TRACKING_ARCHIVE_OFF_PIN_SECONDS": "86400",
        "TASK_TRACKING_S3_ARCHIVE_ENABLED": "false",
        "TASK_TRACKING_ARCHIVE_SINK": "s3",
        "TASK_TRACKING_S3_PREFIX": "task-tracking",
        "TASK_TRACKING_ARCHIVE_FLUSH_MAX_EVENTS": "5000",
        "TASK_TRACKING_ARCHIVE_FLUSH_MAX_BYTES": "8388608",
        "TASK_TRACKING_ARCHIVE_FLUSH_MAX_AGE_SECONDS": "30",
        "TASK_TRACKING_PROJECTION_TTL_SECONDS": "0",
        "TASK_TRACKING_PROJECT_INDEX_MAX_AGE_DAYS": "0",
        "TASK_TRACKING_PROJECT_INDEX_MAX_SIZE": "0",
        "TASK_TRACKING_MAX_EVENT_BYTES": "1048576",
        "TASK_TRACKING_MAX_FUTURE_SECONDS": "86400",
        "TASK_TRACKING_DEAD_LETTER_MAXLEN": "100000",
        "TASK_TRACKING_HTTP_PORT": "9470",
        "TASK_TRACKING_HTTP_HOST": "0.0.0.0",
        "TASK_TRACKING_LOG_LEVEL": "info",
        "TASK_TRACKING_RESOURCE_NAME": FULLNAME,
        "TASK_TRACKING_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }


def test_large_integer_values_render_as_plain_digits(render: Any) -> None:
    # Go templates print big float64 numbers in exponent form unless converted.
    env = env_of(
        sidecar_of(
            render(
                {
                    "archive": {"flush": {"maxBytes": 104857600}},
                    "retention": {"projectIndexMaxSize": 12345678},
                }
            )
        )
    )
    assert env["TASK_TRACKING_ARCHIVE_FLUSH_MAX_BYTES"] == "104857600"
    assert env["TASK_TRACKING_PROJECT_INDEX_MAX_SIZE"] == "12345678"


def test_archive_enabled_sets_bucket_region_and_endpoint(render: Any) -> None:
    env = env_of(sidecar_of(render(TOGGLES["archive-enabled"][0])))
    assert env["TASK_TRACKING_S3_ARCHIVE_ENABLED"] == "true"
    assert env["TASK_TRACKING_S3_BUCKET"] == "my-archive"
    assert env["TASK_TRACKING_S3_REGION"] == "eu-west-1"
    assert env["TASK_TRACKING_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_folder_sink_mounts_the_claim_at_the_archive_folder(render: Any) -> None:
    rendered = render(TOGGLES["folder-sink"][0])
    sidecar = sidecar_of(rendered)
    env = env_of(sidecar)
    assert env["TASK_TRACKING_ARCHIVE_SINK"] == "folder"
    path = env["TASK_TRACKING_ARCHIVE_FOLDER"]
    assert {"name": "task-tracking-archive", "mountPath": path} in sidecar["volumeMounts"]
    volumes = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "task-tracking-archive",
        "persistentVolumeClaim": {"claimName": "archive"},
    } in volumes


def test_native_sidecar_is_an_init_container_that_restarts_always(render: Any) -> None:
    pod = render({"sidecar": {"native": True}}).one("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["app"]
    (init,) = pod["initContainers"]
    assert init["name"] == "task-tracking"
    assert init["restartPolicy"] == "Always"
    assert init["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_watch_off_sets_an_empty_resource_name(render: Any) -> None:
    env = env_of(sidecar_of(render({"taskTracking": {"watch": False}})))
    assert env["TASK_TRACKING_RESOURCE_NAME"] == ""


def test_created_task_tracking_is_the_one_the_sidecars_watch(render: Any) -> None:
    rendered = render(TOGGLES["task-tracking-resource"][0])
    resource = rendered.one("TaskTracking")
    env = env_of(sidecar_of(rendered))
    assert resource["metadata"]["name"] == env["TASK_TRACKING_RESOURCE_NAME"] == FULLNAME
    assert resource["spec"]["archive"] == {
        "enabled": True,
        "bucket": "b-1",
        "prefix": "task-tracking",
    }


def test_demo_off_renders_no_workload(render: Any) -> None:
    rendered = render({"demo": {"enabled": False}})
    assert not rendered.of_kind("Deployment")


def test_service_account_annotations_carry_the_iam_role(render: Any) -> None:
    sa = render(TOGGLES["everything-on"][0]).one("ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}


def test_monitors_scrape_the_sidecar_metrics_port(render: Any) -> None:
    rendered = render(TOGGLES["everything-on"][0])
    sidecar = sidecar_of(rendered)
    port_names = {p["name"] for p in sidecar["ports"]}
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = rendered.one("Service")

    pod_monitor = rendered.one("PodMonitor")["spec"]
    assert {e["port"] for e in pod_monitor["podMetricsEndpoints"]} <= port_names
    assert pod_monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_monitor["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    service_monitor = rendered.one("ServiceMonitor")["spec"]
    assert {e["port"] for e in service_monitor["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    assert (
        service_monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


ALERT_METRICS = {
    "TaskTrackingConsumerGroupLagGrowing": "task_tracking_consumer_group_lag",
    "TaskTrackingOldestPendingTooOld": "task_tracking_oldest_pending_age_seconds",
    "TaskTrackingDeadLettersIncreasing": "task_tracking_events_dead_lettered_total",
    "TaskTrackingArchiveFailures": "task_tracking_archive_failures_total",
    "TaskTrackingSidecarNotReady": "task_tracking_ready",
}


def test_prometheus_rule_alerts_each_carry_a_runbook(render: Any) -> None:
    rule = render({"prometheusRule": {"enabled": True, "matchers": 'namespace="prod"'}})
    (group,) = rule.one("PrometheusRule")["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == set(ALERT_METRICS)
    for name, alert in alerts.items():
        expr = alert["expr"]
        assert ALERT_METRICS[name] + '{namespace="prod"}' in expr, expr
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
        assert alert["labels"]["severity"] == "warning"
        assert len(alert["annotations"]["runbook"]) > 100
        # Prometheus templates must reach Prometheus unrendered by Helm.
        assert "{{ $labels." in alert["annotations"]["summary"] or name.endswith("NotReady")


def test_grafana_dashboard_configmap_holds_the_dashboard_json(render: Any) -> None:
    cm = render({"grafanaDashboard": {"enabled": True}}).one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["task-tracking.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "task_tracking_consumer_group_lag",
        "task_tracking_events_applied_total",
        "task_tracking_end_to_end_latency_seconds_bucket",
        "task_tracking_events_dead_lettered_total",
        "task_tracking_archive_objects_total",
        "task_tracking_archive_bytes_total",
    ):
        assert metric in exprs
    assert "histogram_quantile(0.99" in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_network_policy_admits_metrics_and_limits_egress(render: Any) -> None:
    policy = render(TOGGLES["network-policy"][0]).one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"][0]["ports"] == [{"port": "tt-metrics", "protocol": "TCP"}]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert {53, 6379, 443} <= egress_ports


def test_notes_tell_the_installer_what_to_do_next(render: Any) -> None:
    notes = render().notes
    assert notes is not None
    assert "kubectl -n tt-test create secret generic redis" in notes
    assert "port-forward" in notes
    notes_demo_off = render({"demo": {"enabled": False}}).notes
    assert 'include "task-tracking.sidecarContainer"' in notes_demo_off


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"redis": {"existingSecret": ""}}, "existingSecret"),
        ({"archive": {"enabled": True}}, "bucket"),
        ({"archive": {"enabled": True, "bucket": "Not_A_Bucket"}}, "bucket"),
        ({"archive": {"sink": "folder"}}, "existingClaim"),
        ({"archive": {"sink": "gcs"}}, "sink"),
        ({"archive": {"prefix": "/leading"}}, "prefix"),
        ({"archive": {"flush": {"maxEvents": 0}}}, "maxEvents"),
        ({"image": {"tag": "latest"}}, "tag"),
        ({"logLevel": "verbose"}, "logLevel"),
        ({"redis": {"batchSize": "500"}}, "batchSize"),
        (
            {"sidecar": {"securityContext": {"readOnlyRootFilesystem": False}}},
            "readOnlyRootFilesystem",
        ),
        # null deletes a default key in Helm: a sidecar without limits.
        ({"sidecar": {"resources": {"limits": None}}}, "limits"),
        ({"terminationGracePeriodSeconds": 5}, "terminationGracePeriodSeconds"),
        ({"archvie": {"enabled": True}}, "archvie"),
    ],
)
def test_values_schema_rejects_wrong_values(
    helm: Any, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(HelmRefused, match=complaint):
        helm.render(CHART, deep_merge(REQUIRED_VALUES, values))


def test_missing_redis_secret_is_refused_with_defaults_only(helm: Any) -> None:
    with pytest.raises(HelmRefused, match="existingSecret"):
        helm.render(CHART, {})


def test_archive_enabled_with_folder_sink_needs_no_bucket(render: Any) -> None:
    env = env_of(sidecar_of(render(TOGGLES["folder-sink"][0])))
    assert "TASK_TRACKING_S3_BUCKET" not in env


def test_every_values_key_is_documented_by_a_comment() -> None:
    """Each value is documented by a comment above it or above one of its parent keys."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str, bool]] = []  # (indent, key, has a comment above)
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match[1])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match[2], number > 0 and lines[number - 1].strip().startswith("#")))
        following = next((x.strip() for x in lines[number + 1 :] if x.strip()), "")
        is_leaf = match[3].strip() != "" or following.startswith("- ")
        if is_leaf and not any(documented for _, _, documented in stack):
            undocumented.append(".".join(key for _, key, _ in stack))
    assert undocumented == []


PARENT_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels: {app: shop}
    spec:
      serviceAccountName: {{ .Release.Name }}-task-tracking
      containers:
        - name: shop
          image: example.org/shop:1.2.3
        {{- include "task-tracking.sidecarContainer" . | nindent 8 }}
      volumes:
        {{- include "task-tracking.sidecarVolumes" . | nindent 8 }}
"""


def test_parent_chart_includes_the_sidecar_container_in_its_own_pod(
    helm: Any, tmp_path: Path, crd_schema: dict[str, Any]
) -> None:
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(
        yaml.safe_dump(
            {"apiVersion": "v2", "name": "shop", "version": "2.0.0", "appVersion": "9.9.9"}
        )
    )
    (parent / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "task-tracking": {
                    "redis": {"existingSecret": "shop-redis"},
                    "demo": {"enabled": False},
                    "archive": {"sink": "folder", "folder": {"existingClaim": "shop-archive"}},
                }
            }
        )
    )
    (parent / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT)
    shutil.copytree(CHART, parent / "charts" / "task-tracking")

    rendered = helm.render(parent, {})
    (deployment,) = [o for o in rendered.objects if o["kind"] == "Deployment"]
    validate_object(deployment, crd_schema)
    pod = deployment["spec"]["template"]["spec"]
    shop, sidecar = pod["containers"]
    assert shop["name"] == "shop"
    # Names and the image tag resolve in the subchart's context, not the parent's.
    assert sidecar["image"] == "ghcr.io/alakai/task-tracking-sidecar:0.1.0"
    env = env_of(sidecar)
    assert env["TASK_TRACKING_REDIS_URL"]["secretKeyRef"]["name"] == "shop-redis"
    assert env["TASK_TRACKING_RESOURCE_NAME"] == FULLNAME
    assert {
        "name": "task-tracking-archive",
        "persistentVolumeClaim": {"claimName": "shop-archive"},
    } in pod["volumes"]
    assert {o["kind"] for o in rendered.objects} >= {"ServiceAccount", "Role", "RoleBinding"}


def test_chart_metadata_pins_app_version_and_minimum_kubernetes() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"].startswith(">=1.25")


@pytest.mark.parametrize("toggle", TOGGLES)
def test_rendered_environment_is_accepted_by_the_sidecar_settings(render: Any, toggle: str) -> None:
    # Contract with sidecar/config.py: the chart never renders an env the sidecar refuses.
    from sidecar import config

    rendered = render(TOGGLES[toggle][0])
    if not rendered.of_kind("Deployment"):
        return
    environ = {}
    for name, value in env_of(sidecar_of(rendered)).items():
        if isinstance(value, str):
            environ[name] = value
        elif "secretKeyRef" in value:
            environ[name] = "redis://redis:6379/0"
        else:
            environ[name] = {"metadata.name": "pod-1", "metadata.namespace": NAMESPACE}[
                value["fieldRef"]["fieldPath"]
            ]
    settings = config.load_settings(environ)
    assert settings.http_port == 9470
    assert settings.http_host == "0.0.0.0"
    assert settings.redis_consumer_name == "pod-1"
