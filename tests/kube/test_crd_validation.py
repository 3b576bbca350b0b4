"""The TaskTracking CRD as a cluster applies it: every spec below is created over HTTP in
the tests' Kubernetes API, which admits it against ``manifests/crd/`` (OpenAPI schema,
defaults, pruning, the CEL rules through cel-expr-python), and gets the verdict and the
message kube-apiserver gives.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar.resource import parse_spec
from tests.chart.conftest import CHART, REQUIRED_VALUES, _find_engine, deep_merge

from . import cel
from .api import KubeAPI
from .crd import CRD_FILE, CustomResource, human_duration

ROOT = CRD_FILE.parents[2]
NS = "apps"
PATH = f"/apis/alakai.io/v1alpha1/namespaces/{NS}/tasktrackings"
NOT_CHECKED = (
    "<nil>",
    "FieldValueInvalid",
    'Invalid value: "null": some validation rules were not checked because the object was'
    " invalid; correct the existing errors to complete validation",
)
BUCKET_RULE = "spec.archive.bucket is required when spec.archive.enabled is true"
PREFIX_RULE = "spec.archive.prefix must not start or end with a slash"


def body(spec: Any, name: str = "task-tracking") -> dict[str, Any]:
    return {
        "apiVersion": "alakai.io/v1alpha1",
        "kind": "TaskTracking",
        "metadata": {"name": name},
        "spec": spec,
    }


def example() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        (ROOT / "manifests/examples/tasktracking.yaml").read_text(encoding="utf-8")
    )
    return loaded


def chart_resource() -> dict[str, Any]:
    """The chart's optional TaskTracking (taskTracking.create=true), as Helm renders it."""
    values = deep_merge(REQUIRED_VALUES, {"taskTracking": {"create": True}})
    rendered = _find_engine().render(CHART, values)
    (obj,) = rendered.of_kind("TaskTracking")
    return obj


@dataclasses.dataclass(frozen=True)
class Accepted:
    """Stored with this spec (pruned, defaulted); the sidecar then parses it to this."""

    spec: dict[str, Any]
    sidecar_sees: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Refused:
    """422 Invalid with exactly these causes: (field, reason, message)."""

    causes: list[tuple[str, str, str]]


def sidecar_sees(spec: dict[str, Any]) -> dict[str, Any]:
    """The fields the sidecar takes from a stored spec (the rest it inherits from its
    environment: `ArchiveConfig.inheriting`), by their Python names."""
    parsed = parse_spec(spec)
    return {
        "archive": parsed.archive.model_dump(exclude_unset=True),
        "retention": parsed.retention.model_dump(exclude_unset=True),
    }


def sees(retention: dict[str, Any] | None = None, **archive: Any) -> dict[str, Any]:
    return {"archive": archive, "retention": retention or {}}


OFF = sees(enabled=False, prefix="task-tracking")

