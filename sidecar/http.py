"""The sidecar's HTTP endpoints: /metrics, /healthz (liveness) and /readyz (readiness)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from sidecar.runtime import Sidecar

SIDECAR_KEY: web.AppKey[Sidecar] = web.AppKey("sidecar")


def build_app(sidecar: Sidecar) -> web.Application:
    app = web.Application()
    app[SIDECAR_KEY] = sidecar
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SIDECAR_KEY].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """200 unless the process is wedged: a worker task died or the event loop stalls."""
    problems = request.app[SIDECAR_KEY].liveness_problems()
    return _answer(problems)


async def readyz(request: web.Request) -> web.Response:
    """200 when Redis answers, the groups exist, and an enabled archiver can write."""
    problems = request.app[SIDECAR_KEY].readiness_problems()
    return _answer(problems)


def _answer(problems: list[str]) -> web.Response:
    if problems:
        return web.json_response({"ok": False, "problems": problems}, status=503)
    return web.json_response({"ok": True})
