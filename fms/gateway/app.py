"""The S3 API over HTTP (aiohttp): path-style requests, SigV4 on every one, S3's XML replies
and errors.  A bucket is a top-level folder of the store; an object ``KEY`` in bucket ``B`` is
the fms name ``B/KEY``.

The gateway keeps its own state in the store under :data:`HIDDEN` (never listed): a marker
per bucket created through S3 (``.fms-s3/buckets/B``) and the parts of multipart uploads in
progress (``.fms-s3/mpu/B/UPLOAD_ID/``).

**Who may.** Each request acts for the identity its access key belongs to (:mod:`.credentials`):
storage and the cache decide its reads and writes by that identity's grants, and a refusal is
S3's AccessDenied.  The gateway itself decides what touches its own folder, by the same
:mod:`fms.policy`: a bucket is seen (listed, or reached at all) by an identity with a grant on
it or on a folder inside it; creating or deleting one needs write (or admin) on the bucket
itself; a multipart upload needs write on the object it makes."""

import asyncio
import base64
import binascii
import contextvars
import hashlib
import json
import logging
import mimetypes
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, TypeAlias
from urllib.parse import quote, unquote

from aiohttp import web

from fms import policy
from fms import wire as p
from fms.client.upload import Plan
from fms.errors import FmsError, MissingChunks

from . import sigv4, xmlio
from .credentials import Caller, StaticKeys, StoreKeys
from .errors import S3Error
from .sigv4 import Signed
from .store import ACTING, CHUNK_SIZE, Stat, Store, s3_error_from

log = logging.getLogger("fms.gateway")

Params: TypeAlias = dict[str, str]  # a request's query, decoded
Headers: TypeAlias = Mapping[str, str]
Opened: TypeAlias = tuple[dict[str, Any], bytes | None, dict[str, Any]]  # see Store.open

HIDDEN = ".fms-s3"  # the gateway's own top-level folder
FOLDER_END = "\U0010ffff"  # after a folder's name: sorts after every name inside it
BUCKETS = f"{HIDDEN}/buckets/"
UPLOADS = f"{HIDDEN}/mpu/"
MAX_KEYS = 1000  # keys a listing answers at most
MAX_DELETE = 1000  # keys in one DeleteObjects
MAX_PUT = 5 * p.GiB  # bytes of one PutObject or UploadPart
MIN_PART = 5 * p.MiB  # bytes of every part but the last
MAX_PARTS = 10000
REGION = "us-east-1"
STORED_HEADERS = ("content-type", "cache-control", "content-disposition", "content-encoding")
_SERVED_HEADERS = STORED_HEADERS[1:]  # served as stored (Content-Type has a default)
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
KEEPALIVE = 10.0  # seconds between the spaces a long CompleteMultipartUpload sends
BUCKET_TTL = 5.0  # seconds a bucket seen to exist is not looked up again (by this gateway)
MAX_META_HEADERS = 1900  # bytes of metadata headers: the rest of 2 KiB holds the ETag
MAX_META_BYTES = 2048  # bytes of keys and values the store keeps with a version
MAX_PARTS_META = 1024  # characters of part sizes kept with an object (the map holds 2 KiB)
COMPLETED_KEPT = 1000  # completed uploads remembered, so a repeated Complete gets its answer
NOT_IMPLEMENTED = (
    "acl",
    "policy",
    "cors",
    "lifecycle",
    "tagging",
    "encryption",
    "object-lock",
    "replication",
    "website",
    "logging",
    "notification",
    "accelerate",
    "requestPayment",
    "retention",
    "legal-hold",
    "torrent",
    "select",
    "restore",
    "analytics",
    "metrics",
    "inventory",
    "intelligent-tiering",
    "ownershipControls",
    "publicAccessBlock",
    "attributes",
)


# The caller of the S3 request being served (set once its signature holds).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("fms_s3_caller")


def caller() -> policy.Identity:
    """The identity (with its grants) of the S3 request being served."""
    return CALLER.get().ident


def _denied(what: str, role: str, where: str) -> S3Error:
    who = caller()
    return S3Error(
        "AccessDenied",
        f"access denied: {who.name!r} may not {what}: that needs the {role} role on {where}; "
        f"{who.name!r} has {who.describe()}",
    )


def sees_bucket(who: policy.Identity, bucket: str) -> bool:
    """Whether ``who`` may see ``bucket``: a grant on it (or above it), or on a folder in it."""
    return who.may(policy.READ, bucket) or any(
        g.prefix.startswith(bucket + "/") for g in who.grants
    )


