"""Limits that keep hostile input from costing more than it weighs (DESIGN.md invariants 4, 5, 9).

Decoding.  A msgpack frame can decode to far more memory than it weighs (an empty array is one
byte on the wire and 56 in Python: 32 MiB of them is about 2.3 GiB and 8 s of CPU).  So:

- a route frame, and a request header, is refused *before* it is decoded when it is over
  ``MAX_HEADER`` (64 KiB); only ``commit`` and ``have``, whose chunk lists grow with the file,
  may be larger (up to the frame limit), and the broker never decodes those whole: it reads
  the few fields it needs (``peek``) and skips the rest without building it;
- every decode sets msgpack's own limits (``max_str_len``, ``max_bin_len``, ``max_array_len``,
  ``max_map_len``, ``max_ext_len``) and counts the containers it builds: a request is a flat
  map with at most a list or two of 32-byte digests, so a frame that nests more is refused
  as soon as it builds its ``MAX_CONTAINERS + 1``-th array or map.

Together: a request header of n bytes never builds more than about 2n bytes of objects.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import msgpack

from .errors import BadRequest
from .logutil import clip

if TYPE_CHECKING:
    from logging import Logger  # not imported at run time: `ls` and `stat` log nothing

KiB = 1024
MiB = 1024 * KiB

MAX_HEADER = 64 * KiB  # route frames and request headers (but commit/have)
LARGE_HEADER_OPS = ("commit", "have")  # their lists of digests grow with the file
MAX_FRAME = 32 * MiB  # ZMQ_MAXMSGSIZE (fms.wire.codec.MAX_FRAME_SIZE is this)
MAX_CONTAINERS = 8  # arrays + maps one request header or route frame may hold
MAX_MAP_LEN = 64  # keys in any one map of a request or route
INV_NAME_BYTES = 32 * KiB  # names in one `inv` route frame to a cache (well under MAX_HEADER)
# Names and manifests of a `commit_many`'s fills in one route frame (storage's reply, and the
# `inv` that hands them to a cache): under MAX_HEADER with the arrays' other bytes (an offset and
# a nil or two per name, at most 256 names).
FILL_ROUTE_BYTES = 48 * KiB
# Bytes of commit fills (a small file's content handed to its cache with the invalidation) the
# broker may have handed to ZeroMQ for one cache worker before the cache's heartbeat says it took
# them; past this, a commit's invalidation goes without its content.  8 MiB and a data frame's
# bin32 prefix: a `commit_many` of the most content a message may carry (MAX_BATCH_BYTES, e.g.
# 128 files of 64 KiB) fits whole when the cache has taken all it was handed.
FILL_WINDOW = 8 * MiB + 5
DIGEST_WIRE = 34  # a 32-byte digest as msgpack bin8: the smallest legit list item
PEEK_KEYS = ("v", "op", "id", "ttl_ms", "fresh", "rx")


# A frame's bytes as they are read: a memoryview (over a zmq.Frame's buffer, or a slice), bytes
# or a bytearray.
BytesLike: TypeAlias = bytes | bytearray | memoryview


class FrameTooLarge(BadRequest):
    """A header or route frame over its limit, refused before decoding."""

    code = "too_large"


# A frame up to this size with a limit on its containers is decoded without msgpack's hooks and
# its maps and arrays counted after (:func:`unpack_bounded`): at most this many can be built.
SMALL_FRAME = 1024


class _Counter:
    """msgpack hooks that refuse a frame once it has built too many containers."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def list_hook(self, value: list[Any]) -> list[Any]:
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many nested arrays or maps")
        return value

    def object_hook(self, value: dict[str, Any]) -> dict[str, Any]:
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many nested arrays or maps")
        return value


