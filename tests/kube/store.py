"""The objects of the tests' Kubernetes API and the semantics of writing them.

Kept apart from the HTTP layer (``api.py``) so that what a write does (resourceVersion,
generation, merge patch, status subresource, admission against the CRD, finalizers) reads
in one place:

- ``resourceVersion`` is one global counter that grows on every real change;
- ``metadata.generation`` grows on spec changes only;
- a merge patch that changes nothing is not persisted: no new resourceVersion, no event;
- ``/status`` writes change only the status; status in writes to the main resource is
  ignored;
- TaskTracking writes are admitted against the CRD (``crd.py``) unless ``checked=False``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import itertools
import json
import uuid
from typing import Any

from aiohttp import web

from .crd import CustomResource

GROUP = "alakai.io"
VERSION = "v1alpha1"
PLURAL = "tasktrackings"
KIND = "TaskTracking"
API_VERSION = f"{GROUP}/{VERSION}"

# Resource name -> (apiVersion, kind of the items, namespaced?)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "namespaces": ("v1", "Namespace", False),
    "events": ("v1", "Event", True),
    "customresourcedefinitions": ("apiextensions.k8s.io/v1", "CustomResourceDefinition", False),
    PLURAL: (API_VERSION, KIND, True),
}

Object = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Change:
    """One change, as a watch sends it."""

    resource_version: int
    resource: str
    namespace: str | None
    type: str
    object: Object


class ObjectStore:
    """Every stored object by (resource, namespace, name), and the history of changes."""

    def __init__(self, crd: CustomResource) -> None:
        self.crd = crd
        self.rv = 0
        self.objects: dict[tuple[str, str | None, str], Object] = {}
        self.changes: list[Change] = []
        self.oldest_rv = 0  # watches from an older resourceVersion get "410 Gone"
        self._names = itertools.count(1)

    def ensure_namespace(self, namespace: str) -> None:
        if ("namespaces", None, namespace) not in self.objects:
            self.put("namespaces", None, {"metadata": {"name": namespace}}, "ADDED")

    def compact(self) -> None:
        """Forget the change history (see KubeAPI.compact)."""
        self.changes.clear()
        self.oldest_rv = self.next_rv()

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, resource: str, namespace: str | None, obj: Object, kind: str) -> Object:
        api_version, item_kind, _ = RESOURCES[resource]
        obj["apiVersion"] = api_version
        obj["kind"] = item_kind
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.next_rv())
        if kind == "ADDED":
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
        key = (resource, namespace, meta["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.changes.append(Change(self.rv, resource, namespace, kind, copy.deepcopy(obj)))
        return obj

    def create(
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
        if (resource, namespace, meta["name"]) in self.objects:
            raise Conflict(f'{resource} "{meta["name"]}" already exists')
        if namespace is not None:
            meta["namespace"] = namespace
        meta.pop("resourceVersion", None)
        if resource == PLURAL:
            meta["generation"] = 1
            obj.pop("status", None)  # status subresource: creation ignores the status
            if checked:
                obj = self.admit(obj, None, unknown=unknown, strict=strict)
        return self.put(resource, namespace, obj, "ADDED")

    def patch(
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
        old = self.objects.get((resource, namespace, name))
        if old is None:
            raise NotFound(f'{resource} "{name}" not found')
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
        return self._commit(
            resource, namespace, old, new, subresource, checked=checked, unknown=unknown,
            strict=strict,
        )  # fmt: skip

    def update(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        body: Object,
        *,
        subresource: str | None,
        checked: bool = True,
        unknown: list[str] | None = None,
        strict: bool = False,
    ) -> Object:
        """PUT: the whole object replaced (``kubectl replace``), or its whole status."""
        old = self.objects.get((resource, namespace, name))
        if old is None:
            raise NotFound(f'{resource} "{name}" not found')
        given = (body.get("metadata") or {}).get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise Stale(
                f'Operation cannot be fulfilled on {resource}.{GROUP} "{name}": the object has'
                " been modified; please apply your changes to the latest version and try again"
            )
        new = copy.deepcopy(old)
        if subresource == "status":
            new.pop("status", None)
            if body.get("status"):
                new["status"] = copy.deepcopy(body["status"])
        else:
            new = {k: copy.deepcopy(v) for k, v in body.items() if k != "status"}
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            meta = new.setdefault("metadata", {})
            for key in ("name", "namespace", "uid", "generation", "creationTimestamp"):
                if key in old["metadata"]:
                    meta[key] = old["metadata"][key]
        return self._commit(
            resource, namespace, old, new, subresource, checked=checked, unknown=unknown,
            strict=strict,
        )  # fmt: skip

    def _commit(
        self,
        resource: str,
        namespace: str | None,
        old: Object,
        new: Object,
        subresource: str | None,
        *,
        checked: bool,
        unknown: list[str] | None,
        strict: bool,
    ) -> Object:
        if resource == PLURAL and checked:
            # pruned and defaulted before comparing: a patch of unknown fields changes nothing
            new = self.admit(new, old, unknown=unknown, strict=strict)
        if subresource != "status" and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if _without_rv(new) == _without_rv(old):
            return old  # nothing changed: not persisted, no new resourceVersion, no event
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self.put(resource, namespace, new, "DELETED")
        return self.put(resource, namespace, new, "MODIFIED")

    def delete(self, resource: str, namespace: str | None, name: str) -> Object:
        old = self.objects.get((resource, namespace, name))
        if old is None:
            raise NotFound(f'{resource} "{name}" not found')
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            return self.put(resource, namespace, new, "MODIFIED")
        return self.put(resource, namespace, copy.deepcopy(old), "DELETED")

    def admit(
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
                raise StrictDecoding(
                    f"{KIND} in version {json.dumps(VERSION)} cannot be handled as a {KIND}:"
                    f" strict decoding error: {fields}"
                )
            admitted = self.crd.admit(obj, old)
        if unknown is not None:
            unknown += dropped
        assert admitted is not None
        return admitted


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _without_rv(obj: Object) -> Object:
    clone = copy.deepcopy(obj)
    clone.get("metadata", {}).pop("resourceVersion", None)
    return clone


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class StrictDecoding(Exception):
    pass


class Stale(Exception):
    """An update whose resourceVersion is not the stored one (409 Conflict)."""
