"""The OpenAPI v3 documents ``kubectl`` reads before it writes a TaskTracking.

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

from .crd import CustomResource

Object = dict[str, Any]

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
