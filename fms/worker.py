"""What every worker shares: the link to the broker and the loop around a service's handlers.

A *service* (storage, cache) is an object with these methods, which know no event loop:

- ``handle_request(route, header, data)``: a request routed to this worker; answer it with
  ``link.reply(route, header, data)`` now or later.
- ``handle_reply(header, data)``: the answer to a request this worker sent with
  ``link.request(service, header, data)``.
- ``on_register()``: called each time the worker (re)registers with a broker.
- ``on_invalidate(name)``: the broker says a name changed (the cache uses it).
- ``on_store(digest_fn)`` (optional): the store's digest function, from the broker's
  ``welcome`` (the cache verifies what storage sends it with it).
- ``on_policy(snapshot)`` (optional): the broker passes on the store's access snapshot (a
  :class:`fms.policy.Policy`), as a storage worker sent it (:meth:`BrokerLink.send_policy`).
- ``tick(now)``: called at least once per heartbeat interval.
- ``beat()`` (optional): a dict of counters each heartbeat carries to the broker; called from
  the link's heartbeat thread, so it only reads counters.
- ``linger()`` (optional): seconds to wait for more messages after a drain before the flush
  (one wait a turn: what it says after the wait began can shorten it, never lengthen it).
- ``flush()`` (optional): called after each drain, to finish what the service batched.

(:class:`Service` says the same to the type checker.)

:class:`BrokerLink` is the real link (a DEALER socket); tests pass a recorder instead.

Heartbeats come from a thread of the link's own, so a service busy with long work (a commit
naming many chunks, a long listing, a group commit waiting on the disk) keeps heartbeating, and
the broker never hands its request to a second worker while it is alive.  ZeroMQ sockets are
not thread-safe: the two threads take turns on the one DEALER, under :attr:`BrokerLink.lock`,
whose acquire and release are the full memory barriers ZeroMQ asks for when a socket passes
from one thread to another, and every message is sent whole under it, so a heartbeat never
lands between the frames of a reply.  (A thread of its own passing every message through an
inproc pipe was measured first: it made ``put -r`` of 1,000 small files 1.5-1.8x slower and a
cached GET's p50 16-38% slower, from the handoffs between two Python threads; the lock costs
two uncontended acquires per message.)
"""

import errno
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import msgpack
import zmq

from . import limits
from . import wire as p
from .errors import BadRequest, FmsError, Unavailable
from .logutil import RateLimitedLog
from .policy import Policy
from .security import CurveClient
from .wire.frames import NOBLOCK, Sendable, recv_frames, send_frames

RECONNECT_MIN = 0.25  # seconds: first wait before reconnecting to a silent broker
RECONNECT_MAX = 4.0  # seconds: the backoff doubles up to this
REGISTER_WARN = 5.0  # seconds without a welcome before saying what may be wrong
DRAIN_BATCH = 64  # messages handled per poll, so heartbeats and ticks stay on time
STOP_CHECK = 0.1  # seconds: how soon a worker notices SIGINT/SIGTERM
STUCK = limits.MAX_TTL_MS / 1000  # seconds one turn of the service's loop may take before the
# link stops heartbeating: no client waits longer than that for a request, so a worker stuck
# for longer is let go (the broker hands its requests to another) instead of holding them
BEAT_STOP = 2.0  # seconds close() waits for the heartbeat thread


class WorkerRefused(FmsError):
    """The broker refused this worker; the message says why."""


class Service(Protocol):
    """What a worker serves (storage, cache): the handlers the loop calls, which know no event
    loop.  ``beat()``, ``linger()`` and ``flush()`` are optional and looked up by name."""

    def handle_request(
        self, route: dict[str, Any], header: dict[str, Any], data: zmq.Frame | None
    ) -> None: ...

    def handle_reply(self, header: dict[str, Any], data: zmq.Frame | None) -> None: ...

    def on_register(self, at: int | None = None) -> None: ...

    def on_invalidate(self, name: str, at: int | None = None) -> None: ...

    def tick(self, now: float) -> None: ...


class Link(Protocol):
    """What a service answers through: a :class:`BrokerLink`, or a recorder in the tests."""

    def reply(
        self,
        route: dict[str, Any],
        header: dict[str, Any],
        data: Sendable | None = None,
        invalidate: str | list[str] | None = None,
        cache: str | None = None,
        chunks: int | None = None,
        batch: tuple[int, int] | None = None,
        fill: bytes | None = None,
        fills: list[tuple[int, bytes] | None] | None = None,
    ) -> None: ...

    def request(
        self, service: str, header: dict[str, Any], data: Sendable | None = None
    ) -> None: ...


