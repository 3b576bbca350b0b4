"""The doctor's Kubernetes checks for the TaskTracking resource a sidecar watches:
credentials (the pod's service account, else the kubeconfig, as the sidecar logs in), the
CRD served, the resource found, and RBAC allowing what the sidecar does
(SelfSubjectAccessReview, which any authenticated user may ask)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.config import Settings
from sidecar.kube_api import KubernetesRequests, kubernetes_api, kubernetes_login

if TYPE_CHECKING:
    from sidecar.doctor import Report

GROUP, VERSION, PLURAL = "alakai.io", "v1alpha1", "tasktrackings"
# What the chart's Role grants, and the sidecar uses: (API group, resource, verb).
NEEDED_ACCESS = [
    (GROUP, PLURAL, "get"),
    (GROUP, PLURAL, "list"),
    (GROUP, PLURAL, "watch"),
    (GROUP, f"{PLURAL}/status", "patch"),
    ("", "events", "create"),
]
RBAC_FIX = "apply the chart's Role and RoleBinding (rbac.create=true) for this service account"


async def check_kubernetes(settings: Settings, name: str, report: Report) -> None:
    import aiohttp

    login = kubernetes_login()
    if isinstance(login, str):
        report.add(
            "kubernetes credentials",
            "fail",
            login,
            "run in a pod with a service account, or set KUBECONFIG",
        )
        report.add("tasktracking resource", "skip", "no Kubernetes credentials")
        return
    info, source = login
    namespace = settings.namespace or info.default_namespace or "default"
    report.add("kubernetes credentials", "pass", f"{source}: {info.server}, namespace {namespace}")
    async with kubernetes_api(info, 10) as api:
        try:
            await check_resource(api, namespace, name, report)
            await check_access(api, namespace, report)
        except (aiohttp.ClientError, TimeoutError) as exc:
            report.add(
                "kubernetes api",
                "fail",
                f"{info.server} did not answer: {exc or type(exc).__name__}",
                "check the API server address and the network",
            )


async def check_resource(
    api: KubernetesRequests, namespace: str, name: str, report: Report
) -> None:
    status, _ = await api.get(f"/apis/{GROUP}/{VERSION}")
    if status == 404:
        report.add(
            "tasktracking crd",
            "fail",
            f"{PLURAL}.{GROUP} is not installed (the API does not serve {GROUP}/{VERSION})",
            "install the CRD: kubectl apply -f manifests/crd (or the chart with crds)",
        )
        report.add("tasktracking resource", "skip", "the CRD is not installed")
        return
    report.add("tasktracking crd", "pass", f"{PLURAL}.{GROUP}/{VERSION} is served")
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
    status, body = await api.get(path)
    what = f"TaskTracking {namespace}/{name}"
    if status == 200:
        archive = (body.get("spec") or {}).get("archive") or {}
        enabled = "on" if archive.get("enabled") else "off"
        report.add("tasktracking resource", "pass", f"{what} found (archive {enabled})")
    elif status == 404:
        report.add(
            "tasktracking resource",
            "warn",
            f"{what} not found: the sidecar uses the environment's configuration until it is"
            " created",
            "create it (manifests/ has an example), or fix TASK_TRACKING_RESOURCE_NAME",
        )
    else:
        message = body.get("message", "") if isinstance(body, dict) else ""
        report.add("tasktracking resource", "fail", f"{what}: HTTP {status} {message}", RBAC_FIX)


async def check_access(api: KubernetesRequests, namespace: str, report: Report) -> None:
    denied = []
    for group, resource, verb in NEEDED_ACCESS:
        plain, _, subresource = resource.partition("/")
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "group": group,
                    "resource": plain,
                    "subresource": subresource,
                    "verb": verb,
                }
            },
        }
        status, body = await api.post(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review
        )
        allowed = status in (200, 201) and bool((body.get("status") or {}).get("allowed"))
        if not allowed:
            denied.append(f"{verb} {resource}" + (f".{group}" if group else ""))
    if denied:
        report.add(
            "kubernetes rbac",
            "fail",
            f"not allowed in namespace {namespace}: {', '.join(denied)}",
            RBAC_FIX,
        )
    else:
        allowed_list = ", ".join(f"{verb} {resource}" for _, resource, verb in NEEDED_ACCESS)
        report.add("kubernetes rbac", "pass", f"allowed in namespace {namespace}: {allowed_list}")
