"""AWS Signature Version 4 as S3 checks it: the Authorization header, presigned URLs, and the
aws-chunked bodies of the STREAMING-* payload modes (chunk signatures, trailers, checksums).

Everything here is pure: it takes the request's method, raw path, raw query and headers, and
the secret found for the access key id, and says whether the signature holds.  Signatures are
computed from the **raw** path and query as they came on the wire, never from a decoded form.
"""

import base64
import functools
import hashlib
import hmac
import re
import time
import zlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, TypeAlias
from urllib.parse import quote, unquote

from .. import install_hint
from .errors import S3Error

if TYPE_CHECKING:
    from .credentials import Caller

# resolve(access key id) -> (secret, caller); raises S3Error for an unknown key
Resolve: TypeAlias = Callable[[str], "tuple[str, Caller]"]
# a request's headers: aiohttp's (case-insensitive, with getall) or a plain mapping
Headers: TypeAlias = Mapping[str, str]

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_MODES = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

MAX_SKEW = 15 * 60  # seconds a request's date may differ from ours
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600  # seconds: the most X-Amz-Expires S3 accepts
MAX_CHUNK_HEADER = 4096  # bytes of one aws-chunked chunk header line
MAX_TRAILER = 8192  # bytes of an aws-chunked trailer section
MAX_KEY_ID = 128  # characters of an access key id (AWS's are 20)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


@functools.lru_cache(maxsize=1024)
def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The key a day's signatures are made with (four HMACs), kept per key, date, region and
    service: a client's requests of one day all use the same one."""
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def _uri_encode(text: str, slash: bool = True) -> str:
    return quote(text, safe="-_.~" + ("/" if not slash else ""))


def canonical_query(raw_query: str, drop: str | None = None) -> str:
    """The query as SigV4 signs it: each name and value decoded from the raw query, encoded
    again the RFC 3986 way, sorted."""
    pairs = []
    for part in raw_query.split("&") if raw_query else ():
        if not part:
            continue
        name, _, value = part.partition("=")
        name, value = unquote(name), unquote(value)
        if name == drop:
            continue
        pairs.append((_uri_encode(name), _uri_encode(value)))
    pairs.sort()
    return "&".join(f"{n}={v}" for n, v in pairs)


def _canonical_headers(headers: Headers, signed: list[str]) -> str:
    lines = []
    for name in signed:
        values: list[str] | None = (
            headers.getall(name, None) if hasattr(headers, "getall") else None
        )
        if values is None:
            value = headers.get(name)
            values = [] if value is None else [value]
        if not values:
            raise S3Error("AccessDenied", f"the signed header {name} is missing from the request")
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "".join(lines)


class Credential:
    """The ``Credential=`` part of a signature: key id and scope."""

    __slots__ = ("date", "key_id", "region", "service")

    def __init__(self, text: str) -> None:
        parts = text.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request":
            raise S3Error(
                "AuthorizationHeaderMalformed",
                "the Credential must be KEY/YYYYMMDD/REGION/s3/aws4_request",
            )
        self.key_id, self.date, self.region, self.service = parts[:4]
        if self.service != "s3":
            raise S3Error("AuthorizationHeaderMalformed", "the Credential's service must be s3")

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


class Signed:
    """A request whose signature holds: who signed it, and what its body must be checked
    against (``payload``: a hex sha256, UNSIGNED-PAYLOAD or a STREAMING-* mode), with the key
    and the seed signature that chunk signatures chain from."""

    __slots__ = ("amz_date", "credential", "identity", "key", "key_id", "payload", "seed")

    def __init__(
        self,
        credential: Credential,
        key: bytes,
        amz_date: str,
        seed: str,
        payload: str,
        identity: "Caller",
    ) -> None:
        self.credential = credential
        self.key_id = credential.key_id
        self.key = key
        self.amz_date = amz_date
        self.seed = seed
        self.payload = payload
        self.identity = identity


