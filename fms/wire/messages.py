"""What the messages are: the protocol version, the ops and the service that serves each, the
error codes, the reply builders, and the sizes and times every peer agrees on."""

from typing import Any

from ..errors import BadRequest

__all__ = [
    "BROKER",
    "CACHE",
    "CHANGE_OPS",
    "DATA_OPS",
    "DEFAULT_BACKEND",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_FRONTEND",
    "ERROR_CODES",
    "FALLBACK_SERVICE",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_LIVENESS",
    "INLINE_MAX",
    "LS_ENTRY_MAX",
    "LS_PAGE_DEFAULT",
    "LS_PAGE_MAX",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_FILES",
    "MAX_CHUNK_SIZE",
    "MAX_CLIENT_INFLIGHT",
    "MAX_COMMIT_ID",
    "MAX_GC_GRACE",
    "MAX_HAVE_BATCH",
    "MIN_CHUNK_SIZE",
    "OP_SERVICE",
    "PROTOCOL_VERSION",
    "SERVICES",
    "STORAGE",
    "WORKER_SEND_TIMEOUT",
    "GiB",
    "KiB",
    "MiB",
    "TiB",
    "check_frame_count",
    "check_version",
    "error_reply",
    "fills_fields",
    "is_version",
    "ok_reply",
    "read_fills",
]

PROTOCOL_VERSION = 3  # 2: every store used sha256; 1: manifests listed every chunk

# Where the broker listens unless told otherwise: clients connect to the frontend, workers to the
# backend.
DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"

# Sizes, in bytes.
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
DEFAULT_CHUNK_SIZE = 1 * MiB
MIN_CHUNK_SIZE = 4 * KiB
MAX_CHUNK_SIZE = 16 * MiB
MAX_BATCH_FILES = 256  # files per commit_many or get_many
MAX_BATCH_BYTES = 8 * MiB  # their content in one commit_many or get_many message
INLINE_MAX = 128 * KiB  # files up to this size travel with their manifest: one round trip
MAX_HAVE_BATCH = 4096  # chunk hashes per `have` request
LS_PAGE_DEFAULT = 1000  # entries per `ls` reply unless `limit` says otherwise
LS_PAGE_MAX = 5000  # the largest `limit`: a reply stays far below MAX_FRAME_SIZE
LS_ENTRY_MAX = 1280  # bytes an ls page takes per unit of its `limit`, at most (a 1,024-byte name
# and the fields; a page of entries with metadata maps holds fewer)
MAX_COMMIT_ID = 128  # characters in a commit's or rm's `commit` id
MAX_GC_GRACE = 10 * 365 * 86400  # seconds: the largest `grace` a gc request may ask for

# Times, in seconds.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_LIVENESS = 3  # missed heartbeats before a peer is declared dead
WORKER_SEND_TIMEOUT = 1.0  # SNDTIMEO on a worker's DEALER: a send never blocks for longer
MAX_CLIENT_INFLIGHT = 128  # requests one client may have in flight at the broker

# Services, and which one serves each client op.
CACHE = "cache"
STORAGE = "storage"
BROKER = "broker"
SERVICES = (CACHE, STORAGE)
OP_SERVICE = {
    "get": CACHE,  # manifest (+ content of a small file)
    "chunk": CACHE,  # one chunk by hash
    "page": CACHE,  # a page of a chunk list (or a body) by its id
    "get_many": CACHE,  # many names' manifests (+ small files' content) in one message
    "cache_stats": CACHE,
    "have": STORAGE,  # which of these chunk hashes are missing
    "put_chunk": STORAGE,
    "put_page": STORAGE,  # a page of a long chunk list, before the commit that names it
    "commit": STORAGE,  # write a manifest (idempotent by commit id)
    "commit_many": STORAGE,  # many small files (content inline) in one message
    "ls": STORAGE,
    "stat": STORAGE,
    "rm": STORAGE,
    "mv": STORAGE,  # rename: metadata only, one transaction
    "cp": STORAGE,  # copy: metadata only, the chunks are shared
    "rm_prefix": STORAGE,  # remove a page of the names under a prefix
    "mv_prefix": STORAGE,  # rename a folder: every name under it, one transaction
    "du": STORAGE,  # files and bytes under a prefix
    "versions": STORAGE,  # a name's current and retained versions
    "get_version": STORAGE,  # a retained version's manifest (+ content of a small file)
    "restore": STORAGE,  # make a retained version current again
    "usage": STORAGE,  # the store's totals
    "gc": STORAGE,  # collect garbage now
    "fsck": STORAGE,  # check a page of stored files' chunks
    "purge": STORAGE,  # remove versions of a name for good (an admin's)
    "whoami": STORAGE,  # the identity a request comes from, and its grants
    "id_add": STORAGE,  # identities, their keys and grants (a store admin's): fms.policy
    "id_ls": STORAGE,
    "id_rm": STORAGE,
    "id_key": STORAGE,
    "grant": STORAGE,
    "revoke": STORAGE,
    "audit": STORAGE,  # a page of the audit log
    "s3_key": STORAGE,  # an S3 access key id -> its identity (the S3 gateway's)
    "status": BROKER,  # answered by the broker itself: live workers
    "hello": BROKER,  # answered by the broker itself: the store and its digest function
}
# Storage's changes of one name or two: a storage worker applies those that reach it back to back
# in one metadata transaction (a group commit), so the broker sends them to one worker while it
# has credit (fms.broker.routing.pick) rather than spreading them.
CHANGE_OPS = frozenset({"commit", "rm", "mv", "cp", "restore"})
# Ops whose request may carry a data frame after its header; any other request is one frame.
DATA_OPS = frozenset({"put_chunk", "put_page", "commit", "commit_many"})

