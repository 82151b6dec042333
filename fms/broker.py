"""The broker: routes requests to services and keeps the registry of live workers.

It knows nothing about files.  It reads the small header frame of a client request (for ``op``)
and the route frame of a worker message; data frames pass through untouched (``copy=False``).
The broker holds no state that a restart loses: workers re-register, clients retry.

Dispatch is least-loaded: among a service's live workers, the one with the fewest requests in
flight.  A request in flight on a worker that dies is handed to another worker if its op is
idempotent, and answered with ``unavailable`` otherwise.
"""

import collections
import fcntl
import hashlib
import itertools
import logging
import struct
import termios
import time
from dataclasses import dataclass, field

import zmq

from . import limits
from . import wire as p
from .errors import BadRequest
from .logutil import RateLimitedLog, clip
from .metrics import BrokerMetrics, ReadTally
from .wire.frames import drain, send_frames

log = logging.getLogger("fms.broker")

FRONTEND = "f"
BACKEND = "b"
MAX_ID_LEN = 128  # characters of a worker id or store id kept (they are shown in status)
SHED_KEEPS = 1024  # bytes: a held reply this small is not worth shedding (its error is as big)
DRAIN_BATCH = 64  # messages taken from one socket per poll, so neither socket starves the other


def _digest(op: str, header: dict) -> bytes:
    digest = header.get("hash") if op == "chunk" else None
    return digest if isinstance(digest, bytes) and len(digest) == p.HASH_LEN else b""


def _owner_key(op: str, header: dict):
    """What a cache request is routed by (rendezvous): a get's name, a chunk's hash."""
    key = header.get("name") if op == "get" else header.get("hash") if op == "chunk" else None
    return key if isinstance(key, (str, bytes)) else None


def _read_of(op: str, header: dict):
    """The GET a chunk request belongs to (``of``, a request id: an int or a short str), for
    the cache counters; anything else is ignored (it only feeds metrics)."""
    of = header.get("of") if op == "chunk" else None
    if isinstance(of, bool) or not isinstance(of, (int, str)):
        return None
    return of if isinstance(of, int) or len(of) <= MAX_ID_LEN else None


def rendezvous(key, worker_ids) -> str | None:
    """The owner of ``key`` among ``worker_ids``: the one with the highest hash of (id, key).
    Each key has one owner; a worker that leaves or joins moves only the keys it wins."""
    raw = key.encode() if isinstance(key, str) else key
    return max(
        worker_ids,
        default=None,
        key=lambda wid: hashlib.blake2b(raw, digest_size=8, key=wid.encode()[:64]).digest(),
    )


def _nbytes(frame) -> int:
    return frame.buffer.nbytes if hasattr(frame, "buffer") else len(frame)


def _add(counts: dict, key, delta: int):
    """Add ``delta`` to ``counts[key]``, keeping only keys whose count is positive."""
    if delta:
        value = counts.get(key, 0) + delta
        if value > 0:
            counts[key] = value
        else:
            counts.pop(key, None)


