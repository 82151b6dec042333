"""Admission: what each client may have the broker hold for it, and room made when it is full.

The broker holds two kinds of bytes for clients: their requests (every frame, until answered)
and their replies (held in outboxes until taken: outbox.py).  Each has a per-client budget
(``CLIENT_BYTES``) and a total (``TOTAL_REQUEST_BYTES``, ``TOTAL_REPLY_BYTES``).  A request is
admitted only with room for its reply reserved, sized by :data:`REPLY_BOUNDS`: the most its
reply can carry; so a reply to an admitted request always has room and is never dropped.

When a total is full, the client holding the most gives way to one holding less now
(:meth:`Admission.admit`): its newest queued request is answered ``unavailable``, or, if it has
left its replies unread for ``STALLED``, its oldest unread reply is replaced by ``unavailable``.
A client that reads never has a reply shed.
"""

import collections
import heapq
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from .. import limits
from .. import wire as p
from . import headers as h
from .headers import int_in
from .outbox import Outboxes
from .transit import Transit

SMALL_REPLY = 4 * limits.KiB  # the bound of an op not in REPLY_BOUNDS (a stat, an ack)
CHUNK_GUESS = 1 * limits.MiB  # a chunk of unknown size, in a worker's credit
CHUNK_SIZES_KEPT = 65536  # chunk sizes remembered (LRU), for the bounds below
TRANSIT_RECOUNT = 0.01  # seconds: the least time between counts of every client's transit


def _chunk(header: dict, size: int, seen: int) -> int:
    """A chunk: its length (declared by the client in ``len``, else seen before, else the
    largest a chunk may be)."""
    declared = header.get("len")
    if not int_in(declared, 0, p.MAX_CHUNK_SIZE):
        declared = 0 if seen else p.MAX_CHUNK_SIZE
    return max(declared, seen) + SMALL_REPLY


def _ls(header: dict, size: int, seen: int) -> int:
    page = header.get("limit")
    if not int_in(page, 1):
        page = p.LS_PAGE_DEFAULT
    return min(page, p.LS_PAGE_MAX) * p.LS_ENTRY_MAX + SMALL_REPLY


def _get_many(header: dict, size: int, seen: int) -> int:
    """Inline content up to the batch's limit, and the manifests (each bounded: a long chunk
    list is never in one)."""
    names = header.get("names")
    count = min(len(names), p.MAX_BATCH_FILES) if isinstance(names, list) else 1
    return min(p.MAX_BATCH_BYTES, count * p.INLINE_MAX) + count * p.MANIFEST_MAX + SMALL_REPLY


# A version's metadata as msgpack: its keys and values, and a few bytes of framing per key.
META_WIRE_MAX = p.MAX_META_BYTES + limits.MAX_MAP_LEN * 6


def _commit_many(header: dict, size: int, seen: int) -> int:
    """A result per file: its stat, or an error whose message may name it (each at most
    ``RESULT_MESSAGE_MAX`` bytes, a name and 256, storage cuts a longer one; and the message's
    ``meta``, which every stat echoes, or its own of ``metas``), whatever the request holds."""
    meta = header.get("meta")
    echoed = min(size, META_WIRE_MAX) if isinstance(meta, dict) and meta else 0
    # each file's own (``metas``) is echoed once: together no more than the header holds
    own = size if isinstance(header.get("metas"), list) else 0
    return size + own + p.MAX_BATCH_FILES * (p.RESULT_MESSAGE_MAX + echoed) + SMALL_REPLY


def _have(header: dict, size: int, seen: int) -> int:
    """The hashes it asked about, at most."""
    return size + SMALL_REPLY


def _fixed(nbytes: int) -> Callable[[dict, int, int], int]:
    return lambda header, size, seen: nbytes


