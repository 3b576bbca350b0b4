"""The CRD's ``x-kubernetes-validations`` rules, compiled and evaluated by a real CEL engine.

The engine is ``cel-expr-python``: Google's CEL runtime (cel-cpp, the implementation the
CEL spec's conformance suite is written against, as cel-go in kube-apiserver is) with a
type checker, so an undeclared function or a syntax error fails when the CRD is loaded,
as kube-apiserver refuses such a CRD. kube-apiserver also type-checks field selections
against the schema (``undefined field 'bukket'``); the engine sees ``self`` as a map, so
that check is done here by walking each rule's ``self.a.b`` selections over the schema.

Kubernetes adds libraries to standard CEL (cel-go's strings extension, ``isSorted``,
``url()``, ``quantity()`` ...). The CRD's rules need none beyond the strings extension's
standard members (``startsWith``/``endsWith`` are standard CEL), so only the strings
extension is loaded; a rule calling another Kubernetes function fails to compile here,
loudly, and that function is to be added then.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_strings

from .schema import DUPLICATE, FORBIDDEN, INVALID, REQUIRED, FieldError, Schema, path_string

_CEL_TYPES = {
    "object": cel.Type.Map(cel.Type.STRING, cel.Type.DYN),
    "array": cel.Type.List(cel.Type.DYN),
    "string": cel.Type.STRING,
    "integer": cel.Type.INT,
    "number": cel.Type.DOUBLE,
    "boolean": cel.Type.BOOL,
}
_REASONS = {
    "FieldValueRequired": REQUIRED,
    "FieldValueForbidden": FORBIDDEN,
    "FieldValueDuplicate": DUPLICATE,
    "FieldValueInvalid": INVALID,
}
_SELECTION = re.compile(r"\b(self|oldSelf)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)(\s*\()?")


class RuleCompileError(ValueError):
    """A rule that kube-apiserver would refuse when the CRD is applied."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One compiled ``x-kubernetes-validations`` entry at a schema node."""

    node: tuple[str, ...]  # where `self` is: ("spec", "archive")
    schema_type: str
    source: str
    message: str
    reason: tuple[str, str]
    field_path: tuple[str, ...]  # relative to the node, from `fieldPath: .bucket`
    uses_old_self: bool
    program: Any

    def check(self, value: Any, old: Any = None, *, has_old: bool = False) -> FieldError | None:
        """Evaluate on the node's value; None when it holds, else the field error."""
        if self.uses_old_self and not has_old:
            return None  # a transition rule is not evaluated on create
        data = {"self": value}
        if self.uses_old_self:
            data["oldSelf"] = old
        where = path_string((*self.node, *self.field_path))
        try:
            result = self.program.eval(data=data)
        except Exception as e:  # the engine raises for evaluation errors it cannot return
            return FieldError(INVALID, where, self.schema_type, f"{e}", self.node)
        if result.type() != cel.Type.BOOL:
            detail = f"rule evaluation error: {result.value()}"
            return FieldError(INVALID, where, self.schema_type, detail, self.node)
        if result.value():
            return None
        if self.reason == DUPLICATE:
            return FieldError(DUPLICATE, where, self.schema_type, "", self.node)
        return FieldError(self.reason, where, self.schema_type, self.message, self.node)


def compile_rules(schema: Schema, node: tuple[str, ...] = ()) -> list[Rule]:
    """Every rule of a structural schema, compiled; raises RuleCompileError like the
    API server does for a CRD whose rule does not compile."""
    rules: list[Rule] = []
    schema_type = schema.get("type", "object")
    for index, entry in enumerate(schema.get("x-kubernetes-validations") or []):
        rules.append(_compile(entry, schema, schema_type, node, index))
    for key, sub in (schema.get("properties") or {}).items():
        rules += compile_rules(sub, (*node, key))
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        rules += compile_rules(additional, (*node, "*"))
    if isinstance(schema.get("items"), dict):
        rules += compile_rules(schema["items"], (*node, "[*]"))
    return rules