class BrokerLink:
    """A worker's DEALER connection to the broker's backend, and its heartbeat thread.

    :param ctx: the zmq context.
    :param endpoint: the broker's backend endpoint.
    :param ready: the READY route fields (service, worker id, store id).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        ready: dict[str, Any],
        log: logging.Logger,
        curve: CurveClient | None = None,
    ) -> None:
        self.ctx = ctx
        self.curve = curve  # None for plaintext
        self.endpoint = endpoint
        self.ready = {"t": "ready", "v": p.PROTOCOL_VERSION, **ready}
        self.log = log
        self.sock: zmq.Socket | None = None
        self.lock = threading.Lock()  # held by whichever thread uses ``sock``
        self.registered = False
        self.passes_policy = False  # the broker passes access snapshots on (its welcome's `pol`)
        self.refusals = RateLimitedLog(log)
        # monotonic time the service's current turn began (None: idle)
        self.busy_since: float | None = None
        self._beats: _Heartbeats | None = None

    def start(self, stats: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Connect, send ready, and start heartbeating.

        :param stats: a callable giving the counters each heartbeat carries (the cache's), or
            None.
        """
        self.connect()
        self._beats = _Heartbeats(self, stats)
        self._beats.start()

    def connect(self) -> None:
        """(Re)connect to the broker and send ready."""
        with self.lock:
            if self.sock is not None:
                self.sock.close(linger=0)
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.linger = 0
            self.sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_SIZE)
            self.sock.setsockopt(zmq.SNDTIMEO, int(p.WORKER_SEND_TIMEOUT * 1000))
            # Replies waiting to reach the broker, in messages (up to 16 MiB each): bounded, so
            # a slow broker slows this worker instead of growing it.
            self.sock.setsockopt(zmq.SNDHWM, limits.WORKER_PIPE)
            if self.curve is not None:
                self.curve.apply(self.sock)
            self.sock.connect(self.endpoint)
            self.registered = False
        self.send_ready()

    def send_ready(self) -> None:
        self._send([p.encode(self.ready)])

    def close(self) -> None:
        """Stop heartbeating, say bye and close the socket."""
        if self._beats is not None:
            self._beats.stopping.set()
            self._beats.join(BEAT_STOP)
            self._beats = None
        if self.sock is not None:
            try:
                self._send([p.encode({"t": "bye"})])
            finally:
                with self.lock:
                    self.sock.close(linger=100)
                    self.sock = None

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for a message from the broker.  :return: one is waiting."""
        with self.lock:
            return bool(self._connected().poll(timeout_ms, zmq.POLLIN))

    def _connected(self) -> zmq.Socket:
        if self.sock is None:
            raise RuntimeError("the link to the broker is closed or not started")
        return self.sock

    def drain(
        self,
        handle: Callable[[list[zmq.Frame]], None],
        limit: int,
        until: Callable[[], bool] | None = None,
    ) -> int:
        """Hand up to ``limit`` waiting messages to ``handle``, none once ``until()`` is true;
        the socket is free for a heartbeat while each is handled.  :return: how many."""
        done = 0
        while done < limit and not (until and until()):
            with self.lock:
                sock = self._connected()
                # pyzmq types get() as int or bytes; ZMQ_EVENTS is an int
                if not cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN:
                    break
                frames = recv_frames(sock)
            handle(frames)
            done += 1
        return done

    def reply(
        self,
        route: dict[str, Any],
        header: dict[str, Any],
        data: Sendable | None = None,
        invalidate: str | list[str] | None = None,
        cache: str | None = None,
        chunks: int | None = None,
        batch: tuple[int, int] | None = None,
        fill: bytes | None = None,
        fills: list[tuple[int, bytes] | None] | None = None,
    ) -> None:
        """Answer a request that reached this worker with ``route`` (:func:`reply_frames`)."""
        self._send(reply_frames(route, header, data, invalidate, cache, chunks, batch, fill, fills))

    def send_policy(self, snapshot: Policy) -> None:
        """Send the store's access snapshot (a :class:`fms.policy.Policy`) to the broker, which
        keeps the newest and passes it on (fms.broker.keys); only to a broker that does."""
        if self.passes_policy:
            blob = msgpack.packb(snapshot.to_wire(), use_bin_type=True)
            self._send([p.encode({"t": "policy", "e": snapshot.epoch}), p.pack_data(blob)])

    def request(self, service: str, header: dict[str, Any], data: Sendable | None = None) -> None:
        """Send a request of this worker's own to ``service``; the reply comes to handle_reply."""
        frames: list[Sendable] = [p.encode({"t": "req", "svc": service}), p.encode(header)]
        if data is not None:
            frames.append(data)
        self._send(frames)

    def _send(self, frames: list[Sendable], flags: int = 0) -> None:
        # A DEALER queues while disconnected, up to its HWM; past that it would block, so a send
        # gives up after WORKER_SEND_TIMEOUT: the requester times out and retries.
        try:
            with self.lock:
                send_frames(self._connected(), frames, flags)
        except zmq.Again:
            self.log.warning(
                "event=send_dropped broker=%s reason='queue to broker full'", self.endpoint
            )