@functools.lru_cache(maxsize=256)
def _parse_amz_date(text: str) -> float:
    """X-Amz-Date as a time (kept: the requests of one second share theirs, and strptime costs
    tens of microseconds)."""
    try:
        if not _AMZ_DATE.fullmatch(text):
            raise ValueError(text)
        return datetime(
            int(text[0:4]),
            int(text[4:6]),
            int(text[6:8]),
            int(text[9:11]),
            int(text[11:13]),
            int(text[13:15]),
            tzinfo=UTC,
        ).timestamp()
    except (TypeError, ValueError, OverflowError):
        raise S3Error(
            "AccessDenied", f"bad X-Amz-Date {text!r}: write it as YYYYMMDDTHHMMSSZ"
        ) from None


def _string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def _check(
    method: str,
    raw_path: str,
    query: str,
    headers: Headers,
    signed_headers: str,
    payload: str,
    amz_date: str,
    cred: Credential,
    key: bytes,
    signature: str,
) -> None:
    """Compare ``signature`` with ours, over the raw path and, should a client have encoded
    its path in a different (still valid) way, over the path encoded as SigV4 prescribes."""
    signed_list = signed_headers.split(";")
    canon_headers = _canonical_headers(headers, signed_list)
    path = raw_path
    for _ in range(2):
        canonical = "\n".join([method, path, query, canon_headers, signed_headers, payload])
        to_sign = _string_to_sign(amz_date, cred.scope, canonical).encode()
        mine = hmac.digest(key, to_sign, "sha256").hex()  # hmac.new's, in one C call
        if hmac.compare_digest(mine, signature):
            return
        # the path encoded as SigV4 prescribes, made only when the raw one does not match
        normal = _uri_encode(unquote(raw_path), slash=False)
        if normal == path:
            break
        path = normal
    raise S3Error(
        "SignatureDoesNotMatch",
        "the request signature we calculated does not match the signature you provided; "
        "check your key and signing method",
    )


def key_id(headers: Headers, raw_query: str) -> str | None:
    """The access key id a request says it is signed with (header or presigned URL), or None;
    nothing is checked here (:func:`verify` does)."""
    auth = headers.get("authorization")
    if auth is not None:
        start = auth.find("Credential=")
        text = auth[start + len("Credential=") :] if start >= 0 else None
    else:
        text = _query_params(raw_query).get("X-Amz-Credential")
    key = (text or "").partition("/")[0].strip()
    return key if 0 < len(key) <= MAX_KEY_ID else None


def verify(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Headers,
    resolve: Resolve,
    now: float | None = None,
) -> Signed:
    """Check a request's SigV4 signature (header or presigned URL).

    :param resolve: ``resolve(access_key_id) -> (secret, identity)``; raises S3Error
        (InvalidAccessKeyId) for an unknown key.
    :raises S3Error: anonymous, malformed, expired, skewed or wrong.
    """
    now = time.time() if now is None else now
    auth = headers.get("authorization")
    params = _query_params(raw_query)
    if auth is None and "X-Amz-Signature" in params:
        return _verify_presigned(method, raw_path, raw_query, headers, params, resolve, now)
    if auth is None and "Signature" in params and "AWSAccessKeyId" in params:
        raise S3Error(
            "AccessDenied",
            "AWS Signature Version 2 is not supported: sign with Version 4 (boto3: "
            "Config(signature_version='s3v4'))",
        )
    if auth is None:
        raise S3Error("AccessDenied", "anonymous requests are refused: sign them with a key")
    if not auth.startswith(ALGORITHM + " "):
        raise S3Error(
            "AccessDenied" if auth.startswith("AWS ") else "AuthorizationHeaderMalformed",
            "only AWS Signature Version 4 (AWS4-HMAC-SHA256) is supported",
        )
    fields: dict[str, str] = {}
    for item in auth[len(ALGORITHM) + 1 :].split(","):
        name, _, value = item.strip().partition("=")
        fields[name] = value
    try:
        cred = Credential(fields["Credential"])
        signed_headers, signature = fields["SignedHeaders"], fields["Signature"]
    except KeyError:
        raise S3Error(
            "AuthorizationHeaderMalformed",
            "the Authorization header needs Credential, SignedHeaders and Signature",
        ) from None
    amz_date = headers.get("x-amz-date")
    if amz_date is None:
        raise S3Error("AccessDenied", "the request needs an X-Amz-Date header")
    when = _parse_amz_date(amz_date)
    if abs(now - when) > MAX_SKEW:
        raise S3Error(
            "RequestTimeTooSkewed",
            "the difference between the request time and the server's time is too large "
            "(at most 15 minutes): check the clock",
        )
    if amz_date[:8] != cred.date:
        raise S3Error("AuthorizationHeaderMalformed", "the Credential's date is not X-Amz-Date's")
    if "host" not in signed_headers.split(";"):
        raise S3Error("AccessDenied", "the host header must be signed")
    payload = headers.get("x-amz-content-sha256")
    if payload is None:
        raise S3Error("InvalidRequest", "the request needs an x-amz-content-sha256 header")
    if payload not in (UNSIGNED, *STREAMING_MODES) and not _is_hex_sha256(payload):
        raise S3Error(
            "InvalidArgument",
            f"x-amz-content-sha256 {payload[:80]!r} is not a hex sha256, UNSIGNED-PAYLOAD or "
            f"a supported STREAMING-* mode",
        )
    query = canonical_query(raw_query)
    return _verified(
        resolve,
        cred,
        method,
        raw_path,
        query,
        headers,
        signed_headers,
        payload,
        amz_date,
        signature,
    )