def frame_len(buf: BytesLike) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def unpack_bounded(
    buf: BytesLike,
    *,
    max_size: int,
    max_containers: int | None,
    max_array: int | None = None,
    max_map: int = MAX_MAP_LEN,
) -> Any:
    """msgpack.unpackb with every limit set.  :raises FrameTooLarge: over ``max_size``;
    :raises BadRequest: not msgpack, or over a limit."""
    size = frame_len(buf)
    if size > max_size:
        raise FrameTooLarge(
            f"header frame of {size} bytes is over the limit of {max_size} bytes; "
            f"send smaller requests (e.g. fewer hashes per have)"
        )
    kwargs: dict[str, Callable[[Any], Any]] = {}
    # A small frame's containers are counted after it is decoded (its size bounds what that can
    # build: a few KB); the hooks that count them as they are built (a Python call per
    # container, and objects made for them per frame) were about half of decoding a route.
    count_after = max_containers is not None and size <= SMALL_FRAME
    if max_containers is not None and not count_after:
        counter = _Counter(max_containers)
        kwargs = {"list_hook": counter.list_hook, "object_hook": counter.object_hook}
    try:
        obj = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=max_array if max_array is not None else size,
            max_map_len=max_map,
            max_ext_len=0,
            **kwargs,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadRequest(f"frame is not valid msgpack: {clip(str(exc))}") from None
    if count_after and _over(obj, max_containers):  # type: ignore[arg-type]
        raise BadRequest("frame is not valid msgpack: too many nested arrays or maps")
    return obj


def _over(obj: object, limit: int) -> bool:
    """Whether ``obj`` (decoded msgpack) is or holds more than ``limit`` maps and arrays in
    all; counts no further than that (no recursion: nesting depth does not matter)."""
    if type(obj) is not dict and type(obj) is not list:
        return False
    todo: list[Any] = [obj]
    count = 1
    while todo:
        container = todo.pop()
        for value in container.values() if type(container) is dict else container:
            if type(value) is dict or type(value) is list:
                count += 1
                if count > limit:
                    return True
                todo.append(value)
    return False


def request_limits(size: int) -> dict[str, int]:
    """Limits for a request header of ``size`` bytes (small, or a large commit/have)."""
    if size <= MAX_HEADER:
        return {"max_size": MAX_HEADER, "max_containers": MAX_CONTAINERS}
    # A large header is one list of digests: no list may hold more items than digests fit.
    return {"max_size": MAX_FRAME, "max_containers": 4, "max_array": size // DIGEST_WIRE + 16}


def peek_large(buf: BytesLike) -> dict[str, Any]:
    """``peek`` a request header over ``MAX_HEADER``: only ``commit`` and ``have`` may be.

    :raises FrameTooLarge: any other large frame (also one that is not a map at all).
    """
    size = frame_len(buf)
    try:
        fields = peek(buf)
    except BadRequest:
        fields = {}
    if fields.get("op") not in LARGE_HEADER_OPS:
        raise FrameTooLarge(
            f"request header of {size} bytes is over the limit of {MAX_HEADER} "
            f"bytes (only {' and '.join(LARGE_HEADER_OPS)} may be larger)"
        )
    return fields


def peek(buf: BytesLike) -> dict[str, Any]:
    """The top-level scalar fields in ``PEEK_KEYS`` of a request header, without building
    anything else: the broker's view of a large ``commit`` or ``have``.

    :raises BadRequest: not a msgpack map, or a peeked field is not a scalar.
    """
    size = frame_len(buf)
    if size > MAX_FRAME:
        raise FrameTooLarge(f"header frame of {size} bytes is over the frame limit")
    first = memoryview(buf)[0] if size else 0
    if not (0x80 <= first <= 0x8F or first in (0xDE, 0xDF)):
        raise BadRequest("frame is not a msgpack map")  # before copying it into an unpacker
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(size, 1),
        max_str_len=MAX_HEADER,
        max_bin_len=MAX_HEADER,
        max_array_len=0,
        max_map_len=0,
        max_ext_len=0,
    )
    out: dict[str, Any] = {}
    try:
        unpacker.feed(buf)
        n = unpacker.read_map_header()
        if n > MAX_MAP_LEN:
            raise BadRequest(f"header map has {n} keys, at most {MAX_MAP_LEN}")
        for _ in range(n):
            # Keys must be strings and peeked values scalars: no container is ever built here
            # (read_map_header is not bound by max_map_len, nested maps and arrays are).
            key = unpacker.unpack()
            if not isinstance(key, str):
                raise BadRequest("header keys must be strings")
            if key in PEEK_KEYS:
                out[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except BadRequest:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData) as exc:
        raise BadRequest(
            f"frame is not a valid msgpack map: {clip(str(exc) or type(exc).__name__)}"
        ) from None
    if unpacker.tell() != size:
        raise BadRequest("frame holds more than one msgpack object")
    return out