class _Heartbeats(threading.Thread):
    """Sends the link's heartbeat every interval, whatever the service's thread is doing, unless
    its current turn has lasted longer than :data:`STUCK`."""

    def __init__(self, link: BrokerLink, stats: Callable[[], dict[str, Any] | None] | None) -> None:
        super().__init__(name="fms-heartbeat", daemon=True)
        self.link, self.stats = link, stats
        self.stopping = threading.Event()

    def run(self) -> None:
        stuck = False
        while not self.stopping.wait(p.HEARTBEAT_INTERVAL):
            since = self.link.busy_since
            if since is not None and time.monotonic() - since > STUCK:
                if not stuck:
                    self.link.log.error(
                        "event=worker_stuck seconds=%.0f action='heartbeats stop: the broker "
                        "hands this worker's requests to another'",
                        time.monotonic() - since,
                    )
                stuck = True
                continue
            stuck = False
            try:
                stats = self.stats() if self.stats is not None else None
            except Exception as exc:  # a counter that cannot be read must not stop the beat
                self.link.log.exception("event=heartbeat_stats_failed error=%r", exc)
                stats = None
            # Without waiting: a broker that does not take a heartbeat now is not reading.
            self.link._send([p.encode({"t": "hb", "st": stats} if stats else {"t": "hb"})], NOBLOCK)


