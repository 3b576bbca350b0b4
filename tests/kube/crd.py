"""The TaskTracking CRD as it ships, and what kube-apiserver does with it on every write.

:class:`CustomResource` loads ``manifests/crd/`` (the chart's copy is byte-identical,
``tests/chart`` checks it), compiles its CEL rules once, and admits an object the way the
API server's custom-resource strategy does: prune unknown fields, apply defaults,
validate against the OpenAPI v3 schema, then evaluate the CEL rules (skipped, with one
more error, when the schema found a type error, as the API server does), ratcheting
unchanged values on update. A refusal is an :class:`Invalid` carrying the
``422 Invalid`` Status body that kube-apiserver sends.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import yaml

from . import cel, schema
from .schema import FieldError

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "manifests/crd/tasktrackings.alakai.io.yaml"

Object = dict[str, Any]

_NOT_CHECKED = (
    "some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation"
)


class Invalid(Exception):
    """A write refused by the schema or a CEL rule: 422, reason Invalid."""

    def __init__(self, group: str, kind: str, name: str, errors: list[FieldError]) -> None:
        self.group, self.kind, self.name, self.errors = group, kind, name, errors
        super().__init__(self.message)

    @property
    def message(self) -> str:
        # errors.NewInvalid: one error as is, several as "[a, b]" (utilerrors.Aggregate)
        texts = [str(e) for e in self.errors]
        listed = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
        return f'{self.kind}.{self.group} "{self.name}" is invalid: {listed}'

    def status(self) -> Object:
        causes = [{"reason": e.reason, "message": e.body(), "field": e.field} for e in self.errors]
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": "Invalid",
            "details": {
                "name": self.name,
                "group": self.group,
                "kind": self.kind,
                "causes": causes,
            },
            "code": 422,
        }


class CustomResource:
    """One served version of a CRD: its schema, compiled rules and printer columns."""

    def __init__(self, crd: Object | None = None, version: str | None = None) -> None:
        crd = crd if crd is not None else yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
        self.crd = crd
        spec = crd["spec"]
        self.group: str = spec["group"]
        self.names: Object = spec["names"]
        self.kind: str = spec["names"]["kind"]
        served = [v for v in spec["versions"] if v.get("served")]
        chosen = next(v for v in served if version in (None, v["name"]))
        self.version: str = chosen["name"]
        self.schema: schema.Schema = chosen["schema"]["openAPIV3Schema"]
        self.printer_columns: list[Object] = chosen.get("additionalPrinterColumns") or []
        self.rules = cel.compile_rules(self.schema)

    def admit(
        self, obj: Object, old: Object | None = None, *, unknown: list[str] | None = None
    ) -> Object:
        """The object as stored (pruned, defaulted); raises Invalid like the API server.

        The paths of pruned unknown fields are appended to ``unknown`` (the API server
        warns about them, or refuses them with ``fieldValidation=Strict``)."""
        pruned = schema.prune(obj, self.schema, root=True, dropped=unknown)
        admitted: Object = schema.apply_defaults(pruned, self.schema)
        if old is not None:  # the API server defaults what it reads from storage too
            old = schema.apply_defaults(schema.prune(old, self.schema, root=True), self.schema)
        errors = self.errors(admitted, old)
        if errors:
            name = str((admitted.get("metadata") or {}).get("name", ""))
            raise Invalid(self.group, self.kind, name, errors)
        return admitted

    def unknown_fields(self, obj: Object, found: list[str]) -> None:
        """Append the paths of the fields pruning would drop from ``obj``."""
        schema.prune(obj, self.schema, root=True, dropped=found)

    def errors(self, obj: Object, old: Object | None = None) -> list[FieldError]:
        """Schema errors, then CEL rule errors (unless a type error blocks them)."""
        errors = schema.validate(obj, self.schema)
        if old is not None:
            errors = schema.ratchet(errors, obj, old)
        blocking = [e for e in errors if e.kind in (schema.TYPE_INVALID, schema.NOT_SUPPORTED)]
        if blocking:
            return [*errors, FieldError(schema.INVALID, "<nil>", None, _NOT_CHECKED)]
        rule_errors = cel.evaluate(self.rules, obj, old)
        if old is not None:
            rule_errors = schema.ratchet(rule_errors, obj, old)
        return errors + rule_errors

    # ------------------------------------------------------------------ kubectl get

    def table(self, objects: list[Object], *, resource_version: str) -> Object:
        """A meta.k8s.io/v1 Table from the printer columns, as the API server serves
        ``kubectl get`` (``Accept: application/json;as=Table;v=v1;g=meta.k8s.io``)."""
        columns: list[Object] = [
            {"name": "Name", "type": "string", "format": "name", "priority": 0,
             "description": "Name must be unique within a namespace."},
        ]  # fmt: skip
        for column in self.printer_columns:
            columns.append(
                {
                    "name": column["name"],
                    "type": column["type"],
                    "format": column.get("format", ""),
                    "description": column.get("description", ""),
                    "priority": column.get("priority", 0),
                }
            )
        rows = []
        for obj in objects:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column in self.printer_columns:
                cells.append(_cell(obj, column))
            meta = copy.deepcopy(obj["metadata"])
            partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}
            rows.append({"cells": cells, "object": {**partial, "metadata": meta}})
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns,
            "rows": rows,
        }


def _cell(obj: Object, column: Object) -> Any:
    value: Any = obj
    for key in column["jsonPath"].lstrip(".").split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if column["type"] == "date" and isinstance(value, str):
        return _age(value)
    if column["type"] == "string":
        return f"{value}"
    return value


def _age(timestamp: str) -> str:
    """The API server's table convertor shows a date column as an age: HumanDuration of
    k8s.io/apimachinery/pkg/util/duration ("0s", "5m3s", "3h", "2d4h")."""
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return human_duration((datetime.datetime.now(datetime.UTC) - then).total_seconds())


def human_duration(seconds_float: float) -> str:
    """duration.HumanDuration, branch for branch."""
    seconds = int(seconds_float)
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m" if seconds % 60 == 0 else f"{minutes}m{seconds % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = seconds // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"
