"""The gateway's side of the broker: fms requests made from a pool of threads, each with its
own :class:`fms.Client` (a ZeroMQ socket belongs to one thread), and the streams between them
and the event loop.

Reads go through the cache tier (``get``, then ``chunk`` requests tagged with the GET), writes
go to storage (``put_chunk`` pipelined, then ``commit``).  A body is cut into chunks of
:data:`CHUNK_SIZE` as it arrives; each chunk is hashed (with the store's digest function, for
fms) on the sending thread while the whole body's MD5 (the ETag) and, when the client sent one to
check, its sha256 are computed on two other threads, so the digests run side by side.

**Who for.** Each request acts for the identity of the S3 request being served (the field
``as``, set from :data:`ACTING` when a request is handed to a pool thread), so storage and the
cache decide it by that identity's grants.  :meth:`Store.own` is the same pool acting for the
gateway itself, for its own state (bucket markers, the parts of multipart uploads).
"""

import asyncio
import contextvars
import copy
import functools
import hashlib
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeAlias, TypeVar, cast

import fms
from fms import wire as p
from fms.client import download, upload
from fms.client.listing import ChunkList
from fms.client.session import Session
from fms.errors import NotFound
from fms.security import CurveClient

from .batch import CommitBatcher, Expected
from .errors import S3Error
from .link import AsyncLink

T = TypeVar("T")
Stat: TypeAlias = dict[str, Any]
# check(size, md5 digest, the body's sha256 or None): raises S3Error to refuse a body
Check: TypeAlias = Callable[[int, bytes, bytes | None], None]
# a name, or name(md5 digest) -> name once the body is whole
Naming: TypeAlias = str | Callable[[bytes], str]

CHUNK_SIZE = p.DEFAULT_CHUNK_SIZE  # bytes per chunk of an object the gateway stores
THREADS = 64  # requests to the broker the gateway has under way at once
QUEUE_CHUNKS = 4  # chunks held between the event loop and a transfer's thread, each way

# The identity the S3 request being served acts for (None: the gateway's own); set per request.
ACTING: contextvars.ContextVar[str | None] = contextvars.ContextVar("fms_s3_acting", default=None)


