"""The gateway's side of the broker: fms requests made from a pool of threads, each with its
own :class:`fms.Client` (a ZeroMQ socket belongs to one thread), and the streams between them
and the event loop.

Reads go through the cache tier (``get``, then ``chunk`` requests tagged with the GET), writes
go to storage (``put_chunk`` pipelined, then ``commit``).  A body is cut into chunks of
:data:`CHUNK_SIZE` as it arrives; each chunk is hashed (sha256, for fms) on the sending
thread while the whole body's MD5 (the ETag) and sha256 (for the commit) are computed on two
other threads, so the three digests run side by side.
"""

import asyncio
import hashlib
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import fms
from fms import wire as p
from fms.client import download
from fms.client.upload import commit_timeout
from fms.errors import NotFound

from .errors import S3Error

CHUNK_SIZE = p.DEFAULT_CHUNK_SIZE  # bytes per chunk of an object the gateway stores
THREADS = 64  # requests to the broker the gateway has under way at once
QUEUE_CHUNKS = 4  # chunks held between the event loop and a transfer's thread, each way


class Store:
    """fms operations for the gateway's handlers, as coroutines.

    :param broker: the broker's frontend endpoint.
    :param curve: a :class:`fms.security.CurveClient`, or None.
    """

    def __init__(self, broker: str, curve=None, timeout: float = 5.0):
        self.broker = broker
        self.curve = curve
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="fms-s3")
        self._hashers = ThreadPoolExecutor(4, thread_name_prefix="fms-s3-hash")
        self._local = threading.local()
        self._clients = []
        self._lock = threading.Lock()

    def client(self) -> fms.Client:
        """This thread's client (made on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = fms.Client(self.broker, timeout=self.timeout, curve=self.curve)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._hashers.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for client in self._clients:
                client.close()

    async def run(self, fn, *args):
        """``fn(client, *args)`` on a pool thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(self.client(), *args))

    # --- metadata ---

    async def stat(self, name: str) -> dict | None:
        def stat(client):
            try:
                header, _ = client.call("stat", name=name)
            except NotFound:
                return None
            return header["stat"]

        return await self.run(stat)

    async def ls(self, prefix: str, after: str, limit: int, folders: bool) -> dict:
        def ls(client):
            header, _ = client.call("ls", prefix=prefix, after=after, limit=limit, folders=folders)
            return header

        return await self.run(ls)

    async def call(self, op: str, **fields) -> dict:
        def call(client):
            header, _ = client.call(op, **fields)
            return header

        return await self.run(call)

    async def rm(self, name: str) -> bool:
        """Remove ``name``; False if it was not there."""

        def rm(client):
            try:
                client.call("rm", name=name, commit=os.urandom(16).hex())
            except NotFound:
                return False
            return True

        return await self.run(rm)

    async def cp(self, src: str, dst: str, meta: dict | None) -> dict:
        def cp(client):
            fields = {"src": src, "name": dst, "commit": os.urandom(16).hex()}
            if meta is not None:
                fields["meta"] = meta
            header, _ = client.call("cp", **fields)
            return header["stat"]

        return await self.run(cp)

    async def recommit(self, manifest: dict, meta: dict | None) -> dict:
        """Commit the content of ``manifest`` again as a new version of its name (with
        ``meta``): no chunk moves."""

        def commit(client):
            fields = {
                "name": manifest["name"],
                "size": manifest["size"],
                "chunk_size": manifest["chunk_size"],
                "chunks": manifest["chunks"],
                "sha256": manifest["sha256"],
                "mtime": time.time(),
                "commit": os.urandom(16).hex(),
            }
            if meta is not None:
                fields["meta"] = meta
            return fields

        return await self.commit(await self.run(commit))

    async def commit(self, fields: dict) -> dict:
        """A ``commit`` given whole, waited for as long as storage takes to read the content
        back (:func:`fms.client.upload.commit_timeout`).  :return: the stat."""

        def commit(client):
            with client.session.patience(commit_timeout(fields["size"], client.session.timeout)):
                header, _ = client.call("commit", **fields)
            return header["stat"]

        return await self.run(commit)

    async def get_small(self, name: str) -> bytes | None:
        """The content of a small object (a bucket marker), or None if absent."""

        def get(client):
            try:
                return client.get_bytes(name)
            except NotFound:
                return None

        return await self.run(get)

    async def put_small(self, name: str, data: bytes, meta: dict | None = None) -> dict:
        def put(client):
            return _commit_whole(client.session, name, data, meta)

        return await self.run(put)

    # --- reads ---

    async def open(self, name: str, version: int | None = None):
        """The manifest of ``name`` (a version of it), and its content if it came inline.

        :return: ``(manifest, inline bytes or None, via)`` or None if absent; ``via``: the
            fields of its chunk requests.
        """

        def open_(client):
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
                manifest, data = download.fetch_whole(
                    client.session, name, manifest, p.unpack_data(frame.buffer)
                )
                data = bytes(data)
            return manifest, data, via

        return await self.run(open_)

    async def stream(self, manifest: dict, start: int, end: int, via: dict):
        """Yield the bytes ``start`` to ``end`` (exclusive) of a stored file, fetched on a pool
        thread a chunk at a time (each verified), :data:`QUEUE_CHUNKS` ahead of the reader."""
        if start >= end:
            return
        pipe = ThreadPipe(asyncio.get_running_loop(), QUEUE_CHUNKS)
        chunk_size = manifest["chunk_size"]
        first = start // chunk_size
        # Only the chunks that hold the range are asked for (the pipeline runs ahead).
        last = (end - 1) // chunk_size
        needed = dict(manifest, chunks=manifest["chunks"][: last + 1])

        def fetch(client):
            offset = first * chunk_size
            try:
                for piece in download.iter_chunks(client.session, needed, first, via):
                    lo, hi = max(start - offset, 0), min(end - offset, len(piece))
                    if lo < hi:
                        pipe.put(bytes(piece[lo:hi]) if (lo, hi) != (0, len(piece)) else piece)
                    offset += len(piece)
                    if offset >= end:
                        break
                pipe.put(None)
            except Stopped:
                pass
            except Exception as exc:  # handed to the reader, which fails the response
                pipe.put(exc)

        asyncio.get_running_loop().run_in_executor(self.pool, lambda: fetch(self.client()))
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

    async def put_stream(self, name: str, pieces, check, meta: dict | None = None):
        """Store the bytes yielded by the async iterator ``pieces`` under ``name``.

        ``name`` may be ``name(md5_digest) -> str``, named once the body is whole.
        ``check(size, md5_digest, sha256_digest)`` is called once the body is whole, before the
        commit: it raises S3Error (BadDigest, ...) to refuse it, so nothing becomes visible.
        :return: ``(stat, md5 digest)``.
        """
        loop = asyncio.get_running_loop()
        blocks = queue.Queue(QUEUE_CHUNKS)
        failed = threading.Event()
        task = loop.run_in_executor(
            self.pool, lambda: self._put_thread(self.client(), name, blocks, check, meta, failed)
        )
        try:
            buf = bytearray()
            async for piece in pieces:
                if task.done():
                    break  # the thread failed: its error is raised below
                buf += piece
                while len(buf) >= CHUNK_SIZE:
                    await _hand(loop, blocks, bytes(buf[:CHUNK_SIZE]), task)
                    del buf[:CHUNK_SIZE]
            else:
                if buf:
                    await _hand(loop, blocks, bytes(buf), task)
                await _hand(loop, blocks, None, task)
        except BaseException:
            failed.set()
            _drain(blocks)
            blocks.put(_ABORT)
            raise
        return await task

    def _put_thread(self, client, name, blocks, check, meta, failed):
        session = client.session
        md5, whole = hashlib.md5(), hashlib.sha256()
        md5_thread = ThreadPoolExecutor(1)
        whole_thread = ThreadPoolExecutor(1)
        chunks, size = [], 0
        try:
            first = _take(blocks, failed)
            if first is None or len(first) < CHUNK_SIZE:  # the whole body: one chunk at most
                if first is not None and _take(blocks, failed) is not None:
                    raise S3Error("InternalError", "a short block before the end of a body")
                data = first or b""
                md5.update(data)
                whole.update(data)
                check(len(data), md5.digest(), whole.digest())
                name = name(md5.digest()) if callable(name) else name
                return _commit_whole(session, name, data, meta, whole.digest()), md5.digest()

            def requests():
                nonlocal size
                block = first
                while block is not None:
                    md5_thread.submit(md5.update, block)
                    whole_thread.submit(whole.update, block)
                    digest = p.sha256(block)
                    chunks.append(digest)
                    size += len(block)
                    yield None, "put_chunk", {"hash": digest}, p.pack_data(block)
                    block = _take(blocks, failed)

            for _ in session.pipeline(requests(), session.data_window(CHUNK_SIZE)):
                pass
            md5_thread.shutdown(wait=True)
            whole_thread.shutdown(wait=True)
            check(size, md5.digest(), whole.digest())
            fields = {
                "name": name(md5.digest()) if callable(name) else name,
                "size": size,
                "chunk_size": CHUNK_SIZE,
                "chunks": chunks,
                "sha256": whole.digest(),
                "mtime": time.time(),
                "commit": os.urandom(16).hex(),
            }
            if meta is not None:
                fields["meta"] = meta
            with session.patience(commit_timeout(size, session.timeout)):
                header, _ = session.call("commit", **fields)
            return header["stat"], md5.digest()
        finally:
            md5_thread.shutdown(wait=False, cancel_futures=True)
            whole_thread.shutdown(wait=False, cancel_futures=True)