def serve(
    service: Service,
    link: BrokerLink,
    log: logging.Logger,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Run a worker until ``should_stop()`` or until the broker refuses it.

    :raises WorkerRefused: the broker will not take this worker.
    """
    bad = RateLimitedLog(log)
    limits.tune_malloc()
    limits.raise_fd_limit(log)
    link.start(getattr(service, "beat", None))
    log.info("event=connecting broker=%s", link.endpoint)
    liveness = p.HEARTBEAT_LIVENESS
    backoff = RECONNECT_MIN
    next_tick = time.monotonic() + p.HEARTBEAT_INTERVAL
    warn_at = time.monotonic() + REGISTER_WARN

    def handle(frames: list[zmq.Frame]) -> None:
        _handle(service, link, frames, log, bad)

    while not should_stop():
        # Woken at least every STOP_CHECK: a signal only sets the stop flag, it does not end
        # the poll, and a worker that takes a second to stop makes every restart slower.
        timeout_ms = max(0, int(min(next_tick - time.monotonic(), STOP_CHECK) * 1000))
        if link.poll(timeout_ms):
            liveness = p.HEARTBEAT_LIVENESS
            backoff = RECONNECT_MIN
            link.busy_since = time.monotonic()
            # A stopping worker takes no more: the broker hands what it left to another worker
            # when this one says bye (every op is idempotent).
            link.drain(handle, DRAIN_BATCH, should_stop)
            # More for storage's group, for one wait at most: a group that another op applied
            # meanwhile lets the next change start a wait of its own, which this turn does not
            # take (a steady mix would keep the turn from ending: no tick, and past STUCK no
            # heartbeat).
            wait = _linger(service)
            until = time.monotonic() + wait
            while wait > 0 and not should_stop() and link.poll(math.ceil(wait * 1000)):
                link.drain(handle, DRAIN_BATCH, should_stop)
                wait = min(_linger(service), until - time.monotonic())
            _flush(service, log)
            link.busy_since = None
        now = time.monotonic()
        if now < next_tick:
            continue
        next_tick = now + p.HEARTBEAT_INTERVAL
        liveness -= 1
        if liveness <= 0:
            log.warning(
                "event=broker_silent broker=%s action=reconnect wait=%.2fs", link.endpoint, backoff
            )
            time.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX)
            link.connect()
            liveness = p.HEARTBEAT_LIVENESS
        link.busy_since = now
        service.tick(now)
        link.busy_since = None
        if not link.registered and now >= warn_at:
            warn_at = now + REGISTER_WARN * 6
            log.warning(
                "event=not_registered broker=%s hint=%r",
                link.endpoint,
                "is the broker running? if it requires CURVE, give --curve-secret "
                "and --server-key, and have this worker's .key in its --allow folder",
            )


def _linger(service: Service) -> float:
    """Seconds to wait for more messages before the flush (storage's group commit), or 0."""
    linger = getattr(service, "linger", None)
    return linger() if linger is not None else 0.0


def _flush(service: Service, log: logging.Logger) -> None:
    """Let a service finish what it batched during one drain (storage's group commit)."""
    flush = getattr(service, "flush", None)
    if flush is None:
        return
    try:
        flush()
    except Exception as exc:  # a bug must cost one batch, not the process (invariant 5)
        log.exception("event=flush_crashed error=%r", exc)


def _handle(
    service: Service,
    link: BrokerLink,
    frames: list[zmq.Frame],
    log: logging.Logger,
    bad: RateLimitedLog,
) -> None:
    try:
        _dispatch(service, link, frames, log)
    except WorkerRefused:
        raise
    except FmsError as exc:
        bad.warning("event=bad_message_from_broker error=%r", str(exc))
    except Exception as exc:  # a bug must cost one message, not the process (invariant 5)
        log.exception("event=message_handling_crashed error=%r", exc)


def _dispatch(
    service: Service, link: BrokerLink, frames: list[zmq.Frame], log: logging.Logger
) -> None:
    if len(frames) < 1:
        raise BadRequest("empty message")
    route = p.decode(frames[0].buffer, "route")
    kind = route.get("t")
    if kind == "req":
        _handle_request(service, link, route, frames[1:], log)
    elif kind == "rep":
        if len(frames) not in (2, 3):
            raise BadRequest(f"reply has {len(frames)} frames, expected 2 or 3")
        service.handle_reply(p.decode(frames[1].buffer), frames[2] if len(frames) == 3 else None)
    elif kind == "hb":
        pass
    elif kind == "welcome":
        link.passes_policy = route.get("pol") is True
        # A welcome names the store's digest function once storage has told the broker; a
        # later one may come only to tell it.
        digest_fn = route.get("digest_fn")
        on_store = getattr(service, "on_store", None)
        if digest_fn is not None and on_store is not None:
            on_store(p.need(route, "digest_fn", str))
        if not link.registered:
            link.registered = True
            log.info("event=registered broker=%s", link.endpoint)
            service.on_register(p.need_int(route, "at", optional=True))
    elif kind == "inv":
        names = route.get("names")
        if names is None:
            names = [p.need(route, "name", str)]
        elif not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequest("inv: 'names' must be an array of str")
        # The names are dropped whatever else is wrong with the message (read-after-write); a
        # malformed order or fill drops them with no order (no fill on commit is kept after).
        try:
            at = p.need_int(route, "at", optional=True)
            fill, fills = route.get("fill"), route.get("fills")
            on_fill = getattr(service, "on_fill", None)
            if (fill is not None or fills is not None) and on_fill is not None:
                since = p.need_int(route, "since", optional=True)
                if len(frames) != 2 or at is None or since is None:
                    raise BadRequest("inv: a fill comes with 'at', 'since' and a data frame")
                if fill is not None and (not isinstance(fill, bytes) or len(names) != 1):
                    raise BadRequest("inv: a 'fill' is bytes, for one name")
                if fills is not None:
                    fills = p.read_fills(route, names)
        except BadRequest:
            for name in names:
                service.on_invalidate(name, None)
            raise
        if fill is not None and on_fill is not None:
            on_fill(names[0], at, since, fill, frames[1])
            return
        on_fills = getattr(service, "on_fills", None)
        if fills is not None and on_fills is not None:
            on_fills(names, at, since, fills, frames[1])
            return
        for name in names:
            service.on_invalidate(name, at)
    elif kind == "policy":
        _policy(service, frames)
    elif kind == "reregister":
        log.info("event=reregister broker=%s", link.endpoint)
        link.registered = False
        link.send_ready()
    elif kind == "refused":
        message = str(route.get("msg", "refused by broker"))
        if route.get("retry") is True:
            # Not for good (e.g. another store's worker is registered, maybe an impostor):
            # stay up; the broker's next message makes this worker ask again.
            link.registered = False
            link.refusals.warning("event=refused_for_now reason=%r", message)
            return
        raise WorkerRefused(message)
    else:
        raise BadRequest(f"unknown route type {kind!r}")


def _policy(service: "Service", frames: list[zmq.Frame]) -> None:
    """The store's access snapshot, passed on by the broker: for a service that decides."""
    on_policy = getattr(service, "on_policy", None)
    if on_policy is None:
        return
    if len(frames) != 2:
        raise BadRequest("a policy route comes with one data frame")
    try:
        snapshot = msgpack.unpackb(p.unpack_data(frames[1].buffer), raw=False)
        on_policy(Policy.from_wire(snapshot))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadRequest(f"a policy snapshot that cannot be read: {exc}") from None


def _handle_request(
    service: "Service",
    link: "Link",
    route: dict[str, Any],
    body: list[zmq.Frame],
    log: logging.Logger,
) -> None:
    req_id: int | str | None = None
    try:
        if not body:
            raise BadRequest("request has no header frame")
        # The header first, so that every error reply below carries the request's id.
        header = p.decode(body[0].buffer, "request")
        req_id = p.need(header, "id", (int, str))  # every handler may rely on it
        if len(body) > 2:
            raise BadRequest(f"request has {len(body) + 1} frames, expected 2 or 3")
        ttl = route.get("ttl")
        if isinstance(ttl, int) and not isinstance(ttl, bool):
            if ttl <= 0:
                # Its deadline passed on the way: nobody waits for the answer, but the broker
                # does (it counts the request against this worker's credit until answered).
                raise Unavailable("the request's deadline passed before it could be handled; retry")
            # The worker's own deadline (the ttl is relative: no clocks need agree across
            # hosts); a service that answers later (the cache, after a fetch) drops what expired.
            route["deadline"] = time.monotonic() + ttl / 1000
        service.handle_request(route, header, body[1] if len(body) == 2 else None)
    except FmsError as exc:
        code = getattr(exc, "code", "internal")
        extra = exc.reply_fields() if hasattr(exc, "reply_fields") else {}
        link.reply(route, {**p.error_reply(req_id, code, str(exc)), **extra})
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            log.exception("event=handler_crashed error=%r", exc)
            link.reply(route, p.error_reply(req_id, "internal", f"internal error: {exc!r}"))
            return
        # Out of space or of inodes (a directory or file that could not be created), wherever
        # the handler met it: the write did not happen (temp + rename), say so clearly.
        log.warning("event=no_space error=%r", exc.strerror)
        link.reply(
            route,
            p.error_reply(
                req_id,
                "no_space",
                "the worker's disk is full (no "
                "space or no inodes left); nothing was changed: free "
                "space on it, then retry",
            ),
        )
    except Exception as exc:  # a bug must cost one request, not the process (invariant 5)
        log.exception("event=handler_crashed error=%r", exc)
        link.reply(route, p.error_reply(req_id, "internal", f"internal error: {exc!r}"))


def reply_frames(
    route: dict[str, Any],
    header: dict[str, Any],
    data: Sendable | None = None,
    invalidate: str | list[str] | None = None,
    cache: str | None = None,
    chunks: int | None = None,
    batch: tuple[int, int] | None = None,
    fill: bytes | None = None,
    fills: list[tuple[int, bytes] | None] | None = None,
) -> list[Sendable]:
    """The frames of a worker's answer to a request that reached it with ``route``.

    The route frame repeats the outcome (``ok``, ``err``) and, from the cache, whether it was
    a hit (for a ``get``, how many ``chunks`` requests the client will send for it; for a
    ``get_many``, ``batch``: names served whole from the cache, names fetched), so the
    broker can count them without decoding the header.  ``invalidate`` names a name the
    broker must drop from the cache before it forwards this reply; ``fill``, the encoded
    manifest of the version a commit made whose whole content the request carried (the
    broker may hand both to the cache with the invalidation); ``fills``, a ``commit_many``'s:
    per name of ``invalidate``, ``(offset, manifest)`` of a file it made from the content it
    carried (at ``offset`` of the request's data) or None, sent as two arrays (``fills``,
    ``offsets``) beside ``inv``: a route frame holds few containers (fms.limits).
    """
    back = {"t": "rep", "k": route.get("k"), "ok": bool(header.get("ok"))}
    if not back["ok"]:
        back["err"] = header.get("error")
    if invalidate is not None:
        back["inv"] = invalidate
    if fill is not None:
        back["fill"] = fill
    if fills:
        back.update(p.fills_fields(fills))
    if cache is not None:
        back["cache"] = cache
    if chunks:
        back["n"] = chunks
    if batch is not None:
        back["gh"], back["gm"] = batch
    frames: list[Sendable] = [p.encode(back), p.encode(header)]
    if data is not None:
        frames.append(data)
    return frames
