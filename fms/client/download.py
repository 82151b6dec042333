"""Downloads: chunks fetched pipelined and verified one by one, written to a temp file beside
the destination and renamed into place only when complete and verified; many small files in
batches (``get_many``); and :class:`RemoteFile`, a seekable read-only stream of a stored file.

**One hash pass.**  A manifest's chunk list is checked against its file digest before a byte is
fetched (:mod:`fms.client.listing`), and every chunk against its digest in the list, so a file
whose every chunk verifies is the file the digest names: no second pass over the content.  A
long list is read a page at a time, so a download's memory does not grow with the file.

**Holes.**  A chunk whose digest is that of a chunk of zeros is not fetched: a file gets a hole
there (a sparse file, as ``cp --sparse`` writes), a stream gets the zeros.
"""

import collections
import contextlib
import errno
import io
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, Protocol, TypeAlias

import zmq

from .. import wire as p
from ..errors import FmsError, IntegrityError
from .listing import ChunkList
from .session import Progress, Session

if TYPE_CHECKING:
    from concurrent.futures import Future  # imported at run time only for large files
    from hashlib import _Hash

    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

VERIFY_THREADS = 2  # threads verifying and writing chunks while the next ones arrive
WRITE_THREADS = 2  # threads writing the small files of a download of many (more fight for the GIL)
WRITES_QUEUED = 512  # small files received and waiting to be written, at most ...
WRITES_QUEUED_BYTES = 32 * p.MiB  # ... and bytes of them
TEMP_NAME_BYTES = 200  # of a destination's name kept in its temp file's name

Via: TypeAlias = dict[str, Any] | None  # fields of every chunk request (see iter_chunks)


class Sink(Protocol):
    """Where :func:`download_chunks` writes a file's content, in order: a binary stream."""

    def write(self, data: p.BytesLike, /) -> object: ...


def chunk_list(
    session: Session, manifest: dict[str, Any], via: Via = None, pages: Session | None = None
) -> ChunkList:
    """The chunk list of ``manifest``, its pages and body read on a connection of their own (a
    chunk pipeline may be under way on ``session``), or on ``pages`` (one that has no
    pipeline under way while the list is read); close it when done."""
    aside: list[Session] = [] if pages is None else [pages]

    def fetch(ident: bytes, fresh: bool = False) -> bytes:
        if not aside:
            aside.append(session.aside())
        fields: dict[str, Any] = {"fresh": True} if fresh or (via or {}).get("fresh") else {}
        # `name`: an identity that may not read the whole store reads a list through its file.
        _, frame = aside[0].call("page", hash=ident, name=manifest["name"], **fields)
        return bytes(p.unpack_data(frame.buffer)) if frame is not None else b""

    def close() -> None:
        if aside and aside[0] is not pages:
            aside[0].close()

    listing = ChunkList(manifest, fetch)
    listing.on_close = close
    return listing


def fetch_whole(
    session: Session, name: str, manifest: dict[str, Any], data: p.BytesLike
) -> tuple[dict[str, Any], p.BytesLike]:
    """The verified content of a small file that came with its manifest (``data``); if it does
    not match, asked once more from storage itself (``fresh``).  :return: (manifest, data)."""
    if p.inline_ok(manifest, data):
        ChunkList(manifest, None)  # its one-chunk list gives its digest
        return manifest, data
    with session.aside() as aside:
        header, frame = aside.call("get", name=name, fresh=True)
    manifest = p.check_manifest(header.get("manifest"))
    if frame is None:
        raise IntegrityError(f"{name!r} came without its content from storage; try again")
    return manifest, checked_whole(manifest, p.unpack_data(frame.buffer))


def download_chunks(
    session: Session, manifest: dict[str, Any], out: Sink, report: Progress, via: Via = None
) -> None:
    """Fetch every chunk pipelined, verify each and write them in order to the stream ``out``;
    ``report(name, done, total)`` after each chunk; ``via``: see :func:`iter_chunks`."""
    done = 0
    with contextlib.closing(chunk_list(session, manifest, via)) as listing:
        for piece in iter_chunks(session, listing, via=via):
            out.write(piece)
            done += len(piece)
            report(manifest["name"], done, manifest["size"])


