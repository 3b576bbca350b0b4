"""The read API's Deployment, Service and NetworkPolicy (api.enabled), as Helm renders them."""

from __future__ import annotations

from typing import Any

from .test_security import findings


def named(rendered: Any, kind: str, suffix: str = "-api") -> dict[str, Any]:
    [obj] = [o for o in rendered.of_kind(kind) if o["metadata"]["name"].endswith(suffix)]
    return obj


def test_api_is_off_by_default(render: Any) -> None:
    rendered = render({})
    assert not [o for o in rendered.objects if o["metadata"]["name"].endswith("-api")]


def test_api_deployment_runs_the_api_command_hardened_with_probes(render: Any) -> None:
    rendered = render({"api": {"enabled": True, "replicas": 3}})
    deployment = named(rendered, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["args"] == ["api"]
    assert container["ports"] == [{"name": "tt-api", "containerPort": 9471, "protocol": "TCP"}]
    env = {e["name"]: e for e in container["env"]}
    assert env["TASK_TRACKING_API_PORT"]["value"] == "9471"
    assert "TASK_TRACKING_API_TOKEN" not in env  # no Secret named: no token
    assert env["TASK_TRACKING_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "tt-api"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "tt-api"}
    assert findings([deployment]) == []


def test_api_token_comes_from_the_named_secret(render: Any) -> None:
    rendered = render({"api": {"enabled": True, "tokenSecret": {"name": "board", "key": "t"}}})
    [container] = named(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TASK_TRACKING_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "board",
        "key": "t",
    }


def test_api_service_and_network_policy_select_the_api_pods_only(render: Any) -> None:
    rendered = render({"api": {"enabled": True}, "networkPolicy": {"enabled": True}})
    deployment = named(rendered, "Deployment")
    api_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = named(rendered, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "tt-api"
    assert service["spec"]["selector"].items() <= api_labels.items()
    policy = named(rendered, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= api_labels.items()
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "tt-api", "protocol": "TCP"}]
    # the demo's Service, Deployment and policy do not pick the API pods up, nor the reverse
    for kind in ("Service", "NetworkPolicy"):
        for obj in rendered.of_kind(kind):
            if obj is service or obj is policy:
                continue
            selector = obj["spec"].get("selector") or obj["spec"]["podSelector"]["matchLabels"]
            assert not selector.items() <= api_labels.items(), obj["metadata"]["name"]
    for obj in rendered.of_kind("Deployment"):
        if obj is not deployment:
            selector = obj["spec"]["selector"]["matchLabels"]
            assert not selector.items() <= api_labels.items()


def test_api_environment_is_accepted_by_the_settings(render: Any) -> None:
    from sidecar import config

    rendered = render({"api": {"enabled": True, "tokenSecret": {"name": "board"}}})
    [container] = named(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    environ = {e["name"]: e.get("value") or "redis://redis:6379/0" for e in container["env"]}
    settings = config.load_settings(environ)
    assert settings.api_port == 9471 and settings.http_host == "0.0.0.0"
    assert settings.api_token == "redis://redis:6379/0"  # the Secret's value stands in
