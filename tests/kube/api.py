"""A small in-memory Kubernetes API server that kopf runs against for real, over HTTP.

No API server can be installed on the build machines, so the operator tests own this one.
It serves only what kopf needs for one namespaced custom resource with a status subresource,
and copies the Kubernetes semantics kopf depends on (DESIGN.md, "Known pitfalls"):

- ``resourceVersion`` is one global counter that grows on every real change;
- ``metadata.generation`` grows on spec changes only;
- a merge patch that changes nothing is not persisted: no new resourceVersion, no watch event;
- ``/status`` writes change only the status; status in writes to the main resource is ignored;
- watches end after ``timeoutSeconds``; a resourceVersion older than the retained history
  (see :meth:`KubeAPI.compact`) gets "410 Gone" in the stream;
- with ``namespaced_only=True``, cluster-scoped lists and watches answer 403 like a namespaced
  Role would;
- every TaskTracking write (create, merge patch, status) is admitted as kube-apiserver admits
  it against the CRD that ships (``tests/kube/crd.py``: pruning, defaults, OpenAPI schema,
  CEL rules): a refusal is the same ``422 Invalid`` Status; unknown fields are pruned with
  a ``Warning`` header, or refused with ``fieldValidation=Strict`` (kubectl's default);
- ``kubectl get`` gets the CRD's printer columns as a ``meta.k8s.io/v1`` Table
  (``tests/kube/kubectl.py`` serves the rest kubectl asks for).

Every request is logged (:attr:`KubeAPI.requests`) and every posted Event is kept
(:attr:`KubeAPI.events`), so tests can assert what the operator wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from . import kubectl
from .crd import CustomResource, Invalid

GROUP = "alakai.io"
VERSION = "v1alpha1"
PLURAL = "tasktrackings"
KIND = "TaskTracking"
API_VERSION = f"{GROUP}/{VERSION}"

# Resource name -> (apiVersion, kind of the items, namespaced?)
_RESOURCES: dict[str, tuple[str, str, bool]] = {
    "namespaces": ("v1", "Namespace", False),
    "events": ("v1", "Event", True),
    "customresourcedefinitions": ("apiextensions.k8s.io/v1", "CustomResourceDefinition", False),
    PLURAL: (API_VERSION, KIND, True),
}

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


@dataclasses.dataclass(frozen=True)
class _Change:
    resource_version: int
    resource: str
    namespace: str | None
    type: str
    object: Object


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value, leaves the arguments intact."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


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
        self._rv = 0
        self._objects: dict[tuple[str, str | None, str], Object] = {}
        self._changes: list[_Change] = []
        self._oldest_rv = 0  # watches from an older resourceVersion get "410 Gone"
        self.expired_watches = 0  # how many watches were answered "410 Gone"
        self._changed = asyncio.Condition()
        self._names = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> KubeAPI:
        app = web.Application(middlewares=[self._log_request])
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._api_versions)
        app.router.add_get("/api/v1", self._core_resources)
        app.router.add_get("/apis", self._api_groups)
        app.router.add_get("/apis/{group}/{version}", self._group_resources)
        app.router.add_get("/openapi/v2", self._openapi_v2)
        app.router.add_get("/openapi/v3", self._openapi_v3)
        app.router.add_get("/openapi/v3/apis/{group}/{version}", self._openapi_v3_group)
        app.router.add_route("*", "/{path:.*}", self._resource)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self.ensure_namespace("default")
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
        if ("namespaces", None, namespace) not in self._objects:
            self._store("namespaces", None, {"metadata": {"name": namespace}}, "ADDED")

    async def create(self, namespace: str, body: Object, *, checked: bool = True) -> Object:
        """Create a TaskTracking (as ``kubectl create`` would); returns the stored object.

        ``checked=False`` stores it unadmitted: an object written before the CRD had its
        current schema and rules, which a real cluster still serves as stored."""
        self.ensure_namespace(namespace)
        obj = self._create(PLURAL, namespace, body, checked=checked)
        await self._notify()
        return copy.deepcopy(obj)

    async def patch_spec(
        self, namespace: str, name: str, patch: Object, *, checked: bool = True
    ) -> Object:
        """Merge-patch the spec of a TaskTracking (``checked`` as for :meth:`create`)."""
        obj = self._patch(
            PLURAL, namespace, name, {"spec": patch}, subresource=None, checked=checked
        )
        await self._notify()
        return copy.deepcopy(obj)

    async def patch_status(
        self, namespace: str, name: str, patch: Object, *, checked: bool = True
    ) -> Object:
        """Merge-patch the status of a TaskTracking (as another writer would)."""
        obj = self._patch(
            PLURAL, namespace, name, {"status": patch}, subresource="status", checked=checked
        )
        await self._notify()
        return copy.deepcopy(obj)

    async def delete(self, namespace: str, name: str) -> None:
        self._delete(PLURAL, namespace, name)
        await self._notify()

    def get(self, namespace: str, name: str) -> Object | None:
        obj = self._objects.get((PLURAL, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def compact(self) -> None:
        """Forget the change history: watches from an older resourceVersion get 410 Gone.

        The resourceVersion moves on (as other resources change in a real cluster), so a
        fresh list gives a version that can be watched again.
        """
        self._changes.clear()
        self._oldest_rv = self._next_rv()

    @property
    def resource_version(self) -> int:
        return self._rv

    # ----------------------------------------------------------------- storage

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _store(self, resource: str, namespace: str | None, obj: Object, kind: str) -> Object:
        api_version, item_kind, _ = _RESOURCES[resource]
        obj["apiVersion"] = api_version
        obj["kind"] = item_kind
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._next_rv())
        if kind == "ADDED":
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
        key = (resource, namespace, meta["name"])
        if kind == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        self._changes.append(_Change(self._rv, resource, namespace, kind, copy.deepcopy(obj)))
        return obj

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _create(
        self,
        resource: str,
        namespace: str | None,
        body: Object,
        *,
        checked: bool = True,
        unknown: list[str] | None = None,
        strict: bool = False,
    ) -> Object:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{next(self._names):05d}"
        if not meta.get("name"):
            raise web.HTTPUnprocessableEntity(text="metadata.name is required")
        if (resource, namespace, meta["name"]) in self._objects:
            raise _Conflict(f'{resource} "{meta["name"]}" already exists')
        if namespace is not None:
            meta["namespace"] = namespace
        meta.pop("resourceVersion", None)
        if resource == PLURAL:
            meta["generation"] = 1
            obj.pop("status", None)  # status subresource: creation ignores the status
            if checked:
                obj = self._admit(obj, None, unknown=unknown, strict=strict)
        return self._store(resource, namespace, obj, "ADDED")

    def _patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Object,
        *,
        subresource: str | None,
        checked: bool = True,
        unknown: list[str] | None = None,
        strict: bool = False,
    ) -> Object:
        old = self._objects.get((resource, namespace, name))
        if old is None:
            raise _NotFound(f'{resource} "{name}" not found')
        if subresource == "status":
            new = copy.deepcopy(old)
            status = merge_patch(old.get("status", {}), patch.get("status") or {})
            if status:
                new["status"] = status
            else:
                new.pop("status", None)
        else:
            patch = {k: v for k, v in patch.items() if k not in ("status", "apiVersion", "kind")}
            meta_patch = patch.get("metadata") or {}
            immutable = ("name", "namespace", "uid", "generation", "creationTimestamp")
            meta_patch = {k: v for k, v in meta_patch.items() if k not in immutable}
            meta_patch.pop("resourceVersion", None)
            patch = {**patch, "metadata": meta_patch} if "metadata" in patch else patch
            new = merge_patch(old, patch)
            for key in ("annotations", "labels", "finalizers"):
                if new["metadata"].get(key) in ({}, []):
                    del new["metadata"][key]
        if resource == PLURAL and checked:
            # pruned and defaulted before comparing: a patch of unknown fields changes nothing
            new = self._admit(new, old, unknown=unknown, strict=strict)
        if subresource != "status" and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if _without_rv(new) == _without_rv(old):
            return old  # nothing changed: not persisted, no new resourceVersion, no event
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._store(resource, namespace, new, "DELETED")
        return self._store(resource, namespace, new, "MODIFIED")

    def _delete(self, resource: str, namespace: str | None, name: str) -> Object:
        old = self._objects.get((resource, namespace, name))
        if old is None:
            raise _NotFound(f'{resource} "{name}" not found')
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            return self._store(resource, namespace, new, "MODIFIED")
        return self._store(resource, namespace, copy.deepcopy(old), "DELETED")

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
        except _NotFound as e:
            return _status(404, "NotFound", str(e))
        except _Conflict as e:
            return _status(409, "AlreadyExists", str(e))
        except Invalid as e:
            return web.json_response(e.status(), status=422)
        except _StrictDecoding as e:
            return _status(400, "BadRequest", str(e))
        return response

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-inmemory"})

    async def _api_versions(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def _core_resources(self, request: web.Request) -> web.Response:
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        resources = [
            {"name": "namespaces", "singularName": "namespace", "namespaced": False,
             "kind": "Namespace", "verbs": verbs, "shortNames": ["ns"]},
            {"name": "events", "singularName": "event", "namespaced": True,
             "kind": "Event", "verbs": verbs, "shortNames": ["ev"]},
        ]  # fmt: skip
        return web.json_response(
            {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources}
        )

    async def _openapi_v2(self, request: web.Request) -> web.Response:
        if "protobuf" not in request.headers.get("Accept", ""):
            return _status(406, "NotAcceptable", "only the protobuf OpenAPI v2 is served")
        mime = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
        return web.Response(body=kubectl.openapi_v2_protobuf(), content_type=mime)

    async def _openapi_v3(self, request: web.Request) -> web.Response:
        return web.json_response(kubectl.openapi_v3_root(self.crd))

    async def _openapi_v3_group(self, request: web.Request) -> web.Response:
        group, version = request.match_info["group"], request.match_info["version"]
        if (group, version) != (self.crd.group, self.crd.version):
            return _status(404, "NotFound", f"no OpenAPI document for {group}/{version}")
        return web.json_response(kubectl.openapi_v3_group(self.crd))

    async def _api_groups(self, request: web.Request) -> web.Response:
        def group(name: str, version: str) -> Object:
            gv = {"groupVersion": f"{name}/{version}", "version": version}
            return {"name": name, "versions": [gv], "preferredVersion": gv}

        groups = [
            group(GROUP, VERSION),
            group("events.k8s.io", "v1"),
            group("apiextensions.k8s.io", "v1"),
        ]
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _group_resources(self, request: web.Request) -> web.Response:
        group, version = request.match_info["group"], request.match_info["version"]
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        resources: list[Object]
        if (group, version) == (GROUP, VERSION):
            resources = [
                {"name": PLURAL, "singularName": "tasktracking", "namespaced": True,
                 "kind": KIND, "verbs": verbs, "shortNames": ["tt"]},
                {"name": f"{PLURAL}/status", "singularName": "", "namespaced": True,
                 "kind": KIND, "verbs": ["get", "patch", "update"]},
            ]  # fmt: skip
        elif (group, version) == ("events.k8s.io", "v1"):
            resources = [
                {"name": "events", "singularName": "event", "namespaced": True,
                 "kind": "Event", "verbs": verbs, "shortNames": ["ev"]},
            ]  # fmt: skip
        elif (group, version) == ("apiextensions.k8s.io", "v1"):
            resources = [
                {"name": "customresourcedefinitions", "singularName": "customresourcedefinition",
                 "namespaced": False, "kind": "CustomResourceDefinition", "verbs": verbs,
                 "shortNames": ["crd", "crds"]},
            ]  # fmt: skip
        else:
            return _status(404, "NotFound", f"group {group}/{version} not served")
        body = {"kind": "APIResourceList", "groupVersion": f"{group}/{version}"}
        return web.json_response({**body, "resources": resources})

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
        if not rest or rest[0] not in _RESOURCES:
            return None
        resource, rest = rest[0], rest[1:]
        name = rest[0] if rest else None
        subresource = rest[1] if len(rest) > 1 else None
        return resource, namespace, name, subresource

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        if route is None:
            return _status(404, "NotFound", f"the server could not find {request.path}")
        resource, namespace, name, subresource = route
        namespaced = _RESOURCES[resource][2]
        if not namespaced:
            namespace = None
        if resource == "events" and request.method == "POST" and namespace is not None:
            return await self._post_event(request, namespace)

        if name is None and request.method == "GET":
            if self.namespaced_only and (namespace is None):
                return _status(
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
                self.ensure_namespace(namespace)
            body = await request.json()
            obj = self._create(resource, namespace, body, unknown=unknown, strict=_strict(request))
            await self._notify()
            return self._written(request, obj, unknown, status=201)
        if name is None:
            return _status(405, "MethodNotAllowed", f"{request.method} needs a name")
        if request.method == "GET":
            obj = self._objects.get((resource, namespace, name))
            if obj is None:
                return _status(404, "NotFound", f'{resource} "{name}" not found')
            if resource == PLURAL and _wants_table(request):
                return web.json_response(self.crd.table([obj], resource_version=str(self._rv)))
            return web.json_response(obj)
        if request.method == "PATCH":
            if request.content_type != "application/merge-patch+json":
                return _status(
                    415, "UnsupportedMediaType", f"{request.content_type} is not supported"
                )
            obj = self._patch(
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
            obj = self._delete(resource, namespace, name)
            await self._notify()
            return web.json_response(obj)
        return _status(405, "MethodNotAllowed", f"{request.method} is not supported")

    def _admit(
        self, obj: Object, old: Object | None, *, unknown: list[str] | None, strict: bool
    ) -> Object:
        # Decoding comes first: fieldValidation=Strict (kubectl's default) refuses unknown
        # fields before the schema and the rules are looked at; otherwise they are pruned.
        dropped: list[str] = []
        admitted = self.crd.admit(obj, old, unknown=dropped) if not strict else None
        if strict:
            self.crd.unknown_fields(obj, dropped)
            if dropped:
                fields = ", ".join(f"unknown field {json.dumps(f)}" for f in dropped)
                raise _StrictDecoding(
                    f"{KIND} in version {json.dumps(VERSION)} cannot be handled as a {KIND}:"
                    f" strict decoding error: {fields}"
                )
            admitted = self.crd.admit(obj, old)
        if unknown is not None:
            unknown += dropped
        assert admitted is not None
        return admitted

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
        api_version, kind, _ = _RESOURCES[resource]
        items = [
            obj
            for (res, ns, _name), obj in sorted(self._objects.items(), key=lambda kv: kv[0][2])
            if res == resource and (namespace is None or ns == namespace)
        ]
        if table and resource == PLURAL:
            return web.json_response(self.crd.table(items, resource_version=str(self._rv)))
        body = {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
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
        since = int(request.query.get("resourceVersion") or self._rv)
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

        if since < self._oldest_rv:
            self.expired_watches += 1
            expired = f"too old resource version: {since} ({self._oldest_rv})"
            await send({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                        "status": "Failure", "message": expired, "reason": "Expired",
                        "code": 410}})  # fmt: skip
            return response

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        position = since
        try:
            while not self._closing.is_set():
                for change in self._changes:
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
                    if self._changes and self._changes[-1].resource_version > position:
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=remaining)
            if bookmarks and not self._closing.is_set():
                api_version, kind, _ = _RESOURCES[resource]
                meta = {"resourceVersion": str(position)}
                bookmark = {"apiVersion": api_version, "kind": kind, "metadata": meta}
                await send({"type": "BOOKMARK", "object": bookmark})
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response


def _without_rv(obj: Object) -> Object:
    clone = copy.deepcopy(obj)
    clone.get("metadata", {}).pop("resourceVersion", None)
    return clone


class _NotFound(Exception):
    pass


class _Conflict(Exception):
    pass


class _StrictDecoding(Exception):
    pass


def _strict(request: web.Request) -> bool:
    return request.query.get("fieldValidation") == "Strict"


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")
