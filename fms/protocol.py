"""The fms wire protocol: constants, frame layout, encode/decode as pure functions.

Every frame is msgpack.  docs/PROTOCOL.md describes each message; this module is its code.

Frames as they travel (ROUTER sockets add or strip the identity frame themselves)::

    client  -> broker   [header, data?]
    broker  -> worker   [route{t:req, k, from, via}, header, data?]
    worker  -> broker   [route{t:rep, k, to, via, inv?}, header, data?]     a reply
    worker  -> broker   [route{t:req, svc}, header, data?]                  a worker's own request
    worker <-> broker   [route{t:ready|hb|bye|inv|reregister|refused, ...}] control
    broker  -> client   [header, data?]

``header`` is a map with at least ``v`` (protocol version), ``op`` and ``id`` on requests and
``ok`` and ``id`` on replies.  ``data`` is one msgpack ``bin`` object holding file bytes.
"""

import hashlib
import re

import msgpack

from . import limits
from .errors import BadRequest

PROTOCOL_VERSION = 1

# Sizes, in bytes.
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DEFAULT_CHUNK_SIZE = 1 * MiB
MIN_CHUNK_SIZE = 4 * KiB
MAX_CHUNK_SIZE = 16 * MiB
MAX_BATCH_FILES = 256           # small files per commit_many
MAX_BATCH_BYTES = 8 * MiB       # their content per commit_many
INLINE_MAX = 128 * KiB          # files up to this size travel with their manifest: one round trip
MAX_FRAME_SIZE = 32 * MiB       # ZMQ_MAXMSGSIZE on every socket: a larger frame drops the peer
MAX_NAME_BYTES = 1024
MAX_HAVE_BATCH = 4096           # chunk hashes per `have` request
HASH_LEN = 32                   # sha256 digest
# A file's mtime, in seconds since the epoch: finite, from 1900-01-01 to 9999-12-31 (what
# datetime and every filesystem fms writes to can hold).
MTIME_MIN = -2208988800.0
MTIME_MAX = 253402300799.0

# Times, in seconds.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_LIVENESS = 3          # missed heartbeats before a peer is declared dead
WORKER_SEND_TIMEOUT = 1.0       # SNDTIMEO on a worker's DEALER: a send never blocks for longer
MAX_CLIENT_INFLIGHT = 128       # requests one client may have in flight at the broker

# Services, and which one serves each client op.
CACHE = "cache"
STORAGE = "storage"
BROKER = "broker"
SERVICES = (CACHE, STORAGE)
OP_SERVICE = {
    "get": CACHE,          # manifest (+ content of a small file)
    "chunk": CACHE,        # one chunk by hash
    "cache_stats": CACHE,
    "have": STORAGE,       # which of these chunk hashes are missing
    "put_chunk": STORAGE,
    "commit": STORAGE,     # write a manifest (idempotent by commit id)
    "commit_many": STORAGE,  # many small files (content inline) in one message
    "ls": STORAGE,
    "stat": STORAGE,
    "rm": STORAGE,
    "usage": STORAGE,      # the store's totals
    "gc": STORAGE,         # collect garbage now
    "fsck": STORAGE,       # check a page of stored files' chunks
    "status": BROKER,      # answered by the broker itself: live workers
}
# Ops the broker may hand to another worker when the first one dies before replying, and the
# client may send again.  Every op is: commit and rm carry an id that makes a repeat a no-op.
IDEMPOTENT_OPS = frozenset(OP_SERVICE)
# When no cache worker is alive, storage answers the cache's ops itself (slower, still correct).
FALLBACK_SERVICE = {CACHE: STORAGE}

# Error codes carried in {ok: false, error: CODE, message: TEXT}.
ERROR_CODES = ("not_found", "bad_request", "integrity", "missing_chunks", "unavailable",
               "no_space", "refused", "too_large", "version", "internal")

# A data frame: the msgpack bin32 marker, a 4-byte big-endian length, then the bytes.
BIN32 = 0xC6
DATA_PREFIX_LEN = 5


def encode(obj) -> bytes:
    """Pack a header or route map."""
    return msgpack.packb(obj, use_bin_type=True)