class Gateway:
    """The request handlers.  :param keys: the access keys (:mod:`.credentials`);
    :param store: the broker client."""

    def __init__(self, store: Store, keys: StoreKeys | StaticKeys) -> None:
        self.store = store
        self.own = store.own()  # for the gateway's own folder, whoever the request is for
        self.keys = keys
        self._buckets_seen: dict[
            str, float
        ] = {}  # bucket -> monotonic time until which it is known to exist
        self._completed: dict[
            tuple[str, str], tuple[str, str]
        ] = {}  # (bucket, upload id) -> (key, ETag) of the latest completions

    # --- the entry point ---

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The one handler of aiohttp's low-level server (no router: every path is ours)."""
        expect = request.headers.get("Expect")
        if expect is not None:  # a web.Application's router answered this; we do it here
            if expect.lower() != "100-continue":
                return web.Response(status=417, text=f"unknown expectation: {expect[:64]}")
            if request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request_id = os.urandom(8).hex().upper()
        raw_path, _, raw_query = request.raw_path.partition("?")
        try:
            if raw_path == "/console" or raw_path.startswith("/console/"):
                return await self.console(request, raw_path)
            key_id = sigv4.key_id(request.headers, raw_query)
            if key_id is not None:
                await self.keys.prepare(key_id)  # from memory, but for a key not seen lately
            # Inline: a few HMACs (tens of microseconds) and an in-memory key look-up.
            signed = sigv4.verify(
                request.method, raw_path, raw_query, request.headers, self.keys.resolve
            )
            params = _query(raw_query)
            bucket, key = _split(raw_path)
            caller_set, acting_set = CALLER.set(signed.identity), ACTING.set(signed.identity.acting)
            try:
                response = await self.dispatch(request, signed, bucket, key, params)
            finally:  # a connection's next request may run in this same task
                CALLER.reset(caller_set)
                ACTING.reset(acting_set)
        except S3Error as exc:
            response = _error(request, exc, raw_path, request_id)
        except FmsError as exc:
            response = _error(request, s3_error_from(exc), raw_path, request_id)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("event=s3_internal path=%s", raw_path[:200])
            response = _error(request, s3_error_from(exc), raw_path, request_id)
        response.headers.setdefault("x-amz-request-id", request_id)
        return response

    async def dispatch(
        self,
        request: web.BaseRequest,
        signed: Signed,
        bucket: str | None,
        key: str | None,
        params: Params,
    ) -> web.StreamResponse:
        method = request.method
        if bucket is None:
            if method == "GET":
                return await self.list_buckets()
            raise S3Error("MethodNotAllowed", "only GET (ListBuckets) is allowed on /")
        if params and not params.keys().isdisjoint(NOT_IMPLEMENTED):
            sub = next(sub for sub in NOT_IMPLEMENTED if sub in params)
            raise S3Error("NotImplemented", f"the ?{sub} subresource is not supported")
        if not (key is None and method == "PUT") and not sees_bucket(caller(), bucket):
            # Decided on the name alone, before anything is looked up: it tells nothing.
            raise _denied(f"reach bucket {bucket!r}", policy.READ, "it or a folder in it")
        if key is None:
            return await self.bucket_op(request, signed, bucket, params)
        name = _name(bucket, key)
        if method in ("GET", "HEAD"):
            if "uploadId" in params and method == "GET":
                return await self.list_parts(bucket, key, params)
            return await self.get_object(request, bucket, key, name, params)
        if method == "PUT":
            if "uploadId" in params or "partNumber" in params:
                return await self.upload_part(request, signed, bucket, key, params)
            if "x-amz-copy-source" in request.headers:
                return await self.copy_object(request, bucket, key, name)
            return await self.put_object(request, signed, bucket, key, name)
        if method == "DELETE":
            if "uploadId" in params:
                return await self.abort_upload(bucket, params)
            return await self.delete_object(bucket, name)
        if method == "POST":
            if "uploads" in params:
                return await self.create_upload(request, bucket, key)
            if "uploadId" in params:
                return await self.complete_upload(request, signed, bucket, key, params)
        raise S3Error("MethodNotAllowed", f"{method} is not allowed on an object here")

    # --- buckets ---

    async def bucket_exists(self, bucket: str) -> bool:
        """Whether the bucket exists; a bucket seen lately is taken to exist for
        :data:`BUCKET_TTL` seconds more (one look-up less per request)."""
        if self._buckets_seen.get(bucket, 0.0) > time.monotonic():
            return True
        found = await self.own.stat(BUCKETS + bucket) is not None
        if not found:
            found = bool((await self.store.ls(bucket + "/", "", 1, False))["entries"])
        if found:
            if len(self._buckets_seen) > 10_000:
                self._buckets_seen.clear()
            self._buckets_seen[bucket] = time.monotonic() + BUCKET_TTL
        return found

    async def need_bucket(self, bucket: str) -> None:
        if bucket == HIDDEN or not await self.bucket_exists(bucket):
            raise S3Error("NoSuchBucket", "the specified bucket does not exist", BucketName=bucket)

    async def list_buckets(self) -> web.Response:
        """The buckets the caller may see (:func:`sees_bucket`): those made with CreateBucket,
        and the top-level folders its listing shows."""
        found: dict[str, float | None] = {}
        after = ""
        who = caller()
        while True:
            header = await self.own.ls(BUCKETS, after, 1000, False)
            for e in header["entries"]:
                bucket = e["name"][len(BUCKETS) :]
                if sees_bucket(who, bucket):
                    found[bucket] = e["committed"]
            if not header.get("more") or not header["entries"]:
                break
            after = header["entries"][-1]["name"]
        after = ""
        while True:  # top-level folders written with fms itself are buckets too
            header = await self.store.ls("", after, 1000, True)
            for folder in header["folders"]:
                name = folder.rstrip("/")
                if name != HIDDEN:
                    found.setdefault(name, None)
            if header.get("next") is None:
                break
            after = header["next"]
        items = [
            (
                "Bucket",
                [("Name", name), ("CreationDate", xmlio.iso(created or 0))],
            )
            for name, created in sorted(found.items())
        ]
        owner = [("ID", "fms"), ("DisplayName", "fms")]
        return _xml(
            xmlio.document("ListAllMyBucketsResult", [("Owner", owner), ("Buckets", items)])
        )

    async def bucket_op(
        self, request: web.BaseRequest, signed: Signed, bucket: str, params: Params
    ) -> web.StreamResponse:
        method = request.method
        if method == "PUT":
            return await self.create_bucket(request, bucket)
        if method == "DELETE":
            return await self.delete_bucket(bucket)
        if method == "HEAD":
            await self.need_bucket(bucket)
            return web.Response(status=200, headers={"x-amz-bucket-region": REGION})
        if method == "POST" and "delete" in params:
            return await self.delete_objects(request, bucket)
        if method != "GET":
            raise S3Error("MethodNotAllowed", f"{method} is not allowed on a bucket")
        await self.need_bucket(bucket)
        if "location" in params:
            return _xml(
                xmlio.document("LocationConstraint", []).replace(
                    b"</LocationConstraint>", b"</LocationConstraint>"
                )
            )
        if "versioning" in params:
            return _xml(xmlio.document("VersioningConfiguration", []))
        if "uploads" in params:
            return await self.list_uploads(bucket, params)
        if "versions" in params:
            return await self.list_versions(bucket, params)
        if "x-fms-zip" in params:
            return await self.zip_folder(request, bucket, params)
        return await self.list_objects(bucket, params)

    def need_bucket_write(self, bucket: str, what: str) -> None:
        """That the caller may create or delete ``bucket``: write (or admin) on all of it."""
        if not caller().may_folder(policy.WRITE, bucket):
            raise _denied(f"{what} bucket {bucket!r}", policy.WRITE, f"{bucket!r}")

    def need_write(self, name: str, what: str) -> None:
        """That the caller may write ``name`` (checked before a multipart upload stores in the
        gateway's own folder for it).  :raises S3Error: AccessDenied."""
        if not caller().may(policy.WRITE, name):
            raise _denied(f"{what} {name!r}", policy.WRITE, f"{name!r} or a folder above it")

    async def create_bucket(self, request: web.BaseRequest, bucket: str) -> web.Response:
        self.need_bucket_write(bucket, "create")
        if not BUCKET_NAME.match(bucket) or ".." in bucket:
            raise S3Error(
                "InvalidBucketName",
                "bucket names are 3 to 63 characters: lower-case letters, digits, '.' and '-', "
                "starting and ending with a letter or digit",
                BucketName=bucket,
            )
        await _read_small(request)  # a CreateBucketConfiguration, if any: one region here
        if await self.own.stat(BUCKETS + bucket) is not None:
            raise S3Error(
                "BucketAlreadyOwnedByYou",
                "your previous request to create the named bucket succeeded",
                BucketName=bucket,
            )
        await self.own.put_small(BUCKETS + bucket, json.dumps({"created": time.time()}).encode())
        return web.Response(status=200, headers={"Location": f"/{bucket}"})

    async def delete_bucket(self, bucket: str) -> web.Response:
        self.need_bucket_write(bucket, "delete")
        await self.need_bucket(bucket)
        header = await self.store.ls(bucket + "/", "", 1, False)
        if header["entries"]:
            raise S3Error(
                "BucketNotEmpty",
                "the bucket you tried to delete is not empty",
                BucketName=bucket,
            )
        await self.own.rm(BUCKETS + bucket)
        self._buckets_seen.pop(bucket, None)
        return web.Response(status=204)

    # --- listing ---

    async def list_objects(self, bucket: str, params: Params) -> web.Response:
        v2 = params.get("list-type") == "2"
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter", "")
        if delimiter not in ("", "/"):
            raise S3Error("NotImplemented", "only '/' is supported as a delimiter")
        try:
            max_keys = min(int(params.get("max-keys", MAX_KEYS)), MAX_KEYS)
        except ValueError:
            raise S3Error("InvalidArgument", "max-keys must be an int") from None
        if max_keys < 0:
            raise S3Error("InvalidArgument", "max-keys must be 0 or more")
        encode = params.get("encoding-type") == "url"
        if params.get("encoding-type") not in (None, "url"):
            raise S3Error("InvalidArgument", "encoding-type must be url")
        if v2:
            token = params.get("continuation-token")
            after = _untoken(token) if token else params.get("start-after", "")
        else:
            after = params.get("marker", "")
            if delimiter and after.endswith(delimiter):
                after += FOLDER_END  # a common prefix: go past every key under it
        base = bucket + "/"
        contents: list[dict[str, Any]] = []
        prefixes: list[str] = []
        truncated, last = False, None
        cursor = base + after if after else ""
        while not truncated:
            header = await self.store.ls(base + prefix, cursor, max(max_keys, 1), bool(delimiter))
            entries = header["entries"]
            items: list[tuple[str, dict[str, Any] | None]] = [(e["name"], e) for e in entries]
            items += [(f, None) for f in (header.get("folders", []) if delimiter else [])]
            items.sort(key=lambda item: item[0])
            for item_name, entry in items:
                if len(contents) + len(prefixes) >= max_keys:
                    truncated = max_keys > 0
                    break
                if entry is None:
                    prefixes.append(item_name[len(base) :])
                else:
                    contents.append(entry)
                last = item_name if entry is not None else item_name + FOLDER_END
            more = header.get("next") is not None if delimiter else header.get("more")
            if not more or not items:
                break
            cursor = header["next"] if delimiter else entries[-1]["name"]
        next_after = last
        enc: Callable[[str], str] = (lambda k: quote(k, safe="/")) if encode else (lambda k: k)
        body: list[tuple[str, Any]] = [("Name", bucket), ("Prefix", enc(prefix))]
        if v2:
            body += [
                ("KeyCount", len(contents) + len(prefixes)),
                ("MaxKeys", max_keys),
                ("Delimiter", enc(delimiter) if delimiter else None),
                ("IsTruncated", truncated),
                ("ContinuationToken", params.get("continuation-token")),
                (
                    "NextContinuationToken",
                    _token(next_after[len(base) :]) if truncated and next_after else None,
                ),
                ("StartAfter", enc(params["start-after"]) if "start-after" in params else None),
            ]
        else:
            body += [
                ("Marker", enc(params.get("marker", ""))),
                ("MaxKeys", max_keys),
                ("Delimiter", enc(delimiter) if delimiter else None),
                ("IsTruncated", truncated),
                (
                    "NextMarker",
                    enc(next_after[len(base) :].rstrip(FOLDER_END))
                    if truncated and next_after and delimiter
                    else None,
                ),
            ]
        body += [("EncodingType", "url" if encode else None)]
        for entry in contents:
            body.append(
                (
                    "Contents",
                    [
                        ("Key", enc(entry["name"][len(base) :])),
                        ("LastModified", xmlio.iso(entry["committed"])),
                        ("ETag", _etag(entry)),
                        ("Size", entry["size"]),
                        ("StorageClass", "STANDARD"),
                    ]
                    + ([] if v2 else [("Owner", [("ID", "fms"), ("DisplayName", "fms")])]),
                )
            )
        for folder in prefixes:
            body.append(("CommonPrefixes", [("Prefix", enc(folder))]))
        return _xml(xmlio.document("ListBucketResult", body))

    async def list_versions(self, bucket: str, params: Params) -> web.Response:
        """ListObjectVersions: the current and retained versions of the keys under ``prefix``
        (at most max-keys keys a page)."""
        prefix = params.get("prefix", "")
        max_keys = min(int(params.get("max-keys", MAX_KEYS) or MAX_KEYS), MAX_KEYS)
        after = params.get("key-marker", "")
        base = bucket + "/"
        header = await self.store.ls(base + prefix, base + after if after else "", max_keys, False)
        body: list[tuple[str, Any]] = [("Name", bucket), ("Prefix", prefix), ("MaxKeys", max_keys)]
        body.append(("IsTruncated", bool(header.get("more"))))
        if header.get("more") and header["entries"]:
            body.append(("NextKeyMarker", header["entries"][-1]["name"][len(base) :]))
        names = [e["name"] for e in header["entries"]]
        if prefix and not after and base + prefix not in names:
            # A removed key is in no listing, but its retained versions can be restored.
            names.insert(0, base + prefix)
        for name in names:
            try:
                versions = (await self.store.call("versions", name=name))["versions"]
            except FmsError:
                continue
            for v in versions:
                body.append(
                    (
                        "Version",
                        [
                            ("Key", name[len(base) :]),
                            ("VersionId", str(v["version"])),
                            ("IsLatest", bool(v.get("current"))),
                            ("LastModified", xmlio.iso(v["committed"])),
                            ("ETag", _etag(v)),
                            ("Size", v["size"]),
                            ("StorageClass", "STANDARD"),
                        ],
                    )
                )
        return _xml(xmlio.document("ListVersionsResult", body))

    # --- objects ---

    async def get_object(
        self, request: web.BaseRequest, bucket: str, key: str, name: str, params: Params
    ) -> web.StreamResponse:
        version = _version(params)
        opened = await self.store.open(name, version)
        if opened is None:
            if version is not None:
                raise S3Error("NoSuchVersion", "the specified version does not exist", Key=key)
            await self.need_bucket(bucket)
            raise S3Error("NoSuchKey", "the specified key does not exist", Key=key)
        manifest, inline, via = opened
        size = manifest["size"]
        headers = _object_headers(manifest)
        not_modified = _preconditions(request.headers, headers["ETag"], manifest["committed"])
        if not_modified:
            return web.Response(status=304, headers={"ETag": headers["ETag"]})
        start, end, status = 0, size, 200
        part = params.get("partNumber")
        if part is not None:
            start, end = _part_range(manifest, part)
            status = 206 if (start, end) != (0, size) else 200
            headers["x-amz-mp-parts-count"] = str(_parts_count(manifest))
        elif "range" in request.headers:
            rng = _parse_range(request.headers["range"], size)
            if rng is not None:
                start, end = rng
                status = 206
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        for param, header in RESPONSE_OVERRIDES.items() if params else ():
            if param in params:
                headers[header] = params[param]
        if inline is not None and request.method != "HEAD":
            # Headers and body in one write, with the request id the handler would add.
            return web.Response(status=status, headers=headers, body=inline[start:end])
        headers["Content-Length"] = str(end - start)
        response = web.StreamResponse(status=status, headers=headers)
        if request.method == "HEAD":
            response.content_length = end - start
            await response.prepare(request)
            return response
        response.content_length = end - start
        await response.prepare(request)
        if inline is not None:
            await response.write(inline[start:end])
        else:
            async for piece in self.store.stream(manifest, start, end, via):
                await response.write(piece)
        await response.write_eof()
        return response

    async def put_object(
        self, request: web.BaseRequest, signed: Signed, bucket: str, key: str, name: str
    ) -> web.Response:
        await self.need_bucket(bucket)
        meta = _meta_from_headers(request.headers, key)
        stat, md5 = await self._store_body(request, signed, name, meta)
        headers = {"ETag": f'"{md5.hex()}"', "x-amz-version-id": str(stat["version"])}
        headers.update(_checksum_echo(request.headers))
        return web.Response(status=200, headers=headers)

    async def _store_body(
        self,
        request: web.BaseRequest,
        signed: Signed,
        name: str | Callable[[bytes], str],
        meta: dict[str, Any] | None,
        limit: int = MAX_PUT,
        commit_own: bool = False,
    ) -> tuple[Stat, bytes]:
        """Store the request's body under ``name`` (a str, or ``name(md5_digest)``), checking
        every digest the client sent before the commit.  :return: (stat, md5 digest)."""
        size, pieces, finish = _body(request, signed, limit)
        headers = request.headers
        checks = _header_checksums(headers)
        content_md5 = headers.get("content-md5")
        payload = signed.payload

        async def counted() -> AsyncIterator[bytes]:
            total = 0
            async for piece in pieces:
                total += len(piece)
                if total > limit:
                    raise S3Error("EntityTooLarge", "your proposed upload exceeds the limit")
                if size is not None and total > size:  # at once, not once all of it is read
                    raise S3Error(
                        "IncompleteBody",
                        f"you did not provide the number of bytes announced "
                        f"(at least {total} of {size})",
                    )
                for hasher in checks.values():
                    hasher.update(piece)
                yield piece
            finish()
            if size is not None and total != size:
                raise S3Error(
                    "IncompleteBody",
                    f"you did not provide the number of bytes announced ({total} of {size})",
                )

        def check(n: int, md5: bytes, sha256: bytes | None) -> None:
            if content_md5 is not None and _b64(content_md5) != md5:
                raise S3Error(
                    "BadDigest", "the Content-MD5 you specified did not match what we received"
                )
            if sigv4._is_hex_sha256(payload) and (sha256 is None or sha256.hex() != payload):
                raise S3Error(
                    "XAmzContentSHA256Mismatch",
                    "the provided x-amz-content-sha256 header does not match what was computed",
                )
            for algorithm, hasher in checks.items():
                if headers[f"x-amz-checksum-{algorithm}"] != sigv4.checksum_b64(hasher.digest()):
                    raise S3Error(
                        "BadDigest",
                        f"the x-amz-checksum-{algorithm} you specified did not match the "
                        f"calculated checksum",
                    )

        if content_md5 is not None and len(_b64(content_md5)) != 16:
            raise S3Error("InvalidDigest", "the Content-MD5 you specified is not valid")
        whole = sigv4._is_hex_sha256(payload)  # the body's sha256 is needed only then
        small = size is not None and 0 < size <= p.INLINE_MAX and not commit_own
        coming = self.store.expect_small() if small else None
        try:  # its commit may be waited for by those that go before it (fms.gateway.batch)
            return await self.store.put_stream(
                name, counted(), check, meta, whole, commit_own, coming
            )
        finally:
            if coming is not None:
                coming.arrive()

    async def delete_object(self, bucket: str, name: str) -> web.Response:
        await self.need_bucket(bucket)
        await self.store.rm(name)
        return web.Response(status=204)

    async def copy_object(
        self, request: web.BaseRequest, bucket: str, key: str, name: str
    ) -> web.Response:
        await self.need_bucket(bucket)
        src_bucket, src_key, src_version = _copy_source(request.headers["x-amz-copy-source"])
        src = _name(src_bucket, src_key)
        opened = await self.store.open(src, src_version)
        if opened is None:
            raise S3Error("NoSuchKey", "the specified copy source does not exist", Key=src_key)
        manifest = opened[0]
        etag = _etag(manifest)
        _copy_preconditions(request.headers, etag, manifest["committed"])
        directive = request.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "x-amz-metadata-directive must be COPY or REPLACE")
        if src == name and directive == "REPLACE" and src_version is None:
            # New metadata, same content: the version is committed again (no data moves).
            stat = await self._recommit(opened, _meta_from_headers(request.headers, key), name)
            return _xml(
                xmlio.document(
                    "CopyObjectResult",
                    [("LastModified", xmlio.iso(stat["committed"])), ("ETag", etag)],
                ),
                headers={"x-amz-version-id": str(stat["version"])},
            )
        if src == name and directive == "COPY" and src_version is None:
            raise S3Error(
                "InvalidRequest",
                "this copy request is illegal because it is trying to copy an object to itself "
                "without changing the object's metadata",
            )
        meta = dict(manifest.get("meta") or {})
        if directive == "REPLACE":
            meta = {**_meta_from_headers(request.headers, key), "etag": etag}
        if src_version is not None:
            if src != name:
                raise S3Error(
                    "NotImplemented", "copying a retained version to another key is not supported"
                )
            header = await self.store.call(
                "restore", name=name, version=src_version, commit=os.urandom(16).hex()
            )
            stat = header["stat"]
        elif directive == "REPLACE":  # the source's content under the new name, new metadata
            stat = await self._recommit(opened, meta, name)
        else:
            stat = await self.store.cp(src, name, None)
        body = xmlio.document(
            "CopyObjectResult",
            [("LastModified", xmlio.iso(stat["committed"])), ("ETag", etag)],
        )
        return _xml(body, headers={"x-amz-version-id": str(stat["version"])})

    async def _recommit(self, opened: Opened, meta: dict[str, Any], name: str) -> Stat:
        """The content of ``opened`` committed as a new version of ``name`` with ``meta``: by
        its chunk list (no data moves), or, for an identity that may commit only chunks it
        uploaded itself (:mod:`fms.policy`) and did not upload these, stored again."""
        manifest, inline, via = opened
        try:
            return await self.store.recommit({**manifest, "name": name}, meta)
        except MissingChunks:
            pass

        async def content() -> AsyncIterator[bytes | memoryview]:
            if inline is not None:
                yield inline
            else:
                async for piece in self.store.stream(manifest, 0, manifest["size"], via):
                    yield piece

        stat, _ = await self.store.put_stream(name, content(), _no_check, meta)
        return stat

    async def delete_objects(self, request: web.BaseRequest, bucket: str) -> web.Response:
        await self.need_bucket(bucket)
        body = await _read_small(request)
        headers = request.headers
        checks = _header_checksums(headers)
        if "content-md5" not in headers and not checks:
            raise S3Error(
                "InvalidRequest",
                "DeleteObjects needs a Content-MD5 or x-amz-checksum-* header",
            )
        if "content-md5" in headers and _b64(headers["content-md5"]) != hashlib.md5(body).digest():
            raise S3Error(
                "BadDigest", "the Content-MD5 you specified did not match what we received"
            )
        for algorithm, hasher in checks.items():
            hasher.update(body)
            if headers[f"x-amz-checksum-{algorithm}"] != sigv4.checksum_b64(hasher.digest()):
                raise S3Error("BadDigest", f"the x-amz-checksum-{algorithm} did not match")
        root = xmlio.parse(body, "Delete")
        quiet = (root.findtext("Quiet") or "").strip().lower() == "true"
        objects = root.findall("Object")
        if len(objects) > MAX_DELETE:
            raise S3Error("MalformedXML", f"at most {MAX_DELETE} keys per DeleteObjects")
        results: list[tuple[str, Any]] = []
        for obj in objects:
            key = obj.findtext("Key") or ""
            try:
                await self.store.rm(_name(bucket, key))
                if not quiet:
                    results.append(("Deleted", [("Key", key)]))
            except (S3Error, FmsError) as exc:
                err = exc if isinstance(exc, S3Error) else s3_error_from(exc)
                results.append(
                    ("Error", [("Key", key), ("Code", err.code), ("Message", err.message)])
                )
        return _xml(xmlio.document("DeleteResult", results))

    # --- multipart uploads ---

    def _upload_dir(self, bucket: str, upload_id: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id or ""):
            raise S3Error("NoSuchUpload", "the specified upload does not exist")
        return f"{UPLOADS}{bucket}/{upload_id}/"

    async def _upload_info(self, bucket: str, key: str | None, upload_id: str) -> dict[str, Any]:
        data = await self.own.get_small(self._upload_dir(bucket, upload_id) + "info")
        if data is None:
            raise S3Error("NoSuchUpload", "the specified upload does not exist", Key=key)
        info = json.loads(data)
        if key is not None and info["key"] != key:
            raise S3Error("NoSuchUpload", "the upload is for another key", Key=key)
        return info

    async def create_upload(self, request: web.BaseRequest, bucket: str, key: str) -> web.Response:
        self.need_write(_name(bucket, key), "upload")
        await self.need_bucket(bucket)
        upload_id = os.urandom(16).hex()
        info = {
            "key": key,
            "meta": _meta_from_headers(request.headers, key),
            "initiated": time.time(),
        }
        await self.own.put_small(
            self._upload_dir(bucket, upload_id) + "info", json.dumps(info).encode()
        )
        body = xmlio.document(
            "InitiateMultipartUploadResult",
            [("Bucket", bucket), ("Key", key), ("UploadId", upload_id)],
        )
        return _xml(body)

    async def _parts(self, bucket: str, upload_id: str) -> dict[int, dict[str, Any]]:
        """The parts stored so far: ``{number: stat}`` (their names end in NUMBER.MD5HEX)."""
        base = self._upload_dir(bucket, upload_id)
        parts: dict[int, dict[str, Any]] = {}
        after = ""
        while True:
            header = await self.own.ls(base, after, 1000, False)
            for e in header["entries"]:
                leaf = e["name"][len(base) :]
                match = re.fullmatch(r"(\d{5})\.([0-9a-f]{32})", leaf)
                if match:
                    e["md5"] = match.group(2)
                    number = int(match.group(1))
                    if number not in parts or parts[number]["committed"] < e["committed"]:
                        parts[number] = e
            if not header.get("more") or not header["entries"]:
                return parts
            after = header["entries"][-1]["name"]

    async def upload_part(
        self, request: web.BaseRequest, signed: Signed, bucket: str, key: str, params: Params
    ) -> web.Response:
        upload_id = params.get("uploadId", "")
        number = _part_number(params.get("partNumber"))
        self.need_write(_name(bucket, key), "upload")
        await self._upload_info(bucket, key, upload_id)
        base = self._upload_dir(bucket, upload_id)
        prefix = f"{base}{number:05d}."
        if "x-amz-copy-source" in request.headers:
            stat, md5 = await self._copy_part(request, prefix)
        else:
            stat, md5 = await self._store_body(
                request, signed, lambda md5: prefix + md5.hex(), None, commit_own=True
            )
        # The part replaces any earlier upload of the same number.
        header = await self.own.ls(prefix, "", 100, False)
        for e in header["entries"]:
            if e["name"] != prefix + md5.hex():
                await self.own.rm(e["name"])
        etag = f'"{md5.hex()}"'
        if "x-amz-copy-source" in request.headers:
            body = xmlio.document(
                "CopyPartResult",
                [("LastModified", xmlio.iso(stat["committed"])), ("ETag", etag)],
            )
            return _xml(body)
        return web.Response(status=200, headers={"ETag": etag, **_checksum_echo(request.headers)})

    async def _copy_part(self, request: web.BaseRequest, prefix: str) -> tuple[Stat, bytes]:
        """UploadPartCopy: the part is read from the source object (a range of it)."""
        src_bucket, src_key, src_version = _copy_source(request.headers["x-amz-copy-source"])
        opened = await self.store.open(_name(src_bucket, src_key), src_version)
        if opened is None:
            raise S3Error("NoSuchKey", "the specified copy source does not exist", Key=src_key)
        manifest, inline, via = opened
        _copy_preconditions(request.headers, _etag(manifest), manifest["committed"])
        start, end = 0, manifest["size"]
        rng = request.headers.get("x-amz-copy-source-range")
        if rng is not None:
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", rng.strip())
            if (
                not match
                or int(match.group(1)) > int(match.group(2))
                or int(match.group(2)) >= manifest["size"]
            ):
                raise S3Error("InvalidArgument", "the x-amz-copy-source-range is not valid")
            start, end = int(match.group(1)), int(match.group(2)) + 1

        async def pieces() -> AsyncIterator[bytes | memoryview]:
            if inline is not None:
                yield inline[start:end]
                return
            async for piece in self.store.stream(manifest, start, end, via):
                yield piece

        return await self.store.put_stream(
            lambda d: prefix + d.hex(), pieces(), _no_check, commit_own=True
        )

    async def list_parts(self, bucket: str, key: str, params: Params) -> web.Response:
        self.need_write(_name(bucket, key), "upload")
        upload_id = params.get("uploadId", "")
        await self._upload_info(bucket, key, upload_id)
        parts = await self._parts(bucket, upload_id)
        try:
            marker = int(params.get("part-number-marker", 0) or 0)
            max_parts = min(int(params.get("max-parts", 1000) or 1000), 1000)
        except ValueError:
            raise S3Error("InvalidArgument", "part-number-marker and max-parts are ints") from None
        numbers = sorted(n for n in parts if n > marker)
        shown, truncated = numbers[:max_parts], len(numbers) > max_parts
        body = [
            ("Bucket", bucket),
            ("Key", key),
            ("UploadId", upload_id),
            ("PartNumberMarker", marker),
            ("NextPartNumberMarker", shown[-1] if shown else marker),
            ("MaxParts", max_parts),
            ("IsTruncated", truncated),
            ("StorageClass", "STANDARD"),
        ]
        for n in shown:
            e = parts[n]
            body.append(
                (
                    "Part",
                    [
                        ("PartNumber", n),
                        ("LastModified", xmlio.iso(e["committed"])),
                        ("ETag", f'"{e["md5"]}"'),
                        ("Size", e["size"]),
                    ],
                )
            )
        return _xml(xmlio.document("ListPartsResult", body))

    async def list_uploads(self, bucket: str, params: Params) -> web.Response:
        base = f"{UPLOADS}{bucket}/"
        header = await self.own.ls(base, "", 1000, True)
        uploads = []
        for folder in header.get("folders", []):
            upload_id = folder[len(base) :].rstrip("/")
            try:
                info = await self._upload_info(bucket, None, upload_id)
            except S3Error:
                continue
            mine = caller().may(policy.WRITE, f"{bucket}/{info['key']}")
            if mine and info["key"].startswith(params.get("prefix", "")):
                uploads.append((info["key"], upload_id, info["initiated"]))
        uploads.sort()
        body: list[tuple[str, Any]] = [
            ("Bucket", bucket),
            ("MaxUploads", 1000),
            ("IsTruncated", False),
        ]
        for key, upload_id, initiated in uploads:
            body.append(
                (
                    "Upload",
                    [
                        ("Key", key),
                        ("UploadId", upload_id),
                        ("Initiated", xmlio.iso(initiated)),
                        ("StorageClass", "STANDARD"),
                    ],
                )
            )
        return _xml(xmlio.document("ListMultipartUploadsResult", body))

    async def abort_upload(self, bucket: str, params: Params) -> web.Response:
        upload_id = params.get("uploadId", "")
        base = self._upload_dir(bucket, upload_id)
        info = await self._upload_info(bucket, None, upload_id)
        self.need_write(_name(bucket, info["key"]), "abort an upload of")
        while (await self.own.call("rm_prefix", prefix=base)).get("more"):
            pass
        return web.Response(status=204)

    async def complete_upload(
        self, request: web.BaseRequest, signed: Signed, bucket: str, key: str, params: Params
    ) -> web.StreamResponse:
        upload_id = params.get("uploadId", "")
        done = self._completed.get((bucket, upload_id))
        if done is not None and done[0] == key:
            # A client that lost the reply sends it again: the same answer, as S3 gives.
            return _xml(self._complete_body(bucket, key, done[1]))
        self.need_write(_name(bucket, key), "upload")
        info = await self._upload_info(bucket, key, upload_id)
        root = xmlio.parse(await _read_small(request), "CompleteMultipartUpload")
        wanted = []
        for element in root.findall("Part"):
            try:
                number = int(element.findtext("PartNumber") or "")
            except ValueError:
                raise S3Error("MalformedXML", "a PartNumber is not an int") from None
            wanted.append((number, (element.findtext("ETag") or "").strip().strip('"').lower()))
        if not wanted:
            raise S3Error("MalformedXML", "the upload names no part")
        numbers = [n for n, _ in wanted]
        if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
            raise S3Error("InvalidPartOrder", "the list of parts was not in ascending order")
        parts = await self._parts(bucket, upload_id)
        chosen = []
        for i, (number, etag) in enumerate(wanted):
            part = parts.get(number)
            if part is None or part["md5"] != etag:
                raise S3Error(
                    "InvalidPart",
                    f"part {number} was not uploaded or its ETag does not match",
                )
            if i < len(wanted) - 1 and part["size"] < MIN_PART:
                raise S3Error(
                    "EntityTooSmall",
                    f"part {number} is smaller than the minimum allowed size (5 MiB)",
                )
            chosen.append(part)
        name = _name(bucket, key)
        etag = hashlib.md5(b"".join(bytes.fromhex(pt["md5"]) for pt in chosen)).hexdigest()
        etag = f'"{etag}-{len(chosen)}"'
        meta = {**info["meta"], "etag": etag}
        sizes = ",".join(str(pt["size"]) for pt in chosen)
        used = sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())
        if len(sizes) <= MAX_PARTS_META and used + len(sizes) + 5 <= MAX_META_BYTES:
            # GET ?partNumber=N reads them
            meta["parts"] = sizes

        response = web.StreamResponse(status=200, headers={"Content-Type": "application/xml"})
        await response.prepare(request)
        work = asyncio.ensure_future(self._compose(name, chosen, meta))
        while True:  # S3 sends spaces while it works, so clients and proxies wait
            finished, _ = await asyncio.wait([work], timeout=KEEPALIVE)
            if finished:
                break
            await response.write(b" ")
        try:
            stat = work.result()
            if len(self._completed) >= COMPLETED_KEPT:
                self._completed.pop(next(iter(self._completed)))
            self._completed[(bucket, upload_id)] = (key, etag)
            await response.write(self._complete_body(bucket, key, etag))
            while (
                await self.own.call("rm_prefix", prefix=self._upload_dir(bucket, upload_id))
            ).get("more"):
                pass
            log.debug("event=s3_complete name=%s version=%s", name, stat["version"])
        except Exception as exc:
            err = exc if isinstance(exc, S3Error) else s3_error_from(exc)
            await response.write(err.xml(f"/{bucket}/{key}", "complete"))
        await response.write_eof()
        return response

    @staticmethod
    def _complete_body(bucket: str, key: str, etag: str) -> bytes:
        return xmlio.document(
            "CompleteMultipartUploadResult",
            [
                ("Location", f"/{bucket}/{quote(key)}"),
                ("Bucket", bucket),
                ("Key", key),
                ("ETag", etag),
            ],
        )

    async def _compose(self, name: str, parts: list[dict[str, Any]], meta: dict[str, Any]) -> Stat:
        """Join the parts into one object.  Parts of whole chunks (every part but the last a
        multiple of the chunk size) are joined by their chunk lists: only the whole object's
        sha256 is computed, by reading them, and no byte is stored again; other parts are
        read and stored again."""
        manifests: list[Opened] = []
        for part in parts:
            opened = await self.own.open(part["name"])
            if opened is None:
                raise S3Error("InvalidPart", f"a part of {name!r} vanished")
            manifests.append(opened)

        async def content() -> AsyncIterator[bytes | memoryview]:
            for manifest, inline, _via in manifests:
                if inline is not None:
                    yield inline
                else:
                    async for piece in self.own.stream(
                        manifest, 0, manifest["size"], {"fresh": True}
                    ):
                        yield piece

        aligned = all(
            m["chunk_size"] == CHUNK_SIZE
            and (i == len(manifests) - 1 or m["size"] % CHUNK_SIZE == 0)
            for i, (m, _, _) in enumerate(manifests)
        )
        size = sum(m["size"] for m, _, _ in manifests)
        if not aligned or size <= p.INLINE_MAX:
            stat, _ = await self.store.put_stream(name, content(), _no_check, meta)
            return stat
        # Metadata only: one manifest listing the parts' chunks in order; the object's digest
        # is derived from the chunk digests, so no byte is read or stored again.
        digests = b"".join([await self.own.digests(m) for m, _, _ in manifests])
        plan = Plan(size, CHUNK_SIZE, digests, time.time(), None, await self.store.hasher())
        plan.meta = meta
        try:
            return await self.store.commit_plan(name, plan)
        except MissingChunks:
            # Parts uploaded by another identity than the one completing: an identity may
            # commit only chunks it uploaded itself (fms.policy), so the bytes are stored again.
            stat, _ = await self.store.put_stream(name, content(), _no_check, meta)
            return stat

    # --- the console ---

    async def console(self, request: web.BaseRequest, raw_path: str) -> web.StreamResponse:
        from .console import serve

        return await serve(request, raw_path)

    async def zip_folder(
        self, request: web.BaseRequest, bucket: str, params: Params
    ) -> web.StreamResponse:
        from .console import zip_response

        return await zip_response(self, request, bucket, params.get("prefix", ""))


