"""Chunks in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, ...), with boto3.

``storage_worker.py --chunks s3://BUCKET/PREFIX``, configured the AWS SDK's standard way:
``AWS_ENDPOINT_URL`` (for a store other than AWS), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (or a profile, ``~/.aws/config``...).  A chunk is the
object ``PREFIX/ab/abcdef...``; a PUT is atomic and durable once acknowledged, so there are no
temp files.  Errors that may pass (the store unreachable, throttling, a 5xx) are retried by
botocore's standard retry mode, then reach the client as ``unavailable``.
"""

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.exceptions
from botocore.config import Config

from ... import wire as p
from ...errors import FmsError, IntegrityError, NotFound, Unavailable
from ...limits import BytesLike
from ...wire.fields import Digest
from .base import ChunkBackend

CONNECT_TIMEOUT = 5  # seconds
READ_TIMEOUT = 30  # seconds for one request's reply
ATTEMPTS = 3  # botocore's standard retry mode: tries per request

HEAD_THREADS = 16  # HEAD requests in flight when a commit checks its new chunks are stored
READ_THREADS = 16  # GETs a storage worker has in flight for the chunk reads of one drain

log = logging.getLogger("fms.storage.chunks")


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix ending in '/' or empty)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise FmsError(
            f"--chunks {url!r} is not an S3 URL; write s3://BUCKET or s3://BUCKET/PREFIX"
        )
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class S3Chunks(ChunkBackend):
    """:param url: ``s3://BUCKET/PREFIX``; the bucket must exist (checked at once)."""

    read_threads = READ_THREADS

    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = url
        self.s3 = boto3.session.Session().client(
            "s3",
            config=Config(
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                max_pool_connections=16,
                # fms checks every chunk against its digest itself; the SDK's CRCs would be a second
                # pass over each chunk (measured: GET 1.06-1.19x faster without, less CPU).
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._check()

    def _check(self) -> None:
        where = self.s3.meta.endpoint_url
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.NoCredentialsError:
            raise FmsError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or an AWS profile)"
            ) from None
        except botocore.exceptions.EndpointConnectionError:
            raise FmsError(
                f"cannot reach the S3 endpoint {where}: check AWS_ENDPOINT_URL and "
                f"that the object store runs"
            ) from None
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise FmsError(
                    f"bucket {self.bucket!r} does not exist at {where}: create it "
                    f"(e.g. aws s3 mb s3://{self.bucket}) or fix --chunks"
                ) from None
            if status in (401, 403):
                raise FmsError(
                    f"the S3 store at {where} refused these credentials for bucket "
                    f"{self.bucket!r}: check AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY"
                ) from None
            raise FmsError(f"S3 store at {where}: {exc}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise FmsError(f"S3 store at {where}: {exc}") from None

    def _key(self, digest: Digest) -> str:
        name = digest.hex()
        return f"{self.prefix}{name[:2]}/{name}"

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        """``fn(Bucket=..., **kwargs)`` (a boto3 call), its errors told as fms's."""
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise _unavailable(what, f"bucket {self.bucket!r} no longer exists") from None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise NotFound(f"chunk not found in the object store ({what})") from None
            if status in (401, 403):
                raise _unavailable(
                    what,
                    "the object store refused this worker's credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
                ) from None
            if (status is not None and status >= 500) or code in ("SlowDown", "Throttling"):
                raise _unavailable(what, exc) from None
            raise FmsError(f"object store refused {what}: {exc}") from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise _unavailable(what, exc) from None

    def has(self, digest: Digest) -> bool:
        try:
            self._call("head", self.s3.head_object, Key=self._key(digest))
            return True
        except NotFound:
            return False

    def size(self, digest: Digest) -> int | None:
        try:
            return self._call("head", self.s3.head_object, Key=self._key(digest))["ContentLength"]
        except NotFound:
            return None

    def sizes(self, digests: Iterable[Digest]) -> dict[Digest, int | None]:
        # One HEAD each, side by side: a commit of many new chunks waits for the slowest.
        from concurrent.futures import ThreadPoolExecutor

        wanted = list(digests)
        if len(wanted) < 2:
            return {d: self.size(d) for d in wanted}
        with ThreadPoolExecutor(min(HEAD_THREADS, len(wanted))) as pool:
            return dict(zip(wanted, pool.map(self.size, wanted), strict=True))

    def put(self, digest: Digest, data: BytesLike) -> bool:
        # No HEAD first: a chunk's content never changes, so writing it again is harmless, and
        # the engine only gets here for a chunk a client was told to upload.
        self._call("put", self.s3.put_object, Key=self._key(digest), Body=bytes(data))
        return True

    def get(self, digest: Digest) -> bytearray:
        try:
            reply = self._call("get", self.s3.get_object, Key=self._key(digest))
        except NotFound:
            raise NotFound(f"chunk {digest.hex()[:16]} not found in the object store") from None
        size = reply["ContentLength"]
        if size > p.MAX_CHUNK_SIZE:
            raise IntegrityError(
                f"chunk {digest.hex()[:16]} is {size} bytes in the object store, "
                f"more than any chunk may be"
            )
        try:
            data = reply["Body"].read()
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise _unavailable("get", exc) from None
        if len(data) != size:
            raise _unavailable("get", f"the object ended after {len(data)} of {size} bytes")
        return p.pack_data(data)

    def delete(self, digest: Digest) -> None:
        self._call("delete", self.s3.delete_object, Key=self._key(digest))

    def list(self) -> Iterator[tuple[Digest, int, float]]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    try:
                        digest = bytes.fromhex(name)
                    except ValueError:
                        continue
                    if len(digest) == p.HASH_LEN and obj["Key"] == self._key(digest):
                        yield digest, obj["Size"], obj["LastModified"].timestamp()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise _unavailable("list", exc) from None

    def store_marker(self) -> str | None:
        try:
            reply = self._call("get", self.s3.get_object, Key=f"{self.prefix}STORE")
        except NotFound:
            return None
        return reply["Body"].read().decode("utf-8", "replace").strip() or None

    def mark_store(self, store_id: str) -> None:
        self._call("put", self.s3.put_object, Key=f"{self.prefix}STORE", Body=store_id.encode())

    def quarantine(self, digest: Digest) -> None:
        log.error("event=corrupt_chunk chunk=%s action=quarantined", digest.hex())
        key = self._key(digest)
        try:
            self._call(
                "copy",
                self.s3.copy_object,
                Key=f"{self.prefix}corrupt/{digest.hex()}.{time.time_ns()}",
                CopySource={"Bucket": self.bucket, "Key": key},
            )
            self.delete(digest)
        except FmsError as exc:
            log.error("event=quarantine_failed chunk=%s error=%r", digest.hex(), str(exc))


def _unavailable(what: str, exc: object) -> Unavailable:
    log.warning("event=object_store_error op=%s error=%r", what, str(exc))
    return Unavailable(f"the object store did not answer ({what}: {exc}); retrying")