def download_to_file(
    session: Session, manifest: dict[str, Any], out: BinaryIO, report: Progress, via: Via = None
) -> None:
    """Fetch every chunk pipelined into the file ``out`` (open for writing, empty): while this
    thread receives, :data:`VERIFY_THREADS` threads check each chunk against its digest and
    write it at its offset (the digest helpers and ``os.pwrite`` release the GIL), so hashing,
    writing and receiving overlap.  Only verified bytes are written; a chunk that fails is
    fetched once more from storage itself; a chunk of zeros is a hole.  ``report(name, done,
    total)`` as chunks land, in order.

    :raises IntegrityError: a chunk does not match its digest, also from storage.
    """
    from concurrent.futures import ThreadPoolExecutor  # not imported for small files

    out.flush()
    fd = out.fileno()
    window = session.data_window(
        max(
            (cs for cs, _ in p.unpack_extents(manifest.get("extents") or b"")),
            default=manifest["chunk_size"] or p.DEFAULT_CHUNK_SIZE,
        )
    )
    # ((offset, length, digest), verified and written) in arrival order
    pending: collections.deque[tuple[tuple[int, int, bytes, dict[str, Any]], Future[bool]]] = (
        collections.deque()
    )
    done = holes = 0
    with contextlib.closing(chunk_list(session, manifest, via)) as listing:

        def requests() -> Iterator[
            tuple[tuple[int, int, bytes, dict[str, Any]], str, dict[str, Any], None]
        ]:
            nonlocal holes
            for i, offset, length, digest, zeros in listing.items():
                if zeros:
                    holes += length
                    continue
                piece = (offset, length, digest, listing.where(i))
                fields = {"hash": digest, "len": length, **piece[3], **(via or {})}
                yield piece, "chunk", fields, None

        with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="fms-verify") as pool:

            def settle() -> None:
                nonlocal done
                (offset, length, digest, where), future = pending.popleft()
                if not future.result():
                    refetched = _refetch(session, listing, digest, length, where)
                    _write_at(fd, refetched, offset)
                done += length
                report(manifest["name"], done + holes, manifest["size"])

            for piece, _header, frame in session.pipeline(requests(), window):
                data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
                future = pool.submit(_verify_and_write, fd, listing.hash, *piece[:3], data)
                pending.append((piece, future))
                while pending and (len(pending) > window or pending[0][1].done()):
                    settle()
            while pending:
                settle()
    os.ftruncate(fd, manifest["size"])  # a hole at the end too
    if holes and not done:
        report(manifest["name"], manifest["size"], manifest["size"])


def _verify_and_write(
    fd: int, hash_fn: p.Hasher, offset: int, length: int, digest: bytes, data: p.BytesLike
) -> bool:
    """Write a chunk at its offset if it is what the list says.  :return: whether."""
    if not _chunk_ok(hash_fn, data, length, digest):
        return False
    _write_at(fd, data, offset)
    return True


