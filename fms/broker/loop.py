"""The broker's loop: two ROUTER sockets around the core.

It binds a frontend for clients and a backend for workers, polls them, hands each message to the
core (core.py) with what only the socket knows (the peer's identity, whether its CURVE key is
still allowed, the descriptor of its connection), and sends what the core decides through
:class:`ZmqTransport`.  A frontend monitor tells it when a client's connection closes, so its
queued work is dropped at once.  Timers: the core's sweep (deadlines), heartbeats, and the
outboxes that are due.
"""

import collections
import ctypes
import fcntl
import logging
import math
import socket
import struct
import termios
import time
from collections.abc import Callable

import zmq
from zmq.backend import Socket as _BackendSocket

from .. import limits
from .. import wire as p
from ..logutil import RateLimitedLog, clip
from ..metrics import BrokerMetrics
from ..security import CurveServer
from ..wire.frames import drain
from .core import Core
from .transport import FULL, GONE, SENT, undeliverable

log = logging.getLogger("fms.broker")

DRAIN_BATCH = 64  # messages taken from one socket per poll, so neither socket starves the other
# Clients seen gone, remembered (the newest) so that a message still on its way from one when its
# connection closed is dropped, not taken for a new client's (see Broker.process_client).
GONE_KEPT = 65536

# pyzmq's own send, called without the Python wrapper its Socket class puts around it (about a
# microsecond per frame, several frames per message).
_send = _BackendSocket.send
_SNDMORE = int(zmq.SNDMORE)


def send_to(sock: zmq.Socket, ident: bytes, frames: list) -> None:
    """``frames`` as one message to peer ``ident`` of ROUTER ``sock``: what
    :func:`fms.wire.frames.send_frames` does with ``[ident, *frames]`` (frames without a copy;
    the identity is copied, as it would be anyway under pyzmq's copy threshold), without the
    list.  :raises zmq.ZMQError: as ``send`` (an unknown peer or a full queue at the identity
    frame, before any of the message is queued)."""
    last = len(frames)
    _send(sock, ident, _SNDMORE if last else 0, True)
    for i, frame in enumerate(frames, 1):
        _send(sock, frame, _SNDMORE if i < last else 0, False)


class ZmqTransport:
    """The core's transport over the two ROUTER sockets (ROUTER_MANDATORY, no send timeout:
    a full queue or an unknown peer is reported at once, never waited on)."""

    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket) -> None:
        self.frontend = frontend
        self.backend = backend
        self.client_fd: dict[bytes, int] = {}  # client identity -> fd of its connection

    def to_client(self, ident: bytes, frames: list) -> str:
        try:
            send_to(self.frontend, ident, frames)
            return SENT
        except zmq.Again:
            return FULL
        except zmq.ZMQError as exc:
            undeliverable.warning(
                "event=undeliverable socket=frontend peer=%s error=%r", ident.hex(), exc.strerror
            )
            return GONE

    def to_worker(self, ident: bytes, frames: list) -> bool:
        try:
            send_to(self.backend, ident, frames)
            return True
        except zmq.ZMQError as exc:
            why = "queue full" if exc.errno == zmq.EAGAIN else exc.strerror
            undeliverable.warning(
                "event=undeliverable socket=backend peer=%s error=%r", ident.hex(), why
            )
            return False

    def queued(self, ident: bytes) -> int | None:
        """Bytes the kernel holds unsent on this client's connection (Linux SIOCOUTQ)."""
        fd = self.client_fd.get(ident)
        if fd is None:
            return None
        try:
            return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return None

    def taken(self, ident: bytes) -> int | None:
        """``tcpi_bytes_acked`` of this client's connection (Linux TCP_INFO)."""
        fd = self.client_fd.get(ident)
        if fd is None:
            return None
        return _bytes_acked(fd)

    def disconnect(self, ident: bytes) -> bool:
        """Shut this client's connection down: ZeroMQ sees it close and drops its queue."""
        fd = self.client_fd.get(ident)
        if fd is None:
            return False
        try:
            return _on_fd(fd, lambda s: s.shutdown(socket.SHUT_RDWR)) is not None
        except OSError:
            return False


_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_INFO_LEN = 232  # bytes of struct tcp_info read (Linux)
_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info (Linux 4.1 and later)


_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = getattr(_libc, "getsockopt", None)