# --- helpers ---


def _no_check(size: int, md5: bytes, sha256: bytes | None) -> None:
    return None


def _query(raw_query: str) -> Params:
    out: Params = {}
    for part in raw_query.split("&") if raw_query else ():
        if not part:
            continue
        name, _, value = part.partition("=")
        out.setdefault(unquote(name), unquote(value))
    return out


def _split(raw_path: str) -> tuple[str | None, str | None]:
    path = unquote(raw_path)
    if not path.startswith("/"):
        raise S3Error("InvalidRequest", "the path must start with /")
    bucket, _, key = path[1:].partition("/")
    return (bucket or None), (key or None)


def _name(bucket: str, key: str) -> str:
    """The fms name of an object, or an S3 error saying why the key cannot be one."""
    if bucket == HIDDEN or bucket.startswith(HIDDEN + "/"):
        raise S3Error("AccessDenied", f"{HIDDEN} is the gateway's own folder")
    name = f"{bucket}/{key}"
    if len(name.encode("utf-8")) > p.MAX_NAME_BYTES:
        raise S3Error(
            "KeyTooLongError",
            f"your key is too long: bucket and key together are at most {p.MAX_NAME_BYTES} "
            f"bytes here",
        )
    try:
        return p.check_name(name)
    except FmsError as exc:
        raise S3Error(
            "InvalidArgument",
            f"this store cannot hold the key {key!r}: {exc} (keys cannot end with '/' or "
            f"hold empty, '.' or '..' parts)",
        ) from None