ACCEPTED: dict[str, tuple[Any, Accepted]] = {
    "empty spec: archive defaulted off": (
        {},
        Accepted({"archive": {"enabled": False, "prefix": "task-tracking"}}, OFF),
    ),
    "enabled with bucket": (
        {"archive": {"enabled": True, "bucket": "history"}},
        Accepted(
            {"archive": {"enabled": True, "bucket": "history", "prefix": "task-tracking"}},
            sees(enabled=True, bucket="history", prefix="task-tracking"),
        ),
    ),
    "disabled without bucket": (
        {"archive": {"enabled": False}},
        Accepted({"archive": {"enabled": False, "prefix": "task-tracking"}}, OFF),
    ),
    "prefix with inner slashes": (
        {"archive": {"prefix": "team/a/tasks"}},
        Accepted(
            {"archive": {"enabled": False, "prefix": "team/a/tasks"}},
            sees(enabled=False, prefix="team/a/tasks"),
        ),
    ),
    # A flush limit left out keeps the environment's value: no CRD default fills it in.
    "partial flush: the other limits stay unset": (
        {"archive": {"enabled": True, "bucket": "history", "flush": {"maxEvents": 100}}},
        Accepted(
            {
                "archive": {
                    "enabled": True,
                    "bucket": "history",
                    "prefix": "task-tracking",
                    "flush": {"maxEvents": 100},
                }
            },
            sees(enabled=True, bucket="history", prefix="task-tracking", flush={"max_events": 100}),
        ),
    ),
    "flush and retention at their bounds": (
        {
            "archive": {"flush": {"maxEvents": 100000, "maxBytes": 1024, "maxAgeSeconds": 3600}},
            "retention": {"projectionTtlSeconds": 0, "projectIndexMaxSize": 0},
        },
        Accepted(
            {
                "archive": {
                    "enabled": False,
                    "prefix": "task-tracking",
                    "flush": {"maxEvents": 100000, "maxBytes": 1024, "maxAgeSeconds": 3600},
                },
                "retention": {"projectionTtlSeconds": 0, "projectIndexMaxSize": 0},
            },
            sees(
                {"projection_ttl_seconds": 0, "project_index_max_size": 0},
                enabled=False,
                prefix="task-tracking",
                flush={"max_events": 100000, "max_bytes": 1024, "max_age_seconds": 3600},
            ),
        ),
    ),
    "unknown fields are pruned": (
        {"archive": {"enabled": False, "bukket": "typo"}, "extra": {"a": 1}},
        Accepted({"archive": {"enabled": False, "prefix": "task-tracking"}}, OFF),
    ),
}


def _invalid(field: str, value: str, detail: str) -> tuple[str, str, str]:
    return (field, "FieldValueInvalid", f"Invalid value: {value}: {detail}")


def _type(field: str, actual: str, expected: str) -> tuple[str, str, str]:
    detail = f'{field} in body must be of type {expected}: "{actual}"'
    return (field, "FieldValueTypeInvalid", f'Invalid value: "{actual}": {detail}')


