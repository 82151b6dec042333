"""A client's session with the broker: the socket, the connection and CURVE handshake, the
pipeline (several requests in flight, replies matched by id) and the retries.

This is the seam the rest of the client is built on, and the one unit tests drive: give it an
endpoint where a test's own ROUTER socket answers (``inproc://`` with a shared context works)
and it runs with no other process.

Every request is idempotent (commit and rm carry an id that makes a repeat a no-op), so one that
times out, or meets a moment with no worker, is sent again within its time budget.
"""

import contextlib
import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Self, TypeAlias, TypeVar

import zmq

from .. import limits
from .. import wire as p
from ..errors import (
    BadRequest,
    FmsError,
    RemoteError,
    Timeout,
    TransportError,
    Unavailable,
    from_reply,
)
from ..lazyre import compiled_on_use
from ..wire.frames import Sendable, recv_frames, send_frames

if TYPE_CHECKING:
    from ..security import CurveClient  # not imported at run time: `ls` needs no CURVE

DEFAULT_BROKER = p.DEFAULT_FRONTEND
DEFAULT_TIMEOUT = 5.0  # seconds a request may wait for its reply before a retry
CONNECT_TIMEOUT = 3.0  # seconds to wait for a connection to the broker
SEND_TIMEOUT = 1.0  # seconds a send may wait while the connection is down
DEFAULT_RETRIES = 2  # a request may take (retries + 1) * timeout in all
RETRY_BACKOFF = 0.1  # seconds before resending after `unavailable`; doubles per try
RETRY_BACKOFF_MAX = 2.0
DEFAULT_WINDOW = 8  # requests in flight during a transfer (chunks of one file)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


_HOST_PORT = compiled_on_use(r"(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}")


def endpoint(address: str) -> str:
    """A broker address as ZeroMQ takes it: ``HOST:PORT`` (as fsspec URLs and most tools write
    it) means ``tcp://HOST:PORT``; anything else is passed on as it is."""
    return f"tcp://{address}" if _HOST_PORT.fullmatch(address) else address


def gave_up(error: RemoteError, tries: int, seconds: float) -> RemoteError:
    """``error``, the last answer to a request the client stops sending, told as final: its
    advice to retry (the server's, meant for the client) replaced by how long it was tried."""
    text = re.sub(r"[;,]\s*(retrying|retry|try again|ask again)\b[^;]*$", "", str(error))
    return type(error)(
        f"{text}; gave up after {tries} {'try' if tries == 1 else 'tries'} in {seconds:.0f} s "
        f"(see what the cluster "
        f"has with: fms stats)",
        error.code,
    )


T = TypeVar("T")  # what a caller tags its requests with in a pipeline
# A reply: its header, and its data frame if it has one.
Reply: TypeAlias = tuple[dict[str, Any], zmq.Frame | None]
# report(name, done bytes, total bytes or None if not known yet): called as a file's chunks move.
Progress: TypeAlias = Callable[[str, int, int | None], None]


class _Outstanding(Generic[T]):
    """A request in flight in :meth:`Session.pipeline`."""

    __slots__ = ("deadline", "first_sent", "frames", "last_error", "op", "tag", "tries")

    def __init__(
        self, tag: T, frames: list[Sendable], op: str, first_sent: float, deadline: float
    ) -> None:
        self.tag = tag
        self.frames = frames
        self.op = op
        self.first_sent = first_sent
        self.deadline = deadline  # when to send it again (after a timeout or a backoff)
        self.tries = 1
        self.last_error: RemoteError | None = None  # the `unavailable` behind a pending resend