def _version(params: Params) -> int | None:
    value = params.get("versionId")
    if value is None or value == "null":
        return None
    try:
        return int(value)
    except ValueError:
        raise S3Error("InvalidArgument", "invalid version id specified") from None


def _part_number(text: str | None) -> int:
    try:
        number = int(text or "")
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_PARTS:
        raise S3Error("InvalidArgument", f"partNumber must be an int from 1 to {MAX_PARTS}")
    return number


def _etag(entry: dict[str, Any]) -> str:
    """The object's ETag: the MD5 the gateway stored with it, or for an object stored without
    one (by fms itself), one derived from its sha256 and marked as not an MD5 (``-1``)."""
    meta = entry.get("meta") or {}
    if meta.get("etag"):
        return str(meta["etag"])
    digest = entry["digest"]
    digest = digest.hex() if isinstance(digest, bytes) else digest
    return f'"{digest[:32]}-1"'


def _object_headers(manifest: dict[str, Any]) -> dict[str, str]:
    meta = manifest.get("meta") or {}
    name = manifest["name"]
    headers = {
        "ETag": _etag(manifest),
        "Last-Modified": xmlio.http_date(manifest["committed"]),
        "Accept-Ranges": "bytes",
        "Content-Type": meta.get("content-type") or _guess_type(name),
        "x-amz-version-id": str(manifest["version"]),
    }
    for key, value in meta.items():
        if key in _SERVED_HEADERS:
            headers[key.title()] = value
        elif key.startswith("x-amz-meta-"):
            headers[key] = value
    return headers


