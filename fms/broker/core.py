"""The broker's core: decoded messages in, messages out, no sockets.

For each message a client or a worker sends, the core decides what to send to whom, through a
:class:`~fms.broker.transport.Transport`:

- a client's request is checked (version, op, frame count, its key still allowed), admitted
  within its budgets (admission.py), and dispatched to a service's worker (dispatch.py,
  routing.py) with the key the loop authenticated (``u``, and ``l`` for a key of the ``--allow``
  folder) in its route, for the worker to decide what it may do (fms.policy); ``status`` and
  ``hello`` are answered here;
- a storage worker's ``policy`` route (the store's access snapshot) is kept and passed on to the
  other workers (keys.py);
- a worker's ``ready`` registers it (registry.py), its heartbeats keep it alive, its reply goes
  back to whoever asked; a storage reply that changed names first invalidates them in every
  cache worker, **before** the ack is forwarded: the cache's pipe is FIFO, so any read the client
  sends after the ack reaches the cache after the invalidation (read-after-write);
- time passes in :meth:`Core.tick`: deadlines, dead workers, heartbeats, held replies.

It never decodes a data frame, and it knows nothing about files.  The loop (loop.py) owns the
sockets; the unit tests (tests/test_broker_core.py) drive this class with a recording transport.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from .. import wire as p
from ..errors import BadRequest, TooLarge
from ..logutil import RateLimitedLog, clip
from ..metrics import BrokerMetrics
from . import headers as h
from .admission import Admission, Refusal, expected_reply
from .dispatch import Dispatcher, Fill
from .keys import StoreKeys
from .outbox import Outboxes
from .registry import Refused, Registry, Worker
from .replies import BACKEND, FRONTEND, Replies
from .routing import Pending
from .status import status_of
from .transit import Transit
from .transport import Transport

log = logging.getLogger("fms.broker")


class Core:
    """The broker's decisions.

    :param transport: what messages go out through.
    :param store: the store id storage workers must serve, or None: the first one's.
    :param on_keys: called with the CURVE keys of the store's identities when storage sends
        newer ones (the loop lets them in on the frontend).
    """

    def __init__(
        self,
        transport: Transport,
        store: str | None = None,
        metrics: BrokerMetrics | None = None,
        on_keys: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self.transport = transport
        self.metrics = metrics or BrokerMetrics()
        self.registry = Registry(store, self.metrics)
        self.transit = Transit(transport)
        self.outboxes = Outboxes(transport, self.transit)
        self.admission = Admission(self.outboxes)
        self.replies = Replies(transport, self.outboxes, self.admission, self.metrics)
        self.dispatcher = Dispatcher(
            self.registry, self.admission, self.replies, transport, self.metrics
        )
        self.reads = self.metrics.reads
        self.keys = StoreKeys(on_keys)
        self.started = time.time()
        self.endpoints: dict = {"frontend": None, "backend": None}  # the loop's, once bound
        self._bad = RateLimitedLog(log)
        self._refusals = RateLimitedLog(log)
        self._late = RateLimitedLog(log)
        self._kicks = RateLimitedLog(log)
        self._beat = p.encode({"t": "hb"})

    # --- clients ---

    def client_message(
        self, ident: bytes, frames: list, who: Callable[[Any], dict | None] | None = None
    ) -> None:
        """``[header, data?]`` from client ``ident``; ``who(frame)``: which key sent a frame, as
        the route fields the worker gets (``u``, and ``l`` for a key of the ``--allow``
        folder), or None if that key may not connect any more; asked once the request is known
        to be well formed.  ``who`` None: no CURVE, no key."""
        origin = {"from": ident, "via": FRONTEND}
        req_id = None
        now = time.monotonic()
        self.outboxes.wake(ident, now)
        try:
            if not frames:
                raise BadRequest("a request has 1 or 2 frames (header, data?), got none")
            # The header first, so that even a reply about the frame count carries the id.
            header = h.read_header(h.buffer(frames[0]))
            req_id = p.need(header, "id", (int, str))
            op = h.check_client_request(header, frames)
            user = None if who is None else who(frames[-1])
            if who is not None and user is None:
                # Its key was removed (an identity's, or from the allow directory) since it
                # connected.
                self.replies.error(
                    origin,
                    req_id,
                    "refused",
                    "this client's key may not connect any more (it is no identity's of the "
                    "store, nor in the broker's allow directory); ask an admin",
                    op=op,
                )
                return
        except h.UnsupportedVersion as exc:
            self.replies.error(origin, req_id, "version", str(exc))
            return
        except (BadRequest, TooLarge) as exc:
            self._bad.warning("event=bad_client_message error=%r", str(exc))
            self.replies.error(origin, req_id, exc.code, str(exc))
            return
        shedder = self if op != "status" else None
        ticket = self.admission.request(ident, op, header, frames, shedder, now)
        if isinstance(ticket, Refusal):
            self.replies.error(origin, req_id, ticket.code, ticket.message, op=op)
            return
        if op == "status":
            self.replies.deliver(origin, [p.encode(p.ok_reply(req_id, **self.status()))])
            self.metrics.answered(op, "ok", 0.0)
            return
        if op == "hello":
            self._hello(origin, req_id)
            return
        service = p.OP_SERVICE[op]
        if header.get("fresh") is True and op in ("get", "chunk", "page", "get_many"):
            # The client found what the cache gave it corrupt: this once, ask storage itself.
            service = p.STORAGE
        request = (ticket.digest, ticket.seen, ticket.size, ticket.total)
        self._submit(
            service, op, header, origin, frames, now, request, ticket.reserve, ticket.heavy, user
        )

    def _hello(self, origin: dict, req_id: object) -> None:
        """What a client needs before it hashes: the store and its digest function, as the
        storage workers announced them (``unavailable`` until one has)."""
        if self.registry.store is None:
            self.replies.error(
                origin,
                req_id,
                "unavailable",
                "no storage worker has registered yet, so the store's digest function is "
                "not known; retry",
                op="hello",
            )
            return
        store_id, digest_fn = self.registry.store
        reply = p.ok_reply(req_id, store=store_id, digest_fn=digest_fn)
        self.replies.deliver(origin, [p.encode(reply)])
        self.metrics.answered("hello", "ok", 0.0)

    def _submit(
        self,
        service: str,
        op: str,
        header: dict,
        origin: dict,
        frames: list,
        now: float,
        request: tuple,
        reserve: int = 0,
        heavy: bool = False,
        user: dict | None = None,
    ) -> None:
        """Hand a request to dispatch; a client's cache request is routed by its key, and a
        chunk request counts towards its GET's cache figures.

        :param request: what was read of it already: (chunk digest or b"", that chunk's size
            last seen or 0, the header's size, all its frames' size).
        """
        digest, seen, size, total = request
        client = origin["via"] == FRONTEND
        self.dispatcher.submit(
            Pending(
                None,
                service,
                op,
                origin,
                frames,
                header.get("id"),
                now,
                h.deadline_of(header, now),
                nbytes=total,
                expect=expected_reply(op, header, size, seen, reserve),
                digest=digest,
                owner=h.owner_key(op, header) if client else None,
                read=h.read_of(op, header) if client else None,
                reserve=reserve,
                heavy=heavy,
                user=user,
            )
        )

    def client_gone(self, ident: bytes) -> None:
        """A client disconnected: its queued requests and held replies are dropped."""
        self.dispatcher.client_gone(ident)
        self.outboxes.drop(ident)
        self.transit.drop(ident)
        self.reads.client_gone(ident)

    def shed_queued(self, ident: bytes, uploads: bool) -> bool:
        return self.dispatcher.shed_queued(ident, uploads)

    def kick(self, ident: bytes) -> bool:
        """Close the connection of a client that holds room in transit and takes nothing, for
        another that needs the room: ZeroMQ drops what it queued for it."""
        if not self.transport.disconnect(ident):
            return False
        held = self.admission.holding(ident)
        self.client_gone(ident)
        self._kicks.warning(
            "event=client_disconnected client=%s held=%d reason=%r",
            ident.hex(),
            held,
            "it took none of its replies for a while and another client needs the room",
        )
        return True

    # --- workers ---

    def worker_message(self, ident: bytes, frames: list, allowed: bool = True) -> None:
        """``[route, header?, data?]`` from worker ``ident``; ``allowed``: its key is still in
        the workers' allowlist (always, without CURVE)."""
        if not allowed:
            # Its key was removed from the workers' allow directory: no more requests.
            self.dispatcher.worker_lost(ident, "key no longer allowed")
            self._send_route(
                ident,
                {
                    "t": "refused",
                    "msg": "this worker's key is not in the broker's --allow-workers directory",
                },
            )
            return
        try:
            if not frames:
                raise BadRequest("worker message without a route frame")
            route = p.decode(h.buffer(frames[0]), "route")
            kind = route.get("t")
            worker = self.registry.get(ident)
            if kind == "ready":
                self._register(ident, route)
                return
            if worker is None:
                # Not (or no longer) registered, e.g. after a broker restart: ask it to READY.
                if kind != "bye":
                    self._send_route(ident, {"t": "reregister"})
                return
            self.registry.heard(worker)
            if kind == "rep":
                self._reply(worker, route, frames[1:])
            elif kind == "req":
                self._worker_request(worker, route, frames[1:])
            elif kind == "hb":
                self.registry.note_stats(worker, route.get("st"))
            elif kind == "policy" and worker.service == p.STORAGE:
                if self.keys.offer(route, frames[1:]) and self.keys.frames is not None:
                    self.dispatcher.to_all_but(ident, self.keys.frames)
            elif kind == "bye":
                self.dispatcher.worker_lost(ident, "said bye")
            else:
                raise BadRequest(f"unknown route type {kind!r}")
        except BadRequest as exc:
            self._bad.warning("event=bad_worker_message worker=%s error=%r", ident.hex(), str(exc))

    def _send_route(self, ident: bytes, route: dict) -> bool:
        return self.transport.to_worker(ident, [p.encode(route)])

    def _register(self, ident: bytes, route: dict) -> None:
        try:
            service, worker_id, store_id = self.registry.check(ident, route)
        except Refused as refused:
            self._refusals.warning(
                "event=worker_refused worker=%s reason=%r", ident.hex(), refused.message
            )
            reply: dict = {"t": "refused", "msg": refused.message}
            if refused.retry:
                reply["retry"] = True
            self._send_route(ident, reply)
            return
        if self.registry.get(ident) is not None:
            self.dispatcher.worker_lost(ident, "registered again")
        digest_fn = route.get("digest_fn") if service == p.STORAGE else None
        serial = service == p.STORAGE and route.get("serial") is True
        changed = self.registry.add(ident, service, worker_id, store_id, digest_fn, serial)
        # `pol`: this broker passes the store's access snapshot on (keys.py); the newest one
        # follows the welcome.
        self._send_route(ident, self._welcome())
        if self.keys.frames is not None:
            self.transport.to_worker(ident, self.keys.frames)
        if changed:
            # Caches verify what storage sends them with the store's digest function: they
            # hear of it (again: a later welcome only updates it) before any request reaches
            # this worker, so before any of its replies (the pipes are FIFO).
            for cache in self.registry.of(p.CACHE):
                self._send_route(cache.ident, self._welcome())
        log.info("event=worker_ready service=%s worker=%s store=%s", service, worker_id, store_id)

    def _welcome(self) -> dict:
        """The ``welcome`` route: ``pol`` (this broker passes access snapshots on), and the
        store's digest function once it is known."""
        known = self.registry.store
        # `at`: the newest request key given; a cache keeps no commit fill of a request older
        # than its welcome (an invalidation may have been lost while it was cut off).
        route = {"t": "welcome", "pol": True, "at": self.dispatcher.newest_key}
        if known is not None:
            route["digest_fn"] = known[1]
        return route

    def _reply(self, worker: Worker, route: dict, body: list) -> None:
        key = route.get("k")
        if not isinstance(key, int) or isinstance(key, bool):
            raise BadRequest("reply route without an integer request key")
        names = h.changed_names(route.get("inv"))
        pending = self.dispatcher.answered(worker, key)
        if pending is None:
            # Handed to another worker already, or a duplicate: exactly one reply goes out.
            if worker.service == p.STORAGE:
                # A change storage made late (its request was given up on) still changed the
                # name: the cache must not keep serving the old version (read-after-write).
                self.invalidate(names)
            self._late.warning(
                "event=late_reply worker=%s key=%d action=dropped", clip(worker.worker_id), key
            )
            return
        if pending.digest and len(body) > 1:
            self.admission.learn(pending.digest, h.nbytes(body[1]))
        self.dispatcher.pump(worker.service)  # its credit is free again
        # Invalidate before the ack leaves: the cache's pipe is FIFO, so any read the client
        # sends after this ack reaches the cache after the invalidation.  A commit that carried
        # its whole content hands it to the cache with it (storage says so with `fill`).
        fill = (
            Fill.of_reply(route, names, pending.body[1], key)
            if len(pending.body) == 2 and names
            else None
        )
        if fill is not None:
            self.dispatcher.invalidate(names, fill)
        elif names:
            self.invalidate(names)
        if pending.origin["via"] == FRONTEND:
            # Counted before the reply leaves: a client that has its answer finds it counted.
            err = route.get("err")
            # A worker's word, bounded: a label the metrics keep for good.
            outcome = (
                "ok" if route.get("ok", True) else str(err) if err in p.ERROR_CODES else "internal"
            )
            self.metrics.answered(pending.op, outcome, time.monotonic() - pending.started)
            if route.get("cache") == "hit":
                self.metrics.cache_hits += 1
            elif route.get("cache") == "miss":
                self.metrics.cache_misses += 1
            nbytes = h.nbytes(body[1]) - p.DATA_PREFIX_LEN if len(body) > 1 else 0
            self.reads.tally(
                pending.op, pending.origin["from"], pending.req_id, pending.read, route, nbytes
            )
        self.replies.deliver(
            pending.origin, body, pending.deadline, admitted=pending.reserve, req_id=pending.req_id
        )

    def _worker_request(self, worker: Worker, route: dict, body: list) -> None:
        """A worker asks another service (a cache's miss goes to storage)."""
        service = route.get("svc")
        origin = {"from": worker.ident, "via": BACKEND}
        if len(body) not in (1, 2):
            raise BadRequest(f"worker request has {len(body)} body frames, expected 1 or 2")
        header = h.read_header(h.buffer(body[0]))
        if not isinstance(service, str) or service not in p.SERVICES:
            self.replies.error(
                origin, header.get("id"), "bad_request", f"unknown service {service!r}"
            )
            return
        op = str(header.get("op"))
        digest = h.chunk_digest(op, header)
        seen = self.admission.seen(digest) if digest else 0
        request = (digest, seen, h.nbytes(body[0]), sum(map(h.nbytes, body)))
        self._submit(service, op, header, origin, body, time.monotonic(), request)

    def invalidate(self, names: list) -> None:
        """Tell every cache worker to drop ``names`` (see :meth:`Dispatcher.invalidate`)."""
        self.dispatcher.invalidate(names)

    # --- time ---

    def tick(self, now: float, heartbeat: bool = False) -> None:
        """Time passes: drop requests past their deadline, count what clients took of what is
        in transit; with ``heartbeat``, also forget workers not heard from for their liveness
        and beat to the others."""
        self.dispatcher.expire(now)
        self.transit.sweep(now)
        if heartbeat:
            self.purge_workers(now)
            self.send_heartbeats()

    def purge_workers(self, now: float | None = None) -> None:
        for worker in self.registry.expired(time.monotonic() if now is None else now):
            self.dispatcher.worker_lost(worker.ident, "heartbeat expired")

    def send_heartbeats(self) -> None:
        for worker in self.registry:
            if not self.transport.to_worker(worker.ident, [self._beat]):
                self.dispatcher.worker_lost(worker.ident, "unreachable")

    # --- status ---

    def status(self) -> dict:
        """What ``status`` answers (fms.broker.status)."""
        return status_of(self)
