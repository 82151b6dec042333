"""Routing: which worker serves a request, and in which order waiting requests go.

Every request the broker holds is a :class:`Pending`, known by a broker request key.  One that
no worker can take yet waits in its service's :class:`FairQueue`, one deque per client, served
round robin: one client's flood waits behind everyone else's next request, not in front of it.
:func:`pick` chooses the worker among those with credit: a cache request goes to the owner of
its key (rendezvous hashing, so each name and chunk is cached, and its misses coalesced, in one
place); a change (commit, rm, mv, cp, restore) to the storage worker with credit that has the
most changes in hand, so that they arrive back to back and are committed together, and with
none in hand to the least loaded, ties to the one that took a change last; anything else to the
least loaded worker, ties to the one used least recently.
"""

import collections
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .. import limits
from .. import wire as p
from .registry import Registry, Worker


def rendezvous(key: str | bytes, worker_ids: Iterable[str]) -> str | None:
    """The owner of ``key`` among ``worker_ids``: the one with the highest hash of (id, key).
    Each key has one owner; a worker that leaves or joins moves only the keys it wins."""
    raw = key.encode() if isinstance(key, str) else key
    return max(
        worker_ids,
        default=None,
        key=lambda wid: hashlib.blake2b(raw, digest_size=8, key=wid.encode()[:64]).digest(),
    )


@dataclass(slots=True)
class Pending:
    """A request the broker holds until it is answered (or dropped)."""

    worker: bytes | None  # None while queued at the broker
    service: str  # the service asked for
    op: str
    origin: dict  # {"from": identity, "via": FRONTEND|BACKEND}
    body: list  # header frame (+ data frame), kept for re-dispatch
    req_id: object
    started: float  # time.monotonic() when the request reached the broker
    deadline: float  # time.monotonic() past which nobody waits for it
    target: str = ""  # the service serving it (the asked one, or its fallback)
    exclude: tuple = ()  # workers that died holding it
    nbytes: int = 0  # bytes of all its frames, held here until it is answered
    expect: int = 0  # bytes its reply is expected to carry (counted in the worker's credit)
    digest: bytes = b""  # the chunk a `chunk` request asks for, to learn its size
    owner: str | bytes | None = (
        None  # a cache request's key: the cache worker that owns it serves it
    )
    read: int | str | None = None  # a chunk request's GET (its request id), for the ReadTally
    reserve: int = 0  # reply bytes kept free for it in its client's budget (admission)
    heavy: bool = False  # one of the ops that take turns (admission.HEAVY_OPS)
    user: dict | None = None  # who sent it, for the worker: {u: key, l?: True}; None: no CURVE


class FairQueue(collections.OrderedDict):
    """One service's waiting requests: ``(via, client identity) -> deque of request keys``,
    taken round robin across clients.  Its length is the number of clients waiting (an
    OrderedDict, so the dispatch loop's tests of it cost no Python call)."""

    def waiting(self) -> int:
        """How many requests wait."""
        return sum(map(len, self.values()))

    def push(self, client: tuple, key: int) -> None:
        keys = self.get(client)
        if keys is None:
            keys = self[client] = collections.deque()
        keys.append(key)

    def push_front(self, client: tuple, key: int) -> None:
        """Put ``key`` back first, and its client first in turn (it was taken out of turn)."""
        keys = self.get(client)
        if keys is None:
            keys = self[client] = collections.deque()
        keys.appendleft(key)
        self.move_to_end(client, last=False)

    def pop_next(self) -> tuple:
        """``(client, key)`` of the next request in turn; the client goes to the back."""
        client, keys = next(iter(self.items()))
        key = keys.popleft()
        if keys:
            self.move_to_end(client)
        else:
            del self[client]
        return client, key

    def take_client(self, client: tuple) -> collections.deque:
        """Remove and return every request of ``client``."""
        return self.pop(client, collections.deque())

    def take_all(self) -> Iterator[int]:
        """Remove every request, oldest client first."""
        while self:
            _, keys = self.popitem(last=False)
            yield from keys

    def newest_of(self, client: tuple) -> Iterator[int]:
        """``client``'s keys, newest first (for shedding)."""
        return reversed(self.get(client) or ())

    def remove_key(self, client: tuple, key: int) -> None:
        keys = self[client]
        keys.remove(key)
        if not keys:
            del self[client]

    def keep_only(self, keep: Callable[[int], bool]) -> None:
        """Keep only the keys for which ``keep(key)`` is true."""
        for client, keys in list(self.items()):
            alive = collections.deque(key for key in keys if keep(key))
            if alive:
                self[client] = alive
            else:
                del self[client]