REFUSED: dict[str, tuple[Any, Refused]] = {
    "enabled without bucket": (
        {"archive": {"enabled": True}},
        Refused([("spec.archive.bucket", "FieldValueRequired", f"Required value: {BUCKET_RULE}")]),
    ),
    "prefix with a leading slash": (
        {"archive": {"prefix": "/x"}},
        Refused([_invalid("spec.archive.prefix", '"object"', PREFIX_RULE)]),
    ),
    "prefix with a trailing slash": (
        {"archive": {"prefix": "x/"}},
        Refused([_invalid("spec.archive.prefix", '"object"', PREFIX_RULE)]),
    ),
    "both rules at once": (
        {"archive": {"enabled": True, "prefix": "/"}},
        Refused(
            [
                ("spec.archive.bucket", "FieldValueRequired", f"Required value: {BUCKET_RULE}"),
                _invalid("spec.archive.prefix", '"object"', PREFIX_RULE),
            ]
        ),
    ),
    "empty prefix": (
        {"archive": {"prefix": ""}},
        Refused(
            [
                _invalid(
                    "spec.archive.prefix",
                    '""',
                    "spec.archive.prefix in body should be at least 1 chars long",
                )
            ]
        ),
    ),
    "maxEvents 0": (
        {"archive": {"flush": {"maxEvents": 0}}},
        Refused(
            [
                _invalid(
                    "spec.archive.flush.maxEvents",
                    "0",
                    "spec.archive.flush.maxEvents in body should be greater than or equal to 1",
                )
            ]
        ),
    ),
    "maxBytes above 100 MiB": (
        {"archive": {"flush": {"maxBytes": 104857601}}},
        Refused(
            [
                _invalid(
                    "spec.archive.flush.maxBytes",
                    "104857601",
                    "spec.archive.flush.maxBytes in body should be less than or equal to 104857600",
                )
            ]
        ),
    ),
    "maxAgeSeconds above an hour": (
        {"archive": {"flush": {"maxAgeSeconds": 3601}}},
        Refused(
            [
                _invalid(
                    "spec.archive.flush.maxAgeSeconds",
                    "3601",
                    "spec.archive.flush.maxAgeSeconds in body should be less than or equal to 3600",
                )
            ]
        ),
    ),
    "enabled is a string: the rules are not checked": (
        {"archive": {"enabled": "yes", "prefix": "/x"}},
        Refused([_type("spec.archive.enabled", "string", "boolean"), NOT_CHECKED]),
    ),
    "maxEvents is a string": (
        {"archive": {"flush": {"maxEvents": "5000"}}},
        Refused([_type("spec.archive.flush.maxEvents", "string", "integer"), NOT_CHECKED]),
    ),
    "maxAgeSeconds is fractional": (
        {"archive": {"flush": {"maxAgeSeconds": 0.5}}},
        Refused([_type("spec.archive.flush.maxAgeSeconds", "number", "integer"), NOT_CHECKED]),
    ),
    "archive is a list": (
        {"archive": ["enabled"]},
        Refused([_type("spec.archive", "array", "object"), NOT_CHECKED]),
    ),
    "bucket with capitals": (
        {"archive": {"enabled": True, "bucket": "My-Bucket"}},
        Refused(
            [
                _invalid(
                    "spec.archive.bucket",
                    '"My-Bucket"',
                    "spec.archive.bucket in body should match '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$'",
                )
            ]
        ),
    ),
    "bucket too long": (
        {"archive": {"enabled": True, "bucket": "b" * 64}},
        Refused(
            [
                ("spec.archive.bucket", "FieldValueTooLong", "Too long: may not be longer than 63"),
                _invalid(
                    "spec.archive.bucket",
                    f'"{"b" * 64}"',
                    "spec.archive.bucket in body should match '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$'",
                ),
            ]
        ),
    ),
    "endpointUrl without a scheme": (
        {"archive": {"endpointUrl": "minio:9000"}},
        Refused(
            [
                _invalid(
                    "spec.archive.endpointUrl",
                    '"minio:9000"',
                    "spec.archive.endpointUrl in body should match '^https?://[^\\s/?#]+[^\\s]*$'",
                )
            ]
        ),
    ),
    "region with capitals": (
        {"archive": {"region": "EU-WEST-1"}},
        Refused(
            [
                _invalid(
                    "spec.archive.region",
                    '"EU-WEST-1"',
                    "spec.archive.region in body should match '^[a-z0-9-]+$'",
                )
            ]
        ),
    ),
    "negative retention": (
        {"retention": {"projectionTtlSeconds": -1, "projectIndexMaxSize": -5}},
        Refused(
            [
                _invalid(
                    "spec.retention.projectionTtlSeconds",
                    "-1",
                    "spec.retention.projectionTtlSeconds in body should be greater than or"
                    " equal to 0",
                ),
                _invalid(
                    "spec.retention.projectIndexMaxSize",
                    "-5",
                    "spec.retention.projectIndexMaxSize in body should be greater than or"
                    " equal to 0",
                ),
            ]
        ),
    ),
    "retention days as text": (
        {"retention": {"projectIndexMaxAgeDays": "90d"}},
        Refused([_type("spec.retention.projectIndexMaxAgeDays", "string", "integer"), NOT_CHECKED]),
    ),
}


@pytest.fixture
async def api() -> AsyncIterator[KubeAPI]:
    async with KubeAPI() as server:
        server.ensure_namespace(NS)
        yield server


async def post(api: KubeAPI, obj: dict[str, Any], **query: str) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(api.url + PATH, json=obj, params=query) as response,
    ):
        return response.status, await response.json(), response.headers