# Every op is idempotent (commit, commit_many, rm, mv, cp and restore carry an id that makes a
# repeat a no-op; a repeated rm_prefix removes what is left under its prefix):
# the broker hands a request to another worker when the first one dies before replying, and the
# client sends it again when no reply comes.
# When no cache worker is alive, storage answers the cache's ops itself (slower, still correct).
FALLBACK_SERVICE = {CACHE: STORAGE}

# Error codes carried in {ok: false, error: CODE, message: TEXT}.
ERROR_CODES = (
    "not_found",
    "bad_request",
    "integrity",
    "missing_chunks",
    "unavailable",
    "busy",
    "no_space",
    "refused",
    "forbidden",
    "too_large",
    "conflict",
    "version",
    "internal",
)


def is_version(v: object) -> bool:
    """Whether ``v`` names this protocol version: the int itself (``true`` and ``1.0`` equal 1
    in Python, and are not versions)."""
    return type(v) is int and v == PROTOCOL_VERSION


def check_version(header: dict[str, Any], speaker: str = "this worker") -> None:
    """A worker's check that a request speaks this protocol version (the broker checks first)."""
    if not is_version(header.get("v")):
        raise BadRequest(
            f"protocol version {header.get('v')!r} not supported; "
            f"{speaker} speaks {PROTOCOL_VERSION}"
        )


def check_frame_count(op: object, frames: int) -> None:
    """That a request of ``op`` has ``frames`` frames: its header, and a data frame only where the
    op takes one (:data:`DATA_OPS`).  :raises BadRequest: it has not."""
    if frames > 2 or frames < 1:
        raise BadRequest(f"a request has 1 or 2 frames (header, data?), got {frames}")
    if frames == 2 and op not in DATA_OPS:
        raise BadRequest(
            f"{op!r} takes no data frame; send its header alone (only "
            f"{', '.join(sorted(DATA_OPS))} carry data)"
        )


def error_reply(req_id: object, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": code, "message": message}


def ok_reply(req_id: object, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, **fields}


# A `commit_many`'s fills on commit, in a route frame (storage's `rep`, the broker's `inv`): two
# arrays with an entry per name of the route's names, `fills` (the manifest of a file made from
# the content the request carried, bin) and `offsets` (where that content starts in the data,
# an int), nil for both where there is none: a route frame holds few containers (fms.limits).


def fills_fields(per_name: list[tuple[int, bytes] | None]) -> dict[str, list[Any]]:
    """The ``fills`` and ``offsets`` fields of ``per_name``: ``(offset, manifest)`` or None
    for each name of the route."""
    return {
        "fills": [fill[1] if fill is not None else None for fill in per_name],
        "offsets": [fill[0] if fill is not None else None for fill in per_name],
    }


def read_fills(route: dict[str, Any], names: list[str]) -> list[tuple[str, int, bytes]]:
    """``(name, offset, manifest)`` of each fill a route's ``fills`` and ``offsets`` offer for
    ``names``.  :raises BadRequest: they are not as :func:`fills_fields` makes them."""
    fills, offsets = route.get("fills"), route.get("offsets")
    if (
        not isinstance(fills, list)
        or not isinstance(offsets, list)
        or not len(fills) == len(offsets) == len(names)
    ):
        raise BadRequest("'fills' and 'offsets' are arrays with an entry per name")
    out = []
    for name, manifest, offset in zip(names, fills, offsets, strict=True):
        if manifest is None and offset is None:
            continue
        if (
            not isinstance(manifest, bytes)
            or not isinstance(offset, int)
            or isinstance(offset, bool)
            or offset < 0
        ):
            raise BadRequest("a fill is a manifest (bin) and an offset (int, 0 or more)")
        out.append((name, offset, manifest))
    return out