def _write_at(fd: int, data: p.BytesLike, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _chunk_ok(hash_fn: p.Hasher, data: p.BytesLike, length: int, digest: bytes) -> bool:
    return len(data) == length and hash_fn(data) == digest


class FileOf(NamedTuple):
    """What reading a chunk needs of its file when no chunk list is at hand: its name (storage
    checks the read against it) and the store's digest function (``hash``), as a
    :class:`~fms.client.listing.ChunkList` has them."""

    name: str
    hash: p.Hasher


def _refetch(
    session: Session,
    listing: "ChunkList | FileOf",
    digest: bytes,
    length: int,
    where: dict[str, Any] | None = None,
) -> memoryview:
    """A chunk of ``listing`` once more, from storage itself (``fresh``: the broker bypasses
    the cache), verified; ``where``: its place in the file (ChunkList.where).
    :raises IntegrityError: it does not match either."""
    with session.aside() as aside:
        _, frame = aside.call(
            "chunk", hash=digest, len=length, fresh=True, **(where or {"name": listing.name})
        )
    data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
    if not _chunk_ok(listing.hash, data, length, digest):
        raise IntegrityError(
            f"chunk {digest.hex()[:16]} of {listing.name!r} does not match its digest, "
            f"also from storage; nothing was written, try again"
        )
    return data


def fetch_chunk(
    session: Session,
    listing: "ChunkList | FileOf",
    digest: bytes,
    length: int,
    via: Via = None,
    where: dict[str, Any] | None = None,
) -> memoryview:
    """A chunk of ``listing`` alone, verified (from storage itself if the first copy does not
    match); ``where``: its place in the file (ChunkList.where)."""
    where = where or {"name": listing.name}
    _, frame = session.call("chunk", hash=digest, len=length, **where, **(via or {}))
    data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
    if _chunk_ok(listing.hash, data, length, digest):
        return data
    return _refetch(session, listing, digest, length, where)


def iter_chunks(
    session: Session, listing: ChunkList, start: int = 0, via: Via = None
) -> Iterator[memoryview]:
    """Yield the chunks of ``listing`` from index ``start`` on, in order, each verified (a
    chunk of zeros as zeros, not fetched); ``window`` requests stay in flight and out-of-order
    arrivals wait (at most ``window``).  ``via``: fields of every chunk request: the GET they
    belong to (``of``), or ``fresh`` (from storage); see fms.client.api.Client._chunk_fields.

    :raises IntegrityError: a chunk does not match its digest.
    """
    # What is due, in order: [index, length, digest] of a chunk to fetch, or [None, length, n]
    # of a run of n chunks of zeros (one entry however long: a sparse file costs no memory).
    due: collections.deque[list[Any]] = collections.deque()
    held: dict[int, memoryview] = {}  # chunks come in before their turn

    def requests() -> Iterator[tuple[int, str, dict[str, Any], None]]:
        for i, _offset, length, digest, zeros in listing.items(start):
            if zeros:
                if due and due[-1][0] is None and due[-1][1] == length:
                    due[-1][2] += 1
                else:
                    due.append([None, length, 1])
                continue
            due.append([i, length, digest])
            yield (
                i,
                "chunk",
                {"hash": digest, "len": length, **listing.where(i), **(via or {})},
                None,
            )

    def ready() -> Iterator[memoryview]:
        while due and (due[0][0] is None or due[0][0] in held):
            entry = due.popleft()
            if entry[0] is not None:
                yield held.pop(entry[0])
                continue
            for _ in range(entry[2]):
                yield zeros_of(entry[1])

    window = session.data_window(listing.largest_chunk)
    for i, _header, frame in session.pipeline(requests(), window):
        data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
        entry = next(e for e in due if e[0] == i)
        if not _chunk_ok(listing.hash, data, entry[1], entry[2]):
            data = _refetch(session, listing, entry[2], entry[1], listing.where(entry[0]))
        held[i] = data
        yield from ready()
    yield from ready()


_ZERO_BUF = [memoryview(b"")]  # the zeros handed out for holes, grown to the largest chunk


def zeros_of(n: int) -> memoryview:
    """``n`` zero bytes (a chunk of a hole), shared: read-only."""
    if len(_ZERO_BUF[0]) < n:
        _ZERO_BUF[0] = memoryview(bytes(n))
    return _ZERO_BUF[0][:n]


class RemoteFile(io.RawIOBase):
    """What :meth:`fms.Client.open` returns: read it like a local binary file."""

    def __init__(
        self,
        session: Session,
        manifest: dict[str, Any],
        inline_frame: zmq.Frame | None = None,
        via: Via = None,
    ) -> None:
        super().__init__()
        self._session = session
        self._via = via
        self.manifest = manifest
        self.name = manifest["name"]
        self.size = manifest["size"]
        self._list = chunk_list(session, manifest, via)
        self._pos = 0
        self._buf = memoryview(b"")  # the current chunk, from offset _buf_start
        self._buf_start = 0
        self._stream: Iterator[memoryview] | None = None
        self._run = 0  # chunks read in order since the last jump
        # Kind content: its digest is of the bytes, checked when they are read through in order.
        self._whole: _Hash | None = None
        if manifest["digest_kind"] == p.DIGEST_CONTENT:
            import hashlib  # here: OpenSSL is loaded only by commands that move content

            self._whole = hashlib.sha256()
        self._hashed_to = 0  # bytes hashed so far, while reading in order from 0
        if inline_frame is not None:
            self._buf = checked_whole(manifest, p.unpack_data(inline_frame.buffer))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: "Buffer") -> int:
        """Fill ``buffer`` as far as the content goes (short only at the end of the file)."""
        if self.closed:
            raise ValueError("read from a closed file")
        out = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(out) and self._pos < self.size:
            if not self._buf_start <= self._pos < self._buf_start + len(self._buf):
                self._fetch_chunk_at(self._pos, self._pos + len(out) - filled)
            start = self._pos - self._buf_start
            n = min(len(out) - filled, len(self._buf) - start)
            out[filled : filled + n] = self._buf[start : start + n]
            filled += n
            self._pos += n
        return filled

    def _fetch_chunk_at(self, pos: int, want_end: int) -> None:
        """Make ``_buf`` the chunk that holds ``pos``, for a read up to ``want_end``.  Only the
        chunks a read touches are fetched, one by one, until reading goes on in order: from
        the third chunk read in a row, or for a read beyond the next chunk, the following
        chunks stream (``window`` of them prefetched).  So a ranged read (``seek`` + ``read``)
        costs the chunks that hold its bytes, and reading a file through costs one round trip
        per window."""
        index = self._list.index_at(pos)
        offset, length, digest, zeros = self._list.chunk(index)
        in_order = len(self._buf) and self._buf_start + len(self._buf) == offset
        self._run = self._run + 1 if in_order else 0
        if self._stream is None and in_order and (self._run >= 2 or want_end > offset + length):
            self._stream = iter_chunks(self._session, self._list, index, self._via)
        if self._stream is not None and in_order:
            self._buf = next(self._stream)
        else:
            self._stream = None
            self._buf = (
                zeros_of(length)
                if zeros
                else fetch_chunk(
                    self._session, self._list, digest, length, self._via, self._list.where(index)
                )
            )
        self._buf_start = offset
        self._hash_in_order()

    def _hash_in_order(self) -> None:
        if self._whole is not None and self._buf_start == self._hashed_to:
            self._whole.update(self._buf)
            self._hashed_to += len(self._buf)
            if self._hashed_to == self.size and self._whole.digest() != self.manifest["digest"]:
                raise IntegrityError(f"{self.name!r} does not match its digest")

    def close(self) -> None:
        self._stream = None
        if not self.closed:
            self._list.close()
        super().close()