# --- deadlines and credit (the broker) ---

DEFAULT_TTL_MS = 60_000  # a request without ttl_ms is dropped if still queued after this
MAX_TTL_MS = 600_000  # a larger ttl_ms is cut to this
INFLIGHT_GRACE = 30.0  # seconds past its deadline a worker may hold a request unanswered
SWEEP_INTERVAL = 0.25  # seconds between sweeps of queued requests whose deadline passed
# Requests a worker is given at once; the rest wait at the broker, where a request whose
# deadline passes or whose client leaves is dropped before it costs a worker anything.
# Storage's also bounds its group commit: 8 made put -r of 1,000 small files 1.3x slower.
WORKER_CREDIT = {"storage": 16, "cache": 32}
# Storage changes are packed onto the storage worker with changes in hand
# (fms.broker.routing.pick), unless it holds requests and has answered none for this long
# (seconds): its heartbeats come from a thread of their own, so a worker stuck on its disk or a
# lock stays registered, and packing would pile every client's changes onto it while another
# sits idle.  Then the least loaded.
PACK_STALL = 0.25

# --- byte budgets (the broker, DESIGN.md invariant 4) ---
# How the broker keeps them: fms/broker/admission.py (reservations, shedding, the reply
# bounds) and fms/broker/outbox.py (replies held for clients that do not take them).

CLIENT_BYTES = 64 * MiB  # per client: its uploads' data held, and replies it has not read
TOTAL_REQUEST_BYTES = 512 * MiB  # all clients' uploads' data held by the broker
TOTAL_REPLY_BYTES = 128 * MiB  # all clients' unread replies held by the broker
# SNDHWM per client: replies ZeroMQ queues; the rest wait, counted in bytes, in the broker's
# outbox for that client.
CLIENT_PIPE = 16
# Seconds an outbox may send nothing, or a client take nothing of its bytes in transit, before
# it counts as not reading (when others need the room, its replies may then be shed, or its
# connection closed).  A client that reads acknowledges bytes all the time; 0.5 s (it was 1 s)
# lets one that reads get room taken from clients that flood without reading within its first
# retries (floods benchmark, pacednonreaders: p99 0.8-2 s before, 0.3-0.5 s after).
STALLED = 0.5
OUTBOX_MESSAGES = 512  # replies one client's outbox may hold whatever their size
RECEIVE_PIPE = 16  # RCVHWM per peer on both broker sockets
WORKER_PIPE = 16  # SNDHWM of a worker's link: replies queued towards the broker
WORKER_BYTES = 64 * MiB  # per worker: data sent + replies expected, in flight


MALLOC_KEEP = 64 * MiB  # bytes of freed heap glibc keeps for the next frames (not trimmed)


def tune_malloc(threshold: int = 4 * MiB, keep: int = MALLOC_KEEP) -> None:
    """Have glibc serve allocations over ``threshold`` (data frames) with their own mappings,
    given back to the system when freed, and keep up to ``keep`` bytes of freed heap at its top
    instead of handing it back at once.  By default the mmap threshold grows with use up to
    32 MiB, after which 16 MiB frames come from the heap and a flood's peak stays resident for
    good; but setting it also fixes the trim threshold at its default, 128 KiB, so each 1 MiB
    chunk freed at the heap's top was given back and the next one faulted its pages in again
    (a transfer of 1 GiB: a thousand such round trips per process it crosses).  A no-op where
    there is no glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (also stops it from growing)
        libc.mallopt(-1, keep)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# --- descriptors ---


def raise_fd_limit(log: "Logger | None" = None) -> tuple[int, int]:
    """Raise this process's soft limit on open descriptors to its hard limit (each client
    connection costs the broker one; 1024, a common default, is soon reached).

    :return: ``(soft, hard)`` after the change, as ``status`` reports it.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            if log is not None:
                log.warning(
                    "event=fd_limit_not_raised soft=%d hard=%d error=%r", soft, hard, str(exc)
                )
    if log is not None:
        log.info("event=fd_limit soft=%d hard=%d", soft, hard)
    return soft, hard


def fd_limit() -> dict[str, int]:
    """The descriptor limits and how many are open now (Linux), for ``status``."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = -1
    return {"soft": soft, "hard": hard if hard != resource.RLIM_INFINITY else -1, "open": used}
