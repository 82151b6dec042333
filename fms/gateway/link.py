"""One connection to the broker used from the event loop itself, for the gateway's small
requests: a ``get`` of a small object and the ``commit`` of a small body.  A request made on a
pool thread costs a hop to the thread and one back to the loop (two wake-ups, the GIL handed
over twice) and a ZeroMQ socket per thread; here a request is sent from the handler's
coroutine and its reply completes a future when the socket's file descriptor says it is
readable.  Replies are matched to requests by id, so many are in flight at once: at most
``window`` (:data:`WINDOW`); the rest wait for a place, within their time budget.

Requests are retried as :class:`fms.client.session.Session` retries them: sent again when no
reply came within ``timeout`` seconds, and after a backoff when answered ``unavailable``, within
``timeout * (retries + 1)`` seconds in all.  Only idempotent requests are sent here (a ``get``;
a ``commit`` carries its commit id, which storage remembers: a repeat gets the first
answer).

The socket queues a request only on a live connection (``IMMEDIATE``, as Session's does): with
the broker gone, a request waits for the connection within its try's time and is not kept in
the socket, so a try that timed out is never delivered later, when the broker is back (a
commit the client was told failed would then overwrite a newer one), and a broker that is down
holds no bodies in the gateway's memory."""

import asyncio
import itertools
import logging
import time
from typing import Any

import zmq

from fms import wire as p
from fms.client.session import DEFAULT_RETRIES, RETRY_BACKOFF, RETRY_BACKOFF_MAX, endpoint
from fms.errors import BadRequest, FmsError, Timeout, Unavailable, from_reply
from fms.logutil import clip
from fms.security import CurveClient
from fms.wire.frames import Sendable, recv_frames, send_frames

Reply = tuple[dict[str, Any], zmq.Frame | None]

log = logging.getLogger("fms.gateway")

# ZeroMQ's flags as plain ints: pyzmq's are enum.Flag members, and an operation on one (the
# events & POLLIN of each read, the NOBLOCK | SNDMORE of each frame sent) makes a new enum
# member in Python, a few microseconds a request in all.
_POLLIN, _POLLOUT, _NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)

# Requests in flight on one link at once, as many as the gateway's pool of threads has
# (fms.gateway.store.THREADS): beyond it, a request waits for a place rather than adding to
# the map of pending replies without bound.
WINDOW = 64


