"""Structural OpenAPI v3 schema of a CRD, applied the way kube-apiserver applies it.

For every write of a custom resource the API server prunes unknown fields, fills in
defaults and validates the result (types, enums, bounds, lengths, patterns, required,
formats, ``additionalProperties``), then evaluates the ``x-kubernetes-validations`` CEL
rules (``tests/kube/cel.py``). The errors are reported as ``field.Error`` values: the
same field paths, reasons and message bodies as kube-apiserver's
(``k8s.io/apimachinery/pkg/util/validation/field`` over kube-openapi's validator), so
what a test sees is what ``kubectl`` prints in a cluster.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import re
from typing import Any

Schema = dict[str, Any]

# field.ErrorType: the cause's machine-readable reason and its human-readable word.
REQUIRED = ("FieldValueRequired", "Required value")
INVALID = ("FieldValueInvalid", "Invalid value")
TYPE_INVALID = ("FieldValueTypeInvalid", "Invalid value")
NOT_SUPPORTED = ("FieldValueNotSupported", "Unsupported value")
FORBIDDEN = ("FieldValueForbidden", "Forbidden")
TOO_LONG = ("FieldValueTooLong", "Too long")
DUPLICATE = ("FieldValueDuplicate", "Duplicate value")
_WITHOUT_VALUE = {REQUIRED, FORBIDDEN, TOO_LONG}

_OMIT = object()


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One ``field.Error``: where, what kind, the offending value and the detail."""

    kind: tuple[str, str]
    field: str  # "spec.archive.bucket"; "<nil>" for an error on no field
    bad_value: Any = _OMIT
    detail: str = ""
    node: tuple[str, ...] = ()  # the schema node it came from, for ratcheting updates

    @property
    def reason(self) -> str:
        return self.kind[0]

    def body(self) -> str:
        """``ErrorBody()``: the message without the field, as in a Status cause."""
        if self.kind in _WITHOUT_VALUE or self.bad_value is _OMIT:
            text = self.kind[1]
        else:
            text = f"{self.kind[1]}: {go_value(self.bad_value)}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"


def go_value(value: Any) -> str:
    """A bad value as Go's field.Error prints it (%q for strings, %v for numbers)."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return f"{type(value).__name__}{json.dumps(value, sort_keys=True)}"


def path_string(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "<nil>"


# ---------------------------------------------------------------------- pruning, defaults


def _property_schema(schema: Schema, key: str) -> Schema | None:
    properties = schema.get("properties") or {}
    if key in properties:
        return dict(properties[key])
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        return additional
    return None


def prune(
    value: Any,
    schema: Schema,
    *,
    root: bool = False,
    path: tuple[str, ...] = (),
    dropped: list[str] | None = None,
) -> Any:
    """Drop object fields the schema does not know (unless it preserves unknown fields);
    the paths of dropped fields are appended to ``dropped``."""
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        result: dict[str, Any] = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                result[key] = item  # ObjectMeta is the API server's, not the schema's
                continue
            sub = _property_schema(schema, key)
            if sub is not None:
                result[key] = prune(item, sub, path=(*path, key), dropped=dropped)
            elif preserve or schema.get("additionalProperties") is True:
                result[key] = item
            elif dropped is not None:
                dropped.append(path_string((*path, key)))
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"], path=path, dropped=dropped) for item in value]
    return value


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Fill in ``default`` of absent properties, then descend (defaults get defaults too)."""
    if isinstance(value, dict):
        result = dict(value)
        for key, sub in (schema.get("properties") or {}).items():
            if key not in result and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
        for key, item in result.items():
            sub = _property_schema(schema, key)
            if sub is not None:
                result[key] = apply_defaults(item, sub)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


# ---------------------------------------------------------------------- validation

