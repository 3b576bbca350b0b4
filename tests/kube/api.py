"""A small in-memory Kubernetes API server that kopf and kubectl run against for real, over HTTP.

No API server can be installed on the build machines, so the operator tests own this one.
It serves only what kopf and kubectl need for one namespaced custom resource with a status
subresource, and copies the Kubernetes semantics they depend on (DESIGN.md, "Known
pitfalls"); what a write does is in ``store.py``, discovery and OpenAPI in ``discovery.py``:

- ``resourceVersion`` is one global counter that grows on every real change;
- ``metadata.generation`` grows on spec changes only;
- a merge patch that changes nothing is not persisted: no new resourceVersion, no watch event;
- ``/status`` writes change only the status; status in writes to the main resource is ignored;
- watches end after ``timeoutSeconds``; a resourceVersion older than the retained history
  (see :meth:`KubeAPI.compact`) gets "410 Gone" in the stream;
- with ``namespaced_only=True``, cluster-scoped lists and watches answer 403 like a namespaced
  Role would;
- every TaskTracking write (create, merge patch, status) is admitted as kube-apiserver admits
  it against the CRD that ships (``crd.py``: pruning, defaults, OpenAPI schema, CEL rules):
  a refusal is the same ``422 Invalid`` Status; unknown fields are pruned with a ``Warning``
  header, or refused with ``fieldValidation=Strict`` (kubectl's default);
- ``kubectl get`` (and ``get -w``) gets the CRD's printer columns as a ``meta.k8s.io/v1``
  Table.

Every request is logged (:attr:`KubeAPI.requests`) and every posted Event is kept
(:attr:`KubeAPI.events`), so tests can assert what the operator wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from .crd import CustomResource, Invalid
from .discovery import Discovery, failure
from .store import (
    GROUP,
    PLURAL,
    RESOURCES,
    VERSION,
    Conflict,
    NotFound,
    ObjectStore,
    Stale,
    StrictDecoding,
)

Object = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    token: str | None  # the bearer token: tells apart clients with different kubeconfigs


class KubeAPI:
    """In-memory Kubernetes API on 127.0.0.1; use as ``async with KubeAPI() as api``."""

    def __init__(
        self,
        *,
        namespaced_only: bool = False,
        watch_timeout: float = 30.0,
        crd: CustomResource | None = None,
    ) -> None:
        self.namespaced_only = namespaced_only
        # The CRD every TaskTracking write is admitted against (the one that ships).
        self.crd = crd if crd is not None else CustomResource()
        self.watch_timeout = watch_timeout
        self.requests: list[Request] = []
        self.events: list[Object] = []
        self.url = ""
        self.store = ObjectStore(self.crd)
        self.expired_watches = 0  # how many watches were answered "410 Gone"
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        # For `task-tracking doctor`: a cluster without the CRD, and RBAC that refuses some
        # (verb, "resource[/subresource]") to SelfSubjectAccessReview (everything else allowed).
        self.discovery = Discovery(self.crd)
        self.denied_access: set[tuple[str, str]] = set()

    @property
    def crd_installed(self) -> bool:
        return self.discovery.installed

    @crd_installed.setter
    def crd_installed(self, installed: bool) -> None:
        self.discovery.installed = installed

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> KubeAPI:
        app = web.Application(middlewares=[self._log_request])
        app.add_routes(self.discovery.routes())
        app.router.add_post(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", self._access_review
        )
        app.router.add_route("*", "/{path:.*}", self._resource)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self.store.ensure_namespace("default")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def write_kubeconfig(
        self, path: Path, *, namespace: str = "default", token: str = "test-token"
    ) -> Path:
        """Write a kubeconfig whose current context points at this server; returns the path."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kube-api",
            "clusters": [{"name": "kube-api", "cluster": {"server": self.url}}],
            "users": [{"name": "tests", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "kube-api",
                    "context": {"cluster": "kube-api", "user": "tests", "namespace": namespace},
                }
            ],
        }
        path.write_text(json.dumps(config), encoding="utf-8")  # JSON is valid YAML
        return path

    # ----------------------------------------------------------------- test API

    def ensure_namespace(self, namespace: str) -> None:
        self.store.ensure_namespace(namespace)

    def compact(self) -> None:
        """Forget the change history: watches from an older resourceVersion get 410 Gone.

        The resourceVersion moves on (as other resources change in a real cluster), so a
        fresh list gives a version that can be watched again.
        """
        self.store.compact()

    async def create(self, namespace: str, body: Object, *, checked: bool = True) -> Object:
        """Create a TaskTracking (as ``kubectl create`` would); returns the stored object.

        ``checked=False`` stores it unadmitted: an object written before the CRD had its
        current schema and rules, which a real cluster still serves as stored."""
        self.store.ensure_namespace(namespace)
        obj = self.store.create(PLURAL, namespace, body, checked=checked)
        await self._notify()
        return copy.deepcopy(obj)

    async def patch_spec(
        self, namespace: str, name: str, patch: Object, *, checked: bool = True
    ) -> Object:
        """Merge-patch the spec of a TaskTracking (``checked`` as for :meth:`create`)."""
        obj = self.store.patch(
            PLURAL, namespace, name, {"spec": patch}, subresource=None, checked=checked
        )
        await self._notify()
        return copy.deepcopy(obj)

    async def patch_status(
        self, namespace: str, name: str, patch: Object, *, checked: bool = True
    ) -> Object:
        """Merge-patch the status of a TaskTracking (as another writer would)."""
        obj = self.store.patch(
            PLURAL, namespace, name, {"status": patch}, subresource="status", checked=checked
        )
        await self._notify()
        return copy.deepcopy(obj)

    async def delete(self, namespace: str, name: str) -> None:
        self.store.delete(PLURAL, namespace, name)
        await self._notify()

    def get(self, namespace: str, name: str) -> Object | None:
        obj = self.store.objects.get((PLURAL, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    @property
    def resource_version(self) -> int:
        return self.store.rv

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ----------------------------------------------------------------- HTTP

    @web.middleware
    async def _log_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        self.requests.append(
            Request(
                request.method,
                request.path,
                dict(request.query),
                request.content_type,
                body,
                token,
            )
        )
        try:
            response: web.StreamResponse = await handler(request)
        except NotFound as e:
            return failure(404, "NotFound", str(e))
        except Conflict as e:
            return failure(409, "AlreadyExists", str(e))
        except Invalid as e:
            return web.json_response(e.status(), status=422)
        except StrictDecoding as e:
            return failure(400, "BadRequest", str(e))
        except Stale as e:
            return failure(409, "Conflict", str(e))
        return response

    async def _access_review(self, request: web.Request) -> web.Response:
        """SelfSubjectAccessReview: allowed unless listed in `denied_access`."""
        review = await request.json()
        attributes = review["spec"]["resourceAttributes"]
        resource = attributes["resource"]
        if attributes.get("subresource"):
            resource += "/" + attributes["subresource"]
        allowed = (attributes["verb"], resource) not in self.denied_access
        return web.json_response({**review, "status": {"allowed": allowed}}, status=201)

    def _route(self, path: str) -> tuple[str, str | None, str | None, str | None] | None:
        """Split a resource path into (resource, namespace, name, subresource)."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            if (parts[1], parts[2]) not in {
                (GROUP, VERSION),
                ("events.k8s.io", "v1"),
                ("apiextensions.k8s.io", "v1"),
            }:
                return None
            rest = parts[3:]
        else:
            return None
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in RESOURCES:
            return None
        resource, rest = rest[0], rest[1:]
        name = rest[0] if rest else None
        subresource = rest[1] if len(rest) > 1 else None
        return resource, namespace, name, subresource

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        if route is None:
            return failure(404, "NotFound", f"the server could not find {request.path}")
        resource, namespace, name, subresource = route
        namespaced = RESOURCES[resource][2]
        if not namespaced:
            namespace = None
        if resource == "events" and request.method == "POST" and namespace is not None:
            return await self._post_event(request, namespace)

        if name is None and request.method == "GET":
            if self.namespaced_only and (namespace is None):
                return failure(
                    403,
                    "Forbidden",
                    f'{resource} is forbidden: User "system:serviceaccount:tests:sidecar" '
                    f"cannot list resource {resource!r} at the cluster scope",
                )
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, resource, namespace)
            return self._list(resource, namespace, table=_wants_table(request))

        unknown: list[str] = []
        if request.method == "POST" and name is None:
            if namespace is not None:
                self.store.ensure_namespace(namespace)
            body = await request.json()
            obj = self.store.create(
                resource, namespace, body, unknown=unknown, strict=_strict(request)
            )
            await self._notify()
            return self._written(request, obj, unknown, status=201)
        if name is None:
            return failure(405, "MethodNotAllowed", f"{request.method} needs a name")
        if request.method == "GET":
            found = self.store.objects.get((resource, namespace, name))
            if found is None:
                return failure(404, "NotFound", f'{resource} "{name}" not found')
            obj = found
            if resource == PLURAL and _wants_table(request):
                return web.json_response(self.crd.table([obj], resource_version=str(self.store.rv)))
            return web.json_response(obj)
        if request.method == "PATCH":
            if request.content_type != "application/merge-patch+json":
                return failure(
                    415, "UnsupportedMediaType", f"{request.content_type} is not supported"
                )
            obj = self.store.patch(
                resource,
                namespace,
                name,
                await request.json(),
                subresource=subresource,
                unknown=unknown,
                strict=_strict(request),
            )
            await self._notify()
            return self._written(request, obj, unknown)
        if request.method == "PUT":
            obj = self.store.update(
                resource,
                namespace,
                name,
                await request.json(),
                subresource=subresource,
                unknown=unknown,
                strict=_strict(request),
            )
            await self._notify()
            return self._written(request, obj, unknown)
        if request.method == "DELETE":
            obj = self.store.delete(resource, namespace, name)
            await self._notify()
            return web.json_response(obj)
        return failure(405, "MethodNotAllowed", f"{request.method} is not supported")

    def _written(
        self, request: web.Request, obj: Object, unknown: list[str], *, status: int = 200
    ) -> web.Response:
        response = web.json_response(obj, status=status)
        if request.query.get("fieldValidation") == "Ignore":
            return response  # pruned without a word (kubectl --validate=false)
        for path in unknown:  # fieldValidation=Warn, the default: pruned, with a warning
            warning = json.dumps(f"unknown field {json.dumps(path)}")
            response.headers.add("Warning", f"299 - {warning}")
        return response

    def _list(self, resource: str, namespace: str | None, *, table: bool = False) -> web.Response:
        api_version, kind, _ = RESOURCES[resource]
        items = [
            obj
            for (res, ns, _name), obj in sorted(self.store.objects.items(), key=lambda kv: kv[0][2])
            if res == resource and (namespace is None or ns == namespace)
        ]
        if table and resource == PLURAL:
            return web.json_response(self.crd.table(items, resource_version=str(self.store.rv)))
        body = {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": items,
        }
        return web.json_response(body)

    async def _post_event(self, request: web.Request, namespace: str) -> web.Response:
        body = await request.json()
        body.setdefault("metadata", {})
        body["metadata"]["namespace"] = namespace
        body["metadata"]["name"] = (
            f"{body['metadata'].get('generateName', 'event-')}{len(self.events)}"
        )
        self.events.append(body)
        return web.json_response(body, status=201)

    async def _watch(
        self, request: web.Request, resource: str, namespace: str | None
    ) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.store.rv)
        timeout = float(request.query.get("timeoutSeconds") or self.watch_timeout)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        # kubectl get -w: each event's object is a Table of one row; only the first event
        # carries the column definitions, as kube-apiserver's watch encoder does.
        tables = resource == PLURAL and _wants_table(request)
        columns_sent = False
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event: Object) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        if since < self.store.oldest_rv:
            self.expired_watches += 1
            expired = f"too old resource version: {since} ({self.store.oldest_rv})"
            await send({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                        "status": "Failure", "message": expired, "reason": "Expired",
                        "code": 410}})  # fmt: skip
            return response

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        position = since
        try:
            while not self._closing.is_set():
                for change in self.store.changes:
                    if change.resource_version <= position:
                        continue
                    position = change.resource_version
                    if change.resource == resource and namespace in (None, change.namespace):
                        obj = change.object
                        if tables:
                            obj = self.crd.table([obj], resource_version=str(position))
                            if columns_sent:
                                obj["columnDefinitions"] = None
                            columns_sent = True
                        await send({"type": change.type, "object": obj})
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                async with self._changed:
                    if self.store.changes and self.store.changes[-1].resource_version > position:
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=remaining)
            if bookmarks and not self._closing.is_set():
                api_version, kind, _ = RESOURCES[resource]
                meta = {"resourceVersion": str(position)}
                bookmark = {"apiVersion": api_version, "kind": kind, "metadata": meta}
                await send({"type": "BOOKMARK", "object": bookmark})
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response


def _strict(request: web.Request) -> bool:
    return request.query.get("fieldValidation") == "Strict"


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")