def checked_whole(manifest: dict[str, Any], data: memoryview) -> memoryview:
    """A small file's content, checked against its one chunk's digest (and that against the
    file digest)."""
    if not p.inline_ok(manifest, data):
        raise IntegrityError(
            f"{manifest['name']!r} does not match its digest; nothing was written, try again"
        )
    ChunkList(manifest, None)
    return data


def destination(dest: str) -> tuple[str, bool]:
    """Where a download to ``dest`` goes, as ``cp`` would write it: through a symlink to its
    target (the link stays a link), and into a destination that is not a regular file (a
    device, a FIFO) as it is, never replacing it.

    :return: ``(path, in_place)``: ``in_place`` means write into ``path`` as a stream (it cannot
        be replaced atomically); otherwise ``path`` is a regular file or a new path, replaced
        by :func:`atomic_file`.
    :raises FmsError: ``dest`` is a folder.
    """
    path = os.path.realpath(dest) if os.path.islink(dest) else dest
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return path, False
    except OSError as exc:  # a name too long for the file system, a folder we may not enter
        raise FmsError(f"cannot write to {dest}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise FmsError(f"{dest} is a folder; name a file inside it")
    return path, not stat.S_ISREG(mode)


@contextlib.contextmanager
def in_place(path: str) -> Iterator[BinaryIO]:
    """``path`` (a device, a FIFO) opened for writing as ``cp`` opens it; an OS error (such
    as ENOSPC from /dev/full) becomes one clear :class:`FmsError`."""
    try:
        with open(path, "wb") as out:
            yield out
    except OSError as exc:
        raise FmsError(f"cannot write to {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_file(dest: str, manifest: dict[str, Any], fsync: bool = False) -> Iterator[BinaryIO]:
    """A temp file beside ``dest``, renamed onto it only if the body succeeds (and the content
    was verified): whenever the client dies, ``dest`` holds the old file or the new one, whole.
    With ``fsync`` the data also reaches the disk before the rename (survives a power loss),
    at a price: cp, curl and rsync do not do it by default either."""
    tmp, fd = _create_temp(dest)
    try:
        with open(fd, "wb") as out:
            yield out
            out.flush()
            _finish(fd, manifest, fsync)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class SmallFiles:
    """Small files whose content came with their manifests (``get_many``), each verified and
    written (:func:`write_whole`) on one of :data:`WRITE_THREADS` threads while the caller
    receives the next: creating a file waits on the file system's journal far longer than it
    takes the CPU, so several wait at once.  At most :data:`WRITES_QUEUED` files and
    :data:`WRITES_QUEUED_BYTES` wait to be written.

    ``done(key, manifest)`` is called on the caller's thread as each file is written, in the
    order they were given.  A file whose content does not match its manifest is asked once
    more from storage, on the caller's thread.  Leaving the ``with`` block waits for every
    file given, unless it is left by an exception: then files not yet begun are not written
    (each file begun is written whole or not at all).

    Plain threads and queues: concurrent.futures would import logging, a tenth of start-up.
    """

    def __init__(
        self, session: Session, done: Callable[[Any, dict[str, Any]], None], fsync: bool = False
    ) -> None:
        import queue  # here: only downloads of many files use them
        import threading

        self._session = session
        self._done = done
        self._fsync = fsync
        self._todo: queue.SimpleQueue[tuple[int, str, dict[str, Any], p.BytesLike] | None] = (
            queue.SimpleQueue()
        )  # (seq, dest, manifest, data), or None: stop
        self._finished: queue.SimpleQueue[tuple[int, bool | BaseException]] = (
            queue.SimpleQueue()
        )  # (seq, True, False or the exception raised)
        self._outcomes: dict[
            int, bool | BaseException
        ] = {}  # seq -> outcome, finished but not yet settled
        self._pending: collections.deque[tuple[int, Any, str, dict[str, Any], int]] = (
            collections.deque()
        )  # (seq, key, dest, manifest, size), in order
        self._seq = 0
        self._queued = 0  # bytes of content in _pending
        self._cancelled = False
        self._threads = [
            threading.Thread(target=self._work, name=f"fms-write-{n}", daemon=True)
            for n in range(WRITE_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def write(self, key: object, dest: str, manifest: dict[str, Any], data: p.BytesLike) -> None:
        """Write ``data``, the content of the file ``manifest`` describes, to ``dest`` as
        :meth:`fms.Client.get` would (through a symlink, into a device: :func:`destination`)."""
        self._todo.put((self._seq, dest, manifest, data))
        self._pending.append((self._seq, key, dest, manifest, len(data)))
        self._seq += 1
        self._queued += len(data)
        while not self._finished.empty():
            seq, outcome = self._finished.get()
            self._outcomes[seq] = outcome
        while self._pending and (
            len(self._pending) > WRITES_QUEUED
            or self._queued > WRITES_QUEUED_BYTES
            or self._pending[0][0] in self._outcomes
        ):
            self._settle()

    def _work(self) -> None:
        while (job := self._todo.get()) is not None:
            seq, dest, manifest, data = job
            outcome: bool | BaseException
            try:
                outcome = not self._cancelled and _write_small(dest, manifest, data, self._fsync)
            except BaseException as exc:  # handed to the caller's thread
                outcome = exc
            self._finished.put((seq, outcome))

    def _settle(self) -> None:
        seq, key, dest, manifest, size = self._pending.popleft()
        while seq not in self._outcomes:
            done_seq, outcome = self._finished.get()
            self._outcomes[done_seq] = outcome
        outcome = self._outcomes.pop(seq)
        self._queued -= size
        if isinstance(outcome, BaseException):
            raise outcome
        if not outcome:  # not what its manifest says: from storage itself
            manifest, data = fetch_whole(self._session, manifest["name"], manifest, b"")
            _write_small(dest, manifest, data, self._fsync)
        self._done(key, manifest)

    def __enter__(self) -> "SmallFiles":
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        try:
            while kind is None and self._pending:
                self._settle()
        finally:
            self._cancelled = True  # what was not begun is not written
            for _ in self._threads:
                self._todo.put(None)
            for thread in self._threads:
                thread.join()


def _write_small(dest: str, manifest: dict[str, Any], data: p.BytesLike, fsync: bool) -> bool:
    """Write a small file's content to ``dest`` if it is what ``manifest`` says (its one-chunk
    list giving the file digest).  :return: whether."""
    if not p.inline_ok(manifest, data):
        return False
    ChunkList(manifest, None)
    path, stream = destination(dest)
    if stream:
        with in_place(path) as out:
            out.write(data)
    else:
        write_whole(path, manifest, data, fsync)
    return True


def write_whole(
    dest: str, manifest: dict[str, Any], data: p.BytesLike, fsync: bool = False
) -> None:
    """:func:`atomic_file` for content already in memory and verified (small files), in the
    fewest system calls: an unnamed file made in ``dest``'s folder (``O_TMPFILE``), written,
    its mtime set, then linked at ``dest`` (``linkat``): it appears whole or not at all, and a
    client that dies leaves nothing behind.  Where the kernel or the file system cannot do
    that, a temp file beside ``dest`` renamed onto it."""
    fd = _open_unnamed(dest)
    if fd is not None:
        try:
            _write_at(fd, data, 0)
            _finish(fd, manifest, fsync)
            if _link_unnamed(fd, dest):
                return
        except OSError as exc:  # a full disk, a quota: nothing was named
            raise FmsError(f"cannot write to {dest}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
    tmp, fd = _create_temp(dest)
    try:
        try:
            _write_at(fd, data, 0)
            _finish(fd, manifest, fsync)
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise FmsError(f"cannot write to {dest}: {exc.strerror or exc}") from None
        raise
    _replace(tmp, dest)


AT_FDCWD = -100  # linkat(2): a path relative to the working folder
AT_EMPTY_PATH = 0x1000  # linkat(2): link the file open at the descriptor itself
# Whether unnamed files can be made and linked on this machine: None until tried.
_unnamed: dict[str, Any] = {"works": None, "linkat": None}


def _open_unnamed(dest: str) -> int | None:
    """A descriptor of a new unnamed file in ``dest``'s folder (made if missing), or None
    where there is none to be had (not Linux, a file system without ``O_TMPFILE``)."""
    if _unnamed["works"] is False or not hasattr(os, "O_TMPFILE"):
        return None
    folder = os.path.dirname(os.path.abspath(dest))
    flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
    try:
        try:
            return os.open(folder, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            return os.open(folder, flags, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            _unnamed["works"] = False  # this file system (or an old kernel) has no O_TMPFILE
            return None
        raise FmsError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def _link_unnamed(fd: int, dest: str) -> bool:
    """Name the unnamed file ``fd`` ``dest``; what is there is replaced by way of a temp name
    and a rename (``linkat`` does not replace).  :return: False if this kernel will not link
    it (then nothing was done)."""
    linkat = _linkat()
    at = dest
    while linkat is not None:
        if linkat(fd, b"", AT_FDCWD, os.fsencode(at), AT_EMPTY_PATH) == 0:
            _unnamed["works"] = True
            if at != dest:
                _replace(at, dest)
            return True
        err = _errno()
        if err == errno.EEXIST:
            at = _temp_name(dest)
        elif _unnamed["works"] is None and err in (errno.EPERM, errno.ENOENT, errno.EXDEV):
            _unnamed["works"] = False  # before Linux 6.10 it takes CAP_DAC_READ_SEARCH
            return False
        else:
            raise FmsError(f"cannot write to {dest}: {os.strerror(err)}")
    return False


def _linkat() -> Any:
    """libc's ``linkat``, or None (not loaded: ctypes is imported only when it is used)."""
    if _unnamed["linkat"] is None:
        import ctypes  # here: only a download of small files loads it

        try:
            linkat = ctypes.CDLL(None, use_errno=True).linkat
        except (OSError, AttributeError):
            _unnamed["works"] = False
            return None
        int_, path = ctypes.c_int, ctypes.c_char_p
        linkat.argtypes = (int_, path, int_, path, int_)
        _unnamed["linkat"] = linkat
    return _unnamed["linkat"]


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _replace(tmp: str, dest: str) -> None:
    """Rename ``tmp`` onto ``dest``; if that fails, ``tmp`` is removed."""
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FmsError(f"cannot write to {dest}: {exc.strerror or exc}") from None


def _temp_name(dest: str) -> str:
    """A new temp name beside ``dest``: pid and random part let `fms` tell its own leftovers;
    the destination's name is cut to TEMP_NAME_BYTES, so that the temp name of any name the
    file system takes (up to 255 bytes) is one it takes too."""
    folder = os.path.dirname(os.path.abspath(dest))
    base = os.fsencode(os.path.basename(dest))[:TEMP_NAME_BYTES].decode("utf-8", "ignore")
    return os.path.join(folder, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.fms-part")


def _create_temp(dest: str) -> tuple:
    """``(path, fd)`` of a new temp file beside ``dest`` (:func:`_temp_name`), created with the
    umask's permissions like any new file (0666 & ~umask), O_EXCL so a name is never shared."""
    tmp = _temp_name(dest)
    folder = os.path.dirname(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            return tmp, os.open(tmp, flags, 0o666)
    except OSError as exc:
        raise FmsError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def _finish(fd: int, manifest: dict[str, Any], fsync: bool) -> None:
    if fsync:
        os.fsync(fd)
    os.utime(fd, (time.time(), manifest["mtime"]))


class Collect:
    """A stream that keeps what is written to it, as bytes, in ``parts``."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def write(self, data: p.BytesLike) -> None:
        self.parts.append(bytes(data))
