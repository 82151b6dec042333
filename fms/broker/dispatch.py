"""Dispatch: the requests the broker holds, from admission until they are answered or dropped.

A request (:class:`~fms.broker.routing.Pending`, under a broker request key) waits in its
service's fair queue until a worker of the service has credit (``WORKER_CREDIT`` requests and
``WORKER_BYTES`` of data and expected replies); :meth:`Dispatcher.pump` then sends it to the
worker :func:`~fms.broker.routing.pick` chooses.  With no worker of the service, its fallback
serves (storage serves the cache's ops); with neither, the request is answered ``unavailable``.

A worker that dies holding requests hands them on: every op is idempotent (commit, rm, mv, cp
and restore carry an id that makes a repeat a no-op), so each goes to another worker, never back
to the one that died.  Requests whose deadline passed, whose client left, or that a live worker
has held unanswered for ``INFLIGHT_GRACE`` past their deadline are dropped.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from .. import limits
from .. import wire as p
from ..errors import BadRequest
from ..logutil import RateLimitedLog
from ..metrics import BrokerMetrics
from . import headers as h
from .admission import Admission
from .headers import batches_of_names
from .registry import Registry, Worker
from .replies import FRONTEND, Replies
from .routing import FairQueue, Pending, owner_of, packs, pick
from .transport import Transport

log = logging.getLogger("fms.broker")

# fms.wire.encode (msgpack.packb) without a Packer made for each call: the same bytes.
_encode = msgpack.Packer(use_bin_type=True).pack


@dataclass(frozen=True, slots=True)
class Fill:
    """The small files a commit (``single``: one name, the data frame its content alone, sent
    to the cache as ``fill``) or a ``commit_many`` (sent as ``fills`` and ``offsets``) made
    from the content it carried, for the cache that owns each name (docs/PROTOCOL.md, *Fills
    on commit*): ``entries`` ``(name, offset of its content in the data, its manifest
    encoded)``, ``frame`` the request's data frame, ``since`` its request key."""

    entries: list[tuple[str, int, bytes]]
    frame: Any
    since: int
    single: bool

    @classmethod
    def of_reply(cls, route: dict, names: list, frame: Any, since: int) -> "Fill | None":
        """What storage's reply ``route`` offers (``fill``; or ``fills`` and ``offsets``, with
        an entry per name of its ``inv``) for the ``names`` it changed, or None (nothing
        offered, or not in a form the cache can take: a manifest larger than one may be; an
        ``inv`` the cache cannot read would lose the invalidation)."""
        fill = route.get("fill")
        if isinstance(fill, bytes):
            if len(fill) <= p.MANIFEST_MAX and len(names) == 1:
                return cls([(names[0], 0, fill)], frame, since, True)
            return None
        if route.get("fills") is None:
            return None
        try:
            entries = p.read_fills(route, names)
        except BadRequest:
            return None
        if not entries or any(len(manifest) > p.MANIFEST_MAX for _n, _o, manifest in entries):
            return None
        return cls(entries, frame, since, False)

    def by_owner(self, caches: list[Worker]) -> dict[bytes, list[tuple[str, int, bytes]]]:
        """The entries each of ``caches`` owns, by its ident."""
        owned: dict[bytes, list[tuple[str, int, bytes]]] = {}
        for entry in self.entries:
            owner = owner_of(entry[0], caches)
            if owner is not None:
                owned.setdefault(owner.ident, []).append(entry)
        return owned


