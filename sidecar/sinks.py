"""Archive sinks: where archive objects are written, S3 or a local folder.

Both offer the one primitive exactly-once archival needs: create an object
only if its key is absent (`create_if_absent`), and read back an existing one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from sidecar.consumer import WorkerError

# Errors no retry can fix: the operator has to change the configuration.
CONFIG_ERROR_CODES = {
    "NoSuchBucket": "bucket does not exist",
    "AccessDenied": "access denied (check the IAM role / credentials)",
    "AllAccessDisabled": "access disabled for this bucket",
    "InvalidAccessKeyId": "invalid access key",
    "SignatureDoesNotMatch": "credentials rejected (signature does not match)",
    "InvalidBucketName": "invalid bucket name",
    "PermanentRedirect": "bucket is in another region (set the region)",
    "AuthorizationHeaderMalformed": "wrong region for this bucket (set the region)",
}

# botocore retries transient errors (5xx, throttling, timeouts) itself, with
# capped exponential backoff and jitter ("standard" mode).
S3_CLIENT_CONFIG = Config(
    retries={"max_attempts": 5, "mode": "standard"},
    connect_timeout=5,
    read_timeout=30,
)


class SinkError(WorkerError):
    """An archive write failed; `reason` is a short label for metrics."""

    def __init__(self, message: str, reason: str, *, configuration: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.configuration = configuration  # the operator must act; retrying will not fix it


class ArchiveSink(Protocol):
    """A place archive objects go to."""

    description: str  # e.g. "s3://bucket" or "folder:/var/archive", for logs and metrics

    async def create_if_absent(self, key: str, body: bytes) -> bool:
        """Write the object unless the key exists; True if this call created it."""

    async def read(self, key: str) -> bytes: ...

    def list_keys(self, prefix: str) -> AsyncIterator[str]: ...

    async def check(self) -> None:
        """Raise `SinkError` if the sink cannot be written to (bucket missing, no access)."""


class S3Sink:
    """An S3 bucket, through one shared aiobotocore client. Conditional writes use
    `If-None-Match: *` (AWS S3 since 2024, MinIO, and moto)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket
        self.description = f"s3://{bucket}"

    async def create_if_absent(self, key: str, body: bytes) -> bool:
        try:
            await self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                IfNoneMatch="*",
                ContentType="application/x-ndjson",
            )
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412"):
                return False
            raise _sink_error(exc, self.bucket) from exc
        except (BotoCoreError, OSError) as exc:
            raise _sink_error(exc, self.bucket) from exc
        return True

    async def read(self, key: str) -> bytes:
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as stream:
                body: bytes = await stream.read()
                return body
        except (ClientError, BotoCoreError, OSError) as exc:
            raise _sink_error(exc, self.bucket) from exc

    async def list_keys(self, prefix: str) -> AsyncIterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"]
        except (ClientError, BotoCoreError, OSError) as exc:
            raise _sink_error(exc, self.bucket) from exc

    async def check(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError, OSError) as exc:
            error = _sink_error(exc, self.bucket)
            if isinstance(exc, ClientError) and _code(exc) in ("404", "NoSuchBucket"):
                error = SinkError(
                    f"s3://{self.bucket}: bucket does not exist", "NoSuchBucket", configuration=True
                )
            elif isinstance(exc, ClientError) and _code(exc) in ("403",):
                error = SinkError(
                    f"s3://{self.bucket}: access denied (check the IAM role / credentials)",
                    "AccessDenied",
                    configuration=True,
                )
            raise error from exc


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _sink_error(exc: Exception, bucket: str) -> SinkError:
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code in CONFIG_ERROR_CODES:
            return SinkError(f"s3://{bucket}: {CONFIG_ERROR_CODES[code]}", code, configuration=True)
        return SinkError(f"s3://{bucket}: {code}: {exc}", code or "ClientError")
    if isinstance(exc, EndpointConnectionError):
        return SinkError(
            f"s3://{bucket}: cannot reach the S3 endpoint ({exc}); check the endpoint URL"
            " and the network",
            "EndpointConnectionError",
            configuration=True,
        )
    return SinkError(f"s3://{bucket}: {type(exc).__name__}: {exc}", type(exc).__name__)


def s3_client_context(*, region: str | None, endpoint_url: str | None) -> Any:
    """An aiobotocore S3 client context: default credential chain (IRSA, workload
    identity, environment), and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL unless
    `endpoint_url` is given."""
    from aiobotocore.session import get_session

    return get_session().create_client(
        "s3", region_name=region, endpoint_url=endpoint_url, config=S3_CLIENT_CONFIG
    )


class FolderSink:
    """A local folder with the same layout, for `task-tracking dev` and volume archives.

    Objects are written to a temporary file, fsynced, then hard-linked to their
    final name: the link fails if the name exists, which is the conditional
    create, and a reader never sees a partial object.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"folder:{root}"

    async def create_if_absent(self, key: str, body: bytes) -> bool:
        return await asyncio.to_thread(self._create_if_absent, key, body)

    def _create_if_absent(self, key: str, body: bytes) -> bool:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            with open(temporary, "wb") as file:
                file.write(body)
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, target)
            except FileExistsError:
                return False
            finally:
                temporary.unlink()
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise SinkError(
                f"{self.description}: {exc.strerror}: {exc.filename}",
                type(exc).__name__,
                configuration=isinstance(exc, PermissionError),
            ) from exc
        return True

    async def read(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread((self.root / key).read_bytes)
        except OSError as exc:
            raise SinkError(
                f"{self.description}: cannot read {key}: {exc.strerror}", type(exc).__name__
            ) from exc

    async def list_keys(self, prefix: str) -> AsyncIterator[str]:
        keys = await asyncio.to_thread(self._list, prefix)
        for key in keys:
            yield key

    def _list(self, prefix: str) -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*.jsonl")
            if not path.name.startswith(".")
        )
        return sorted(key for key in keys if key.startswith(prefix))

    async def check(self) -> None:
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(
                f"{self.description}: cannot create the folder: {exc.strerror}",
                type(exc).__name__,
                configuration=True,
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise SinkError(
                f"{self.description}: folder is not writable", "PermissionError", configuration=True
            )