# The most bytes a reply to each op can carry, from its request: (header, the header's size in
# bytes, the size last seen of the chunk it asks for or 0).  It is reserved in the client's
# budget when the request is admitted, and counted in the byte credit of the worker serving it
# (so a worker is never handed more than WORKER_BYTES of replies at once), with one exception:
# a chunk counts in a worker's credit the size last seen for it, else CHUNK_GUESS.  A client's
# `len` is its own budget's business, not the shared worker's (a false one must not take a
# worker's credit from everyone), and counting an unknown chunk 16 MiB would have storage serve
# cold reads (a cache's fetch carries no `len`) four chunks at a time.
# A reply larger than its reservation (a false `len`) is kept only while the budgets have room.
REPLY_BOUNDS: dict[str, Callable[[dict, int, int], int]] = {
    "chunk": _chunk,
    "ls": _ls,
    "get_many": _get_many,
    "have": _have,
    "get": _fixed(p.INLINE_MAX + p.MANIFEST_MAX + SMALL_REPLY),  # a small file comes along
    "get_version": _fixed(p.INLINE_MAX + p.MANIFEST_MAX + SMALL_REPLY),
    "page": _fixed(p.PAGE_REPLY_MAX),  # a page of 65,536 digests, or a body
    "versions": _fixed(1 * limits.MiB),
    "fsck": _fixed(1 * limits.MiB),
    "commit_many": _commit_many,
    "status": _fixed(64 * limits.KiB),
    "cache_stats": _fixed(16 * limits.KiB),
    "rm_prefix": _fixed(64 * limits.KiB),  # the names it removed: at most 32 KiB of them
}
_SMALL = _fixed(SMALL_REPLY)


def reply_bound(op: str, header: dict, size: int, seen: int = 0) -> int:
    """The most a reply to ``op`` can carry (see :data:`REPLY_BOUNDS`)."""
    return REPLY_BOUNDS.get(op, _SMALL)(header, size, seen)


def expected_reply(op: str, header: dict, size: int, seen: int = 0, bound: int = 0) -> int:
    """What a reply counts in the serving worker's byte credit (see :data:`REPLY_BOUNDS`);
    ``bound``: its reply bound, when known already."""
    if op == "chunk":
        return seen + SMALL_REPLY if seen else CHUNK_GUESS
    return bound or reply_bound(op, header, size, seen)


# Ops whose work grows with the store rather than with what they carry: a fsck page, a
# collection, a count under a prefix, the totals, a removal page, a folder rename, a listing
# that descends into sub-folders.  They take turns: at most HEAVY_PER_CLIENT of a client's and
# HEAVY_TOTAL of all clients' are held at once; past that they are answered `busy` (retried
# with backoff), so a flood of them leaves the workers' credit to everyone else.
HEAVY_OPS = frozenset({"fsck", "gc", "du", "usage", "rm_prefix", "mv_prefix"})
HEAVY_PER_CLIENT = 2
HEAVY_TOTAL = 8


def is_heavy(op: str, header: dict) -> bool:
    """Whether a request takes turns with the other heavy ones (see :data:`HEAVY_OPS`)."""
    return op in HEAVY_OPS or (op == "ls" and header.get("folders") is not True)


class Shedder(Protocol):
    """What admission asks of the core to make room (see :meth:`Admission.admit`)."""

    def shed_queued(self, ident: bytes, uploads: bool) -> bool:
        """Answer ``unavailable`` to the newest queued request of ``ident`` holding bytes of
        the kind wanted."""
        ...

    def kick(self, ident: bytes) -> bool:
        """Close ``ident``'s connection, dropping everything held for it."""
        ...


def _add(counts: dict, key: bytes, delta: int) -> None:
    """Add ``delta`` to ``counts[key]``, keeping only keys whose count is positive."""
    if delta:
        value = counts.get(key, 0) + delta
        if value > 0:
            counts[key] = value
        else:
            counts.pop(key, None)


class Ticket(NamedTuple):
    """An admitted request: what admission read of it and reserved for it."""

    heavy: bool  # a slow operation taking its turn
    digest: bytes  # the chunk it asks for, or b""
    seen: int  # that chunk's size last seen, or 0
    size: int  # its header's bytes
    total: int  # all its frames' bytes
    reserve: int  # reply bytes reserved


class Refusal(NamedTuple):
    """Why a request was not admitted: the error code and the message for the client."""

    code: str
    message: str