class Store:
    """fms operations for the gateway's handlers, as coroutines.

    :param broker: the broker's frontend endpoint.
    :param curve: a :class:`fms.security.CurveClient`, or None.
    """

    def __init__(self, broker: str, curve: CurveClient | None = None, timeout: float = 5.0):
        self.broker = broker
        self.curve = curve
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="fms-s3")
        self._hashers = ThreadPoolExecutor(4, thread_name_prefix="fms-s3-hash")
        self._local = threading.local()
        self._clients: list[fms.Client] = []
        self._lock = threading.Lock()
        self._own = False
        # small requests (a get, the commit of a small body) from the event loop itself
        self.link = AsyncLink(broker, curve, timeout)
        self.commits = CommitBatcher(self.link, CHUNK_SIZE)  # small bodies' commits, batched
        self._inline_hash: p.Hasher | None = None  # the store's digest function, once known

    def own(self) -> "Store":
        """This store (the same threads and connections) acting for the gateway itself,
        whatever request is being served."""
        view = copy.copy(self)
        view._own = True
        return view

    def acting(self) -> str | None:
        """Whom requests made now act for: the request's identity, or None (the gateway)."""
        return None if self._own else ACTING.get()

    def client(self, acting: str | None = None) -> fms.Client:
        """This thread's client (made on first use), acting for ``acting``."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = fms.Client(self.broker, timeout=self.timeout, curve=self.curve)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        client.session.acting_as = acting
        return client

    def _submit(self, fn: Callable[[fms.Client], T]) -> "asyncio.Future[T]":
        """``fn(client)`` on a pool thread, its client acting for whom this store acts now."""
        acting = self.acting()
        return asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: fn(self.client(acting))
        )

    def close(self) -> None:
        self.link.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._hashers.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for client in self._clients:
                client.close()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(client, *args)`` on a pool thread."""
        return await self._submit(lambda client: fn(client, *args))

    async def s3_key(self, access_key: str) -> dict[str, Any] | None:
        """An S3 access key's ``identity``, ``secret`` and ``grants`` in the store, or None
        (asked as the gateway itself)."""
        return await self.own().run(lambda client: client.s3_key(access_key))

    # --- metadata ---

    async def stat(self, name: str) -> dict | None:
        def stat(client: fms.Client) -> Stat | None:
            try:
                header, _ = client.call("stat", name=name)
            except NotFound:
                return None
            return header["stat"]

        return await self.run(stat)

    async def ls(self, prefix: str, after: str, limit: int, folders: bool) -> dict:
        def ls(client: fms.Client) -> dict[str, Any]:
            header, _ = client.call("ls", prefix=prefix, after=after, limit=limit, folders=folders)
            return header

        return await self.run(ls)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        def call(client: fms.Client) -> dict[str, Any]:
            header, _ = client.call(op, **fields)
            return header

        return await self.run(call)

    async def rm(self, name: str) -> bool:
        """Remove ``name``; False if it was not there."""

        def rm(client: fms.Client) -> bool:
            try:
                client.call("rm", name=name, commit=os.urandom(16).hex())
            except NotFound:
                return False
            return True

        return await self.run(rm)

    async def cp(self, src: str, dst: str, meta: dict | None) -> dict:
        def cp(client: fms.Client) -> Stat:
            fields: dict[str, Any] = {"src": src, "name": dst, "commit": os.urandom(16).hex()}
            if meta is not None:
                fields["meta"] = meta
            header, _ = client.call("cp", **fields)
            return header["stat"]

        return await self.run(cp)

    async def recommit(self, manifest: dict, meta: dict | None) -> dict:
        """Commit the content of ``manifest`` again as a new version of its name, with
        ``meta``: no chunk moves."""
        if "body" in manifest and "pages" not in manifest:
            raise S3Error("NotImplemented", "changing the metadata of so large an object")
        fields: dict[str, Any] = {
            k: manifest[k] for k in ("extents", "chunks", "pages", "digest") if k in manifest
        }
        fields.update(
            name=manifest["name"], mtime=time.time(), commit=os.urandom(16).hex(), meta=meta or {}
        )
        return await self.commit(fields)

    async def commit(self, fields: dict) -> dict:
        """A ``commit`` given whole.  :return: the stat."""

        def commit(client: fms.Client) -> Stat:
            header, _ = client.call("commit", **fields)
            return header["stat"]

        return await self.run(commit)

    async def digests(self, manifest: dict) -> bytes:
        """The chunk digests of a stored file, back to back (its pages read if it has any)."""

        def digests(client: fms.Client) -> bytes:
            with download.chunk_list(client.session, manifest, {"fresh": True}) as listing:
                return b"".join(item[3] for item in listing.items(0))

        return await self.run(digests)

    async def hasher(self) -> "p.Hasher":
        """The helper of the store's digest function (asked of the broker once per thread)."""
        return await self.run(lambda client: client.session.hasher())

    async def commit_plan(self, name: str, plan: upload.Plan) -> Stat:
        return await self.run(lambda client: upload.commit_plan(client.session, name, plan))

    async def get_small(self, name: str) -> bytes | None:
        """The content of a small object (a bucket marker), or None if absent."""

        def get(client: fms.Client) -> bytes | None:
            try:
                return client.get_bytes(name)
            except NotFound:
                return None

        return await self.run(get)

    async def put_small(self, name: str, data: bytes, meta: dict | None = None) -> dict:
        def put(client: fms.Client) -> Stat:
            return _commit_bytes(client.session, name, data, meta)

        return await self.run(put)

    # --- reads ---

    async def open(
        self, name: str, version: int | None = None
    ) -> tuple[dict[str, Any], bytes | None, dict[str, Any]] | None:
        """The manifest of ``name`` (a version of it), and its content if it came inline;
        ``name`` is a checked name (:func:`fms.wire.check_name`, as the gateway's ``_name``).

        :return: ``(manifest, inline bytes or None, via)`` or None if absent; ``via``: the
            fields of its chunk requests.
        """
        if version is None:  # from the event loop: no thread hop for a small object
            try:
                header, frame = await self.link.call("get", acting=self.acting(), name=name)
            except NotFound:
                return None
            # ``name`` was checked (the gateway's _name): the manifest's, if it is that one, is
            # not checked again
            manifest = p.check_manifest(header.get("manifest"), name)
            via = {"fresh": True} if header.get("cache") is False else {"of": header["id"]}
            if frame is None:
                return manifest, None, via
            data = p.unpack_data(frame.buffer)
            if download.small_ok(manifest, data):
                return manifest, bytes(data), via
            # a copy that does not match: asked again of storage itself, on a pool thread

        def open_(
            client: fms.Client,
        ) -> tuple[dict[str, Any], bytes | None, dict[str, Any]] | None:
            try:
                if version is not None:
                    header, frame = client.call("get_version", name=name, version=version)
                    via = {"fresh": True}
                else:
                    header, frame = client.call("get", name=name)
                    via = client._chunk_fields(header)
            except NotFound:
                return None
            manifest = p.check_manifest(header.get("manifest"))
            data = None
            if frame is not None:
                manifest, whole = download.fetch_whole(
                    client.session, name, manifest, p.unpack_data(frame.buffer)
                )
                data = bytes(whole)
            return manifest, data, via

        return await self.run(open_)

    async def stream(
        self, manifest: dict[str, Any], start: int, end: int, via: dict[str, Any]
    ) -> AsyncIterator[bytes | memoryview]:
        """Yield the bytes ``start`` to ``end`` (exclusive) of a stored file, fetched on a pool
        thread a chunk at a time (each verified), :data:`QUEUE_CHUNKS` ahead of the reader."""
        if start >= end:
            return

        def fetch(client: fms.Client, put: Callable[[bytes | memoryview], None]) -> None:
            # Its pages are read on this same connection: _range_chunks reads the list it needs
            # before its pipeline starts (a connection aside per GET cost a connect each).
            session = client.session
            with download.chunk_list(session, manifest, via, pages=session) as listing:
                for offset, piece in _range_chunks(session, listing, start, end, via):
                    lo, hi = max(start - offset, 0), min(end - offset, len(piece))
                    if lo < hi:
                        whole = (lo, hi) == (0, len(piece))
                        put(piece if whole else bytes(piece[lo:hi]))

        async for item in self.produced(fetch, QUEUE_CHUNKS):
            yield item

    async def produced(
        self, work: Callable[[fms.Client, Callable[[T], None]], None], queued: int
    ) -> AsyncIterator[T]:
        """Yield what ``work(client, put)`` puts, run on a pool thread with a client of its own,
        at most ``queued`` items ahead of the reader; what ``work`` raises is raised here."""
        pipe: ThreadPipe[T] = ThreadPipe(asyncio.get_running_loop(), queued)

        def run(client: fms.Client) -> None:
            try:
                work(client, pipe.put)
                pipe.put(None)
            except Stopped:
                pass
            except Exception as exc:  # handed to the reader
                pipe.put(exc)

        self._submit(run)
        try:
            while True:
                item = await pipe.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            pipe.close()

    # --- writes ---

    def expect_small(self) -> Expected:
        """Say that the body of a small PUT (one that travels with its commit) is being read:
        :meth:`CommitBatcher.expect` for whom this store acts now."""
        return self.commits.expect(self.acting())

    async def put_stream(
        self,
        name: Naming,
        pieces: AsyncIterator[bytes | memoryview],
        check: Check,
        meta: dict[str, Any] | None = None,
        whole: bool = False,
        commit_own: bool = False,
        expected: Expected | None = None,
    ) -> tuple[Stat, bytes]:
        """Store the bytes yielded by the async iterator ``pieces`` under ``name``.

        ``name`` may be ``name(md5_digest) -> str``, named once the body is whole.
        ``check(size, md5_digest, sha256_digest)`` (the body's sha256 only if ``whole``, else
        None but for a body of one chunk) is called once the body is whole, before the
        commit: it raises S3Error (BadDigest, ...) to refuse it, so nothing becomes visible.
        ``commit_own``: the chunks are uploaded for the request's identity (so that it may
        commit them under a name of its own later) and committed by the gateway itself (a part
        of a multipart upload, in the gateway's folder).  ``expected``: the body is small, and
        :meth:`CommitBatcher.expect` was told (its commit joins the batch with it).
        :return: ``(stat, md5 digest)``.
        """
        # The first chunk's worth is gathered here: a body shorter than that (most objects)
        # is stored by one call on a pool thread, with no queue between the loop and it.
        buf = bytearray()
        async for piece in pieces:
            buf += piece
            if len(buf) >= CHUNK_SIZE:
                break
        else:
            data = bytes(buf)
            if not commit_own and len(data) <= p.INLINE_MAX:
                return await self._put_inline(name, data, check, meta, expected)
            whole_body = functools.partial(
                _put_whole, name=name, data=data, check=check, meta=meta, own=commit_own
            )
            return await self._submit(whole_body)
        loop = asyncio.get_running_loop()
        blocks: Blocks = queue.Queue(QUEUE_CHUNKS)
        failed = threading.Event()
        task = self._submit(
            lambda client: self._put_thread(
                client, name, blocks, check, meta, failed, whole, commit_own
            )
        )
        try:
            while not task.done():  # done before the end: it failed, and it is raised below
                while len(buf) >= CHUNK_SIZE:
                    await _hand(loop, blocks, bytes(buf[:CHUNK_SIZE]), task)
                    del buf[:CHUNK_SIZE]
                try:
                    buf += await anext(pieces)
                except StopAsyncIteration:
                    if buf:
                        await _hand(loop, blocks, bytes(buf), task)
                    await _hand(loop, blocks, None, task)
                    break
        except BaseException:
            failed.set()
            _drain(blocks)
            blocks.put(_ABORT)
            raise
        return await task

    async def _put_inline(
        self,
        name: Naming,
        data: bytes,
        check: Check,
        meta: dict[str, Any] | None,
        expected: Expected | None = None,
    ) -> tuple[Stat, bytes]:
        """A body small enough to travel with its commit, stored from the event loop: hashed
        here (microseconds at this size) and committed in one request on :attr:`link`."""
        md5 = hashlib.md5(data).digest()
        check(len(data), md5, p.sha256(data))
        name = name(md5) if callable(name) else name
        meta = _with_etag(meta, md5) or None
        if not 0 < len(data) <= min(CHUNK_SIZE, p.INLINE_MAX):  # not one chunk: the usual way
            return await self.run(
                lambda client: _commit_bytes(client.session, name, data, meta)
            ), md5
        hash_fn = self._inline_hash
        if hash_fn is None:  # the store's digest function, asked once
            hash_fn = self._inline_hash = p.hasher(await self.link.digest_fn())
        fields = _inline_commit(name, data, hash_fn, meta)
        return await self.commits.commit(fields, data, self.acting(), expected), md5

    def _put_thread(
        self,
        client: fms.Client,
        name: Naming,
        blocks: "Blocks",
        check: Check,
        meta: dict[str, Any] | None,
        failed: threading.Event,
        whole_needed: bool,
        commit_own: bool,
    ) -> tuple[Stat, bytes]:
        session = client.session
        uploader = session.acting_as
        hash_fn = session.hasher()  # asked before the pipeline starts (once per connection)
        md5 = hashlib.md5()
        whole = hashlib.sha256() if whole_needed else None
        md5_thread = ThreadPoolExecutor(1)
        digests, size = bytearray(), 0
        try:
            first = _take(blocks, failed)
            if first is None:
                raise S3Error("InternalError", "a body of less than a chunk handed to a thread")

            def requests() -> Iterator[tuple[None, str, dict[str, Any], p.Sendable]]:
                nonlocal size
                block: bytes | None = first
                while block is not None:
                    md5_thread.submit(md5.update, block)
                    if whole is not None:
                        whole.update(block)
                    digest = hash_fn(block)
                    digests.extend(digest)
                    size += len(block)
                    yield None, "put_chunk", {"hash": digest}, p.pack_data(block)
                    block = _take(blocks, failed)

            for _ in session.pipeline(requests(), session.data_window(CHUNK_SIZE)):
                pass
            md5_thread.shutdown(wait=True)
            check(size, md5.digest(), whole.digest() if whole is not None else None)
            plan = upload.Plan(size, CHUNK_SIZE, digests, time.time(), None, hash_fn)
            plan.meta = _with_etag(meta, md5.digest())
            name = name(md5.digest()) if callable(name) else name
            if commit_own:
                session.acting_as = None
            return upload.commit_plan(session, name, plan), md5.digest()
        finally:
            md5_thread.shutdown(wait=False, cancel_futures=True)
            session.acting_as = uploader