async def patch(
    api: KubeAPI, name: str, patch: dict[str, Any], *, status: bool = False
) -> tuple[int, Any]:
    url = f"{api.url}{PATH}/{name}" + ("/status" if status else "")
    headers = {"Content-Type": "application/merge-patch+json"}
    async with (
        aiohttp.ClientSession() as session,
        session.patch(url, json=patch, headers=headers) as response,
    ):
        return response.status, await response.json()


# ------------------------------------------------------------------------- the table


@pytest.mark.parametrize(("spec", "verdict"), ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_accepted_spec_is_stored_defaulted_and_parsed_by_the_sidecar(
    api: KubeAPI, spec: Any, verdict: Accepted
) -> None:
    code, stored, _ = await post(api, body(copy.deepcopy(spec)))
    assert code == 201, stored
    assert stored["spec"] == verdict.spec
    assert sidecar_sees(stored["spec"]) == verdict.sidecar_sees


@pytest.mark.parametrize(("spec", "verdict"), REFUSED.values(), ids=REFUSED.keys())
async def test_refused_spec_gets_422_invalid_with_the_api_servers_causes(
    api: KubeAPI, spec: Any, verdict: Refused
) -> None:
    code, status, _ = await post(api, body(copy.deepcopy(spec)))
    assert code == 422, status
    assert (status["kind"], status["status"], status["reason"]) == ("Status", "Failure", "Invalid")
    assert status["details"]["name"] == "task-tracking"
    assert (status["details"]["group"], status["details"]["kind"]) == ("alakai.io", "TaskTracking")
    causes = [(c["field"], c["reason"], c["message"]) for c in status["details"]["causes"]]
    assert causes == verdict.causes
    texts = [f"{field}: {message}" for field, _, message in verdict.causes]
    listed = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
    assert status["message"] == f'TaskTracking.alakai.io "task-tracking" is invalid: {listed}'
    assert api.get(NS, "task-tracking") is None


async def test_the_shipped_example_is_accepted_as_written(api: KubeAPI) -> None:
    obj = example()
    code, stored, _ = await post(api, copy.deepcopy(obj))
    assert code == 201, stored
    assert stored["spec"] == obj["spec"]  # every field set: nothing pruned, nothing defaulted
    assert sidecar_sees(stored["spec"]) == sees(
        {
            "projection_ttl_seconds": 2592000,
            "project_index_max_age_days": 90,
            "project_index_max_size": 10000,
        },
        enabled=True,
        bucket="my-task-history",
        prefix="task-tracking",
        region="eu-west-1",
        flush={"max_events": 5000, "max_bytes": 8388608, "max_age_seconds": 30},
    )


async def test_the_charts_optional_resource_is_accepted_with_the_defaults(api: KubeAPI) -> None:
    obj = chart_resource()
    code, stored, _ = await post(api, obj)
    assert code == 201, stored
    assert stored["spec"] == {"archive": {"enabled": False, "prefix": "task-tracking"}}
    assert sidecar_sees(stored["spec"]) == OFF


def test_every_cel_rule_is_exercised_both_ways_by_the_table() -> None:
    resource = CustomResource()
    assert resource.rules, "the CRD has CEL rules"
    accepted = [resource.admit(body(copy.deepcopy(spec))) for spec, _ in ACCEPTED.values()]
    refused_messages = {m for _, v in REFUSED.values() for _, _, m in v.causes}
    for rule in resource.rules:
        assert any(rule.message in message for message in refused_messages), rule.source
        holds = [
            obj
            for obj in accepted
            if "enabled" in obj["spec"]["archive"] and rule.check(obj["spec"]["archive"]) is None
        ]
        assert holds, f"no accepted spec where {rule.source!r} holds"


# ------------------------------------------------------------------- writes other than create


async def test_a_refused_merge_patch_changes_nothing(api: KubeAPI) -> None:
    await api.create(NS, body({"archive": {"enabled": True, "bucket": "history"}}))
    rv = api.resource_version
    code, status = await patch(api, "task-tracking", {"spec": {"archive": {"bucket": None}}})
    assert code == 422
    assert status["details"]["causes"][0]["field"] == "spec.archive.bucket"
    assert api.resource_version == rv
    assert api.get(NS, "task-tracking")["spec"]["archive"]["bucket"] == "history"


async def test_a_patch_that_removes_a_defaulted_field_gets_the_default_again(api: KubeAPI) -> None:
    await api.create(NS, body({"archive": {"prefix": "custom"}}))
    code, stored = await patch(api, "task-tracking", {"spec": {"archive": {"prefix": None}}})
    assert code == 200
    assert stored["spec"]["archive"]["prefix"] == "task-tracking"
    assert stored["metadata"]["generation"] == 2


async def test_a_patch_of_unknown_fields_only_is_pruned_to_no_change(api: KubeAPI) -> None:
    await api.create(NS, body({}))
    rv = api.resource_version
    code, stored = await patch(api, "task-tracking", {"spec": {"archive": {"bukket": "x"}}})
    assert code == 200
    assert "bukket" not in stored["spec"]["archive"]
    assert api.resource_version == rv  # not persisted: no new resourceVersion, no event


async def test_unknown_fields_warn_by_default_and_are_refused_when_strict(api: KubeAPI) -> None:
    code, stored, headers = await post(api, body({"archive": {"bukket": "x"}}, name="warned"))
    assert code == 201
    assert "bukket" not in stored["spec"]["archive"]
    assert headers.getall("Warning") == ['299 - "unknown field \\"spec.archive.bukket\\""']
    code, status, _ = await post(
        api, body({"archive": {"bukket": "x"}}, name="strict"), fieldValidation="Strict"
    )
    assert code == 400
    assert status["reason"] == "BadRequest"
    assert status["message"] == (
        'TaskTracking in version "v1alpha1" cannot be handled as a TaskTracking:'
        ' strict decoding error: unknown field "spec.archive.bukket"'
    )
    assert api.get(NS, "strict") is None


async def test_status_writes_are_validated_against_the_status_schema(api: KubeAPI) -> None:
    await api.create(NS, body({}))
    entry = {"observedGeneration": 1, "archiving": False, "updatedAt": "2026-03-15T10:00:00Z"}
    code, stored = await patch(
        api, "task-tracking", {"status": {"sidecars": {"pod-a": entry}}}, status=True
    )
    assert code == 200, stored
    bad = {"status": {"applied": 2, "sidecars": {"pod-a": {"updatedAt": "yesterday"}}}}
    code, status = await patch(api, "task-tracking", bad, status=True)
    assert code == 422
    causes = [(c["field"], c["reason"]) for c in status["details"]["causes"]]
    assert causes == [
        ("status.sidecars.pod-a.updatedAt", "FieldValueTypeInvalid"),
        ("status.applied", "FieldValueTypeInvalid"),
        ("<nil>", "FieldValueInvalid"),
    ]
    # unknown fields: kept inside a sidecar entry (newer sidecars), pruned elsewhere
    kept = {"status": {"note": "x", "sidecars": {"pod-a": {"conditionalWrites": "enforced"}}}}
    code, stored = await patch(api, "task-tracking", kept, status=True)
    assert code == 200
    assert "note" not in stored["status"]
    assert stored["status"]["sidecars"]["pod-a"]["conditionalWrites"] == "enforced"


async def test_an_object_stored_before_the_rules_can_still_have_its_status_written(
    api: KubeAPI,
) -> None:
    """Ratcheting: the unchanged invalid spec does not block a status write; a spec write
    that leaves it invalid is still refused."""
    await api.create(NS, body({"archive": {"enabled": True}}), checked=False)
    code, stored = await patch(api, "task-tracking", {"status": {"applied": "0/1"}}, status=True)
    assert code == 200, stored
    code, status = await patch(api, "task-tracking", {"spec": {"archive": {"prefix": "p"}}})
    assert code == 422
    assert status["details"]["causes"][0]["field"] == "spec.archive.bucket"


# ------------------------------------------------------------------- the CEL rules themselves


def _crd_with_rule(rule: str) -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    archive = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["archive"]
    archive["x-kubernetes-validations"] = [{"rule": rule, "message": "m"}]
    return crd


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ("!self.enabled || has(self.bukket)", "undefined field 'bukket'"),
        ("self.flush.maxEvent > 0", "undefined field 'maxEvent'"),
        ("self.prefix.startsWith('/'", "Syntax error"),
        ("self.prefix.isSorted()", "undeclared reference to 'isSorted'"),
        ("size(self.prefix, 1) > 0", "undeclared reference to 'size'"),
        ("self.enabled || 'a' + 1 == 'a1'", "found no matching overload for '_+_'"),
    ],
)
def test_a_rule_that_would_not_compile_in_the_api_server_fails_the_crd(
    rule: str, error: str
) -> None:
    with pytest.raises(cel.RuleCompileError, match="compilation failed") as refused:
        CustomResource(_crd_with_rule(rule))
    assert error in str(refused.value)


