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
import io
import os
import stat
import time

from .. import wire as p
from ..errors import FmsError, IntegrityError
from .listing import ChunkList
from .session import Session

VERIFY_THREADS = 2  # threads verifying and writing chunks while the next ones arrive
TEMP_NAME_BYTES = 200  # of a destination's name kept in its temp file's name


def chunk_list(session: Session, manifest: dict, via=None) -> ChunkList:
    """The chunk list of ``manifest``, its pages and body read on a connection of their own (a
    chunk pipeline may be under way on ``session``); close it when done."""
    aside = []

    def fetch(ident: bytes, fresh: bool = False) -> bytes:
        if not aside:
            aside.append(session.aside())
        fields = {"fresh": True} if fresh or (via or {}).get("fresh") else {}
        # `name`: an identity that may not read the whole store reads a list through its file.
        _, frame = aside[0].call("page", hash=ident, name=manifest["name"], **fields)
        return bytes(p.unpack_data(frame.buffer)) if frame is not None else b""

    listing = ChunkList(manifest, fetch)
    listing.on_close = lambda: aside and aside[0].close()
    return listing


def fetch_whole(session: Session, name: str, manifest: dict, data):
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


def download_chunks(session: Session, manifest: dict, out, report, via=None):
    """Fetch every chunk pipelined, verify each and write them in order to the stream ``out``;
    ``report(name, done, total)`` after each chunk; ``via``: see :func:`iter_chunks`."""
    done = 0
    with contextlib.closing(chunk_list(session, manifest, via)) as listing:
        for piece in iter_chunks(session, listing, via=via):
            out.write(piece)
            done += len(piece)
            report(manifest["name"], done, manifest["size"])


def download_to_file(session: Session, manifest: dict, out, report, via=None):
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
    pending = collections.deque()  # (piece, future) in arrival order
    done = holes = 0
    with contextlib.closing(chunk_list(session, manifest, via)) as listing:

        def requests():
            nonlocal holes
            for i, offset, length, digest, zeros in listing.items():
                if zeros:
                    holes += length
                    continue
                piece = (offset, length, digest, listing.where(i))
                fields = {"hash": digest, "len": length, **piece[3], **(via or {})}
                yield piece, "chunk", fields, None

        with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="fms-verify") as pool:

            def settle():
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


def _verify_and_write(fd: int, hash_fn, offset: int, length: int, digest: bytes, data) -> bool:
    """Write a chunk at its offset if it is what the list says.  :return: whether."""
    if not _chunk_ok(hash_fn, data, length, digest):
        return False
    _write_at(fd, data, offset)
    return True


def _write_at(fd: int, data, offset: int):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _chunk_ok(hash_fn, data, length: int, digest: bytes) -> bool:
    return len(data) == length and hash_fn(data) == digest


def _refetch(session: Session, listing: ChunkList, digest: bytes, length: int, where=None):
    """A chunk of ``listing`` once more, from storage itself (``fresh``: the broker bypasses
    the cache), verified; ``where``: its place in the file (ChunkList.where).
    :raises IntegrityError: it does not match either."""
    with session.aside() as aside:
        _, frame = aside.call(
            "chunk", hash=digest, len=length, fresh=True, **(where or {"name": listing.name})
        )
    data = p.unpack_data(frame.buffer) if frame is not None else b""
    if not _chunk_ok(listing.hash, data, length, digest):
        raise IntegrityError(
            f"chunk {digest.hex()[:16]} of {listing.name!r} does not match its digest, "
            f"also from storage; nothing was written, try again"
        )
    return data


def fetch_chunk(
    session: Session, listing: ChunkList, digest: bytes, length: int, via=None, where=None
):
    """A chunk of ``listing`` alone, verified (from storage itself if the first copy does not
    match); ``where``: its place in the file (ChunkList.where)."""
    where = where or {"name": listing.name}
    _, frame = session.call("chunk", hash=digest, len=length, **where, **(via or {}))
    data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
    if _chunk_ok(listing.hash, data, length, digest):
        return data
    return _refetch(session, listing, digest, length, where)


