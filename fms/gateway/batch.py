"""Small PUTs' commits that wait together go to the broker in one message (``commit_many``).

Each 4 KiB PUT was one ``commit`` message through the broker to storage and back, and each
message wakes every process on its way (the broker twice, storage, the cache for its fill): on a
busy machine a wake-up costs about as much CPU as the work it wakes for.  Here the commit of a
small body waits while :data:`WINDOW` messages of its identity's commits are in flight, and
the commits that gathered meanwhile go together as one ``commit_many``: each file with its own
commit id, ``meta`` (``metas``) and result, all in one transaction (docs/PROTOCOL.md).  A
message is also held, :data:`HOLD` at most, for the small PUTs of its identity that the gateway
is reading at that moment (:meth:`CommitBatcher.expect`): it goes as soon as they have all
joined (those still on their way when a hold runs out hold no later message).  A commit that
finds no message in flight and no other small PUT on its way goes at once, alone, as a plain
``commit``: batches form only while PUTs come faster than storage answers them (group commit,
done by the sender).

What a PUT sees is what its own ``commit`` would have given it:

- a file's result is its own: ``ok`` gives its stat, an error its error;
- a file answered ``unavailable`` is sent again alone with the same commit id (a repeat is a
  no-op), with the link's tries and backoff;
- a message refused whole (which the checks here should make impossible: every name and
  ``meta`` is checked before it joins) sends each of its files alone, for a verdict of its own;
- a message that gets no answer (the link's tries spent) fails each of its files so;
- a PUT's time budget (the link's) runs from when its commit came here, its wait included: one
  that waited it all behind the message before it fails (Timeout) without being sent;
- a PUT whose handler is cancelled while its commit waits here is not sent."""

import asyncio
import functools
import logging
import time
from collections import deque
from typing import Any

from fms import limits
from fms import wire as p
from fms.errors import FmsError, RemoteError, Timeout, Unavailable, from_reply

from .link import AsyncLink

# Messages of one identity's commits in flight at once.  One: the commits that come while it is
# answered go in the next (on a busy 2-core machine a window of 2 made batches of 1.3 to 1.5
# commits, a window of 1 of 1.7 to 2.2, and less CPU per PUT: docs/BENCHMARKS.md).
WINDOW = 1
# The longest a message of commits is held for small PUTs of its identity that are already on
# their way (their headers read, their bodies not yet whole): it goes as soon as the last of
# them has joined (or failed), and at the latest after this.  Those still on their way when a
# hold runs out hold no later message: a PUT holds at most one message, once, so a slow or
# stalled body (a client that sends it byte by byte) cannot hold each of its identity's.
HOLD = 0.002

# A commit_many's header is at most limits.MAX_HEADER (only commit and have may be larger: a
# larger one is refused whole, too_large).  A batch is cut before its files' fields (each name,
# digest, id and meta: up to about 3 KiB a file) would take it over, with room for the rest of
# the header (v, op, id, ttl_ms, as, chunk_size, the keys, the arrays' prefixes: under 300 bytes).
HEADER_ROOM = limits.MAX_HEADER - 1024

log = logging.getLogger("fms.gateway")

Key = str | None  # whom the commits act for (the request's identity, None: the gateway)


class _Commit:
    __slots__ = ("cost", "data", "fields", "fut", "meta", "since")

    def __init__(self, fields: dict[str, Any], data: bytes, fut: "asyncio.Future[dict]") -> None:
        self.fields, self.data, self.fut = fields, data, fut
        self.since = time.monotonic()  # its PUT's time budget runs from here, waits included
        self.meta = p.encode(fields.get("meta") or {})  # its entry of ``metas``
        # what it adds to a commit_many's header, at most (a few bytes over: the map's key)
        mine = [fields["name"], len(data), fields["chunks"][0], fields["mtime"], fields["commit"]]
        self.cost = len(p.encode({"": [*mine, self.meta]}))


class Expected:
    """A small PUT on its way to :meth:`CommitBatcher.commit` (see :meth:`~CommitBatcher.expect`):
    :meth:`arrive` once its commit has joined, or once it will not come (any number of times)."""

    __slots__ = ("_batcher", "acting", "arrived")

    def __init__(self, batcher: "CommitBatcher", acting: Key) -> None:
        self._batcher, self.acting, self.arrived = batcher, acting, False

    def arrive(self) -> None:
        if not self.arrived:
            self.arrived = True
            self._batcher._arrived(self)