def _guess_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _meta_from_headers(headers: Headers, key: str) -> dict[str, str]:
    meta: dict[str, str] = {}
    get = headers.get
    for name in STORED_HEADERS:
        value = get(name)
        if value is not None:
            meta[name] = value
    meta.setdefault("content-type", "application/octet-stream")
    for name, value in headers.items():
        # lowered only if its 11th character is the "-" of x-amz-meta- (no other character
        # lowers to "-", and one that lowers to two characters makes it no x-amz-meta- name)
        if name[10:11] == "-" and name.lower().startswith("x-amz-meta-"):
            meta[name.lower()] = value
    if sum(len(k.encode()) + len(v.encode()) for k, v in meta.items()) > MAX_META_HEADERS:
        raise S3Error(
            "MetadataTooLarge",
            f"your metadata headers exceed {MAX_META_HEADERS} bytes (the store keeps 2 KiB of "
            f"metadata with a version, the ETag included)",
            status=400,
        )
    return meta


# (algorithm, its header) for each x-amz-checksum-* header a request may send
_CHECKSUM_HEADERS = tuple((a, f"x-amz-checksum-{a}") for a in sigv4.CHECKSUM_ALGORITHMS)


def _header_checksums(headers: Headers) -> dict[str, sigv4.Hasher]:
    """Hashers for the x-amz-checksum-* headers sent with the request (not in a trailer)."""
    out: dict[str, sigv4.Hasher] = {}
    for algorithm, header in _CHECKSUM_HEADERS:
        if header in headers:
            out[algorithm] = sigv4.new_checksum(algorithm)
    return out