_ABORT = object()  # put in a transfer's queue when the request failed on the loop's side
# a transfer's queue of blocks: bytes, None at the end of the body, or _ABORT
Blocks: TypeAlias = "queue.Queue[bytes | object | None]"


class Stopped(Exception):
    """The reader of a :class:`ThreadPipe` went away."""


class ThreadPipe(Generic[T]):
    """Items from a pool thread to a coroutine: ``put`` (thread) waits while ``size`` items
    are queued, ``get`` (event loop) waits for the next.  The loop is woken once per item and
    never waits for the thread, nor the thread for the loop unless the queue is full."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self._queue: queue.Queue[T | Exception | None] = queue.Queue(size)
        self._loop = loop
        self._ready = asyncio.Event()
        self._closed = threading.Event()

    def put(self, item: T | Exception | None) -> None:
        """Queue ``item``.  :raises Stopped: the reader closed the pipe."""
        while True:
            if self._closed.is_set():
                raise Stopped
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                continue
        self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> T | Exception | None:
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            self._ready.clear()
            if self._queue.empty():  # a put after the check above has set _ready again
                await self._ready.wait()

    def close(self) -> None:
        """The reader is done: the thread's next put raises Stopped."""
        self._closed.set()
        _drain(self._queue)


class _Aborted(Exception):
    """The body of a PUT failed on the loop's side."""