class Admission:
    """Per-client and total counts of what the broker holds for clients, and the decision to
    admit a request."""

    def __init__(self, outboxes: Outboxes) -> None:
        self.outboxes = outboxes
        self.transit: Transit = outboxes.transit
        self.inflight: dict[bytes, int] = {}  # client -> its requests in flight or queued
        self.req_bytes: dict[bytes, int] = {}  # client -> bytes of its requests held
        self.total_req = 0
        self.reserved: dict[bytes, int] = {}  # client -> reply bytes reserved for its requests
        self.total_reserved = 0
        self.backed_off = 0  # requests refused at admission: over a byte budget
        self.heavy: dict[bytes, int] = {}  # client -> its heavy requests held (HEAVY_OPS)
        self.total_heavy = 0
        self.busy = 0  # heavy requests answered `busy`: past a limit
        self.kicked = 0  # clients disconnected: they held room in transit and took nothing
        self._sizes: collections.OrderedDict = collections.OrderedDict()  # digest -> size (LRU)
        self._counted = -math.inf  # when what is in transit was last counted for every client

    def seen(self, digest: bytes) -> int:
        """The size of chunk ``digest`` in the last reply that carried it, or 0."""
        return self._sizes.get(digest, 0)

    def learn(self, digest: bytes, size: int) -> None:
        """Remember the size of a chunk a reply carried (CHUNK_SIZES_KEPT of them, LRU)."""
        self._sizes[digest] = size
        self._sizes.move_to_end(digest)
        if len(self._sizes) > CHUNK_SIZES_KEPT:
            self._sizes.popitem(last=False)

    def track(
        self, ident: bytes, delta: int, nbytes: int = 0, reserve: int = 0, heavy: bool = False
    ) -> None:
        """A request of ``ident`` comes (+1) or goes (-1) with its bytes and reservation."""
        if heavy:
            _add(self.heavy, ident, delta)
            self.total_heavy += delta
        _add(self.inflight, ident, delta)
        if nbytes:  # (each request has a header; a status reserves nothing: skip the calls)
            _add(self.req_bytes, ident, delta * nbytes)
            self.total_req += delta * nbytes
        if reserve:
            _add(self.reserved, ident, delta * reserve)
            self.total_reserved += delta * reserve

    def turn(self, ident: bytes) -> str | None:
        """Whether a heavy request of ``ident`` may be held now; else why it must wait."""
        if self.heavy.get(ident, 0) >= HEAVY_PER_CLIENT:
            return (
                f"this client has {HEAVY_PER_CLIENT} slow operations (fsck, gc, du, usage, "
                f"rm -r, deep listings) in flight already; retry when one is done"
            )
        if self.total_heavy >= HEAVY_TOTAL:
            return (
                f"{HEAVY_TOTAL} slow operations (fsck, gc, du, usage, rm -r, deep listings) "
                f"are in flight already; retry in a moment"
            )
        return None

    def request(
        self,
        ident: bytes,
        op: str,
        header: dict,
        frames: list,
        shedder: Shedder | None,
        now: float,
    ) -> Ticket | Refusal:
        """Admit client ``ident``'s checked request (:meth:`admit`, after its limits on
        requests in flight and on slow operations taking turns), or say why not."""
        if self.inflight.get(ident, 0) >= p.MAX_CLIENT_INFLIGHT:
            return Refusal(
                "too_large",
                f"more than {p.MAX_CLIENT_INFLIGHT} requests in flight from one client; wait "
                f"for replies before sending more",
            )
        heavy = is_heavy(op, header)
        if heavy:
            wait = self.turn(ident)
            if wait:
                self.busy += 1
                return Refusal("busy", wait)
        digest = h.chunk_digest(op, header)
        seen = self.seen(digest) if digest else 0
        size = h.nbytes(frames[0])
        reserve = reply_bound(op, header, size, seen)
        total = sum(map(h.nbytes, frames))
        over = self.admit(ident, total, reserve, shedder, now)
        if over:
            self.backed_off += 1
            return Refusal("unavailable", over)
        return Ticket(heavy, digest, seen, size, total, reserve)

    def admit(
        self,
        ident: bytes,
        nbytes: int,
        reserve: int,
        shedder: Shedder | None,
        now: float,
    ) -> str | None:
        """Admit a client's request: count its ``nbytes`` (every frame of it: the broker holds
        them until it is answered) and reserve ``reserve`` reply bytes for it; or say why it
        must back off (None: admitted).

        Per client: its requests' bytes held and its replies (unread, in transit or reserved)
        each stay within CLIENT_BYTES, so a client that does not read stalls itself.  In all:
        when a total is full, room is made by shedding from clients holding more than this one
        does (with ``shedder``; None: shed nothing), so many clients that flood or never read
        cannot keep one that reads from being served.
        """
        held_req = self.req_bytes.get(ident, 0)
        if held_req + nbytes > limits.CLIENT_BYTES:
            return (
                f"this client already has {held_req} bytes of requests in flight at the "
                f"broker (budget {limits.CLIENT_BYTES}); wait for replies before sending "
                f"more (retried with backoff)"
            )
        held = self.holding(ident)
        if held + reserve > limits.CLIENT_BYTES or (
            self.outboxes.count(ident) + self.inflight.get(ident, 0) >= limits.OUTBOX_MESSAGES
        ):
            return (
                f"this client has {held} bytes of replies unread or on their way; read them "
                f"before asking for more (retried with backoff)"
            )
        while self.total_req + nbytes > limits.TOTAL_REQUEST_BYTES:
            if not (shedder and self._shed(held_req, True, shedder, now)):
                return (
                    "the broker holds as many requests as it may for all clients; retry "
                    "in a moment (retried with backoff)"
                )
        if self.replies_held() + reserve > limits.TOTAL_REPLY_BYTES:
            self._count_transit(now)  # what clients took frees room, and says who reads
        while self.replies_held() + reserve > limits.TOTAL_REPLY_BYTES:
            if not (shedder and self._shed(held, False, shedder, now)):
                return (
                    "the broker holds as many replies as it may for all clients; retry in a "
                    "moment (retried with backoff)"
                )
        return None

    def _count_transit(self, now: float) -> None:
        """Read what every client took of what is in transit, before making room: at most
        once per TRANSIT_RECOUNT, so a burst of hundreds of requests finding the total full
        costs one count, not one per request (each is a system call per client)."""
        if now - self._counted >= TRANSIT_RECOUNT:
            self._counted = now
            self.transit.sweep(now)

    def holding(self, ident: bytes) -> int:
        """Reply bytes held for ``ident``: in its outbox, in transit, and reserved."""
        return self.outboxes.holding(ident) + self.transit.held(ident) + self.reserved.get(ident, 0)

    def replies_held(self) -> int:
        """Reply bytes held for all clients: in outboxes, in transit, and reserved."""
        return self.outboxes.total + self.transit.total + self.total_reserved

    def _shed(self, holding: int, uploads: bool, shedder: Shedder, now: float) -> bool:
        """Make room in a total for a client holding ``holding`` bytes: take from the clients
        holding more (request bytes, or reply bytes), the most first: its newest queued
        request; or else (replies) its oldest reply left unread in its outbox for STALLED; or
        else, if it has taken none of what is in transit for STALLED, its connection.  False if
        nobody can give room.  Only the clients holding more are ordered, with a heap (no sort
        of every client per shed)."""
        holdings: Iterable[tuple[bytes, int]]
        if uploads:
            holdings = self.req_bytes.items()
        else:
            clients = {*self.outboxes.boxes, *self.transit.flows, *self.reserved}
            holdings = ((i, self.holding(i)) for i in clients)
        heap = [(-held, n, i) for n, (i, held) in enumerate(holdings) if held > holding]
        heapq.heapify(heap)
        while heap:
            _, _, ident = heapq.heappop(heap)
            if shedder.shed_queued(ident, uploads):
                return True
            if uploads:
                continue
            if self.outboxes.shed_reply(ident, now):
                return True
            if self.transit.stalled(ident, now) and shedder.kick(ident):
                self.kicked += 1
                return True
        return False

    def may_hold(self, ident: bytes, size: int, admitted: int) -> bool:
        """Whether a reply of ``size`` bytes may wait in ``ident``'s outbox.  A reply to an
        admitted request had its room reserved (``admitted`` bytes, released just before): up to
        that it is kept; a larger one (a client that declared less than it asked for, an error
        to a request never admitted) must fit the budgets."""
        return size <= admitted or not (
            self.holding(ident) + size > limits.CLIENT_BYTES
            or self.replies_held() + size > limits.TOTAL_REPLY_BYTES
            or self.outboxes.count(ident) >= limits.OUTBOX_MESSAGES
        )

    def status(self) -> dict:
        return {
            "heavy": self.total_heavy,
            "uploads": self.total_req,
            "replies": self.outboxes.total,
            "replies_in_transit": self.transit.total,
            "replies_reserved": self.total_reserved,
        }