def _checksum_echo(headers: Headers) -> dict[str, str]:
    get = headers.get
    return {header: value for _, header in _CHECKSUM_HEADERS if (value := get(header)) is not None}


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _body(
    request: web.BaseRequest, signed: Signed, limit: int
) -> tuple[int | None, AsyncIterator[bytes], Callable[[], None]]:
    """``(announced size or None, async iterator of the decoded body, finish())``."""
    headers = request.headers
    if signed.payload in sigv4.STREAMING_MODES:
        try:
            size = int(headers["x-amz-decoded-content-length"])
        except (KeyError, ValueError):
            raise S3Error(
                "MissingContentLength",
                "an aws-chunked body needs x-amz-decoded-content-length",
            ) from None
        if size > limit:
            raise S3Error("EntityTooLarge", "your proposed upload exceeds the maximum allowed size")
        trailer = headers.get("x-amz-trailer", "")
        decoder = sigv4.ChunkedDecoder(signed, trailer.split(",") if trailer else [])

        async def decoded() -> AsyncIterator[bytes]:
            async for data in request.content.iter_any():
                for piece in decoder.feed(data):
                    yield piece
            decoder.feed(b"")

        return size, decoded(), decoder.finish
    length = request.content_length
    if length is None and "chunked" not in headers.get("transfer-encoding", "").lower():
        raise S3Error("MissingContentLength", "you must provide the Content-Length HTTP header")
    if length is not None and length > limit:
        raise S3Error("EntityTooLarge", "your proposed upload exceeds the maximum allowed size")

    async def raw() -> AsyncIterator[bytes]:
        async for data in request.content.iter_any():
            yield data

    return length, raw(), lambda: None