def _int_in(value, lo: int, hi: float = float("inf")) -> bool:
    """Whether a decoded field is an int (a bool is not) from ``lo`` to ``hi``."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def deadline_of(header: dict) -> float:
    """The broker's own monotonic deadline for a request: now plus the client's relative
    budget ``ttl_ms`` (relative, so no clocks need agree across hosts), within bounds."""
    ttl = header.get("ttl_ms")
    if not _int_in(ttl, 1):
        ttl = limits.DEFAULT_TTL_MS
    return time.monotonic() + min(ttl, limits.MAX_TTL_MS) / 1000


def read_header(buf) -> dict:
    """The fields of a request header the broker needs, within bounds: a small header is
    decoded (with msgpack's limits), a large one (only commit and have may be) is only peeked
    at, its lists skipped without being built.

    :raises BadRequest: not a bounded msgpack map (``too_large`` when over the limit).
    """
    if limits.frame_len(buf) <= limits.MAX_HEADER:
        return p.decode(buf, "request")
    return limits.peek_large(buf)


@dataclass
class Worker:
    ident: bytes
    service: str
    worker_id: str
    store_id: str | None
    expiry: float
    inflight: set = field(default_factory=set)  # broker request keys
    inflight_bytes: int = 0  # their data + the replies expected of them
    served: int = 0
    last_used: int = 0  # request key of its latest dispatch
    stats: dict = field(default_factory=dict)  # a cache's counters, from its heartbeats


@dataclass
class Pending:
    worker: bytes | None  # None while queued at the broker
    service: str  # the service asked for
    op: str
    origin: dict  # {"from": identity, "via": FRONTEND|BACKEND}
    body: list  # header frame (+ data frame), kept for re-dispatch
    req_id: object
    started: float  # time.monotonic() when the request reached the broker
    deadline: float = float("inf")  # time.monotonic() past which nobody waits for it
    target: str = ""  # the service serving it (the asked one, or its fallback)
    exclude: tuple = ()  # workers that died holding it
    nbytes: int = 0  # bytes of its data frame, held here until it is answered
    expect: int = 0  # bytes its reply is expected to carry (a chunk's size, once seen)
    digest: bytes = b""  # the chunk a `chunk` request asks for, to learn its size
    owner: object = None  # a cache request's key: the cache worker that owns it serves it
    read: object = None  # a chunk request's GET (its request id), for the ReadTally
    reserve: int = 0  # reply bytes kept free for it in its client's budget (admission)


def _changed_names(inv) -> list:
    """The names a storage reply says it changed: one (a commit, an rm) or a list (a batch)."""
    if isinstance(inv, str):
        return [inv]
    if isinstance(inv, list):
        return [name for name in inv if isinstance(name, str)]
    return []


def _batches_of_names(names: list, max_bytes: int):
    """``names`` in consecutive lists whose UTF-8 lengths add up to at most ``max_bytes`` (a
    longer name alone)."""
    batch, size = [], 0
    for name in names:
        n = len(name.encode())
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += n
    if batch:
        yield batch


class Broker:
    """Routes between a frontend ROUTER (clients) and a backend ROUTER (workers).

    :param frontend: endpoint to bind for clients.
    :param backend: endpoint to bind for workers.
    """

    def __init__(
        self,
        frontend: str,
        backend: str,
        ctx: zmq.Context | None = None,
        curve=None,
        store: str | None = None,
    ):
        """:param curve: a :class:`~fms.security.CurveServer` to require CURVE and an allowlist
        on both sockets (clients' on the frontend, workers' on the backend), or None for
        plaintext.
        :param store: the store id storage workers must serve; None: the first one's."""
        self.ctx = ctx or zmq.Context.instance()
        self.curve = curve
        self.pinned_store = store
        self.frontend_endpoint = frontend
        self.backend_endpoint = backend
        self.frontend = None
        self.backend = None
        self.workers = {}  # ident -> Worker
        self.pending = {}  # request key -> Pending
        self.client_inflight = {}  # client identity -> requests of it in flight (or queued)
        # Requests wait here while every worker of their service has its credit in flight:
        # service -> {(via, origin identity) -> deque of request keys}, served round robin, so
        # one client's flood waits behind everyone else's next request, not in front of it.
        self.queues = {service: collections.OrderedDict() for service in p.SERVICES}
        self.dropped = 0  # requests dropped: deadline passed, or their client left
        self._client_fd = {}  # client identity -> fd of its connection
        self._fd_clients = {}  # fd -> client identities seen on it
        self.monitor = None
        self._drops = RateLimitedLog(log)
        # Byte budgets (fms.limits): request data held per client and in all, and replies a
        # client has not taken yet, held here (its ZeroMQ queue takes only CLIENT_PIPE).
        self.req_bytes = {}  # client identity -> bytes of its requests' data held
        self.total_req = 0
        self.outbox = {}  # client identity -> deque of (frames, bytes, deadline)
        self.outbox_bytes = {}  # client identity -> bytes held in its outbox
        self.outbox_moved = {}  # client identity -> when its outbox last sent (or began)
        self.total_out = 0
        # Reply bytes reserved when a request is admitted, released when its reply arrives: a
        # reply to an admitted request always has room (it is never dropped for budget).
        self.reserved = {}  # client identity -> reply bytes reserved for its requests
        self.total_reserved = 0
        self.shed_replies = 0  # unread replies dropped to make room for another client
        self.shed_requests = 0  # queued requests answered `unavailable` to make room
        self.backed_off = 0  # requests refused at admission: over a byte budget
        self.dropped_replies = 0
        self.chunk_sizes = collections.OrderedDict()  # digest -> size seen in a reply (LRU)
        self._keys = itertools.count(1)
        self._bad = RateLimitedLog(log)
        self._undeliverable = RateLimitedLog(log)
        self._refusals = RateLimitedLog(log)
        self._crashes = RateLimitedLog(log)
        self._late = RateLimitedLog(log)
        self.started = time.time()
        self.metrics = BrokerMetrics()
        self.reads = ReadTally(self.metrics)
        self.cache_seen = {}  # (cache worker id, counter) -> value its heartbeat last had

    # --- set-up ---

    def bind(self):
        """Bind both sockets; the actual endpoints (with any ``*`` port resolved) are kept."""
        self.frontend = self._router(self.frontend_endpoint, hwm=limits.CLIENT_PIPE)
        self.backend = self._router(self.backend_endpoint, workers=True)
        # Disconnections of clients, so that their queued work is dropped at once.
        self.monitor = self.frontend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.frontend_endpoint = self.frontend.last_endpoint.decode()
        self.backend_endpoint = self.backend.last_endpoint.decode()
        log.info(
            "event=listening frontend=%s backend=%s", self.frontend_endpoint, self.backend_endpoint
        )
        if self.pinned_store is None:
            log.warning(
                "event=store_not_pinned hint=%r",
                "the first storage worker to register "
                "decides which store this broker serves; give --store ID (fms up does) "
                "so that an impostor cannot, and use CURVE worker keys",
            )

    def _router(self, endpoint: str, hwm: int | None = None, workers: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises, never vanishes
        # Never wait on one peer: a full queue raises at once and is handled (logged, or the
        # worker is dropped), so a stalled peer cannot stall the broker for everyone else.
        sock.setsockopt(zmq.SNDTIMEO, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_SIZE)
        if hwm is not None:
            sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, limits.RECEIVE_PIPE)
        if self.curve is not None:
            self.curve.apply(sock, workers=workers)
        sock.bind(endpoint)
        return sock

    def close(self):
        if self.monitor is not None:
            self.frontend.disable_monitor()
            self.monitor.close(linger=0)
        for sock in (self.frontend, self.backend):
            if sock is not None:
                sock.close(linger=0)
        if self.curve is not None:
            self.curve.stop()

    # --- the loop ---

    def run(self, should_stop=lambda: False):
        limits.tune_malloc()
        limits.raise_fd_limit(log)
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        next_heartbeat = time.monotonic() + p.HEARTBEAT_INTERVAL
        next_sweep = time.monotonic() + limits.SWEEP_INTERVAL
        while not should_stop():
            timeout = max(0.0, min(next_heartbeat, next_sweep) - time.monotonic())
            if self.outbox:
                timeout = min(timeout, limits.FLUSH_INTERVAL)
            events = dict(poller.poll(int(timeout * 1000)))
            if self.outbox:
                self.flush()
            if self.monitor in events:  # before the frontend: a reused fd is seen gone first
                drain(self.monitor, self.process_monitor, DRAIN_BATCH)
            # Under load, take what is queued without polling again for each message: a poll
            # costs about as much as the routing.  Replies first, so work in flight drains.
            if self.backend in events:
                drain(self.backend, self._guarded(self.process_worker), DRAIN_BATCH)
            if self.frontend in events:
                drain(self.frontend, self._guarded(self.process_client), DRAIN_BATCH)
            if time.monotonic() >= next_sweep:
                self.expire(time.monotonic())
                next_sweep = time.monotonic() + limits.SWEEP_INTERVAL
            if time.monotonic() >= next_heartbeat:
                self.purge_workers()
                self.send_heartbeats()
                next_heartbeat = time.monotonic() + p.HEARTBEAT_INTERVAL

    # --- clients ---

    def _guarded(self, handle):
        """``handle`` with any bug it meets costing one message, not the broker (invariant 5)."""

        def guarded(frames):
            try:
                handle(frames)
            except Exception as exc:
                self._crashes.warning("event=message_handling_crashed error=%r", clip(repr(exc)))

        return guarded

    def process_client(self, frames):
        """``[identity, header, data?]`` from a client."""
        ident = frames[0].bytes
        origin = {"from": ident, "via": FRONTEND}
        req_id = None
        self._note_fd(ident, frames[0])
        try:
            if len(frames) < 2:
                raise BadRequest("a request has 1 or 2 frames (header, data?), got none")
            # The header first, so that even a reply about the frame count carries the id.
            header = read_header(frames[1].buffer)
            op = header.get("op")
            req_id = p.need(header, "id", (int, str))
            if header.get("v") != p.PROTOCOL_VERSION:
                self._reply_error(
                    origin,
                    req_id,
                    "version",
                    f"protocol version {header.get('v')!r} is not supported; "
                    f"this broker speaks {p.PROTOCOL_VERSION}: upgrade the client",
                )
                return
            if not isinstance(op, str) or op not in p.OP_SERVICE:
                raise BadRequest(f"unknown op {op!r}; known ops: {', '.join(sorted(p.OP_SERVICE))}")
            p.check_frame_count(op, len(frames) - 1)
            if self.curve is not None and not self.curve.allowed(frames[-1]):
                # Its key was removed from the allow directory since it connected.
                self._reply_error(
                    origin,
                    req_id,
                    "refused",
                    "this client's key is no longer in "
                    "the broker's allow directory; ask the operator to add it back",
                    op=op,
                )
                return
        except BadRequest as exc:
            self._bad.warning("event=bad_client_message error=%r", str(exc))
            self._reply_error(origin, req_id, exc.code, str(exc))
            return
        if self.client_inflight.get(ident, 0) >= p.MAX_CLIENT_INFLIGHT:
            self._reply_error(
                origin,
                req_id,
                "too_large",
                f"more than {p.MAX_CLIENT_INFLIGHT} requests in flight from one "
                f"client; wait for replies before sending more",
                op=op,
            )
            return
        digest = _digest(op, header)
        reserve = self._reply_bound(op, header, digest, _nbytes(frames[1]))
        over = self._admit(ident, sum(map(_nbytes, frames[1:])), reserve, shed=op != "status")
        if over:
            self.backed_off += 1
            self._reply_error(origin, req_id, "unavailable", over, op=op)
            return
        if op == "status":
            self._deliver(origin, [p.encode(p.ok_reply(req_id, **self.status()))])
            self.metrics.answered(op, "ok", 0.0)
            return
        service = p.OP_SERVICE[op]
        if header.get("fresh") is True and op in ("get", "chunk", "get_many"):
            # The client found what the cache gave it corrupt: this once, ask storage itself.
            service = p.STORAGE
        self.dispatch(
            service,
            op,
            req_id,
            origin,
            frames[1:],
            deadline=deadline_of(header),
            digest=digest,
            owner=_owner_key(op, header),
            read=_read_of(op, header),
            reserve=reserve,
        )

    def dispatch(
        self,
        service: str,
        op: str,
        req_id,
        origin: dict,
        body: list,
        exclude=(),
        started=None,
        deadline=None,
        digest=b"",
        owner=None,
        read=None,
        reserve=0,
    ):
        """Queue a request for ``service`` (or its fallback) and send what the workers' credit
        allows; with no worker of either, answer ``unavailable`` at once."""
        target = self._serving(service, exclude)
        if target is None:
            self._reply_error(
                origin,
                req_id,
                "unavailable",
                f"no {service} worker is connected to the broker; start one "
                f"(python {service}_worker.py) or run a whole cluster with: fms up",
                op=op,
                admitted=reserve,
            )
            return
        now = time.monotonic()
        key = next(self._keys)
        nbytes = sum(map(_nbytes, body))  # header and data: all of it is held here
        if op == "chunk":
            expect = self.chunk_sizes.get(digest, limits.CHUNK_GUESS)
        else:
            expect = limits.REPLY_GUESS.get(op, limits.SMALL_REPLY)
        self.pending[key] = Pending(
            None,
            service,
            op,
            origin,
            body,
            req_id,
            started if started is not None else now,
            deadline if deadline is not None else now + limits.DEFAULT_TTL_MS / 1000,
            target,
            tuple(exclude),
            nbytes,
            expect,
            digest,
            owner,
            read,
            reserve,
        )
        self._track_client(origin, +1, nbytes, reserve)
        queue = self.queues[target]
        okey = (origin["via"], origin["from"])
        if okey not in queue:
            queue[okey] = collections.deque()
        queue[okey].append(key)
        self.pump(target)

    def _serving(self, service: str, exclude=()):
        """The service whose workers take ``service``'s requests now: itself, else its
        fallback, else None."""
        for candidate in (service, p.FALLBACK_SERVICE.get(service)):
            if candidate and any(
                w.service == candidate and w.ident not in exclude for w in self.workers.values()
            ):
                return candidate
        return None

    def pump(self, service: str):
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
                for w in self.workers.values()
                if w.service == service
                and len(w.inflight) < credit
                and (w.inflight_bytes < budget or not w.inflight)
            ]
            if not free:
                return
            okey, keys = next(iter(queue.items()))
            key = keys.popleft()
            if keys:
                queue.move_to_end(okey)
            else:
                del queue[okey]
            pending = self.pending.get(key)
            if pending is None:
                continue
            now = time.monotonic()
            if now >= pending.deadline:
                self._forget(key, pending, "deadline passed")
                continue
            worker = self._pick(service, pending, free)
            if worker is None:  # its owner is busy, or only workers it must avoid are free:
                self._requeue_front(queue, okey, key)  # it waits; the next client's turn
                queue.move_to_end(okey)
                blocked += 1
                continue
            blocked = 0
            route = {"t": "req", "k": key, "ttl": max(1, int((pending.deadline - now) * 1000))}
            if not self._send(self.backend, [worker.ident, p.encode(route), *pending.body]):
                pending.exclude = (*pending.exclude, worker.ident)
                self._requeue_front(queue, okey, key)
                self.delete_worker(worker.ident, "unreachable")
                return  # delete_worker pumps again
            pending.worker = worker.ident
            worker.inflight_bytes += pending.nbytes + pending.expect
            worker.inflight.add(key)
            worker.served += 1
            worker.last_used = key

    def _pick(self, service: str, pending: Pending, free: list):
        """The worker to send ``pending`` to among ``free``, or None (it waits).

        A cache request goes to the owner of its key among the live cache workers (rendezvous
        hashing), so each name and chunk is cached, and its misses coalesced, in one place;
        anything else to the least loaded, ties to the one used least recently, so sequential
        requests take turns."""
        if service == p.CACHE and pending.owner is not None:
            live = {
                w.worker_id: w
                for w in self.workers.values()
                if w.service == p.CACHE and w.ident not in pending.exclude
            }
            owner = live.get(rendezvous(pending.owner, live))
            return owner if owner in free else None
        return min(
            (w for w in free if w.ident not in pending.exclude),
            key=lambda w: (len(w.inflight), w.last_used),
            default=None,
        )

    @staticmethod
    def _requeue_front(queue, okey, key):
        if okey not in queue:
            queue[okey] = collections.deque()
        queue[okey].appendleft(key)
        queue.move_to_end(okey, last=False)

    def expire(self, now: float):
        """Drop queued requests whose deadline has passed: their clients stopped waiting.
        Forget one a live worker has held unanswered for INFLIGHT_GRACE past its deadline,
        so a worker that never answers cannot keep its credit (its late reply is dropped)."""
        stale = now - limits.INFLIGHT_GRACE
        for key, pending in [
            (k, q) for k, q in self.pending.items() if q.worker is not None and q.deadline < stale
        ]:
            worker = self.workers.get(pending.worker)
            if worker is not None and key in worker.inflight:
                worker.inflight.discard(key)
                worker.inflight_bytes -= pending.nbytes + pending.expect
                self._forget(key, pending, f"no answer from {worker.worker_id}")
                self.pump(worker.service)
        for queue in self.queues.values():
            for okey, keys in list(queue.items()):
                alive = collections.deque()
                for key in keys:
                    pending = self.pending.get(key)
                    if pending is None:
                        continue
                    if pending.deadline <= now:
                        self._forget(key, pending, "deadline passed")
                    else:
                        alive.append(key)
                if alive:
                    queue[okey] = alive
                else:
                    del queue[okey]

    def client_gone(self, ident: bytes):
        """A client disconnected: its queued requests are dropped (no one will read a reply)."""
        for queue in self.queues.values():
            for key in queue.pop((FRONTEND, ident), ()):
                pending = self.pending.get(key)
                if pending is not None:
                    self._forget(key, pending, "client gone")
        self._drop_outbox(ident)
        self.reads.client_gone(ident)

    def _forget(self, key, pending: Pending, why: str):
        del self.pending[key]
        self._track_client(pending.origin, -1, pending.nbytes, pending.reserve)
        self.dropped += 1
        self._drops.warning(
            "event=request_dropped op=%s reason=%r dropped_total=%d", pending.op, why, self.dropped
        )

    def _note_fd(self, ident: bytes, frame):
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):
            return
        if self._client_fd.get(ident) != fd:
            self._client_fd[ident] = fd
            self._fd_clients.setdefault(fd, set()).add(ident)

    def process_monitor(self, frames):
        """A frontend connection closed: the clients seen on it are gone."""
        if len(frames) != 2 or len(frames[0].bytes) != 6:
            return
        event = int.from_bytes(frames[0].bytes[:2], "little")
        fd = int.from_bytes(frames[0].bytes[2:], "little")
        if event != zmq.EVENT_DISCONNECTED:
            return
        for ident in self._fd_clients.pop(fd, ()):
            if self._client_fd.get(ident) == fd:
                del self._client_fd[ident]
                self.client_gone(ident)

    # --- workers ---

    def process_worker(self, frames):
        """``[identity, route, header?, data?]`` from a worker."""
        ident = frames[0].bytes
        if self.curve is not None and not self.curve.allowed(frames[-1], workers=True):
            # Its key was removed from the workers' allow directory: no more requests.
            self.delete_worker(ident, "key no longer allowed")
            self._send(
                self.backend,
                [
                    ident,
                    p.encode(
                        {
                            "t": "refused",
                            "msg": "this worker's key "
                            "is not in the broker's --allow-workers "
                            "directory",
                        }
                    ),
                ],
            )
            return
        try:
            if len(frames) < 2:
                raise BadRequest("worker message without a route frame")
            route = p.decode(frames[1].buffer, "route")
            kind = route.get("t")
            worker = self.workers.get(ident)
            if kind == "ready":
                self.register_worker(ident, route)
                return
            if worker is None:
                # Not (or no longer) registered, e.g. after a broker restart: ask it to READY.
                if kind != "bye":
                    self._send(self.backend, [ident, p.encode({"t": "reregister"})])
                return
            worker.expiry = time.monotonic() + p.HEARTBEAT_INTERVAL * p.HEARTBEAT_LIVENESS
            if kind == "rep":
                self.process_reply(worker, route, frames[2:])
            elif kind == "req":
                self.process_worker_request(worker, route, frames[2:])
            elif kind == "hb":
                self._note_stats(worker, route.get("st"))
            elif kind == "bye":
                self.delete_worker(ident, "said bye")
            else:
                raise BadRequest(f"unknown route type {kind!r}")
        except BadRequest as exc:
            self._bad.warning("event=bad_worker_message worker=%s error=%r", ident.hex(), str(exc))

    def register_worker(self, ident: bytes, route: dict):
        service = route.get("svc")
        worker_id = str(route.get("wid", ident.hex()))[:MAX_ID_LEN]
        store_id = route.get("store")
        if store_id is not None and not isinstance(store_id, str):
            store_id = repr(store_id)
        if store_id is not None:
            store_id = store_id[:MAX_ID_LEN]
        if route.get("v") != p.PROTOCOL_VERSION:
            return self._refuse(
                ident,
                f"protocol version {route.get('v')!r} is not supported; "
                f"this broker speaks {p.PROTOCOL_VERSION}",
            )
        if service not in p.SERVICES:
            return self._refuse(ident, f"unknown service {service!r}")
        if service == p.STORAGE:
            # The store is decided by storage (the broker's --store, read from the data
            # directory), else by the storage workers already serving.  A worker of another
            # store is refused but not told to exit: if an impostor registered first, the real
            # workers keep asking and get in as soon as it is gone.
            current = self.pinned_store or self.store_id(exclude=ident)
            if current is not None and store_id != current:
                return self._refuse(
                    ident,
                    f"this worker serves a different store ({store_id!r:.80}) than the "
                    f"{'broker was started for' if self.pinned_store else 'storage workers already connected'} "  # noqa: E501
                    f"({current}); start it with the same --data directory as them "
                    f"(sharding across stores comes later); it retries every second",
                    retry=True,
                )
        if ident in self.workers:
            self.delete_worker(ident, "registered again")
        self.workers[ident] = Worker(
            ident,
            service,
            worker_id,
            store_id,
            time.monotonic() + p.HEARTBEAT_INTERVAL * p.HEARTBEAT_LIVENESS,
        )
        self._send(self.backend, [ident, p.encode({"t": "welcome"})])
        self._count_workers()
        log.info("event=worker_ready service=%s worker=%s store=%s", service, worker_id, store_id)

    def _count_workers(self):
        for service in p.SERVICES:
            self.metrics.workers.labels(service).set(
                sum(w.service == service for w in self.workers.values())
            )

    def store_id(self, exclude=None):
        for worker in self.workers.values():
            if worker.service == p.STORAGE and worker.ident != exclude:
                return worker.store_id
        return None

    def _refuse(self, ident: bytes, message: str, retry: bool = False):
        self._refusals.warning("event=worker_refused worker=%s reason=%r", ident.hex(), message)
        route = {"t": "refused", "msg": message}
        if retry:
            route["retry"] = True
        self._send(self.backend, [ident, p.encode(route)])

    def process_reply(self, worker: Worker, route: dict, body: list):
        key = route.get("k")
        if not isinstance(key, int) or isinstance(key, bool):
            raise BadRequest("reply route without an integer request key")
        names = _changed_names(route.get("inv"))
        pending = self.pending.pop(key, None)
        if pending is None or pending.worker != worker.ident:
            # Handed to another worker already, or a duplicate: exactly one reply goes out.
            if pending is not None:
                self.pending[key] = pending
            if worker.service == p.STORAGE:
                # A change storage made late (its request was given up on) still changed the
                # name: the cache must not keep serving the old version (invariant 1).
                self.invalidate(names)
            self._late.warning(
                "event=late_reply worker=%s key=%d action=dropped", clip(worker.worker_id), key
            )
            return
        worker.inflight.discard(key)
        worker.inflight_bytes -= pending.nbytes + pending.expect
        self._track_client(pending.origin, -1, pending.nbytes, pending.reserve)
        if pending.digest and len(body) > 1:
            self.chunk_sizes[pending.digest] = _nbytes(body[1])
            self.chunk_sizes.move_to_end(pending.digest)
            if len(self.chunk_sizes) > limits.CHUNK_SIZES_KEPT:
                self.chunk_sizes.popitem(last=False)
        self.pump(worker.service)  # its credit is free again
        # Invalidate before the ack leaves: the cache's pipe is FIFO, so any read the client
        # sends after this ack reaches the cache after the invalidation (invariant 1).
        self.invalidate(names)
        self._deliver(
            pending.origin, body, pending.deadline, admitted=pending.reserve, req_id=pending.req_id
        )
        if pending.origin["via"] == FRONTEND:
            outcome = "ok" if route.get("ok", True) else str(route.get("err"))
            self.metrics.answered(pending.op, outcome, time.monotonic() - pending.started)
            if route.get("cache") == "hit":
                self.metrics.cache_hits.inc()
            elif route.get("cache") == "miss":
                self.metrics.cache_misses.inc()
            self._tally(pending, route, body)

    def _tally(self, pending: Pending, route: dict, body: list):
        """Count a reply towards the cache's per-GET figures (fms.metrics.ReadTally)."""
        if not route.get("ok", True):
            return
        nbytes = max(0, _nbytes(body[1]) - p.DATA_PREFIX_LEN) if len(body) > 1 else 0
        if pending.op == "get" and route.get("cache") is not None:
            self.reads.get_answered(
                pending.origin["from"], pending.req_id, route["cache"], route.get("n", 0), nbytes
            )
        elif pending.op == "get_many" and route.get("cache") is not None:
            self.reads.batch_answered(route.get("gh"), route.get("gm"))
        elif pending.op == "chunk" and pending.read is not None:
            self.reads.chunk_answered(
                pending.origin["from"], pending.read, route.get("cache"), nbytes
            )

    def _note_stats(self, worker: Worker, stats):
        """A cache's counters, from its heartbeat: their growth goes to the Prometheus ones.
        What was seen is kept by worker id, so a worker that registers again is not counted
        twice; a value below it means the worker restarted from 0."""
        if not isinstance(stats, dict):
            return
        for name, counter in (
            ("evictions", self.metrics.cache_evictions),
            ("refused", self.metrics.cache_refused),
        ):
            value = stats.get(name)
            if _int_in(value, 0):
                seen = self.cache_seen.get((worker.worker_id, name), 0)
                grown = value - seen if value >= seen else value
                if grown > 0:
                    counter.inc(grown)
                self.cache_seen[(worker.worker_id, name)] = value
                worker.stats[name] = value

    def process_worker_request(self, worker: Worker, route: dict, body: list):
        service = route.get("svc")
        origin = {"from": worker.ident, "via": BACKEND}
        if len(body) not in (1, 2):
            raise BadRequest(f"worker request has {len(body)} body frames, expected 1 or 2")
        header = read_header(body[0].buffer)
        if service not in p.SERVICES:
            self._reply_error(
                origin, header.get("id"), "bad_request", f"unknown service {service!r}"
            )
            return
        op = str(header.get("op"))
        self.dispatch(
            service,
            op,
            header.get("id"),
            origin,
            body,
            deadline=deadline_of(header),
            digest=_digest(op, header),
        )

    def invalidate(self, names: list):
        """Tell every cache worker to drop ``names``: one ``inv`` message per at most
        INV_NAME_BYTES of names (an rm -r page changes a thousand: one message each would
        overflow the cache's pipe)."""
        for batch in _batches_of_names(names, limits.INV_NAME_BYTES):
            message = p.encode(
                {"t": "inv", "name": batch[0]} if len(batch) == 1 else {"t": "inv", "names": batch}
            )
            for worker in list(self.workers.values()):
                # A cache we cannot tell must not serve reads any more.
                if worker.service == p.CACHE and not self._send(
                    self.backend, [worker.ident, message]
                ):
                    self.delete_worker(worker.ident, "missed an invalidation")

    def purge_workers(self):
        now = time.monotonic()
        for worker in [w for w in self.workers.values() if w.expiry < now]:
            self.delete_worker(worker.ident, "heartbeat expired")

    def delete_worker(self, ident: bytes, reason: str):
        worker = self.workers.pop(ident, None)
        if worker is None:
            return
        self._count_workers()
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
            self._track_client(pending.origin, -1, pending.nbytes, pending.reserve)
            # Every op is idempotent (commit and rm carry an id that makes a repeat a no-op):
            # another worker takes it.
            self.metrics.redispatched.inc()
            self.dispatch(
                pending.service,
                pending.op,
                pending.req_id,
                pending.origin,
                pending.body,
                exclude=(*pending.exclude, ident),
                started=pending.started,
                deadline=pending.deadline,
                digest=pending.digest,
                owner=pending.owner,
                read=pending.read,
                reserve=pending.reserve,
            )
        self._requeue_orphans(worker.service)

    def _requeue_orphans(self, service: str):
        """After a worker left: queued requests of a service with no worker left go to its
        fallback, or are answered ``unavailable``; the rest are pumped to who is left."""
        queue = self.queues[service]
        if self._serving(service) == service:
            self.pump(service)
            return
        while queue:
            _, keys = queue.popitem(last=False)
            for key in keys:
                pending = self.pending.pop(key, None)
                if pending is None:
                    continue
                self._track_client(pending.origin, -1, pending.nbytes, pending.reserve)
                self.dispatch(
                    pending.service,
                    pending.op,
                    pending.req_id,
                    pending.origin,
                    pending.body,
                    exclude=pending.exclude,
                    started=pending.started,
                    deadline=pending.deadline,
                    digest=pending.digest,
                    owner=pending.owner,
                    read=pending.read,
                    reserve=pending.reserve,
                )

    def send_heartbeats(self):
        beat = p.encode({"t": "hb"})
        for worker in list(self.workers.values()):
            if not self._send(self.backend, [worker.ident, beat]):
                self.delete_worker(worker.ident, "unreachable")

    def _track_client(self, origin: dict, delta: int, nbytes: int = 0, reserve: int = 0):
        if origin["via"] != FRONTEND:
            return
        ident = origin["from"]
        _add(self.client_inflight, ident, delta)
        _add(self.req_bytes, ident, delta * nbytes)
        self.total_req += delta * nbytes
        _add(self.reserved, ident, delta * reserve)
        self.total_reserved += delta * reserve

    # --- byte budgets ---

    def _reply_bound(self, op: str, header: dict, digest: bytes, size: int) -> int:
        """Reply bytes to reserve for a client's request (of ``size`` header bytes): at most
        what its reply can carry, or, for a chunk, its length (declared by the client in
        ``len``, else seen before, else the largest a chunk may be)."""
        if op == "chunk":
            declared = header.get("len")
            seen = self.chunk_sizes.get(digest, 0)
            if not _int_in(declared, 0, p.MAX_CHUNK_SIZE):
                declared = 0 if seen else p.MAX_CHUNK_SIZE
            return max(declared, seen) + limits.SMALL_REPLY
        if op == "ls":
            page = header.get("limit")
            if not _int_in(page, 1):
                page = p.LS_PAGE_DEFAULT
            return min(page, p.LS_PAGE_MAX) * limits.LS_ENTRY_MAX + limits.SMALL_REPLY
        if op == "get_many":  # inline content up to the batch's limit, and the manifests
            names = header.get("names")
            count = len(names) if isinstance(names, list) else 1
            return (
                min(p.MAX_BATCH_BYTES, count * p.INLINE_MAX)
                + count * limits.MANIFEST_GUESS
                + limits.SMALL_REPLY
            )
        if op == "have":  # the hashes it asked about, at most
            return size + limits.SMALL_REPLY
        return limits.REPLY_BOUND.get(op, limits.SMALL_REPLY)

    def _admit(self, ident: bytes, nbytes: int, reserve: int, shed: bool = True):
        """Admit a client's request: count its ``nbytes`` (every frame of it: the broker holds
        them until it is answered) and reserve ``reserve`` reply bytes for it; or say why it
        must back off (None: admitted).

        Per client: its requests' bytes held and its replies (unread or reserved) each stay
        within CLIENT_BYTES, so a client that does not read stalls itself.  In all: when a
        total is full, room is made by shedding (:meth:`_shed`) from clients holding more
        than this one does, so many clients that flood or never read cannot keep one that
        reads from being served.
        """
        held_req = self.req_bytes.get(ident, 0)
        if held_req + nbytes > limits.CLIENT_BYTES:
            return (
                f"this client already has {held_req} bytes of requests in flight at the "
                f"broker (budget {limits.CLIENT_BYTES}); wait for replies before sending "
                f"more (retried with backoff)"
            )
        held = self.outbox_bytes.get(ident, 0) + self.reserved.get(ident, 0)
        box = self.outbox.get(ident, ())
        if held + reserve > limits.CLIENT_BYTES or (
            len(box) + self.client_inflight.get(ident, 0) >= limits.OUTBOX_MESSAGES
        ):
            return (
                f"this client has {held} bytes of replies unread or on their way; read them "
                f"before asking for more (retried with backoff)"
            )
        while self.total_req + nbytes > limits.TOTAL_REQUEST_BYTES:
            if not (shed and self._shed(held_req, uploads=True)):
                return (
                    "the broker holds as many requests as it may for all clients; retry "
                    "in a moment (retried with backoff)"
                )
        while self.total_out + self.total_reserved + reserve > limits.TOTAL_REPLY_BYTES:
            if not (shed and self._shed(held, uploads=False)):
                return (
                    "the broker holds as many replies as it may for all clients; retry in a "
                    "moment (retried with backoff)"
                )
        return None

    def _shed(self, holding: int, uploads: bool) -> bool:
        """Make room in a total for a client holding ``holding`` bytes: take from the client
        holding the most (request bytes, or reply bytes unread and reserved), if that is more:
        its newest request still queued here is answered ``unavailable`` (it retries with
        backoff), or else (replies) the oldest reply it has left unread for STALLED seconds is
        replaced by ``unavailable`` with the same id.  A client reading its replies keeps
        them.  False if nobody can give room."""
        holdings = (
            self.req_bytes
            if uploads
            else {
                i: self.outbox_bytes.get(i, 0) + self.reserved.get(i, 0)
                for i in {*self.outbox_bytes, *self.reserved}
            }
        )
        for ident, held in sorted(holdings.items(), key=lambda kv: -kv[1]):
            if held <= holding:
                return False
            if self._shed_queued(ident, uploads):
                return True
            if not uploads and self._shed_reply(ident):
                return True
        return False

    def _shed_queued(self, ident: bytes, uploads: bool) -> bool:
        for queue in self.queues.values():
            keys = queue.get((FRONTEND, ident))
            for key in reversed(keys or ()):
                pending = self.pending.get(key)
                if pending is None or not (pending.nbytes if uploads else pending.reserve):
                    continue
                keys.remove(key)
                if not keys:
                    del queue[(FRONTEND, ident)]
                del self.pending[key]
                self._track_client(pending.origin, -1, pending.nbytes, pending.reserve)
                self.shed_requests += 1
                self._drops.warning("event=request_shed op=%s client=%s", pending.op, ident.hex())
                self._reply_error(
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

    def _shed_reply(self, ident: bytes) -> bool:
        """Replace the oldest reply ``ident`` has left unread for STALLED seconds by a small
        ``unavailable`` with the same id; False if it is reading (or nothing would be freed)."""
        box = self.outbox.get(ident)
        if not box or time.monotonic() - self.outbox_moved.get(ident, 0.0) < limits.STALLED:
            return False
        for i, (_, size, deadline, req_id) in enumerate(box):
            if req_id is None or size <= SHED_KEEPS:
                continue
            error = [
                p.encode(
                    p.error_reply(
                        req_id,
                        "unavailable",
                        "this client left its "
                        "replies unread while others needed the room; "
                        "ask again",
                    )
                )
            ]
            freed = size - len(error[0])
            box[i] = (error, size - freed, deadline, req_id)
            self.outbox_bytes[ident] -= freed
            self.total_out -= freed
            self.shed_replies += 1
            self._undeliverable.warning(
                "event=reply_shed peer=%s error=%r",
                ident.hex(),
                "the client does not read and another needs the room",
            )
            return True
        return False

    def flush(self):
        """Send what clients' outboxes hold, as far as their queues take it; drop what has
        passed its deadline by INFLIGHT_GRACE (a client still reading matches a late reply by
        its id)."""
        now = time.monotonic()
        for ident in list(self.outbox):
            box = self.outbox[ident]
            while box:
                frames, size, deadline, _ = box[0]
                if deadline + limits.INFLIGHT_GRACE > now:
                    if size >= limits.LARGE_REPLY and self._backed_up(ident):
                        break
                    try:
                        send_frames(self.frontend, [ident, *frames])
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        self._drop_outbox(ident)  # the client is gone
                        break
                    self.outbox_moved[ident] = now  # it reads
                else:
                    self.dropped_replies += 1
                box.popleft()
                self.outbox_bytes[ident] -= size
                self.total_out -= size
            if not box and ident in self.outbox:
                del self.outbox[ident]
                del self.outbox_bytes[ident]
                del self.outbox_moved[ident]

    def _backed_up(self, ident: bytes) -> bool:
        """Whether the kernel still holds more than CLIENT_KERNEL_QUEUE bytes not yet taken by
        this client (Linux SIOCOUTQ on its connection): then a large reply waits in the
        outbox, counted, instead of in ZeroMQ's queue, where nothing counts its bytes."""
        fd = self._client_fd.get(ident)
        if fd is None:
            return False
        try:
            queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return False
        return queued > limits.CLIENT_KERNEL_QUEUE

    def _hold(self, ident: bytes, frames: list, deadline: float, admitted: int = 0, req_id=None):
        """Keep a reply for a client whose queue is full.  A reply to an admitted request had
        its room reserved (``admitted`` bytes, released just before): up to that it is kept;
        a larger one (a client that declared less than it asked for, an error to a request
        never admitted) must fit the budgets, or is dropped."""
        size = sum(map(_nbytes, frames))
        held = self.outbox_bytes.get(ident, 0)
        box = self.outbox.get(ident)
        if size > admitted and (
            held + self.reserved.get(ident, 0) + size > limits.CLIENT_BYTES
            or self.total_out + self.total_reserved + size > limits.TOTAL_REPLY_BYTES
            or (box is not None and len(box) >= limits.OUTBOX_MESSAGES)
        ):
            self.dropped_replies += 1
            self._undeliverable.warning(
                "event=undeliverable socket=frontend peer=%s error=%r held=%d",
                ident.hex(),
                "queue full: the client does not read; reply dropped (byte budget)",
                held,
            )
            return
        if box is None:
            box = self.outbox[ident] = collections.deque()
            self.outbox_moved[ident] = time.monotonic()
        box.append((frames, size, deadline, req_id))
        self.outbox_bytes[ident] = held + size
        self.total_out += size

    def _drop_outbox(self, ident: bytes):
        box = self.outbox.pop(ident, None)
        if box is not None:
            self.dropped_replies += len(box)
            self.total_out -= self.outbox_bytes.pop(ident)
            del self.outbox_moved[ident]

    # --- status ---

    def status(self) -> dict:
        return {
            "broker": {
                "frontend": self.frontend_endpoint,
                "backend": self.backend_endpoint,
                "uptime": time.time() - self.started,
                "pending": len(self.pending),
                "queued": {s: sum(map(len, q.values())) for s, q in self.queues.items()},
                "dropped": self.dropped,
                "held_bytes": {
                    "uploads": self.total_req,
                    "replies": self.total_out,
                    "replies_reserved": self.total_reserved,
                },
                "dropped_replies": self.dropped_replies,
                "shed": {"replies": self.shed_replies, "requests": self.shed_requests},
                "backed_off": self.backed_off,
                "fds": limits.fd_limit(),
                "budgets": {
                    "client_bytes": limits.CLIENT_BYTES,
                    "total_upload_bytes": limits.TOTAL_REQUEST_BYTES,
                    "total_reply_bytes": limits.TOTAL_REPLY_BYTES,
                },
            },
            "cache": {
                **self.reads.figures(),
                "evictions": sum(w.stats.get("evictions", 0) for w in self.workers.values()),
                "admissions_refused": sum(w.stats.get("refused", 0) for w in self.workers.values()),
            },
            "workers": [
                {
                    "service": w.service,
                    "id": w.worker_id,
                    "store": w.store_id,
                    "state": "ready",
                    "inflight": len(w.inflight),
                    "inflight_bytes": w.inflight_bytes,
                    "served": w.served,
                }
                for w in sorted(self.workers.values(), key=lambda w: (w.service, w.worker_id))
            ],
        }

    # --- sending ---

    def _deliver(
        self,
        origin: dict,
        body: list,
        deadline: float | None = None,
        admitted: int = 0,
        req_id=None,
    ):
        """Send a reply (``body``) to whoever asked; to a client whose queue is full or whose
        connection is backed up (for a large reply), hold it, counted (:meth:`_hold`)."""
        if origin["via"] == FRONTEND:
            ident = origin["from"]
            if ident not in self.outbox and (
                sum(map(_nbytes, body)) < limits.LARGE_REPLY or not self._backed_up(ident)
            ):
                try:
                    send_frames(self.frontend, [ident, *body])
                    return
                except zmq.Again:
                    pass  # its queue is full: hold the reply here, counted in bytes
                except zmq.ZMQError as exc:
                    self._undeliverable.warning(
                        "event=undeliverable socket=frontend peer=%s error=%r",
                        ident.hex(),
                        exc.strerror,
                    )
                    return
            if deadline is None:
                deadline = time.monotonic() + limits.DEFAULT_TTL_MS / 1000
            self._hold(ident, body, deadline, admitted, req_id)
        else:
            self._send(self.backend, [origin["from"], p.encode({"t": "rep"}), *body])

    def _reply_error(
        self, origin: dict, req_id, code: str, message: str, op="unknown", started=None, admitted=0
    ):
        self._deliver(
            origin,
            [p.encode(p.error_reply(req_id, code, message))],
            admitted=admitted,
            req_id=req_id,
        )
        if origin["via"] == FRONTEND:
            elapsed = time.monotonic() - started if started is not None else 0.0
            self.metrics.answered(op if op in p.OP_SERVICE else "unknown", code, elapsed)

    def _send(self, sock: zmq.Socket, frames) -> bool:
        """Send; on an unknown peer or a full queue log it and return False (invariant 7)."""
        try:
            send_frames(sock, frames)
            return True
        except zmq.ZMQError as exc:
            side = "frontend" if sock is self.frontend else "backend"
            peer = frames[0].hex() if isinstance(frames[0], bytes) else "?"
            why = "queue full" if exc.errno == zmq.EAGAIN else exc.strerror
            self._undeliverable.warning(
                "event=undeliverable socket=%s peer=%s error=%r", side, peer, why
            )
            return False