def decode(buf, kind: str = "reply") -> dict:
    """Unpack a header or route frame, which must be a msgpack map, within bounds
    (:mod:`fms.limits`): ``kind`` is ``"route"`` (at most 64 KiB), ``"request"`` (at most
    64 KiB, but a ``commit`` or ``have`` up to the frame limit, flat) or ``"reply"`` (up to the
    frame limit; what a client or the cache reads from its trusted broker).

    :raises BadRequest: the bytes are not msgpack, hold more than one object, not a map, or
        are over a limit (:class:`fms.limits.FrameTooLarge`, code ``too_large``, before decoding).
    """
    size = limits.frame_len(buf)
    if kind == "route":
        bounds = {"max_size": limits.MAX_HEADER, "max_containers": limits.MAX_CONTAINERS}
    elif kind == "request":
        bounds = limits.request_limits(size)
        if size > limits.MAX_HEADER:
            limits.peek_large(buf)
    else:
        bounds = {"max_size": MAX_FRAME_SIZE, "max_containers": None, "max_map": 2**16}
    obj = limits.unpack_bounded(buf, **bounds)
    if not isinstance(obj, dict):
        raise BadRequest(f"frame must be a msgpack map, got {type(obj).__name__}")
    return obj


def data_buffer(size: int) -> bytearray:
    """A buffer for ``size`` payload bytes behind a reserved bin32 prefix.

    Fill it with ``readinto(memoryview(buf)[DATA_PREFIX_LEN:])`` and send the whole buffer: it is
    a valid msgpack ``bin`` object, built with no extra copy of the payload.
    """
    buf = bytearray(DATA_PREFIX_LEN + size)
    buf[0] = BIN32
    buf[1:DATA_PREFIX_LEN] = size.to_bytes(4, "big")
    return buf


def pack_data(payload) -> bytearray:
    """Copy ``payload`` into a data frame (for callers that already hold the bytes)."""
    buf = data_buffer(len(payload))
    buf[DATA_PREFIX_LEN:] = payload
    return buf


def unpack_data(frame) -> memoryview:
    """The payload of a data frame as a memoryview over the frame: no copy.

    Accepts bin8 and bin16 too, so a frame made by ``msgpack.packb(bytes)`` is read as well.

    :raises BadRequest: the frame is not exactly one msgpack bin object.
    """
    view = memoryview(frame).cast("B")
    if len(view) < 2:
        raise BadRequest("data frame too short to be msgpack bin")
    marker = view[0]
    if marker == BIN32:
        head = 5
    elif marker == 0xC5:
        head = 3
    elif marker == 0xC4:
        head = 2
    else:
        raise BadRequest(f"data frame must be msgpack bin, starts with 0x{marker:02x}")
    if len(view) < head:
        raise BadRequest("data frame too short for its bin header")
    length = int.from_bytes(view[1:head], "big")
    if len(view) - head != length:
        raise BadRequest(f"data frame says {length} bytes but holds {len(view) - head}")
    return view[head:]


def sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


# --- file shape: the one home of the rules that split a file into chunks ---

def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a ``size``-byte file has in ``chunk_size``-byte chunks (0 if empty)."""
    return -(-size // chunk_size)


def chunk_length(i: int, size: int, chunk_size: int) -> int:
    """The length of chunk ``i``: ``chunk_size``, except the last, which holds the rest."""
    return min(chunk_size, size - i * chunk_size)


def travels_inline(size: int, chunks: int) -> bool:
    """Whether a file's content travels in the same message as its manifest (one round trip)."""
    return size <= INLINE_MAX and chunks == 1


# --- field checks: every handler reads its fields through these, never by bare indexing ---