_ABORT = object()  # put in a transfer's queue when the request failed on the loop's side


class Stopped(Exception):
    """The reader of a :class:`ThreadPipe` went away."""


class ThreadPipe:
    """Items from a pool thread to a coroutine: ``put`` (thread) waits while ``size`` items
    are queued, ``get`` (event loop) waits for the next.  The loop is woken once per item and
    never waits for the thread, nor the thread for the loop unless the queue is full."""

    def __init__(self, loop, size: int):
        self._queue = queue.Queue(size)
        self._loop = loop
        self._ready = asyncio.Event()
        self._closed = threading.Event()

    def put(self, item):
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

    async def get(self):
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            self._ready.clear()
            if self._queue.empty():  # a put after the check above has set _ready again
                await self._ready.wait()

    def close(self):
        """The reader is done: the thread's next put raises Stopped."""
        self._closed.set()
        _drain(self._queue)


class _Aborted(Exception):
    """The body of a PUT failed on the loop's side."""


def _take(blocks: queue.Queue, failed: threading.Event):
    item = blocks.get()
    if item is _ABORT or failed.is_set():
        raise _Aborted
    return item


async def _hand(loop, blocks: queue.Queue, item, task):
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


def _drain(blocks: queue.Queue):
    while True:
        try:
            blocks.get_nowait()
        except queue.Empty:
            return