async def _read_small(request: web.BaseRequest, limit: int = xmlio.MAX_BODY) -> bytes:
    data = await request.content.read(limit + 1)
    if len(data) > limit:
        raise S3Error("MalformedXML", "the request body is too large")
    return data


def _parse_range(text: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` of a single ``bytes=`` range, None to serve the whole (not a range we
    honour), or InvalidRange (416) when it cannot be satisfied."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", text)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        n = int(last)
        if n == 0:
            raise _invalid_range(size)
        return max(size - n, 0), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _invalid_range(size)
    return start, end


def _invalid_range(size: int) -> S3Error:
    err = S3Error("InvalidRange", "the requested range is not satisfiable")
    err.headers = {"Content-Range": f"bytes */{size}"}
    return err


def _parts_count(manifest: dict[str, Any]) -> int:
    parts = (manifest.get("meta") or {}).get("parts")
    return len(parts.split(",")) if parts else 1


def _part_range(manifest: dict[str, Any], text: str) -> tuple[int, int]:
    number = _part_number(text)
    parts = (manifest.get("meta") or {}).get("parts")
    sizes = [int(s) for s in parts.split(",")] if parts else [manifest["size"]]
    if number > len(sizes):
        raise S3Error(
            "InvalidPartNumber", "the requested partnumber is not satisfiable", status=416
        )
    start = sum(sizes[: number - 1])
    return start, start + sizes[number - 1]


def _http_time(text: str) -> float | None:
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _etag_match(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or etag.strip('"') in (t.strip('"') for t in tags)


def _preconditions(headers: Headers, etag: str, committed: float) -> bool:
    """RFC 7232 as S3 applies it: PreconditionFailed, or True for 304 Not Modified."""
    modified = int(committed)
    if "if-match" in headers:
        if not _etag_match(headers["if-match"], etag):
            raise S3Error(
                "PreconditionFailed", "at least one of the preconditions you specified did not hold"
            )
    elif "if-unmodified-since" in headers:
        since = _http_time(headers["if-unmodified-since"])
        if since is not None and modified > since:
            raise S3Error(
                "PreconditionFailed", "at least one of the preconditions you specified did not hold"
            )
    if "if-none-match" in headers:
        return _etag_match(headers["if-none-match"], etag)
    if "if-modified-since" in headers:
        since = _http_time(headers["if-modified-since"])
        return since is not None and modified <= since
    return False


def _copy_preconditions(headers: Headers, etag: str, committed: float) -> None:
    fields = {
        k[len("x-amz-copy-source-") :]: v
        for k, v in headers.items()
        if k.lower().startswith("x-amz-copy-source-if-")
    }
    if fields and _preconditions({k.lower(): v for k, v in fields.items()}, etag, committed):
        raise S3Error(
            "PreconditionFailed", "at least one of the preconditions you specified did not hold"
        )


def _copy_source(text: str) -> tuple[str, str, int | None]:
    """``(bucket, key, version or None)`` of an x-amz-copy-source header."""
    source, _, query = text.partition("?")
    source = unquote(source).lstrip("/")
    bucket, _, key = source.partition("/")
    if not bucket or not key:
        raise S3Error("InvalidArgument", "x-amz-copy-source must be BUCKET/KEY")
    version = _version(_query(query))
    return bucket, key, version


def _token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode("utf-8")).decode("ascii")


def _untoken(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError):
        raise S3Error("InvalidArgument", "the continuation token provided is incorrect") from None


def _xml(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=body, status=status, content_type="application/xml", headers=headers or {}
    )


def _error(request: web.BaseRequest, exc: S3Error, raw_path: str, request_id: str) -> web.Response:
    headers = {"x-amz-request-id": request_id, **exc.headers}
    if request.method == "HEAD":  # HEAD errors carry no body
        return web.Response(status=exc.status, headers=headers)
    body = exc.xml(unquote(raw_path), request_id)
    return web.Response(
        body=body, status=exc.status, content_type="application/xml", headers=headers
    )


def make_server(gateway: Gateway) -> web.Server:
    """aiohttp's low-level server with :meth:`Gateway.handle` for every request: no router,
    no middlewares, no per-request Application state."""
    return web.Server(
        gateway.handle,
        auto_decompress=False,  # a body sent with Content-Encoding: gzip is stored as sent
        access_log=None,
    )
