"""Archive sinks: where archive objects are written, S3 or a local folder.

Both offer the one primitive exactly-once archival needs: create an object
only if its key is absent (`create_if_absent`), and read back an existing one.
An S3-compatible server may ignore the condition (`If-None-Match: *`); the S3
sink then checks before it writes (`check_before_write`, see
sidecar.conditional_writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.errors import WorkerError

if TYPE_CHECKING:
    # botocore (and aiobotocore) are imported only once an S3 target is used: about 4 MiB
    # of a sidecar's RSS that does not archive to S3 (README, "Performance").
    from botocore.config import Config
    from botocore.exceptions import ClientError

BUCKET_MISSING = (
    "bucket does not exist (create it, or set TASK_TRACKING_S3_BUCKET or the resource's"
    " spec.archive.bucket to one that does)"
)
# Errors no retry can fix: the operator has to change the configuration.
CONFIG_ERROR_CODES = {
    "NoSuchBucket": BUCKET_MISSING,
    "AccessDenied": "access denied (check the IAM role / credentials)",
    "AllAccessDisabled": "access disabled for this bucket",
    "InvalidAccessKeyId": "invalid access key",
    "SignatureDoesNotMatch": "credentials rejected (signature does not match)",
    "InvalidBucketName": "invalid bucket name",
    "PermanentRedirect": "bucket is in another region (set the region)",
    "AuthorizationHeaderMalformed": "wrong region for this bucket (set the region)",
}

# A create refused because the key exists (412), or because another conditional write to
# it is in progress (409, AWS): either way the server evaluates the condition.
PRECONDITION_FAILED = ("PreconditionFailed", "412")
REFUSED_CREATE = (*PRECONDITION_FAILED, "ConditionalRequestConflict", "409")
NOT_FOUND = ("404", "NoSuchKey", "NotFound")

# Every S3 call: a PUT of an archive object (8 MiB by default) is answered in well under
# a second by S3 or MinIO once its body is sent, so a server silent for 10 s is hung, not
# slow. botocore retries a failed call once ("standard" mode: 5xx, throttling, timeouts;
# one retry covers a dead keep-alive connection); beyond that the runner retries the whole
# flush with capped backoff, and /readyz names the hang meanwhile. The former 5 attempts
# of 30 s kept one hung PUT in flight for minutes, silently, and no SIGTERM could finish
# within its 10 s budget.
S3_CONNECT_TIMEOUT_SECONDS = 5.0
S3_READ_TIMEOUT_SECONDS = 10.0
# aiohttp waits for the "100 Continue" botocore asks for before a PUT's body with no
# timeout at all, so a server that accepts and never answers would hold a PUT forever:
# each PUT has a deadline of its own, both timeouts plus its body at this slow rate.
# (/readyz names any call in flight longer than the read timeout before that.)
SLOWEST_UPLOAD_BYTES_PER_SECOND = 1024 * 1024


def s3_client_config() -> Config:
    """botocore's settings for every S3 call (the timeouts and retries above)."""
    from botocore.config import Config

    return Config(
        retries={"total_max_attempts": 2, "mode": "standard"},
        connect_timeout=S3_CONNECT_TIMEOUT_SECONDS,
        read_timeout=S3_READ_TIMEOUT_SECONDS,
    )