def _commit_whole(session, name: str, data: bytes, meta, digest: bytes | None = None) -> dict:
    """Commit ``data`` as one message when it travels inline, else chunk by chunk."""
    digest = digest or p.sha256(data)
    if p.travels_inline(len(data), 1 if data else 0) or not data:
        fields = {
            "name": name,
            "size": len(data),
            "chunk_size": CHUNK_SIZE,
            "chunks": [digest] if data else [],
            "sha256": digest,
            "mtime": time.time(),
            "commit": os.urandom(16).hex(),
        }
        if meta is not None:
            fields["meta"] = meta
        header, _ = session.call("commit", data=p.pack_data(data) if data else None, **fields)
        return header["stat"]
    chunks = [p.sha256(data[i : i + CHUNK_SIZE]) for i in range(0, len(data), CHUNK_SIZE)]
    requests = (
        (None, "put_chunk", {"hash": c}, p.pack_data(data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]))
        for i, c in enumerate(chunks)
    )
    for _ in session.pipeline(requests, session.data_window(CHUNK_SIZE)):
        pass
    fields = {
        "name": name,
        "size": len(data),
        "chunk_size": CHUNK_SIZE,
        "chunks": chunks,
        "sha256": digest,
        "mtime": time.time(),
        "commit": os.urandom(16).hex(),
    }
    if meta is not None:
        fields["meta"] = meta
    header, _ = session.call("commit", **fields)
    return header["stat"]


def s3_error_from(exc: Exception) -> S3Error:
    """An fms error met while serving a request, as the S3 error a client understands."""
    code = getattr(exc, "code", None)
    if code == "not_found":
        return S3Error("NoSuchKey", "the specified key does not exist")
    if code in ("unavailable", "too_large") or isinstance(exc, fms.TransportError):
        return S3Error("ServiceUnavailable", f"the store is busy or unreachable: {exc}")
    if code == "no_space":
        return S3Error("InternalError", f"the store is out of space: {exc}", status=507)
    if code == "bad_request":
        return S3Error("InvalidArgument", str(exc))
    return S3Error("InternalError", f"{type(exc).__name__}: {exc}")