def need(header: dict, key: str, kind, *, optional=False, default=None):
    """Read ``header[key]`` and check its type; bools are never ints.

    :raises BadRequest: missing (unless optional) or of the wrong type.
    """
    if key not in header:
        if optional:
            return default
        raise BadRequest(f"field {key!r} is missing")
    value = header[key]
    if isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"field {key!r} must be {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise BadRequest(f"field {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def need_int(header: dict, key: str, *, lo=0, hi=2**63 - 1, optional=False, default=None) -> int:
    value = need(header, key, int, optional=optional, default=default)
    if value is not None and not lo <= value <= hi:
        raise BadRequest(f"field {key!r} = {value} is out of range [{lo}, {hi}]")
    return value


def need_hash(header: dict, key: str) -> bytes:
    value = need(header, key, bytes)
    if len(value) != HASH_LEN:
        raise BadRequest(f"field {key!r} must be a {HASH_LEN}-byte sha256, got {len(value)} bytes")
    return value


def need_hashes(header: dict, key: str, limit: int) -> list:
    values = need(header, key, list)
    if len(values) > limit:
        raise BadRequest(f"field {key!r} holds {len(values)} hashes, at most {limit} allowed")
    for value in values:
        if not isinstance(value, bytes) or len(value) != HASH_LEN:
            raise BadRequest(f"field {key!r} must hold {HASH_LEN}-byte sha256 digests")
    return values


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", bytes: "bytes", list: "a list", dict: "a map",
             bool: "a boolean", float: "a number"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def check_manifest(manifest) -> dict:
    """Check that a manifest from the wire has every field with the right type and consistent
    sizes, so nothing downstream can trip over it.

    :raises BadRequest: it does not.
    """
    if not isinstance(manifest, dict):
        raise BadRequest("manifest must be a map")
    check_name(need(manifest, "name", str))
    size = need_int(manifest, "size")
    chunk_size = need_int(manifest, "chunk_size", lo=MIN_CHUNK_SIZE, hi=MAX_CHUNK_SIZE)
    need_hash(manifest, "sha256")
    chunks = need_hashes(manifest, "chunks", chunk_count(size, chunk_size))
    if len(chunks) != chunk_count(size, chunk_size):
        raise BadRequest("manifest's chunk count does not fit its size")
    check_mtime(need(manifest, "mtime", (int, float)))
    need_int(manifest, "version", lo=1)
    return manifest


# --- names ---

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")   # C0, DEL and C1


def check_name(name) -> str:
    """Return ``name`` if it is a valid key, else raise :class:`BadRequest` saying why.

    A name is a key, not a path: relative, ``/``-separated, no empty, ``.`` or ``..`` parts,
    no NUL or control characters, at most 1024 bytes in UTF-8.  Storage never uses a name as a
    path (manifests live under the sha256 of the name), so this is about clear errors and about
    ``get -r`` writing only inside its destination.
    """
    if not isinstance(name, str):
        raise BadRequest(f"a name must be a string, got {type(name).__name__}")
    if not name:
        raise BadRequest("the name is empty; give a name such as 'photos/cat.jpg'")
    if "\x00" in name:
        raise BadRequest(f"name {name!r} contains a NUL byte; remove it")
    if _CONTROL.search(name):
        raise BadRequest(f"name {name!r} contains a control character; remove it")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"name {name!r} is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise BadRequest(f"name is {size} bytes long; names are at most {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise BadRequest(f"name {name!r} is absolute; names are relative keys such as 'a/b.txt'")
    for part in name.split("/"):
        if part == "..":
            raise BadRequest(f"name {name!r} has a '..' component; names cannot climb out")
        if part in ("", "."):
            raise BadRequest(f"name {name!r} has an empty or '.' component; write it as "
                             f"{'/'.join(p for p in name.split('/') if p not in ('', '.'))!r}")
    return name


def check_mtime(mtime) -> float:
    """An mtime as a float if finite and within [MTIME_MIN, MTIME_MAX], else :class:`BadRequest`."""
    value = float(mtime)
    if not MTIME_MIN <= value <= MTIME_MAX:   # also false for NaN
        raise BadRequest(f"mtime {mtime!r} is not a time between the years 1900 and 9999; "
                         f"send seconds since 1970 as a finite number")
    return value


def check_prefix(prefix) -> str:
    """A listing prefix: any string without NUL, at most MAX_NAME_BYTES."""
    if not isinstance(prefix, str):
        raise BadRequest(f"a prefix must be a string, got {type(prefix).__name__}")
    if "\x00" in prefix or len(prefix.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        raise BadRequest("prefix contains a NUL byte or is over 1024 bytes")
    return prefix


def check_version(header: dict, speaker: str = "this worker"):
    """A worker's check that a request speaks this protocol version (the broker checks first)."""
    if header.get("v") != PROTOCOL_VERSION:
        raise BadRequest(f"protocol version {header.get('v')!r} not supported; "
                         f"{speaker} speaks {PROTOCOL_VERSION}")


def error_reply(req_id, code: str, message: str) -> dict:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": code, "message": message}


def ok_reply(req_id, **fields) -> dict:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, **fields}