def _bytes_acked(fd: int) -> int | None:
    """``tcpi_bytes_acked`` of the TCP connection on descriptor ``fd``; None if it is not one
    (or not Linux).  Read straight from getsockopt(2): admission asks it of every client with
    bytes in transit when the total is full, and a socket object made over the descriptor for
    each question cost ten times the question."""
    if _getsockopt is None:
        return None
    info = ctypes.create_string_buffer(_INFO_LEN)
    size = ctypes.c_uint32(_INFO_LEN)
    if _getsockopt(fd, socket.IPPROTO_TCP, _TCP_INFO, info, ctypes.byref(size)) != 0:
        return None  # not a TCP socket (or gone)
    if size.value < _BYTES_ACKED + 8:
        return None
    return struct.unpack_from("Q", info.raw, _BYTES_ACKED)[0]


def _on_fd(fd: int, use: Callable[[socket.socket], object]) -> object | None:
    """``use`` a socket object over ZeroMQ's descriptor ``fd`` of a TCP connection, without
    taking it over (it is detached, never closed, here); None if ``fd`` is not TCP."""
    sock = socket.socket(fileno=fd)
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        result = use(sock)
        return True if result is None else result
    finally:
        sock.detach()


def _made_by_zeromq(ident: bytes) -> bool:
    """Whether a ROUTER's peer identity is one ZeroMQ made for a connection (a zero byte, then a
    uint32 counter: never given again by that socket), not one the peer chose.  A chosen one may
    start with a zero byte too (allowed since ZeroMQ 4.1), so only the length tells them apart,
    and only for one chosen with ZeroMQ's reserved form."""
    return len(ident) == 5 and ident[0] == 0


def _endpoint(sock: zmq.Socket) -> str:
    endpoint = sock.last_endpoint
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