_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def json_type(value: Any) -> str:
    """The JSON type name go-openapi reports for a value of the wrong type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_matches(value: Any, expected: str) -> bool:
    actual = json_type(value)
    return actual == expected or (expected == "number" and actual == "integer")


def _valid_date_time(value: str) -> bool:
    if not _DATE_TIME.match(value):
        return False
    try:
        datetime.datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def validate(value: Any, schema: Schema, path: tuple[str, ...] = ()) -> list[FieldError]:
    """kube-openapi's schema validation of one value; errors in document order."""
    name = path_string(path)
    expected = schema.get("type")
    if value is None and schema.get("nullable"):
        return []
    if expected and not _type_matches(value, expected):
        detail = f"{name} in body must be of type {expected}: {json.dumps(json_type(value))}"
        return [FieldError(TYPE_INVALID, name, json_type(value), detail, path)]
    errors: list[FieldError] = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(
            json.dumps(v if isinstance(v, str) else json.dumps(v)) for v in schema["enum"]
        )
        errors.append(FieldError(NOT_SUPPORTED, name, value, f"supported values: {allowed}", path))
    if isinstance(value, str):
        errors += _validate_string(value, schema, path)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        errors += _validate_number(value, schema, path)
    elif isinstance(value, dict):
        errors += _validate_object(value, schema, path)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            item_path = (*path[:-1], f"{path[-1]}[{index}]") if path else (f"[{index}]",)
            errors += validate(item, schema["items"], item_path)
    return errors


def _validate_string(value: str, schema: Schema, path: tuple[str, ...]) -> list[FieldError]:
    name = path_string(path)
    errors: list[FieldError] = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        detail = f"may not be longer than {schema['maxLength']}"
        errors.append(FieldError(TOO_LONG, name, value, detail, path))
    if "minLength" in schema and len(value) < schema["minLength"]:
        detail = f"{name} in body should be at least {schema['minLength']} chars long"
        errors.append(FieldError(INVALID, name, value, detail, path))
    if "pattern" in schema and not re.search(schema["pattern"], value):
        detail = f"{name} in body should match '{schema['pattern']}'"
        errors.append(FieldError(INVALID, name, value, detail, path))
    if schema.get("format") == "date-time" and not _valid_date_time(value):
        detail = f"{name} in body must be of type date-time: {json.dumps(value)}"
        errors.append(FieldError(TYPE_INVALID, name, value, detail, path))
    return errors


def _validate_number(value: float, schema: Schema, path: tuple[str, ...]) -> list[FieldError]:
    name = path_string(path)
    errors: list[FieldError] = []
    if "maximum" in schema and value > schema["maximum"]:
        detail = f"{name} in body should be less than or equal to {schema['maximum']}"
        errors.append(FieldError(INVALID, name, value, detail, path))
    if "minimum" in schema and value < schema["minimum"]:
        detail = f"{name} in body should be greater than or equal to {schema['minimum']}"
        errors.append(FieldError(INVALID, name, value, detail, path))
    return errors


def _validate_object(
    value: dict[str, Any], schema: Schema, path: tuple[str, ...]
) -> list[FieldError]:
    errors: list[FieldError] = []
    for key in schema.get("required") or []:
        if key not in value:
            errors.append(FieldError(REQUIRED, path_string((*path, key)), node=path))
    properties = schema.get("properties") or {}
    for key, item in value.items():
        if not path and key in ("apiVersion", "kind", "metadata"):
            continue
        sub = _property_schema(schema, key)
        if sub is not None:
            errors += validate(item, sub, (*path, key))
        elif key not in properties and schema.get("additionalProperties") is False:
            errors.append(FieldError(FORBIDDEN, path_string((*path, key)), node=path))
    return errors


def value_at(obj: Any, path: tuple[str, ...]) -> Any:
    """The value at a node path, or _OMIT when absent (list indexes are not followed)."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _OMIT
        obj = obj[key]
    return obj


def ratchet(errors: list[FieldError], new: Any, old: Any) -> list[FieldError]:
    """CRDValidationRatcheting (on by default since 1.30): on update, an error on a value
    that the update left unchanged is not reported, so an object stored under an older
    schema can still have its other fields (its status, say) written."""
    return [e for e in errors if value_at(new, e.node) != value_at(old, e.node)]