def _take(blocks: Blocks, failed: threading.Event) -> bytes | None:
    item = blocks.get()
    if item is _ABORT or failed.is_set():
        raise _Aborted
    return cast("bytes | None", item)


async def _hand(
    loop: asyncio.AbstractEventLoop, blocks: Blocks, item: bytes | None, task: "asyncio.Future[Any]"
) -> None:
    """Put ``item`` in the thread's queue, waiting (off the loop) while it is full."""
    try:
        blocks.put_nowait(item)
    except queue.Full:
        while not task.done():
            try:
                await loop.run_in_executor(None, lambda: blocks.put(item, timeout=0.5))
                return
            except queue.Full:
                continue


def _drain(blocks: "queue.Queue[Any]") -> None:
    while True:
        try:
            blocks.get_nowait()
        except queue.Empty:
            return


def _with_etag(meta: dict[str, Any] | None, md5: bytes) -> dict[str, Any] | None:
    """The metadata to store with an object: ``meta`` and its ETag (an MD5, quoted)."""
    if meta is None:
        return None
    return {"etag": f'"{md5.hex()}"', **meta}  # a multipart ETag given in meta stays


def _inline_commit(
    name: str, data: bytes, hash_fn: p.Hasher, meta: dict[str, Any] | None
) -> dict[str, Any]:
    """The fields of the ``commit`` of ``data``, one chunk of :data:`CHUNK_SIZE` that travels
    with it: those :func:`fms.client.upload.plan_bytes` and ``_commit_fields`` make for it,
    made directly (its file digest is :func:`fms.wire.one_chunk_digest`: no Plan, no page
    list for one chunk)."""
    chunk = hash_fn(data)
    extents = p.pack_extents(((CHUNK_SIZE, len(data)),))
    fields: dict[str, Any] = {
        "name": name,
        "extents": extents,
        "digest": p.one_chunk_digest(extents, chunk, hash_fn),
        "mtime": time.time(),
        "commit": os.urandom(16).hex(),
        "chunks": [chunk],
    }
    if meta:
        fields["meta"] = meta
    return fields