class CommitBatcher:
    """The commits of small bodies (one chunk each, its content inline) sent on ``link``."""

    def __init__(self, link: AsyncLink, chunk_size: int, window: int = WINDOW) -> None:
        self.link = link
        self.chunk_size = chunk_size
        self.window = max(1, window)
        self._waiting: dict[Key, deque[_Commit]] = {}  # per identity, in arrival order
        self._flying: dict[Key, int] = {}  # messages in flight per identity
        self._tasks: set[asyncio.Future[None]] = set()  # the loop keeps weak references only
        self.sizes: dict[int, int] = {}  # messages sent, by the commits each held
        self._coming: dict[Key, set[Expected]] = {}  # small PUTs on their way, per identity
        self._sending: dict[Key, asyncio.Handle] = {}  # a flush to come, per identity

    def expect(self, acting: Key) -> Expected:
        """Say that a small PUT for ``acting`` is on its way (its body being read): a message
        of its identity's commits may wait for it, up to :data:`HOLD`.  The caller must
        :meth:`Expected.arrive` it, whatever happens (``finally``)."""
        token = Expected(self, acting)
        self._coming.setdefault(acting, set()).add(token)
        return token

    def _arrived(self, token: Expected) -> None:
        acting = token.acting
        coming = self._coming.get(acting)
        if coming is None or token not in coming:
            return  # a hold ran out while it was on its way: it holds nothing any more
        coming.remove(token)
        if coming:
            return
        del self._coming[acting]
        held = self._sending.pop(acting, None)
        if held is not None:  # held for those on their way: all are here
            held.cancel()
            self._schedule(acting)

    async def commit(
        self, fields: dict[str, Any], data: bytes, acting: Key, expected: Expected | None = None
    ) -> dict:
        """The stat of the ``commit`` of ``fields``: one chunk of :attr:`chunk_size`, ``data``
        its content (1 byte to ``min(chunk_size, INLINE_MAX)``), as
        :func:`fms.gateway.store._inline_commit` makes them; ``expected``: this PUT's
        :meth:`expect`, if it said it was coming.

        :raises FmsError: what this commit's own result, or its message's failure, says."""
        try:
            p.check_name(fields["name"])  # what would refuse a whole message refuses this alone
            p.check_meta(fields.get("meta") or {})
            fut: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(acting, deque()).append(_Commit(fields, data, fut))
        finally:
            if expected is not None:
                expected.arrive()
        self._schedule(acting)
        return await fut

    def _schedule(self, acting: Key) -> None:
        """Send what waits for ``acting`` once the window has room: in this pass of the loop
        (with any other commit that comes in it), or after :data:`HOLD` while other small PUTs
        of the identity are on their way (sooner if they all join)."""
        if acting in self._sending or not self._waiting.get(acting):
            return
        if self._flying.get(acting, 0) >= self.window:
            return  # sent when a message in flight is answered
        loop = asyncio.get_running_loop()
        if self._coming.get(acting):
            self._sending[acting] = loop.call_later(HOLD, self._held, acting)
        else:
            self._sending[acting] = loop.call_soon(self._flush, acting)

    def _held(self, acting: Key) -> None:
        """The hold ran out before all those on their way joined: they hold no later message
        (each would again, for as long as its body takes), and what waits goes."""
        self._coming.pop(acting, None)
        self._flush(acting)

    def _flush(self, acting: Key) -> None:
        """Send what waits for ``acting`` while its window has room."""
        self._sending.pop(acting, None)  # this call
        waiting = self._waiting.get(acting)
        while waiting and self._flying.get(acting, 0) < self.window:
            batch: list[_Commit] = []
            nbytes = header = 0
            while waiting and len(batch) < p.MAX_BATCH_FILES:
                one = waiting[0]
                if one.fut.done():  # its handler gave up while it waited: not sent
                    waiting.popleft()
                elif batch and (
                    nbytes + len(one.data) > p.MAX_BATCH_BYTES or header + one.cost > HEADER_ROOM
                ):
                    break
                else:
                    batch.append(waiting.popleft())
                    nbytes += len(one.data)
                    header += one.cost
            if not batch:
                break
            self._flying[acting] = self._flying.get(acting, 0) + 1
            self.sizes[len(batch)] = self.sizes.get(len(batch), 0) + 1
            task = asyncio.ensure_future(self._send(acting, batch))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._sent, acting, batch))
        if not waiting:
            self._waiting.pop(acting, None)

    async def _send(self, acting: Key, batch: list[_Commit]) -> None:
        live = []
        for one in batch:
            if self._left(one.since) > 0:
                live.append(one)
            else:  # it waited its whole budget behind the message before it
                _fail(
                    one,
                    Timeout(
                        f"the commit of {one.fields['name']!r:.80} waited "
                        f"{time.monotonic() - one.since:.0f} s for the commits before it to be "
                        f"answered by the fms cluster at {self.link.broker}: its time is up"
                    ),
                )
        if len(live) == 1:
            await self._alone(acting, live[0])
        elif live:
            await self._together(acting, live)

    def _sent(self, acting: Key, batch: list[_Commit], task: "asyncio.Future[None]") -> None:
        """``batch``'s send is over, however it ended (even cancelled before it ran, when no
        code of its own did): a PUT it did not answer fails rather than wait for ever, and the
        identity's window takes the next."""
        self._tasks.discard(task)
        if task.cancelled():
            _fail_all(batch, asyncio.CancelledError())
        elif task.exception() is not None:  # a fault here: said, and each PUT left fails with it
            exc = task.exception()
            log.error("event=s3_commit_batch_failed files=%d error=%r", len(batch), exc)
            _fail_all(batch, exc if isinstance(exc, Exception) else FmsError(repr(exc)))
        _fail_all(batch, FmsError("the commit's message ended without an answer for it"))
        self._flying[acting] -= 1
        if not self._flying[acting]:
            del self._flying[acting]
        self._schedule(acting)

    def _left(self, since: float) -> float:
        """What is left of the link's budget for a PUT that came at ``since``: the time it
        waited here counts, so that a PUT gives up when its own ``commit`` would have."""
        return self.link.budget - (time.monotonic() - since)

    async def _together(self, acting: Key, batch: list[_Commit]) -> None:
        """``batch`` as one ``commit_many``; each file's result to its PUT."""
        try:
            header, _ = await self.link.call(
                "commit_many",
                p.pack_data(b"".join(one.data for one in batch)),
                acting=acting,
                within=self._left(min(one.since for one in batch)),
                names=[one.fields["name"] for one in batch],
                sizes=[len(one.data) for one in batch],
                hashes=[one.fields["chunks"][0] for one in batch],
                mtimes=[one.fields["mtime"] for one in batch],
                commits=[one.fields["commit"] for one in batch],
                metas=[one.meta for one in batch],
                chunk_size=self.chunk_size,
            )
        except RemoteError as exc:
            if isinstance(exc, Unavailable):  # the link's tries spent: each fails so
                _fail_all(batch, exc)
            else:  # refused whole: each alone, for a verdict of its own
                await asyncio.gather(*(self._alone(acting, one) for one in batch))
            return
        except BaseException as exc:  # no answer, or cancelled: no PUT is left waiting
            _fail_all(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        results = header.get("results")
        if not isinstance(results, list) or len(results) != len(batch):
            _fail_all(
                batch, FmsError(f"commit_many of {len(batch)} files answered {results!r:.60}")
            )
            return
        again = []
        for one, result in zip(batch, results, strict=True):
            if not isinstance(result, dict):
                _fail(one, FmsError(f"commit_many answered a file with {result!r:.60}"))
            elif result.get("ok"):
                _done(one, result.get("stat"))
            else:
                error = from_reply(str(result.get("error")), str(result.get("message")), result)
                if isinstance(error, Unavailable):
                    again.append(one)  # alone, with its id (a repeat is a no-op)
                else:
                    _fail(one, error)
        if again:
            await asyncio.gather(*(self._alone(acting, one) for one in again))

    async def _alone(self, acting: Key, one: _Commit) -> None:
        """``one`` as a ``commit`` of its own."""
        try:
            header, _ = await self.link.call(
                "commit",
                p.pack_data(one.data),
                acting=acting,
                within=self._left(one.since),
                **one.fields,
            )
        except BaseException as exc:
            _fail(one, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _done(one, header.get("stat"))


def _done(one: _Commit, stat: object) -> None:
    if not isinstance(stat, dict):
        _fail(
            one, FmsError(f"the commit of {one.fields['name']!r:.80} was answered without a stat")
        )
    elif not one.fut.done():
        one.fut.set_result(stat)


def _fail(one: _Commit, exc: BaseException) -> None:
    if not one.fut.done():
        if not isinstance(exc, Exception):  # cancelled (the gateway stopping): not the PUT's own
            exc = Unavailable("the gateway stopped before the commit was answered")
        one.fut.set_exception(exc)


def _fail_all(batch: list[_Commit], exc: BaseException) -> None:
    for one in batch:
        _fail(one, exc)