_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")


def _is_hex_sha256(text: str) -> bool:
    return len(text) == 64 and _HEX_SHA256.fullmatch(text) is not None


def _query_params(raw_query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in raw_query.split("&") if raw_query else ():
        name, _, value = part.partition("=")
        out.setdefault(unquote(name), unquote(value))
    return out


def _verify_presigned(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Headers,
    params: dict[str, str],
    resolve: Resolve,
    now: float,
) -> Signed:
    if params.get("X-Amz-Algorithm") != ALGORITHM:
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Algorithm must be " + ALGORITHM)
    try:
        cred = Credential(params["X-Amz-Credential"])
        amz_date = params["X-Amz-Date"]
        expires = int(params["X-Amz-Expires"])
        signed_headers = params["X-Amz-SignedHeaders"]
    except (KeyError, ValueError):
        raise S3Error(
            "AuthorizationQueryParametersError",
            "a presigned URL needs X-Amz-Credential, X-Amz-Date, X-Amz-Expires (an int) and "
            "X-Amz-SignedHeaders",
        ) from None
    if not 1 <= expires <= MAX_PRESIGN_EXPIRES:
        raise S3Error(
            "AuthorizationQueryParametersError",
            "X-Amz-Expires must be between 1 and 604800 seconds (7 days)",
        )
    when = _parse_amz_date(amz_date)
    if now > when + expires:
        raise S3Error("AccessDenied", "Request has expired")
    if when - now > MAX_SKEW:
        raise S3Error("RequestTimeTooSkewed", "the presigned URL's date is in the future")
    payload = params.get("X-Amz-Content-Sha256", UNSIGNED)
    query = canonical_query(raw_query, drop="X-Amz-Signature")
    signature = params["X-Amz-Signature"]
    return _verified(
        resolve,
        cred,
        method,
        raw_path,
        query,
        headers,
        signed_headers,
        payload,
        amz_date,
        signature,
    )


def _verified(
    resolve: Resolve,
    cred: Credential,
    method: str,
    raw_path: str,
    query: str,
    headers: Headers,
    signed_headers: str,
    payload: str,
    amz_date: str,
    signature: str,
) -> Signed:
    """The request, signed by the key ``cred`` names (``resolve``: key id -> its secret and
    identity), checked against ``signature``.  :raises S3Error: it does not match."""
    secret, identity = resolve(cred.key_id)
    key = signing_key(secret, cred.date, cred.region, cred.service)
    _check(
        method, raw_path, query, headers, signed_headers, payload, amz_date, cred, key, signature
    )
    return Signed(cred, key, amz_date, signature, payload, identity)


def presign(
    method: str,
    endpoint_host: str,
    path: str,
    key_id: str,
    secret: str,
    expires: int,
    region: str = "us-east-1",
    now: float | None = None,
) -> str:
    """A presigned URL's path and query for ``path`` (already URI-encoded), as SDKs make it."""
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, UTC)
    amz_date, date = stamp.strftime("%Y%m%dT%H%M%SZ"), stamp.strftime("%Y%m%d")
    cred = Credential(f"{key_id}/{date}/{region}/s3/aws4_request")
    query = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{key_id}/{cred.scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": "host",
    }
    raw_query = "&".join(f"{_uri_encode(k)}={_uri_encode(v)}" for k, v in sorted(query.items()))
    canonical = "\n".join(
        [method, path, canonical_query(raw_query), f"host:{endpoint_host}\n", "host", UNSIGNED]
    )
    key = signing_key(secret, date, region, "s3")
    sig = hmac.new(
        key, _string_to_sign(amz_date, cred.scope, canonical).encode(), hashlib.sha256
    ).hexdigest()
    return f"{path}?{raw_query}&X-Amz-Signature={sig}"