def iter_chunks(session: Session, listing: ChunkList, start: int = 0, via=None):
    """Yield the chunks of ``listing`` from index ``start`` on, in order, each verified (a
    chunk of zeros as zeros, not fetched); ``window`` requests stay in flight and out-of-order
    arrivals wait (at most ``window``).  ``via``: fields of every chunk request: the GET they
    belong to (``of``), or ``fresh`` (from storage); see fms.client.api.Client._chunk_fields.

    :raises IntegrityError: a chunk does not match its digest.
    """
    # What is due, in order: [index, length, digest] of a chunk to fetch, or [None, length, n]
    # of a run of n chunks of zeros (one entry however long: a sparse file costs no memory).
    due = collections.deque()
    held = {}

    def requests():
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

    def ready():
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

    def __init__(self, session: Session, manifest: dict, inline_frame=None, via=None):
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
        self._stream = None
        self._run = 0  # chunks read in order since the last jump
        # Kind content: its digest is of the bytes, checked when they are read through in order.
        self._whole = None
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

    def readinto(self, buffer) -> int:
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

    def _fetch_chunk_at(self, pos: int, want_end: int):
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

    def _hash_in_order(self):
        if self._whole is not None and self._buf_start == self._hashed_to:
            self._whole.update(self._buf)
            self._hashed_to += len(self._buf)
            if self._hashed_to == self.size and self._whole.digest() != self.manifest["digest"]:
                raise IntegrityError(f"{self.name!r} does not match its digest")

    def close(self):
        self._stream = None
        if not self.closed:
            self._list.close()
        super().close()


def checked_whole(manifest: dict, data) -> memoryview:
    """A small file's content, checked against its one chunk's digest (and that against the
    file digest)."""
    if not p.inline_ok(manifest, data):
        raise IntegrityError(
            f"{manifest['name']!r} does not match its digest; nothing was written, try again"
        )
    ChunkList(manifest, None)
    return data


def destination(dest: str) -> tuple:
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
def in_place(path: str):
    """``path`` (a device, a FIFO) opened for writing as ``cp`` opens it; an OS error (such
    as ENOSPC from /dev/full) becomes one clear :class:`FmsError`."""
    try:
        with open(path, "wb") as out:
            yield out
    except OSError as exc:
        raise FmsError(f"cannot write to {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_file(dest: str, manifest: dict, fsync: bool = False):
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


def write_whole(dest: str, manifest: dict, data, fsync: bool = False):
    """:func:`atomic_file` for content already in memory and verified (small files), in the
    fewest system calls: create, write, utime, close, rename."""
    tmp, fd = _create_temp(dest)
    try:
        try:
            _write_at(fd, data, 0)
            _finish(fd, manifest, fsync)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temp(dest: str) -> tuple:
    """``(path, fd)`` of a new temp file beside ``dest``, created with the umask's permissions
    like any new file (0666 & ~umask), O_EXCL so a name is never shared; pid and random part
    let `fms` tell its own leftovers."""
    folder = os.path.dirname(os.path.abspath(dest))
    # The destination's name cut to TEMP_NAME_BYTES, so that the temp name of any name the
    # file system takes (up to 255 bytes) is one it takes too.
    base = os.fsencode(os.path.basename(dest))[:TEMP_NAME_BYTES].decode("utf-8", "ignore")
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.fms-part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            return tmp, os.open(tmp, flags, 0o666)
    except OSError as exc:
        raise FmsError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def _finish(fd: int, manifest: dict, fsync: bool):
    if fsync:
        os.fsync(fd)
    os.utime(fd, (time.time(), manifest["mtime"]))


class Collect:
    """A stream that keeps what is written to it, as bytes, in ``parts``."""

    def __init__(self, parts):
        self.parts = parts

    def write(self, data):
        self.parts.append(bytes(data))
