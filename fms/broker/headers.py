"""What the broker reads of a message: a few fields of a request header, within bounds.

The broker never decodes data frames, and decodes a header only as far as it must: a small
header whole (with msgpack's limits), a large ``commit`` or ``have`` header only for its scalar
fields (:func:`fms.limits.peek_large`).  Each helper here takes what it needs from a decoded
header and answers a safe default for anything malformed: these fields steer routing, budgets
and metrics, never what a worker is asked to do.
"""

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeGuard

import zmq

from .. import limits
from .. import wire as p
from ..errors import BadRequest

MAX_TAG_LEN = 128  # characters of a chunk request's `of` (a request id) the metrics take


def nbytes(frame: Any) -> int:
    """The size of a frame in bytes (a zmq.Frame, or bytes in the unit tests): its length (a
    memoryview's in bytes; anything else's ``buffer``'s).  A zmq.Frame's own length, not its
    ``buffer``'s: a memoryview made anew, behind a weak reference, each time it is asked for."""
    if type(frame) is memoryview:
        return frame.nbytes
    try:
        return len(frame)
    except TypeError:
        return int(frame.buffer.nbytes)


def buffer(frame: Any) -> Any:
    """What a frame's bytes are read from: a zmq.Frame or bytes themselves (the buffer
    protocol reads them in place; a zmq.Frame's ``buffer`` is a memoryview made anew each time
    it is asked for), anything else's ``buffer``."""
    if isinstance(frame, (zmq.Frame, bytes, bytearray, memoryview)):
        return frame
    return frame.buffer


def int_in(value: object, lo: int, hi: float = float("inf")) -> TypeGuard[int]:
    """Whether a decoded field is an int (a bool is not) from ``lo`` to ``hi``."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def read_header(buf: Any) -> dict:
    """The fields of a request header the broker needs, within bounds: a small header is
    decoded (with msgpack's limits), a large one (only commit and have may be) is only peeked
    at, its lists skipped without being built.  ``buf``: what :func:`buffer` gives of the frame.

    :raises BadRequest: not a bounded msgpack map (``too_large`` when over the limit).
    """
    if limits.frame_len(buf) <= limits.MAX_HEADER:
        return p.decode(buf, "request")
    return limits.peek_large(buf)


class UnsupportedVersion(BadRequest):
    """A request in a protocol version this broker does not speak (answered ``version``)."""

    code = "version"


def check_client_request(header: dict, frames: list) -> str:
    """Check a client request before anything is spent on it: its protocol version, its op,
    its frame count and every field of the op against the one table (a large header,
    ``commit`` or ``have``, was only peeked at: its arrays are the worker's to check).

    :return: its op.
    :raises UnsupportedVersion: another protocol version.
    :raises BadRequest: anything else wrong, saying what.
    """
    if not p.is_version(header.get("v")):
        raise UnsupportedVersion(
            f"protocol version {header.get('v')!r} is not supported; "
            f"this broker speaks {p.PROTOCOL_VERSION}: upgrade the client"
        )
    op = header.get("op")
    if not isinstance(op, str) or op not in p.OP_SERVICE:
        raise BadRequest(f"unknown op {op!r}; known ops: {', '.join(sorted(p.OP_SERVICE))}")
    p.check_frame_count(op, len(frames))
    p.check_request(op, header, partial=nbytes(frames[0]) > limits.MAX_HEADER)
    return op


def deadline_of(header: dict, now: float | None = None) -> float:
    """The broker's own monotonic deadline for a request: now plus the client's relative
    budget ``ttl_ms`` (relative, so no clocks need agree across hosts), within bounds."""
    ttl = header.get("ttl_ms")
    if not int_in(ttl, 1):
        ttl = limits.DEFAULT_TTL_MS
    return (time.monotonic() if now is None else now) + min(ttl, limits.MAX_TTL_MS) / 1000


def chunk_digest(op: str, header: dict) -> bytes:
    """The chunk a ``chunk`` request asks for (to learn and reserve its size), else b""."""
    digest = header.get("hash") if op == "chunk" else None
    return digest if isinstance(digest, bytes) and len(digest) == p.HASH_LEN else b""


BY_HASH = ("chunk", "page")  # cache ops routed by the digest they ask for


def owner_key(op: str, header: dict) -> str | bytes | None:
    """What a cache request is routed by (rendezvous): a get's name, a chunk's or page's hash."""
    key = header.get("name") if op == "get" else header.get("hash") if op in BY_HASH else None
    return key if isinstance(key, (str, bytes)) else None


def read_of(op: str, header: dict) -> int | str | None:
    """The GET a chunk request belongs to (``of``, a request id: an int or a short str), for
    the cache counters; anything else is ignored (it only feeds metrics)."""
    of = header.get("of") if op == "chunk" else None
    if isinstance(of, bool) or not isinstance(of, (int, str)):
        return None
    return of if isinstance(of, int) or len(of) <= MAX_TAG_LEN else None


def changed_names(inv: object) -> list:
    """The names a storage reply says it changed: one (a commit, an rm) or a list (a batch)."""
    if isinstance(inv, str):
        return [inv]
    if isinstance(inv, list):
        return [name for name in inv if isinstance(name, str)]
    return []


def batches_of_names(names: Iterable[str], max_bytes: int) -> Iterator[list]:
    """``names`` in consecutive lists whose UTF-8 lengths add up to at most ``max_bytes`` (a
    longer name alone)."""
    batch: list = []
    size = 0
    for name in names:
        n = len(name.encode())
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += n
    if batch:
        yield batch