def owner_of(key: str | bytes, caches: list[Worker]) -> Worker | None:
    """The cache worker among ``caches`` that owns ``key`` (None if there is none)."""
    if len(caches) == 1:
        return caches[0]  # the one cache worker owns every key
    live = {w.worker_id: w for w in caches}
    winner = rendezvous(key, live)
    return live[winner] if winner is not None else None


def packs(op: str, worker: Worker) -> bool:
    """Whether ``op``, sent to storage ``worker``, is packed onto the worker with changes in
    hand (:func:`pick`): every change (``CHANGE_OPS``: a worker commits those that reach it back
    to back in one transaction), and a put -r's ``commit_many`` where the store takes one write
    transaction at a time (SQLite, ``serial`` in ``ready``): spread over two workers, each batch
    waited for the other's and then read again the pages it had changed; over PostgreSQL the
    batches of two workers commit side by side."""
    return op in p.CHANGE_OPS or (op == "commit_many" and worker.serial)


def pick(
    service: str, pending: Pending, free: list, registry: Registry, now: float
) -> Worker | None:
    """The worker to send ``pending`` to among ``free`` at ``now`` (time.monotonic()), or None
    (it waits)."""
    if service == p.CACHE and pending.owner is not None:
        caches = registry.of(p.CACHE)
        if pending.exclude:
            caches = [w for w in caches if w.ident not in pending.exclude]
        owner = owner_of(pending.owner, caches)
        return owner if owner in free else None
    if len(free) == 1:  # (whichever rule picks: the one free worker, unless it is avoided)
        return None if free[0].ident in pending.exclude else free[0]
    if service == p.STORAGE and packs(pending.op, free[0]):  # (one store: one kind of engine)
        # Packed, not spread: a storage worker applies the changes that reach it back to back in
        # one transaction, and two workers of one store take turns at its write lock anyway.
        # Spread over two, 8 writers' commits were mostly groups of one (docs/BENCHMARKS.md).
        # To the worker with the most changes in hand, not the busiest: one busy with reads
        # would make a change wait behind them.  Not onto one that holds requests and has
        # answered none for PACK_STALL: stuck, it would collect every change up to its credit
        # (its heartbeats go on from a thread of their own).
        stalled = now - limits.PACK_STALL
        # With none in hand anywhere: the least loaded, ties to the worker that took a change
        # last.  Changes stay with one writer while it keeps up: SQLite keeps its pages cached
        # between transactions unless another connection wrote meanwhile, so two workers taking
        # turns each read their pages again (storage CPU per 4 KiB S3 PUT, in turns: 0.405 and
        # 0.395 ms over two workers taking turns, 0.370 and 0.350 on one; docs/BENCHMARKS.md).
        packed = max(
            (
                w
                for w in free
                if w.ident not in pending.exclude and not (w.inflight and w.progress <= stalled)
            ),
            key=lambda w: (w.changes, -len(w.inflight), w.last_change),
            default=None,
        )
        if packed is not None:
            return packed
    return min(
        (w for w in free if w.ident not in pending.exclude),
        key=lambda w: (len(w.inflight), w.last_used),
        default=None,
    )