class AsyncLink:
    """A DEALER socket to the broker driven by the running event loop (made on first use)."""

    def __init__(
        self,
        broker: str,
        curve: CurveClient | None = None,
        timeout: float = 5.0,
        retries: int = DEFAULT_RETRIES,
        window: int = WINDOW,
    ) -> None:
        self.broker = endpoint(broker)
        self.curve = curve
        self.timeout = timeout
        self.retries = retries
        self._sock: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Reply]] = {}
        self._slots = asyncio.Semaphore(max(1, window))  # places for requests in flight
        self._closed = False
        self._digest_fn: str | None = None
        self._fd = -1
        # resolved when the socket can take a request again (connected, or under its HWM)
        self._writable: asyncio.Future[None] | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: see above
            sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_SIZE)
            if self.curve is not None:
                self.curve.apply(sock)
            sock.connect(self.broker)
            self._loop = asyncio.get_running_loop()
            self._fd = int(sock.getsockopt(zmq.FD))
            self._loop.add_reader(self._fd, self._readable)
            self._sock = sock
        return self._sock

    def _closed_error(self) -> Unavailable:
        return Unavailable(f"the gateway's link to the fms cluster at {self.broker} was closed")

    def close(self) -> None:
        """Close the socket for good: calls waiting for a reply, or for a place, and any made
        later, fail with :class:`~fms.errors.Unavailable` (not ``CancelledError``, which a
        handler could take for its own cancellation)."""
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(self._fd)
                except (RuntimeError, zmq.ZMQError):
                    pass
            sock.close(linger=0)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(self._closed_error())
        self._waiting.clear()
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)  # its sender finds the link closed

    def _readable(self) -> None:
        """Every reply waiting on the socket, each to its request's future.  ZeroMQ's file
        descriptor is edge-triggered: the socket is drained until it has nothing more, and
        checked again after each send (:meth:`_send`).  A sender waiting for the socket to
        take its request is woken too."""
        sock = self._sock
        if sock is None:
            return
        while True:
            events = int(sock.getsockopt(zmq.EVENTS))
            if events & _POLLOUT and self._writable is not None:
                writable, self._writable = self._writable, None
                if not writable.done():
                    writable.set_result(None)
            if not events & _POLLIN:
                return
            frames = recv_frames(sock, _NOBLOCK)
            try:
                self._deliver(frames)
            except Exception as e:  # a malformed reply must not leave the others unread
                log.warning(
                    "event=link_bad_reply broker=%s frames=%d error=%s",
                    self.broker,
                    len(frames),
                    clip(f"{type(e).__name__}: {e}"),
                )

    def _deliver(self, frames: list[zmq.Frame]) -> None:
        """One reply to its request's future (none if its request was given up).

        :raises BadRequest: the reply is malformed."""
        if len(frames) not in (1, 2):
            raise BadRequest(f"a reply of {len(frames)} frames")
        header = p.decode(frames[0].buffer)
        req_id = header.get("id")
        if type(req_id) is not int:
            raise BadRequest(f"a reply whose id is {type(req_id).__name__}, not int")
        fut = self._waiting.pop(req_id, None)
        if fut is not None and not fut.done():
            fut.set_result((header, frames[1] if len(frames) == 2 else None))

    def _send_now(self, frames: list[Sendable]) -> bool:
        """Send a request if the socket takes it at once (the usual case: connected, under its
        HWM); False if it cannot now (:meth:`_send` then waits for it)."""
        sock = self._sock if self._sock is not None else self._socket()
        try:
            send_frames(sock, frames, _NOBLOCK)
        except zmq.Again:
            return False
        if self._waiting:  # a send can leave the edge of a reply unseen: look now
            self._readable()
        return True

    async def _send(self, frames: list[Sendable], deadline: float) -> None:
        """Send a request that :meth:`_send_now` could not, waiting until ``deadline`` (the
        loop's time) for the socket to take it (no connection yet, or the broker away); past
        it, the try counts as made, and is sent again when its reply does not come."""
        loop = asyncio.get_running_loop()
        while True:
            if self._writable is None or self._writable.done():
                self._writable = loop.create_future()
            writable = self._writable
            self._readable()  # the connection may have come up meanwhile
            wait = deadline - loop.time()
            if wait <= 0:
                break
            try:
                await asyncio.wait_for(asyncio.shield(writable), wait)
            except TimeoutError:
                break
            if self._closed:
                raise self._closed_error()
            if self._send_now(frames):
                return
        if self._waiting:  # a send can leave the edge of a reply unseen: look now
            self._readable()

    @property
    def budget(self) -> float:
        """The seconds a call has in all, its tries and backoffs: ``timeout * (retries + 1)``."""
        return self.timeout * (self.retries + 1)

    async def call(
        self,
        op: str,
        data: Sendable | None = None,
        acting: str | None = None,
        *,
        within: float | None = None,
        **fields: Any,
    ) -> Reply:
        """One request; its ``(header, data frame or None)``; ``within``: seconds it has in all,
        if less than :attr:`budget` (what is left of a caller's own).  :raises RemoteError: an
        error reply (its subclass names the code); :raises Timeout: no reply within the
        budget."""
        first = time.monotonic()
        budget = self.budget if within is None else min(within, self.budget)
        if self._closed:
            raise self._closed_error()
        if self._slots.locked():  # a place among the requests in flight, within the budget
            try:
                await asyncio.wait_for(self._slots.acquire(), budget)
            except TimeoutError:
                raise Unavailable(
                    f"the gateway has {len(self._waiting)} requests in flight to the fms "
                    f"cluster at {self.broker}: no place for a {op} within {budget:.0f} s"
                ) from None
        else:  # a place is free: taken at once (wait_for would make a task to take it)
            await self._slots.acquire()
        try:
            return await self._call(op, data, acting, fields, first, budget)
        finally:
            self._slots.release()

    async def _call(
        self,
        op: str,
        data: Sendable | None,
        acting: str | None,
        fields: dict[str, Any],
        first: float,
        budget: float,
    ) -> Reply:
        """:meth:`call`'s tries, once it has a place among the requests in flight."""
        tries, last_error = 0, None
        while True:
            if self._closed:  # while this call waited for a place, or backed off
                raise self._closed_error()
            left = budget - (time.monotonic() - first)
            if left <= 0:
                if last_error is not None:
                    raise last_error
                raise Timeout(
                    f"no reply to {op} from the fms cluster at {self.broker} within "
                    f"{time.monotonic() - first:.0f} s ({tries} {'try' if tries == 1 else 'tries'})"
                )
            wait = min(self.timeout, left)  # no try outlasts the budget
            tries += 1
            req_id = next(self._ids)
            header: dict[str, Any] = {
                "v": p.PROTOCOL_VERSION,
                "op": op,
                "id": req_id,
                "ttl_ms": max(1, int(wait * 1000)),
                **fields,
            }
            if acting is not None:
                header["as"] = acting
            frames: list[Sendable] = [p.encode(header)]
            if data is not None:
                frames.append(data)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            fut: asyncio.Future[Reply] = loop.create_future()
            self._waiting[req_id] = fut
            # The try's time is a timer on its future, not wait_for (which wraps the future
            # in one of its own, with callbacks both ways, per request).
            timer = loop.call_at(deadline, _expire, fut)
            try:
                if not self._send_now(frames):
                    await self._send(frames, deadline)
                reply, frame = await fut
            except TimeoutError:
                continue  # sent again while the budget lasts
            finally:
                timer.cancel()
                self._waiting.pop(req_id, None)
                if fut.done() and not fut.cancelled():
                    fut.exception()  # an error no one awaited (the send failed): seen
            if reply.get("ok"):
                return reply, frame
            error = from_reply(str(reply.get("error")), str(reply.get("message")), reply)
            left = budget - (time.monotonic() - first)
            if isinstance(error, Unavailable) and left > 0:
                last_error = error
                backoff = min(RETRY_BACKOFF * 2 ** (tries - 1), RETRY_BACKOFF_MAX)
                await asyncio.sleep(min(backoff, left))
                continue
            raise error

    async def digest_fn(self) -> str:
        """The store's digest function (asked once: ``hello``)."""
        if self._digest_fn is None:
            header, _ = await self.call("hello")
            name = header.get("digest_fn")
            if name not in p.DIGEST_FUNCTIONS:
                raise FmsError(f"the broker says the store's digest function is {name!r:.40}")
            self._digest_fn = str(name)
        return self._digest_fn


def _expire(fut: "asyncio.Future[Reply]") -> None:
    """A try's time is up: its call stops waiting for the reply (and may try again)."""
    if not fut.done():
        fut.set_exception(TimeoutError())
