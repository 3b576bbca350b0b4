"""Discovery and OpenAPI: what kopf and ``kubectl`` read before they touch a TaskTracking.

Discovery (``/api``, ``/apis``, the group-versions' resource lists) tells clients which
resources exist, their verbs and short names (``tt``).

The OpenAPI v3 documents are what ``kubectl`` reads before it writes a TaskTracking.

``kubectl apply``/``create``/``patch`` validate by default (``--validate=strict``): kubectl
looks in ``/openapi/v3`` whether the server takes ``fieldValidation`` on the resource's
PATCH and, when it does, leaves the checking to the server (``fieldValidation=Strict``);
otherwise it downloads the schema to validate on the client. ``kubectl apply`` also reads
the resource's PATCH request types there: without ``strategic-merge-patch+json`` (custom
resources never take it) it sends a JSON merge patch. So the documents below hold what a
real API server publishes for a CRD's group-version, cut to what kubectl reads: the
resource's paths with their operations, parameters, request types and
``x-kubernetes-group-version-kind``, and the CRD's schema as the component.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from .crd import CustomResource
from .store import GROUP, KIND, PLURAL, VERSION

Object = dict[str, Any]


def failure(code: int, reason: str, message: str) -> web.Response:
    """A Status response (the body of every error the API server answers)."""
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


class Discovery:
    """The discovery and OpenAPI endpoints, for one CRD."""

    def __init__(self, crd: CustomResource) -> None:
        self.crd = crd
        self.installed = True  # False: a cluster without the CRD (for `task-tracking doctor`)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/version", self.version),
            web.get("/api", self.api_versions),
            web.get("/api/v1", self.core_resources),
            web.get("/apis", self.api_groups),
            web.get("/apis/{group}/{version}", self.group_resources),
            web.get("/openapi/v2", self.openapi_v2),
            web.get("/openapi/v3", self.openapi_v3),
            web.get("/openapi/v3/apis/{group}/{version}", self.openapi_v3_group),
        ]

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-inmemory"})

    async def api_versions(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIVersions", "versions": ["v1"]})

    async def core_resources(self, request: web.Request) -> web.Response:
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

    async def openapi_v2(self, request: web.Request) -> web.Response:
        if "protobuf" not in request.headers.get("Accept", ""):
            return failure(406, "NotAcceptable", "only the protobuf OpenAPI v2 is served")
        mime = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
        return web.Response(body=openapi_v2_protobuf(), content_type=mime)

    async def openapi_v3(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_v3_root(self.crd))

    async def openapi_v3_group(self, request: web.Request) -> web.Response:
        group, version = request.match_info["group"], request.match_info["version"]
        if (group, version) != (self.crd.group, self.crd.version):
            return failure(404, "NotFound", f"no OpenAPI document for {group}/{version}")
        return web.json_response(openapi_v3_group(self.crd))

    async def api_groups(self, request: web.Request) -> web.Response:
        def group(name: str, version: str) -> Object:
            gv = {"groupVersion": f"{name}/{version}", "version": version}
            return {"name": name, "versions": [gv], "preferredVersion": gv}

        groups = [
            *([group(GROUP, VERSION)] if self.installed else []),
            group("events.k8s.io", "v1"),
            group("apiextensions.k8s.io", "v1"),
        ]
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def group_resources(self, request: web.Request) -> web.Response:
        group, version = request.match_info["group"], request.match_info["version"]
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        resources: list[Object]
        if (group, version) == (GROUP, VERSION) and self.installed:
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
            return failure(404, "NotFound", f"group {group}/{version} not served")
        body = {"kind": "APIResourceList", "groupVersion": f"{group}/{version}"}
        return web.json_response({**body, "resources": resources})


_PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
)


def openapi_v2_protobuf() -> bytes:
    """``GET /openapi/v2`` for kubectl before 1.25 (Debian's kubernetes-client is 1.20), which
    validates on the client and reads only the protobuf form (gnostic's OpenAPI v2
    ``Document``). This one declares no definitions: kubectl finds no schema for TaskTracking
    and leaves the whole check to the server, which prunes unknown fields with a warning
    (those versions send no ``fieldValidation``). A real server would publish the CRD's
    schema here too; kubectl's client-side check of it adds nothing the server's misses."""

    def field(number: int, payload: bytes) -> bytes:  # length-delimited protobuf field
        return bytes([number << 3 | 2, len(payload)]) + payload

    info = field(1, b"Kubernetes") + field(2, b"v1.30.0")  # Info.title, Info.version
    return field(1, b"2.0") + field(2, info)  # Document.swagger, Document.info


def openapi_v3_root(crd: CustomResource) -> Object:
    """``GET /openapi/v3``: the group-versions and where their documents are."""
    digest = hashlib.sha256(json.dumps(openapi_v3_group(crd), sort_keys=True).encode())
    path = f"apis/{crd.group}/{crd.version}"
    return {"paths": {path: {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest.hexdigest()}"}}}


def openapi_v3_group(crd: CustomResource) -> Object:
    """``GET /openapi/v3/apis/<group>/<version>``: the CRD's resource as kubectl reads it."""
    plural = crd.names["plural"]
    gvk = {"group": crd.group, "version": crd.version, "kind": crd.kind}
    component = f"{'.'.join(reversed(crd.group.split('.')))}.{crd.version}.{crd.kind}"
    ref = {"$ref": f"#/components/schemas/{component}"}
    body = {"content": {"application/json": {"schema": ref}}}

    def operation(verb: str, name: str, *, patch: bool = False, validated: bool = False) -> Object:
        parameters: list[Object] = [
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
        ]
        if validated:
            parameters.append(
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"},
                 "description": "Ignore, Warn (the default) or Strict: unknown fields"},
            )  # fmt: skip
        op: Object = {
            "operationId": f"{verb}{crd.kind}",
            "parameters": parameters,
            "responses": {"200": body},
            "x-kubernetes-action": name,
            "x-kubernetes-group-version-kind": gvk,
        }
        if patch:
            content = {t: {"schema": {"type": "object"}} for t in _PATCH_TYPES}
            op["requestBody"] = {"content": content, "required": True}
        elif verb in ("create", "replace"):
            op["requestBody"] = {**body, "required": True}
        return op

    namespaced = f"/apis/{crd.group}/{crd.version}/namespaces/{{namespace}}/{plural}"
    names = [{"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}}]
    named = [*names, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    item = {
        "get": operation("read", "get"),
        "put": operation("replace", "put", validated=True),
        "patch": operation("patch", "patch", patch=True, validated=True),
        "delete": operation("delete", "delete"),
        "parameters": named,
    }
    status = {
        "get": operation("readStatus", "get"),
        "patch": operation("patchStatus", "patch", patch=True, validated=True),
        "parameters": named,
    }
    collection = {
        "get": operation("list", "list"),
        "post": operation("create", "post", validated=True),
        "parameters": names,
    }
    schema = {**crd.schema, "x-kubernetes-group-version-kind": [gvk]}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"},
        "paths": {
            namespaced: collection,
            f"{namespaced}/{{name}}": item,
            f"{namespaced}/{{name}}/status": status,
        },
        "components": {"schemas": {component: schema}},
    }
