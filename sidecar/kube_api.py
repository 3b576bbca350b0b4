"""Plain requests to the Kubernetes API with the credentials kopf logs in with (the
pod's service account, else the kubeconfig): the doctor's checks, and the sidecar's one
read of its TaskTracking before archival starts. kopf does the watching."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any


class KubernetesRequests:
    def __init__(self, session: Any, ssl: ssl.SSLContext | bool) -> None:
        self.session, self.ssl = session, ssl

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(path.lstrip("/"), ssl=self.ssl) as response:
            return response.status, await response.json(content_type=None)

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.session.post(path.lstrip("/"), json=body, ssl=self.ssl) as response:
            return response.status, await response.json(content_type=None)


def kubernetes_login() -> tuple[Any, str] | str:
    """(kopf's ConnectionInfo, where it came from), or why there is none."""
    import kopf

    settings = kopf.OperatorSettings()
    sources = (
        (kopf.login_with_service_account, "the pod's service account"),
        (kopf.login_with_kubeconfig, "the kubeconfig"),
    )
    for login, source in sources:
        try:
            info = login(settings=settings)
        except Exception as exc:  # a broken kubeconfig
            return f"{source} cannot be used: {exc}"
        if info is not None:
            return info, source
    return "no service account token and no kubeconfig (KUBECONFIG, ~/.kube/config)"


def ssl_context(info: Any) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data,
    )
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    return context


@contextlib.asynccontextmanager
async def kubernetes_api(info: Any, timeout_seconds: float) -> AsyncIterator[KubernetesRequests]:
    """Requests to the API server of `info` (kopf's ConnectionInfo), each within
    `timeout_seconds`."""
    import aiohttp

    headers = {"Accept": "application/json"}
    if info.token:
        headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
    auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(
        base_url=info.server.rstrip("/") + "/", headers=headers, auth=auth, timeout=timeout
    ) as session:
        yield KubernetesRequests(session, ssl_context(info))