def s3_call_errors() -> tuple[type[Exception], ...]:
    """What an S3 call raises when it fails (an `except` clause evaluates this only when
    something was raised: botocore is imported by then, the client came from it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, OSError)


REGION_SETTINGS = "TASK_TRACKING_S3_REGION (or AWS_REGION / AWS_DEFAULT_REGION)"
ENDPOINT_SETTINGS = "TASK_TRACKING_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)"


def client_error_fix(exc: Exception) -> str:
    """What to change when botocore cannot make an S3 client or find its credentials:
    the settings behind the error (the error's own text says what was wrong)."""
    from botocore.exceptions import InvalidRegionError, PartialCredentialsError

    if isinstance(exc, InvalidRegionError):
        return f"set {REGION_SETTINGS} to a region name such as eu-west-1"
    if isinstance(exc, PartialCredentialsError):
        return "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither (IRSA)"
    if isinstance(exc, ValueError) and "endpoint" in str(exc).lower():
        return f"set {ENDPOINT_SETTINGS} to a URL such as https://s3.eu-west-1.amazonaws.com"
    return f"check {REGION_SETTINGS}, {ENDPOINT_SETTINGS} and the AWS_* credentials"


class SinkError(WorkerError):
    """An archive write failed; `reason` is a short label for metrics."""

    def __init__(self, message: str, reason: str, *, configuration: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.configuration = configuration  # the operator must act; retrying will not fix it


class ArchiveSink(Protocol):
    """A place archive objects go to."""

    description: str  # e.g. "s3://bucket" or "folder:/var/archive", for logs and metrics
    # True where a second create is refused by construction (a folder's hard link): no probe.
    always_conditional: bool
    # Look before each create: set when the server does not enforce the condition.
    check_before_write: bool

    async def create_if_absent(self, key: str, body: bytes) -> bool:
        """Write the object unless the key exists; True if this call created it."""

    async def read(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None:
        """Remove the object if it exists (the conditional-write probe's own objects)."""

    def list_keys(self, prefix: str) -> AsyncIterator[str]: ...

    async def check(self) -> None:
        """Raise `SinkError` if the sink cannot be written to (bucket missing, no access)."""

    async def probe_conditional_writes(self, key: str) -> bool:
        """Create `key` twice, then delete it: True if the second create was refused."""

    def stalled(self) -> str | None:
        """Why the target looks hung (for /readyz): a call in flight past the read timeout,
        or the last call timed out and none was answered since. Else None."""


class S3Sink:
    """An S3 bucket, through one shared aiobotocore client. Conditional writes use
    `If-None-Match: *` (AWS S3 since 2024, MinIO, and moto); where the server ignores it,
    `check_before_write` makes each create look first (HEAD)."""

    always_conditional = False

    def __init__(
        self, client: Any, bucket: str, *, read_timeout: float = S3_READ_TIMEOUT_SECONDS
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.description = f"s3://{bucket}"
        self.read_timeout = read_timeout
        self.check_before_write = False
        self._in_flight: dict[object, tuple[str, float]] = {}  # call -> (operation, started)
        # The last call that timed out, until the server answers again: between one hung
        # call failing and the next one becoming overdue, /readyz must not turn green.
        self._timed_out: str | None = None

    async def create_if_absent(self, key: str, body: bytes) -> bool:
        if self.check_before_write and await self._exists(key):
            return False  # the archiver reads it back and compares, as after a 412
        put = self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body,
            IfNoneMatch="*",  # kept in check-before-write mode: harmless where ignored
            ContentType="application/x-ndjson",
        )
        try:
            await self._put(put, len(body))
        except SinkError as exc:
            if exc.reason in PRECONDITION_FAILED:
                return False
            raise
        return True

    async def read(self, key: str) -> bytes:
        with self._call("GET"):
            response = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as stream:
                body: bytes = await stream.read()
                return body

    async def delete(self, key: str) -> None:
        with self._call("DELETE"):
            await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def list_keys(self, prefix: str) -> AsyncIterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"]
        except s3_call_errors() as exc:
            raise _sink_error(exc, self.bucket, "LIST") from exc

    async def check(self) -> None:
        try:
            with self._call("HEAD"):
                await self.client.head_bucket(Bucket=self.bucket)
        except SinkError as exc:
            if exc.reason in ("404", "NoSuchBucket"):
                raise SinkError(
                    f"s3://{self.bucket}: {BUCKET_MISSING}", "NoSuchBucket", configuration=True
                ) from exc
            if exc.reason == "403":
                raise SinkError(
                    f"s3://{self.bucket}: access denied (check the IAM role / credentials)",
                    "AccessDenied",
                    configuration=True,
                ) from exc
            raise

    async def probe_conditional_writes(self, key: str) -> bool:
        # A probe left by a process killed mid-probe would refuse the first create.
        await self.delete(key)
        refused = False
        for _ in range(2):
            put = self.client.put_object(
                Bucket=self.bucket, Key=key, Body=b"probe\n", IfNoneMatch="*"
            )
            try:
                await self._put(put, 6)
            except SinkError as exc:
                if exc.reason not in REFUSED_CREATE:
                    raise
                refused = True
                break
        await self.delete(key)
        return refused

    def stalled(self) -> str | None:
        now = time.monotonic()
        for operation, started in list(self._in_flight.values()):
            if now - started > self.read_timeout:
                return f"{self.description}: {operation} timed out after {self.read_timeout:.0f} s"
        return self._timed_out

    async def _put(self, put: Awaitable[Any], size: int) -> None:
        seconds = S3_CONNECT_TIMEOUT_SECONDS + self.read_timeout
        seconds += size / SLOWEST_UPLOAD_BYTES_PER_SECOND
        with self._call("PUT", seconds):
            await asyncio.wait_for(put, seconds)

    async def _exists(self, key: str) -> bool:
        try:
            with self._call("HEAD"):
                await self.client.head_object(Bucket=self.bucket, Key=key)
        except SinkError as exc:
            if exc.reason in NOT_FOUND:
                return False
            raise
        return True

    @contextlib.contextmanager
    def _call(self, operation: str, seconds: float | None = None) -> Iterator[None]:
        """One S3 call: tracked while in flight (for `stalled`), its errors as `SinkError`."""
        call = object()
        seconds = self.read_timeout if seconds is None else seconds
        self._in_flight[call] = (operation, time.monotonic())
        try:
            yield
        except TimeoutError as exc:  # the call's own deadline (`_put`)
            message = f"{self.description}: {operation} timed out after {seconds:.0f} s"
            self._timed_out = message
            raise SinkError(message, "timeout") from exc
        except s3_call_errors() as exc:
            error = _sink_error(exc, self.bucket, operation, seconds)
            # Another failure (refused, reset, an error reply) is not a hang: the runner
            # reports it.
            self._timed_out = str(error) if error.reason == "timeout" else None
            raise error from exc
        else:
            self._timed_out = None
        finally:
            del self._in_flight[call]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _sink_error(
    exc: Exception, bucket: str, operation: str, read_timeout: float = S3_READ_TIMEOUT_SECONDS
) -> SinkError:
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ReadTimeoutError):
        message = f"s3://{bucket}: {operation} timed out after {read_timeout:.0f} s"
        return SinkError(message, "timeout")
    if isinstance(exc, ConnectTimeoutError):
        return SinkError(
            f"s3://{bucket}: {operation}: connect timed out after {S3_CONNECT_TIMEOUT_SECONDS:g} s",
            "timeout",
        )
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
    from sidecar.s3_client import lean_session

    return lean_session().create_client(
        "s3", region_name=region, endpoint_url=endpoint_url, config=s3_client_config()
    )


class FolderSink:
    """A local folder with the same layout, for `task-tracking dev` and volume archives.

    Objects are written to a temporary file, fsynced, then hard-linked to their
    final name: the link fails if the name exists, which is the conditional
    create, and a reader never sees a partial object. So conditional writes are
    always enforced here: no probe, no check before writing.
    """

    always_conditional = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"folder:{root}"
        self.check_before_write = False  # never needed: the hard link is the condition

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

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread((self.root / key).unlink, missing_ok=True)
        except OSError as exc:
            raise SinkError(
                f"{self.description}: cannot delete {key}: {exc.strerror}", type(exc).__name__
            ) from exc

    async def probe_conditional_writes(self, key: str) -> bool:
        return True  # os.link refuses an existing name: nothing to probe

    def stalled(self) -> str | None:
        return None

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