def _compile(
    entry: dict[str, Any], schema: Schema, schema_type: str, node: tuple[str, ...], index: int
) -> Rule:
    source = entry["rule"]
    where = f"{path_string(node)}: x-kubernetes-validations[{index}].rule"
    uses_old_self = bool(re.search(r"\boldSelf\b", source))
    variables = {"self": _CEL_TYPES[schema_type]}
    if uses_old_self:
        variables["oldSelf"] = _CEL_TYPES[schema_type]
    env = cel.NewEnv(variables=variables, extensions=[ext_strings.ExtStrings()])
    try:
        program = env.compile(source)
    except RuntimeError as e:
        raise RuleCompileError(f"{where}: compilation failed: {e}") from None
    for match in _SELECTION.finditer(source):
        fields = match.group(2).lstrip(".").split(".")
        if match.group(3):  # the last name is a method call: self.prefix.startsWith(
            fields = fields[:-1]
        missing = _undefined_field(schema, fields)
        if missing is not None:
            raise RuleCompileError(f"{where}: compilation failed: undefined field '{missing}'")
    field_path = tuple(p for p in (entry.get("fieldPath") or "").split(".") if p)
    if field_path:
        target = _undefined_field(schema, list(field_path))
        if target is not None:
            raise RuleCompileError(f"{where}: fieldPath {entry['fieldPath']!r} does not exist")
    reason = entry.get("reason") or "FieldValueInvalid"
    if reason not in _REASONS:
        raise RuleCompileError(f"{where}: unsupported reason {reason!r}")
    return Rule(
        node=node,
        schema_type=schema_type,
        source=source,
        message=entry.get("message") or f"failed rule: {source}",
        reason=_REASONS[reason],
        field_path=field_path,
        uses_old_self=uses_old_self,
        program=program,
    )


def _undefined_field(schema: Schema, fields: list[str]) -> str | None:
    """The first selected field the schema does not declare, or None."""
    for name in fields:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return None
        properties = schema.get("properties") or {}
        if name in properties:
            schema = properties[name]
        elif isinstance(schema.get("additionalProperties"), dict):
            schema = schema["additionalProperties"]
        else:
            return name
    return None


def evaluate(rules: list[Rule], new: Any, old: Any = None) -> list[FieldError]:
    """Evaluate every rule on every value its node matches in ``new``."""
    errors: list[FieldError] = []
    for rule in rules:
        for node, value, old_value, has_old in _matches(rule.node, new, old):
            error = rule.check(value, old_value, has_old=has_old)
            if error is not None:
                if node != rule.node:  # inside a map or a list: the concrete path
                    suffix = error.field.split(".")[len(rule.node) :]
                    error = dataclasses.replace(
                        error, field=path_string((*node, *suffix)), node=node
                    )
                errors.append(error)
    return errors


def _matches(
    pattern: tuple[str, ...], new: Any, old: Any
) -> list[tuple[tuple[str, ...], Any, Any, bool]]:
    found: list[tuple[tuple[str, ...], Any, Any, bool]] = [((), new, old, old is not None)]
    for key in pattern:
        step: list[tuple[tuple[str, ...], Any, Any, bool]] = []
        for path, value, old_value, has_old in found:
            if key == "*" and isinstance(value, dict):
                olds = old_value if isinstance(old_value, dict) else {}
                for name, item in value.items():
                    step.append(((*path, name), item, olds.get(name), has_old and name in olds))
            elif key == "[*]" and isinstance(value, list):
                step += [
                    ((*path[:-1], f"{path[-1]}[{i}]"), v, None, False) for i, v in enumerate(value)
                ]
            elif isinstance(value, dict) and key in value:
                olds = old_value if isinstance(old_value, dict) else {}
                step.append(((*path, key), value[key], olds.get(key), has_old and key in olds))
        found = step
    return found