def _put_whole(
    client: fms.Client, name: Naming, data: bytes, check: Check, meta: Stat | None, own: bool
) -> tuple[Stat, bytes]:
    """:meth:`Store.put_stream` of a body shorter than a chunk, whole in ``data``."""
    session = client.session
    md5 = hashlib.md5(data).digest()
    check(len(data), md5, p.sha256(data))
    name = name(md5) if callable(name) else name
    meta = _with_etag(meta, md5)
    uploader = session.acting_as
    try:
        if own:
            if data and uploader is not None:  # the identity's own upload of the chunk
                session.call("put_chunk", p.pack_data(data), hash=session.hasher()(data))
            session.acting_as = None
        return _commit_bytes(session, name, data, meta), md5
    finally:
        session.acting_as = uploader


def _commit_bytes(session: Session, name: str, data: bytes, meta: dict[str, Any] | None) -> Stat:
    """Store ``data`` (in memory) under ``name``: with its commit when it travels inline."""
    plan = upload.plan_bytes(data, CHUNK_SIZE, None, session.hasher())
    plan.meta = meta or None
    return upload.put_planned(session, [(data, name, plan)], lambda *a: None)[0]


def _range_chunks(
    session: Session, listing: ChunkList, start: int, end: int, via: download.Via
) -> Iterator[tuple[int, bytes | memoryview]]:
    """``(offset, chunk)`` of the chunks that hold bytes ``start`` to ``end``, in order, each
    verified, fetched pipelined (only those: a ranged GET costs the chunks it touches)."""
    wanted = []
    for item in listing.items(listing.index_at(start)):
        if item[1] >= end:
            break
        wanted.append(item)  # (index, offset, length, digest, zeros)
    requests = (
        (i, "chunk", {"hash": digest, "len": length, **(via or {})}, None)
        for i, _offset, length, digest, zeros in wanted
        if not zeros
    )
    held: dict[int, memoryview] = {}
    due = iter(wanted)
    nxt = next(due, None)

    def ready() -> Iterator[tuple[int, bytes | memoryview]]:
        nonlocal nxt
        while nxt is not None and (nxt[4] or nxt[0] in held):
            i, offset, length, digest, zeros = nxt
            if zeros:
                yield offset, download.zeros_of(length)
            else:
                data = held.pop(i)
                if not download._chunk_ok(listing.hash, data, length, digest):
                    data = download._refetch(session, listing, digest, length)
                yield offset, data
            nxt = next(due, None)

    yield from ready()
    window = session.data_window(listing.largest_chunk)
    for i, _header, frame in session.pipeline(requests, window):
        held[i] = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
        yield from ready()


def s3_error_from(exc: Exception) -> S3Error:
    """An fms error met while serving a request, as the S3 error a client understands."""
    code = getattr(exc, "code", None)
    if code == "forbidden":
        return S3Error("AccessDenied", f"access denied: {exc}")
    if code == "not_found":
        return S3Error("NoSuchKey", "the specified key does not exist")
    if code in ("unavailable", "too_large") or isinstance(exc, fms.TransportError):
        return S3Error("ServiceUnavailable", f"the store is busy or unreachable: {exc}")
    if code == "no_space":
        return S3Error("InternalError", f"the store is out of space: {exc}", status=507)
    if code == "bad_request":
        return S3Error("InvalidArgument", str(exc))
    return S3Error("InternalError", f"{type(exc).__name__}: {exc}")
