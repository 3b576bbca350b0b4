"""The doctor's archive checks: where the AWS credentials come from, the bucket exists and
is writable, and whether it enforces conditional writes (the archiver's own probe)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Any

from sidecar.conditional_writes import SETTING, probe_key
from sidecar.config import Settings

if TYPE_CHECKING:
    from sidecar.doctor import Report


async def check_archive(settings: Settings, report: Report) -> None:
    if not settings.archive.enabled:
        report.add(
            "archive",
            "skip",
            "off (TASK_TRACKING_S3_ARCHIVE_ENABLED=false; a TaskTracking resource may turn it on)",
        )
        return
    if settings.archive.sink == "folder":
        check_folder(settings, report)
        return
    await check_s3(settings, report)


def check_folder(settings: Settings, report: Report) -> None:
    folder = settings.archive.folder
    assert folder is not None  # Settings requires it for the folder sink
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-"):
            pass
    except OSError as exc:
        report.add(
            "archive",
            "fail",
            f"folder {folder} is not writable: {exc.strerror or exc}",
            "create it, or point TASK_TRACKING_ARCHIVE_FOLDER at a writable folder",
        )
        return
    report.add("archive", "pass", f"folder {folder} is writable (conditional by construction)")


async def check_s3(settings: Settings, report: Report) -> None:
    from sidecar.s3_client import lean_session
    from sidecar.sinks import S3Sink, SinkError, client_error_fix, s3_client_context

    bucket = settings.archive.bucket
    assert bucket is not None  # Settings requires it when archival is on
    try:
        credentials = await lean_session().get_credentials()  # the sidecar client's chain
    except Exception as exc:  # e.g. AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY
        report.add("s3 credentials", "fail", str(exc), client_error_fix(exc))
        return
    if credentials is None:
        report.add(
            "s3 credentials",
            "fail",
            "none found in the default chain (environment, web identity / IRSA, profile,"
            " instance metadata)",
            "give the pod an IAM role (IRSA / workload identity) or set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY",
        )
        return
    report.add("s3 credentials", "pass", f"from {describe_credentials(credentials)}")
    endpoint = settings.archive.endpoint_url
    shown = endpoint_shown(endpoint)
    where = f"s3://{bucket}" + (f" at {shown}" if shown else "")
    try:
        context = s3_client_context(region=settings.archive.region, endpoint_url=endpoint)
        client = await context.__aenter__()
    except Exception as exc:  # a malformed region or endpoint URL
        report.add(
            "s3 bucket", "fail", f"cannot create the S3 client: {exc}", client_error_fix(exc)
        )
        report.add("s3 conditional writes", "skip", "no S3 client")
        return
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_exit(context)
        sink = S3Sink(client, bucket)
        try:
            await sink.check()
        except SinkError as exc:
            report.add("s3 bucket", "fail", str(exc), bucket_fix(exc.reason))
            report.add("s3 conditional writes", "skip", "bucket not reachable")
            return
        key = probe_key(settings.archive.prefix, f"{settings.redis_consumer_name}-doctor")
        try:
            enforced = await sink.probe_conditional_writes(key)
        except SinkError as exc:
            report.add(
                "s3 bucket",
                "fail",
                f"{where} exists but the probe write to {key} failed: {exc}",
                "allow s3:PutObject and s3:DeleteObject on the prefix (README 'Kubernetes"
                " install')",
            )
            report.add("s3 conditional writes", "skip", "the bucket is not writable")
            return
    report.add("s3 bucket", "pass", f"{where} exists and is writable (probe {key}, deleted)")
    report_conditional_writes(settings, enforced, report)


def report_conditional_writes(settings: Settings, enforced: bool, report: Report) -> None:
    setting = settings.archive.conditional_writes
    name = "s3 conditional writes"
    if enforced:
        report.add(name, "pass", "enforced (a second create with If-None-Match: * got 412)")
    elif setting == "enforced":
        report.add(
            name,
            "fail",
            f"not enforced (a second create was accepted), but {SETTING}=enforced: a retried"
            " batch could overwrite an archived object",
            f"set {SETTING}=auto (or check_before_write)",
        )
    else:
        report.add(
            name,
            "warn",
            "not enforced (a second create was accepted): the archiver writes in"
            " check_before_write mode (README 'Guarantees' says what it cannot exclude)",
            "use a store that honours If-None-Match, or accept the fallback",
        )


def describe_credentials(credentials: Any) -> str:
    """botocore's name for where the credentials came from, in words."""
    method = str(getattr(credentials, "method", "") or "unknown")
    names = {
        "env": "the environment (AWS_ACCESS_KEY_ID)",
        "assume-role-with-web-identity": "web identity (IRSA / workload identity token)",
        "shared-credentials-file": "the shared credentials file (~/.aws/credentials)",
        "config-file": "the AWS config file",
        "iam-role": "the instance metadata (IAM role)",
        "container-role": "the container credentials endpoint (ECS / EKS Pod Identity)",
        "sso": "AWS SSO",
        "assume-role": "an assumed role (profile)",
    }
    return names.get(method, method)


def endpoint_shown(endpoint: str | None) -> str:
    environ = os.environ
    return endpoint or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL", "")


def bucket_fix(reason: str) -> str:
    if reason == "NoSuchBucket":
        return "create the bucket, or fix TASK_TRACKING_S3_BUCKET"
    if reason in ("AccessDenied", "403"):
        return "allow s3:ListBucket, s3:PutObject, s3:GetObject on it for these credentials"
    if reason in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
        return "set TASK_TRACKING_S3_REGION to the bucket's region"
    return "check TASK_TRACKING_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the network"