class Broker:
    """Routes between a frontend ROUTER (clients) and a backend ROUTER (workers).

    :param frontend: endpoint to bind for clients.
    :param backend: endpoint to bind for workers.
    :param curve: a :class:`~fms.security.CurveServer` to require CURVE and an allowlist on
        both sockets (clients' on the frontend, workers' on the backend), or None for plaintext.
    :param store: the store id storage workers must serve; None: the first one's.
    """

    def __init__(
        self,
        frontend: str,
        backend: str,
        ctx: zmq.Context | None = None,
        curve: CurveServer | None = None,
        store: str | None = None,
    ) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.curve = curve
        self.frontend_endpoint = frontend
        self.backend_endpoint = backend
        self.store = store
        self.metrics = BrokerMetrics()
        self.frontend = self._router(hwm=limits.CLIENT_PIPE)
        self.backend = self._router(workers=True)
        # Disconnections of clients, so that their queued work is dropped at once.
        self.monitor = self.frontend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.transport = ZmqTransport(self.frontend, self.backend)
        self.core = Core(
            self.transport,
            store=store,
            metrics=self.metrics,
            on_keys=curve.clients.set_identities if curve is not None else None,
        )
        self._fd_clients: dict[int, set] = {}  # fd -> client identities seen on it
        self._gone: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._crashes = RateLimitedLog(log)
        # Which key sent a client's message, as it stands now (ZAP authenticated it).
        self._who = curve.client if curve is not None else None

    # --- set-up ---

    def bind(self) -> None:
        """Bind both sockets; the actual endpoints (with any ``*`` port resolved) are kept."""
        self.frontend.bind(self.frontend_endpoint)
        self.backend.bind(self.backend_endpoint)
        self.frontend_endpoint = _endpoint(self.frontend)
        self.backend_endpoint = _endpoint(self.backend)
        self.core.endpoints = {"frontend": self.frontend_endpoint, "backend": self.backend_endpoint}
        log.info(
            "event=listening frontend=%s backend=%s", self.frontend_endpoint, self.backend_endpoint
        )
        if self.store is None:
            log.warning(
                "event=store_not_pinned hint=%r",
                "the first storage worker to register "
                "decides which store this broker serves; give --store ID (fms up does) "
                "so that an impostor cannot, and use CURVE worker keys",
            )

    def _router(self, hwm: int | None = None, workers: bool = False) -> zmq.Socket:
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
        return sock

    def close(self) -> None:
        self.frontend.disable_monitor()
        for sock in (self.monitor, self.frontend, self.backend):
            sock.close(linger=0)
        if self.curve is not None:
            self.curve.stop()

    # --- the loop ---

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        limits.tune_malloc()
        limits.raise_fd_limit(log)
        core = self.core
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        next_heartbeat = time.monotonic() + p.HEARTBEAT_INTERVAL
        next_sweep = time.monotonic() + limits.SWEEP_INTERVAL
        client, worker = self._guarded(self.process_client), self._guarded(self.process_worker)
        while not should_stop():
            now = time.monotonic()
            wake = min(next_heartbeat, next_sweep)
            due = core.outboxes.next_due()
            if due is not None:
                wake = min(wake, due)
            # Rounded up: a poll woken a hair early would spin until the time comes.
            events = dict(poller.poll(max(0, math.ceil((wake - now) * 1000))))
            if due is not None:
                core.outboxes.flush(time.monotonic())
            if self.monitor in events:  # before the frontend: a reused fd is seen gone first
                drain(self.monitor, self.process_monitor, DRAIN_BATCH)
            # Under load, take what is queued without polling again for each message: a poll
            # costs about as much as the routing.  Replies first, so work in flight drains.
            if self.backend in events:
                drain(self.backend, worker, DRAIN_BATCH, ready=True)
            if self.frontend in events:
                drain(self.frontend, client, DRAIN_BATCH, ready=True)
            now = time.monotonic()
            if now >= next_sweep or now >= next_heartbeat:
                heartbeat = now >= next_heartbeat
                core.tick(now, heartbeat=heartbeat)
                next_sweep = now + limits.SWEEP_INTERVAL
                if heartbeat:
                    next_heartbeat = time.monotonic() + p.HEARTBEAT_INTERVAL

    def _guarded(self, handle: Callable[[list], None]) -> Callable[[list], None]:
        """``handle`` with any bug it meets costing one message, not the broker."""

        def guarded(frames: list) -> None:
            try:
                handle(frames)
            except Exception as exc:
                self._crashes.warning("event=message_handling_crashed error=%r", clip(repr(exc)))

        return guarded

    def process_client(self, frames: list) -> None:
        """``[identity, header, data?]`` from the frontend.

        A message from a client already seen gone is dropped: ZeroMQ still hands up what it
        read from a connection before it closed, after the monitor said so, and its work would
        otherwise be admitted and sent to the workers as a new client's, for nobody to read.
        Only identities ZeroMQ made (a zero byte, then a number it never gives again: 5 bytes) are
        remembered: a peer that sets its own may come back under it on a new connection (and
        since ZeroMQ 4.1 its own may start with a zero byte too, as a random UUID does)."""
        ident = frames[0].bytes
        if ident in self._gone:
            self.core.dispatcher.drop_unread()
            return
        self._note_fd(ident, frames[0])
        self.core.client_message(ident, frames[1:], self._who)

    def process_worker(self, frames: list) -> None:
        """``[identity, route, header?, data?]`` from the backend."""
        allowed = self.curve is None or self.curve.allowed(frames[-1], workers=True)
        self.core.worker_message(frames[0].bytes, frames[1:], allowed)

    def _note_fd(self, ident: bytes, frame: zmq.Frame) -> None:
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):
            return
        client_fd = self.transport.client_fd
        if client_fd.get(ident) != fd:
            # A connection's first message.  Its fd may be one a client that left had: ZeroMQ
            # wrote that one's disconnection to the monitor before it closed the fd, so before
            # this connection was accepted on it.  Take it now, or it would be taken later for
            # this client too (a drain of the frontend reads on past the poll that saw it).  All
            # of them: the monitor's pipe bounds how many wait.
            while drain(self.monitor, self.process_monitor, DRAIN_BATCH) == DRAIN_BATCH:
                pass
            client_fd[ident] = fd
            self._fd_clients.setdefault(fd, set()).add(ident)

    def process_monitor(self, frames: list) -> None:
        """A frontend connection closed: the clients seen on it are gone."""
        if len(frames) != 2 or len(frames[0].bytes) != 6:
            return
        event = int.from_bytes(frames[0].bytes[:2], "little")
        fd = int.from_bytes(frames[0].bytes[2:], "little")
        if event != zmq.EVENT_DISCONNECTED:
            return
        client_fd = self.transport.client_fd
        for ident in self._fd_clients.pop(fd, ()):
            if client_fd.get(ident) == fd:
                del client_fd[ident]
                self.core.client_gone(ident)
                if _made_by_zeromq(ident):  # for that connection alone
                    self._gone[ident] = None
                    if len(self._gone) > GONE_KEPT:
                        self._gone.popitem(last=False)