# --- checksums (x-amz-checksum-*) ---


class Hasher(Protocol):
    """What an x-amz-checksum-* algorithm computes with (hashlib's, or a CRC below)."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    def __init__(self, fn: Callable[[bytes, int], int]) -> None:
        self._fn, self._value = fn, 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        raise NotImplementedError


class _Crc32(_Crc):
    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


class _Crc64(_Crc):
    def digest(self) -> bytes:
        return self._value.to_bytes(8, "big")


def _crt(name: str) -> Callable[[bytes, int], int]:
    try:
        from awscrt import checksums
    except ImportError:  # pragma: no cover - awscrt is in the s3 gateway's extra
        raise S3Error(
            "NotImplemented",
            f"the {name} checksum needs the awscrt package: " + install_hint("s3gw"),
        ) from None
    fn: Callable[[bytes, int], int] = getattr(checksums, name)
    return fn


CHECKSUM_ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


def new_checksum(algorithm: str) -> Hasher:
    """A hasher (``update``, ``digest``) for an x-amz-checksum-* algorithm (lower case)."""
    if algorithm == "crc32":
        return _Crc32(zlib.crc32)
    if algorithm == "crc32c":
        return _Crc32(_crt("crc32c"))
    if algorithm == "crc64nvme":
        return _Crc64(_crt("crc64nvme"))
    if algorithm in ("sha1", "sha256"):
        return hashlib.new(algorithm)
    raise S3Error("InvalidRequest", f"unknown checksum algorithm {algorithm!r}")


def checksum_b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


# --- aws-chunked bodies ---


class ChunkedDecoder:
    """Decodes an aws-chunked body fed in pieces of any size: yields the payload bytes,
    verifies each chunk's signature (signed modes) and, at the end, the trailer's checksum and
    signature.  ``feed(data)`` returns a list of payload pieces; ``finish()`` raises unless the
    body ended properly."""

    def __init__(self, signed: Signed, trailer_names: list[str]) -> None:
        self.mode = signed.payload
        self.signed = signed
        self.prev = signed.seed
        self.trailer_names = [n.strip().lower() for n in trailer_names if n.strip()]
        self.checksum: Hasher | None = None
        self.checksum_name: str | None = None
        for name in self.trailer_names:
            if name.startswith("x-amz-checksum-"):
                self.checksum_name = name
                self.checksum = new_checksum(name[len("x-amz-checksum-") :])
        self._buf = bytearray()
        self._state = "header"  # header -> data -> crlf -> header ... -> trailer -> done
        self._left = 0
        self._chunk_sig: str | None = None
        self._chunk_hash: hashlib._Hash | None = None
        self.trailers: dict[str, str] = {}
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._state == "header":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > MAX_CHUNK_HEADER:
                        raise _incomplete("a chunk header line is too long")
                    return out
                self._start_chunk(bytes(self._buf[:end]))
                del self._buf[: end + 2]
            elif self._state == "data":
                if not self._buf:
                    return out
                take = min(self._left, len(self._buf))
                piece = bytes(self._buf[:take])
                del self._buf[:take]
                self._left -= take
                if self._chunk_hash is not None:
                    self._chunk_hash.update(piece)
                if self.checksum is not None:
                    self.checksum.update(piece)
                out.append(piece)
                if self._left == 0:
                    self._end_chunk()
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(self._buf) < 2:
                    return out
                if self._buf[:2] != b"\r\n":
                    raise _incomplete("a chunk's data is not followed by CRLF")
                del self._buf[:2]
                self._state = "header"
            elif self._state == "trailer":
                if not self._read_trailer():
                    return out
            else:  # done: anything after the body is junk
                if self._buf.strip():
                    raise _incomplete("data after the end of the aws-chunked body")
                self._buf.clear()
                return out

    def _start_chunk(self, line: bytes) -> None:
        text = line.decode("latin-1")
        size_text, _, ext = text.partition(";")
        try:
            size = int(size_text.strip(), 16)
        except ValueError:
            raise _incomplete(f"bad chunk size {size_text[:20]!r}") from None
        self._chunk_sig = None
        if self.mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
            name, _, sig = ext.partition("=")
            if name.strip() != "chunk-signature" or not sig:
                raise S3Error("SignatureDoesNotMatch", "a chunk has no chunk-signature")
            self._chunk_sig = sig.strip()
            self._chunk_hash = hashlib.sha256()
        else:
            self._chunk_hash = None
        if size == 0:
            self._end_chunk()
            self._state = "trailer"  # trailer lines, or the empty line that ends the body
            return
        self._left = size
        self._state = "data"

    def _end_chunk(self) -> None:
        if self._chunk_sig is None:
            return
        digest = self._chunk_hash.hexdigest() if self._chunk_hash else EMPTY_SHA256
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                self.signed.amz_date,
                self.signed.credential.scope,
                self.prev,
                EMPTY_SHA256,
                digest,
            ]
        )
        mine = hmac.new(self.signed.key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mine, self._chunk_sig):
            raise S3Error("SignatureDoesNotMatch", "a chunk's signature does not match its content")
        self.prev = self._chunk_sig

    def _read_trailer(self) -> bool:
        """The trailer section after the last (empty) chunk: header lines, then an empty
        line.  :return: whether it is complete."""
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            # A body with no trailer ends with the empty line right after "0\r\n".
            if self._buf[:2] == b"\r\n":
                del self._buf[:2]
                self._state = "done"
                self.done = True
                return True
            if len(self._buf) > MAX_TRAILER:
                raise _incomplete("the trailer is too long")
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        signature = None
        canonical: list[str] = []
        for line in lines:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "x-amz-trailer-signature":
                signature = value
                continue
            self.trailers[name] = value
            canonical.append(f"{name}:{value}\n")
        if self.mode == STREAMING_SIGNED_TRAILER:
            if signature is None:
                raise S3Error("SignatureDoesNotMatch", "the trailer has no signature")
            to_sign = "\n".join(
                [
                    "AWS4-HMAC-SHA256-TRAILER",
                    self.signed.amz_date,
                    self.signed.credential.scope,
                    self.prev,
                    hashlib.sha256("".join(canonical).encode()).hexdigest(),
                ]
            )
            mine = hmac.new(self.signed.key, to_sign.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(mine, signature):
                raise S3Error("SignatureDoesNotMatch", "the trailer's signature does not match")
        self._state = "done"
        self.done = True
        return True

    def finish(self) -> None:
        """The body ended: check it was whole and its trailing checksum matches."""
        if not self.done:
            raise _incomplete("the aws-chunked body ended early")
        for name in self.trailer_names:
            if name not in self.trailers:
                raise S3Error("InvalidRequest", f"the trailer {name} was announced but not sent")
        if self.checksum is not None:
            sent = self.trailers.get(self.checksum_name or "", "")
            if sent != checksum_b64(self.checksum.digest()):
                raise S3Error(
                    "BadDigest",
                    f"the {self.checksum_name} you specified did not match the calculated checksum",
                )


def _incomplete(what: str) -> S3Error:
    return S3Error("IncompleteBody", f"bad aws-chunked body: {what}")