class Dispatcher:
    """The pending requests, the queues per service, and sending requests to workers."""

    def __init__(
        self,
        registry: Registry,
        admission: Admission,
        replies: Replies,
        transport: Transport,
        metrics: BrokerMetrics,
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.replies = replies
        self.transport = transport
        self.metrics = metrics
        self.pending: dict[int, Pending] = {}  # broker request key -> the request
        self.queues = {service: FairQueue() for service in p.SERVICES}
        self.dropped = 0  # requests dropped: deadline passed, their client left, no answer
        self.shed = 0  # queued requests answered `unavailable` to make room for another
        # Request keys start at the time in microseconds: a broker started again on the same
        # workers never gives a key the one before gave (a worker that answers one of those
        # late is not taken to answer a new request), and its keys are above those (the
        # order fills on commit go by).
        self._next_key = time.time_ns() // 1000
        self._drops = RateLimitedLog(log)
        self._fills: dict[str, Any] = {}  # outcome -> the fills counter's child

    @property
    def newest_key(self) -> int:
        """The newest request key given (the start, if none yet)."""
        return self._next_key

    def _track(self, pending: Pending, delta: int) -> None:
        if pending.origin["via"] == FRONTEND:
            self.admission.track(
                pending.origin["from"], delta, pending.nbytes, pending.reserve, pending.heavy
            )

    def submit(self, pending: Pending) -> None:
        """Queue ``pending`` for its service (or the fallback) and send what the workers'
        credit allows; with no worker of either, answer ``unavailable`` at once."""
        target = self.registry.serving(pending.service, pending.exclude)
        if target is None:
            service = pending.service
            self.replies.error(
                pending.origin,
                pending.req_id,
                "unavailable",
                f"no {service} worker is connected to the broker; start one "
                f"(python {service}_worker.py) or run a whole cluster with: fms up",
                op=pending.op,
                admitted=pending.reserve,
            )
            return
        self._next_key += 1
        key = self._next_key
        pending.target = target
        pending.worker = None
        self.pending[key] = pending
        self._track(pending, +1)
        self.queues[target].push((pending.origin["via"], pending.origin["from"]), key)
        self.pump(target)

    def pump(self, service: str) -> None:
        """Send queued requests of ``service`` to its workers while they have credit: the
        least loaded first, clients taking turns; drop those whose deadline has passed."""
        queue = self.queues[service]
        credit = limits.WORKER_CREDIT[service]
        budget = limits.WORKER_BYTES
        blocked = 0  # clients in a row whose next request waits for a busy owner
        while queue and blocked < len(queue):
            # Credit in requests and in bytes (data sent + replies expected): a worker busy
            # with a few 16 MiB chunks takes no more, so a small request waits behind few.
            free = [
                w
                for w in self.registry.of(service)
                if len(w.inflight) < credit and (w.inflight_bytes < budget or not w.inflight)
            ]
            if not free:
                return
            client, key = queue.pop_next()
            pending = self.pending.get(key)
            if pending is None:
                continue
            now = time.monotonic()
            if now >= pending.deadline:
                self._forget(key, pending, "deadline passed")
                continue
            worker = pick(service, pending, free, self.registry, now)
            if worker is None:  # its owner is busy, or only workers it must avoid are free:
                queue.push_front(client, key)  # it waits; the next client's turn
                queue.move_to_end(client)
                blocked += 1
                continue
            blocked = 0
            route = {"t": "req", "k": key, "ttl": max(1, int((pending.deadline - now) * 1000))}
            if pending.user is not None:  # the key the loop authenticated: workers decide
                route.update(pending.user)
            if not self.transport.to_worker(worker.ident, [_encode(route), *pending.body]):
                pending.exclude = (*pending.exclude, worker.ident)
                queue.push_front(client, key)
                self.worker_lost(worker.ident, "unreachable")
                return  # worker_lost pumps again
            pending.worker = worker.ident
            if not worker.inflight:
                worker.progress = now
            worker.inflight_bytes += pending.nbytes + pending.expect
            worker.inflight.add(key)
            if packs(pending.op, worker):
                worker.changes += 1
                worker.last_change = key
            worker.served += 1
            worker.last_used = key

    def invalidate(self, names: list, fill: "Fill | None" = None) -> None:
        """Tell every cache worker to drop ``names``: one ``inv`` message per at most
        INV_NAME_BYTES of names (an rm -r page changes a thousand: one message each would
        overflow the cache's pipe).  A cache that cannot be told must not serve reads any
        more: it is let go.

        Each ``inv`` says ``at``, the newest request key given so far: every change whose
        request was admitted after a change's ack left here has a key above it.  ``fill``
        (a commit, or a ``commit_many``, that made small files from the content it carried):
        each of its files is handed, with the ``inv`` and the request's data frame, to the
        cache that owns the name, which keeps it unless it has heard of a change to the name
        at or after the request's key (docs/PROTOCOL.md, *Fills on commit*).  At most
        ``FILL_WINDOW`` bytes of fills wait in ZeroMQ for a cache: past that, and when the
        names take more than one message, the ``inv`` goes alone."""
        at = self._next_key
        batches = list(batches_of_names(names, limits.INV_NAME_BYTES))
        caches = self.registry.of(p.CACHE)
        owned = fill.by_owner(caches) if fill is not None and len(batches) == 1 else {}
        for batch in batches:
            route: dict[str, Any] = (
                {"t": "inv", "name": batch[0], "at": at}
                if len(batch) == 1
                else {"t": "inv", "names": batch, "at": at}
            )
            message = None  # encoded once a cache needs it (not for one that takes a fill)
            for worker in caches:
                entries = owned.get(worker.ident)
                if entries and fill is not None and self._fill(worker, route, entries, fill):
                    continue
                if message is None:
                    message = _encode(route)
                if not self.transport.to_worker(worker.ident, [message]):
                    self.worker_lost(worker.ident, "missed an invalidation")

    def _fill(self, worker: Worker, route: dict, entries: list, fill: "Fill") -> bool:
        """Send ``route`` (an ``inv``) to cache ``worker`` with the files of ``fill`` it owns
        (``entries``) and the request's data frame, if its window has room; False: not sent
        (the plain ``inv`` goes instead)."""
        size = h.nbytes(fill.frame)
        if worker.fill_sent - worker.fill_taken + size > limits.FILL_WINDOW:
            self._count_fill("window_full", len(entries))
            return False
        if fill.single:
            extra: dict[str, Any] = {"fill": entries[0][2]}
        else:
            mine = {name: (offset, manifest) for name, offset, manifest in entries}
            extra = p.fills_fields([mine.get(n) for n in route.get("names") or [route["name"]]])
        message = _encode({**route, **extra, "since": fill.since})
        if not self.transport.to_worker(worker.ident, [message, fill.frame]):
            return False
        worker.fill_sent += size
        self._count_fill("sent", len(entries))
        return True

    def _count_fill(self, outcome: str, files: int = 1) -> None:
        """Count ``files`` fills on commit (sent, or not: window_full).  The counter's child for
        each outcome is looked up once (``labels()`` takes a lock and builds a key each time)."""
        child = self._fills.get(outcome)
        if child is None:
            child = self._fills[outcome] = self.metrics.cache_fills.labels(outcome)
        child.inc(files)

    def to_all_but(self, exclude: bytes, frames: list) -> None:
        """Send the newest access snapshot (``frames``) to every worker but the one it came
        from; a cache that cannot be told must not decide with an old one."""
        for worker in self.registry:
            if worker.ident == exclude:
                continue
            sent = self.transport.to_worker(worker.ident, frames)
            if not sent and worker.service == p.CACHE:
                self.worker_lost(worker.ident, "missed an access snapshot")

    def answered(self, worker: Worker, key: int) -> Pending | None:
        """``worker`` answered request ``key``: the request, no longer pending, or None if it
        is not ``worker``'s to answer (handed to another worker already, or a duplicate)."""
        pending = self.pending.get(key)
        if pending is None or pending.worker != worker.ident:
            return None
        del self.pending[key]
        _release(worker, key, pending)
        worker.progress = time.monotonic()
        self._track(pending, -1)
        return pending

    def worker_lost(self, ident: bytes, reason: str) -> None:
        """Forget a worker; its requests go to another worker (never back to it)."""
        worker = self.registry.remove(ident)
        if worker is None:
            return
        log.warning(
            "event=worker_gone service=%s worker=%s reason=%r inflight=%d",
            worker.service,
            worker.worker_id,
            reason,
            len(worker.inflight),
        )
        for key in sorted(worker.inflight):
            pending = self.pending.pop(key, None)
            if pending is None:
                continue
            self._track(pending, -1)
            self.metrics.redispatched.inc()
            pending.exclude = (*pending.exclude, ident)
            self.submit(pending)
        self._requeue_orphans(worker.service)

    def _requeue_orphans(self, service: str) -> None:
        """After a worker left: queued requests of a service with no worker left go to its
        fallback, or are answered ``unavailable``; the rest are pumped to who is left."""
        if self.registry.serving(service) == service:
            self.pump(service)
            return
        for key in self.queues[service].take_all():
            pending = self.pending.pop(key, None)
            if pending is not None:
                self._track(pending, -1)
                self.submit(pending)

    def expire(self, now: float) -> None:
        """Drop queued requests whose deadline has passed: their clients stopped waiting.
        Forget one a live worker has held unanswered for INFLIGHT_GRACE past its deadline,
        so a worker that never answers cannot keep its credit (its late reply is dropped)."""
        stale = now - limits.INFLIGHT_GRACE
        for key, pending in [
            (k, q) for k, q in self.pending.items() if q.worker is not None and q.deadline < stale
        ]:
            worker = self.registry.get(pending.worker) if pending.worker else None
            if worker is not None and key in worker.inflight:
                _release(worker, key, pending)
                self._forget(key, pending, f"no answer from {worker.worker_id}")
                self.pump(worker.service)

        def keep(key: int) -> bool:
            pending = self.pending.get(key)
            if pending is None:
                return False
            if pending.deadline <= now:
                self._forget(key, pending, "deadline passed")
                return False
            return True

        for queue in self.queues.values():
            queue.keep_only(keep)

    def client_gone(self, ident: bytes) -> None:
        """A client disconnected: its queued requests are dropped (no one will read a reply)."""
        for queue in self.queues.values():
            for key in queue.take_client((FRONTEND, ident)):
                pending = self.pending.get(key)
                if pending is not None:
                    self._forget(key, pending, "client gone")

    def drop_unread(self) -> None:
        """A request read after its client was seen gone (it was on its way when the connection
        closed): dropped before admission, as its queued ones were."""
        self.dropped += 1
        self._drops.warning(
            "event=request_dropped reason=%r dropped_total=%d",
            "its client left before it was read",
            self.dropped,
        )

    def shed_queued(self, ident: bytes, uploads: bool) -> bool:
        """Answer ``unavailable`` to the newest request of ``ident`` still queued here that
        holds bytes of the kind wanted (request data, or reserved reply room)."""
        client = (FRONTEND, ident)
        for queue in self.queues.values():
            for key in queue.newest_of(client):
                pending = self.pending.get(key)
                if pending is None or not (pending.nbytes if uploads else pending.reserve):
                    continue
                queue.remove_key(client, key)
                del self.pending[key]
                self._track(pending, -1)
                self.shed += 1
                self._drops.warning("event=request_shed op=%s client=%s", pending.op, ident.hex())
                self.replies.error(
                    pending.origin,
                    pending.req_id,
                    "unavailable",
                    "the broker is full and this client holds the most; retry in "
                    "a moment (retried with backoff)",
                    op=pending.op,
                    started=pending.started,
                    admitted=pending.reserve,
                )
                return True
        return False

    def _forget(self, key: int, pending: Pending, why: str) -> None:
        del self.pending[key]
        self._track(pending, -1)
        self.dropped += 1
        self._drops.warning(
            "event=request_dropped op=%s reason=%r dropped_total=%d",
            pending.op,
            why,
            self.dropped,
        )

    def status(self) -> dict:
        return {
            "pending": len(self.pending),
            "queued": {s: q.waiting() for s, q in self.queues.items()},
            "dropped": self.dropped,
        }


def _release(worker: Worker, key: int, pending: Pending) -> None:
    """``worker`` holds request ``key`` no more: its credit (in requests and bytes) is free."""
    worker.inflight.discard(key)
    worker.inflight_bytes -= pending.nbytes + pending.expect
    worker.changes -= packs(pending.op, worker)