def test_rules_use_the_strings_extension_like_kubernetes() -> None:
    resource = CustomResource(_crd_with_rule("self.prefix.lowerAscii() == self.prefix"))
    assert resource.admit(body({"archive": {"prefix": "lower"}}))
    with pytest.raises(Exception, match="m"):
        resource.admit(body({"archive": {"prefix": "Upper"}}))


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-5, "<invalid>"), (-1, "0s"), (0, "0s"), (119, "119s"), (150, "2m30s"), (600, "10m"),
     (3 * 3600, "3h"), (3 * 3600 + 60 * 7, "3h7m"), (30 * 3600, "30h"), (50 * 3600, "2d2h"),
     (10 * 86400, "10d"), (800 * 86400, "2y70d"), (9 * 365 * 86400, "9y")],
)  # fmt: skip
def test_age_column_is_shown_like_the_api_servers_human_duration(seconds: int, shown: str) -> None:
    assert human_duration(seconds) == shown


async def put(api: KubeAPI, name: str, obj: dict[str, Any], *, status: bool = False) -> Any:
    url = f"{api.url}{PATH}/{name}" + ("/status" if status else "")
    async with aiohttp.ClientSession() as session, session.put(url, json=obj) as response:
        return response.status, await response.json()


async def test_an_update_is_admitted_like_a_patch(api: KubeAPI) -> None:
    stored = await api.create(NS, body({"archive": {"enabled": True, "bucket": "history"}}))
    await api.patch_status(NS, "task-tracking", {"applied": "1/1"})
    replaced = body({"archive": {"enabled": True}})
    code, status = await put(api, "task-tracking", replaced)
    assert code == 422
    assert [c["field"] for c in status["details"]["causes"]] == ["spec.archive.bucket"]

    replaced = body({"archive": {"enabled": False}})
    code, updated = await put(api, "task-tracking", replaced)
    assert code == 200, updated
    assert updated["spec"] == {"archive": {"enabled": False, "prefix": "task-tracking"}}
    assert updated["status"] == {"applied": "1/1"}  # the main resource's PUT keeps the status
    assert updated["metadata"]["generation"] == 2
    assert updated["metadata"]["uid"] == stored["metadata"]["uid"]

    stale = {**body({}), "metadata": {"name": "task-tracking", "resourceVersion": "1"}}
    code, status = await put(api, "task-tracking", stale)
    assert (code, status["reason"]) == (409, "Conflict")

    code, status = await put(
        api, "task-tracking", {**updated, "status": {"applied": 1}}, status=True
    )
    assert code == 422
    assert status["details"]["causes"][0]["field"] == "status.applied"