class Session:
    """A DEALER connection to the broker that sends requests and matches their replies.

    :param broker: the broker's frontend endpoint; default ``$FMS_BROKER`` or
        ``tcp://127.0.0.1:5555``.
    :param timeout: seconds a request waits for its reply before it is retried.
    :param retries: how many times a request that timed out is sent again.
    :param window: requests kept in flight by :meth:`pipeline` unless told otherwise.
    :param curve: a :class:`fms.security.CurveClient`, or None for plaintext.
    :param acting_as: an identity every request acts for (field ``as``): only a gateway
        identity may (see :mod:`fms.policy`).
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        window: int = DEFAULT_WINDOW,
        ctx: zmq.Context | None = None,
        curve: "CurveClient | None" = None,
        acting_as: str | None = None,
    ) -> None:
        self.broker = endpoint(broker or os.environ.get("FMS_BROKER") or DEFAULT_BROKER)
        self.acting_as = acting_as
        self.timeout = timeout
        self.retries = retries
        self.window = max(1, window)
        self.curve = curve  # None for plaintext
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._digest_fn: str | None = None  # the store's digest function, once asked (hello)
        self._retry_budget: float | None = (
            None  # seconds to retry `unavailable` in (None: the whole budget)
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def aside(self) -> "Session":
        """A new session with the same settings, on a connection of its own: a request sent on
        it takes no reply of a pipeline under way on this one."""
        other = Session(
            self.broker,
            timeout=self.timeout,
            retries=self.retries,
            window=self.window,
            ctx=self._ctx,
            curve=self.curve,
            acting_as=self.acting_as,
        )
        other._digest_fn = self._digest_fn
        return other

    def digest_fn(self) -> str:
        """The name of the store's digest function (what every digest sent is made with),
        asked of the broker once per session (``hello``)."""
        if self._digest_fn is None:
            header, _ = self.call("hello")
            name = header.get("digest_fn")
            if name not in p.DIGEST_FUNCTIONS:
                raise FmsError(
                    f"the broker says the store's digest function is {name!r:.40}, which this "
                    f"fms does not know; upgrade fms"
                )
            self._digest_fn = name
        return self._digest_fn

    def hasher(self) -> p.Hasher:
        """The helper of the store's digest function (:meth:`digest_fn`)."""
        return p.hasher(self.digest_fn())

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: see below
            sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_SIZE)
            # With IMMEDIATE and the broker gone, a send would block forever: bound it.
            sock.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT * 1000))
            if self.curve is not None:
                self.curve.apply(sock)
            try:
                self._connect(sock)
            except BaseException:
                sock.close(linger=0)
                raise
            self._sock = sock
        return self._sock

    def _connect(self, sock: zmq.Socket) -> None:
        """Connect and wait until the connection (and any CURVE handshake) is up.

        With IMMEDIATE, POLLOUT means "connected": an unreachable broker is reported now,
        clearly, instead of as a timeout on the first request; a socket monitor tells why a
        handshake failed (key not allowed, plaintext against CURVE, wrong server key).
        """
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        try:
            try:
                sock.connect(self.broker)
            except zmq.ZMQError as exc:
                raise TransportError(
                    f"bad broker endpoint {self.broker!r}: {exc.strerror}; "
                    f"use the form tcp://HOST:PORT"
                ) from None
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLOUT)
            poller.register(monitor, zmq.POLLIN)
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while (wait := deadline - time.monotonic()) > 0:
                ready = dict(poller.poll(int(wait * 1000) + 1))
                if sock in ready:
                    return
                if monitor in ready:
                    # Imported here: zmq.utils.monitor pulls in asyncio, a sixth of start-up.
                    from zmq.utils.monitor import recv_monitor_message

                    event = recv_monitor_message(monitor)["event"]
                    raise TransportError(self._handshake_advice(event))
            raise TransportError(
                f"cannot reach the fms broker at {self.broker} (no connection within "
                f"{CONNECT_TIMEOUT:.0f} s); is it running? start a local cluster with "
                f"'fms up', or point --broker / FMS_BROKER at the right address"
            )
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    def _handshake_advice(self, event: int) -> str:
        where = f"the fms broker at {self.broker}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                f"{where} refused this client's key: ask its operator to put this client's "
                f"public .key file in the broker's allow directory"
            )
        if self.curve is None:
            return (
                f"{where} requires encryption (CURVE): give --curve-secret (this client's "
                f".key_secret) and --server-key (the broker's .key), or set "
                f"FMS_CURVE_SECRET and FMS_SERVER_KEY"
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (
                f"the secure handshake with {where} failed: the broker does not use CURVE; "
                f"drop --curve-secret/--server-key, or start the broker with keys"
            )
        return (
            f"the secure handshake with {where} failed: check that --server-key is the "
            f"broker's public key"
        )

    # --- requests ---

    def _frames(
        self, op: str, fields: dict[str, Any], data: Sendable | None = None
    ) -> tuple[int, list[Sendable]]:
        req_id = next(self._ids)
        # ttl_ms: how long this try will be waited for; the broker drops it once that passes.
        frames: list[Sendable] = [
            p.encode(
                {
                    "v": p.PROTOCOL_VERSION,
                    "op": op,
                    "id": req_id,
                    "ttl_ms": int(self.timeout * 1000),
                    **fields,
                    **({"as": self.acting_as} if self.acting_as is not None else {}),
                }
            )
        ]
        if data is not None:
            frames.append(data)
        return req_id, frames

    def _send(self, frames: list[Sendable]) -> None:
        """Send a request.  If the broker is unreachable right now the send is given up after
        SEND_TIMEOUT and counts as a try: the retry logic sends it again or times out."""
        try:
            send_frames(self._socket(), frames)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise TransportError(
                f"cannot send to the broker at {self.broker}: {exc.strerror}"
            ) from None

    def _recv(self, deadline: float) -> Reply | None:
        """One reply (header, data frame or None), or None if ``deadline`` passes first."""
        sock = self._socket()
        while True:
            wait = deadline - time.monotonic()
            if wait <= 0 or not sock.poll(int(wait * 1000) + 1, zmq.POLLIN):
                return None
            frames = recv_frames(sock)
            if len(frames) not in (1, 2):
                continue  # not a reply of ours; the broker never sends this
            try:
                header = p.decode(frames[0].buffer)
            except BadRequest:
                continue
            return header, (frames[1] if len(frames) == 2 else None)

    def pipeline(
        self,
        requests: Iterable[tuple[T, str, dict[str, Any], Sendable | None]],
        window: int | None = None,
        errors: bool = False,
        sent: Callable[[], None] | None = None,
    ) -> Iterator[tuple[T, dict[str, Any], zmq.Frame | None]]:
        """Send requests keeping at most ``window`` in flight; yield replies as they come.

        An idempotent request that gets no reply in ``timeout`` is sent again, and so is one
        answered ``unavailable`` (no worker right now, a worker died, a broker restart), after a
        backoff; each request gets ``timeout * (retries + 1)`` seconds in all.

        :param requests: iterable of ``(tag, op, fields, data)``; ``data`` is a data frame or None.
        :return: iterator of ``(tag, header, data_frame)`` in completion order.
        :param errors: yield an error reply that is not retried (its header: ``ok`` false)
            like any other, instead of raising it: for requests that may fail one by one.
        :param sent: called once, when the first ``window`` requests are on their way and before
            any reply is waited for: work that overlaps their round trip (what it raises ends
            the pipeline).
        :raises RemoteError: the first error reply that is not retried (its subclass names the
            code), unless ``errors``.
        :raises Timeout: a request got no reply within its budget.
        """
        window = window or self.window
        source = iter(requests)
        inflight: dict[int, _Outstanding[T]] = {}  # by request id
        exhausted = False
        # No later than the earliest deadline in flight (an earlier wake-up only costs a check),
        # kept up to date as requests go out rather than recomputed for every reply.
        wake = float("inf")
        while inflight or not exhausted:
            while not exhausted and len(inflight) < window:
                try:
                    tag, op, fields, data = next(source)
                except StopIteration:
                    exhausted = True
                    break
                req_id, frames = self._frames(op, fields, data)
                self._send(frames)
                now = time.monotonic()
                inflight[req_id] = _Outstanding(tag, frames, op, now, now + self.timeout)
                wake = min(wake, now + self.timeout)
            if sent is not None:
                overlap, sent = sent, None
                overlap()
            if not inflight:
                break
            reply = self._recv(wake)
            if reply is None:
                self._resend_due(inflight)
                wake = min(o.deadline for o in inflight.values())
                continue
            header, data = reply
            reply_id = header.get("id")
            if not isinstance(reply_id, int) or reply_id not in inflight:
                continue  # a late answer to a request already retried and answered
            out = inflight[reply_id]
            if not header.get("ok"):
                error = from_reply(str(header.get("error")), str(header.get("message")), header)
                if isinstance(error, Unavailable) and self._within_budget(out, self._retry_budget):
                    backoff = min(RETRY_BACKOFF * 2 ** (out.tries - 1), RETRY_BACKOFF_MAX)
                    out.deadline = time.monotonic() + backoff
                    out.last_error = error
                    wake = min(wake, out.deadline)
                    continue
                if isinstance(error, Unavailable) and out.tries > 1:
                    error = gave_up(error, out.tries, time.monotonic() - out.first_sent)
                if not errors:
                    raise error
                header = {**header, "message": str(error)}
            del inflight[reply_id]
            yield out.tag, header, data

    def _budget(self) -> float:
        return self.timeout * (self.retries + 1)

    def _within_budget(self, out: _Outstanding[T], budget: float | None = None) -> bool:
        return time.monotonic() - out.first_sent < (budget or self._budget())

    def _resend_due(self, inflight: dict[int, _Outstanding[T]]) -> None:
        now = time.monotonic()
        for out in inflight.values():
            if out.deadline > now:
                continue
            if not self._within_budget(out):
                if out.last_error is not None:  # it did answer: say what it said, as final
                    raise gave_up(out.last_error, out.tries, now - out.first_sent)
                raise Timeout(
                    f"no reply to {out.op} from the fms cluster at {self.broker} "
                    f"within {now - out.first_sent:.0f} s ({out.tries} "
                    f"{'try' if out.tries == 1 else 'tries'}); is the "
                    f"broker up and does it have workers? (check with: stats)"
                )
            out.tries += 1
            out.deadline = now + self.timeout
            out.last_error = None
            self._send(out.frames)

    def call(self, op: str, data: Sendable | None = None, **fields: Any) -> Reply:
        """One request; returns ``(header, data_frame)``."""
        for _tag, header, frame in self.pipeline([(None, op, fields, data)], 1):
            return header, frame
        raise FmsError(f"no reply to {op}")  # unreachable: pipeline yields or raises

    @contextlib.contextmanager
    def patience(self, timeout: float) -> Iterator[None]:
        """Wait up to ``timeout`` for each reply (a GC or fsck pass does real work).  A request
        answered ``unavailable`` (a database or object store down) is still given up within
        the usual budget: the wait is for work, not for a store to come back."""
        saved, saved_budget = self.timeout, self._retry_budget
        self._retry_budget = self._budget()
        self.timeout = max(self.timeout, timeout)
        try:
            yield
        finally:
            self.timeout, self._retry_budget = saved, saved_budget

    def data_window(self, chunk_size: int) -> int:
        """Chunks in flight: ``window``, but never more data than the broker's per-client
        budget (fms.limits.CLIENT_BYTES) holds, so large chunks are not refused."""
        return max(1, min(self.window, limits.CLIENT_BYTES // (chunk_size + 64 * 1024)))
