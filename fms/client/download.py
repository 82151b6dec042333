"""Downloads: chunks fetched pipelined and verified one by one, written to a temp file beside
the destination and renamed into place only when complete and verified; many small files in
batches (``get_many``); and :class:`RemoteFile`, a seekable read-only stream of a stored file.

**One hash pass.**  Every chunk is checked against its digest in the manifest, and storage
checked those digests against the whole-file sha256 when it accepted the commit (it reads the
chunks back), so a file whose every chunk verifies is the file whose sha256 the manifest names:
the whole-file check is derived from the chunk checks rather than done as a second pass.
"""

import collections
import contextlib
import io
import os
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import zmq

from .. import wire as p
from ..errors import FmsError, IntegrityError
from .session import Progress, Session

if TYPE_CHECKING:
    from concurrent.futures import Future  # imported at run time only for large files

    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

VERIFY_THREADS = 2  # threads verifying and writing chunks while the next ones arrive
TEMP_NAME_BYTES = 200  # of a destination's name kept in its temp file's name


class Sink(Protocol):
    """Where :func:`download_chunks` writes a file's content, in order: a binary stream."""

    def write(self, data: p.BytesLike, /) -> object: ...


def chunk_fields(manifest: dict[str, Any], i: int) -> dict[str, Any]:
    """A ``chunk`` request's fields for chunk ``i``: its hash, and its length, so the broker
    reserves room for exactly that reply (without ``len`` it assumes the largest chunk)."""
    return {
        "hash": manifest["chunks"][i],
        "len": p.chunk_length(i, manifest["size"], manifest["chunk_size"]),
    }


def fetch_whole(
    session: Session, name: str, manifest: dict[str, Any], data: memoryview
) -> tuple[dict[str, Any], memoryview]:
    """The verified content of a small file that came with its manifest (``data``); if it does
    not match, asked once more from storage itself (``fresh``).  :return: (manifest, data)."""
    if len(data) == manifest["size"] and p.sha256(data) == manifest["sha256"]:
        return manifest, data
    with session.aside() as aside:
        header, frame = aside.call("get", name=name, fresh=True)
    manifest = p.check_manifest(header.get("manifest"))
    if frame is None:
        raise IntegrityError(f"{name!r} came without its content from storage; try again")
    return manifest, checked_whole(manifest, p.unpack_data(frame.buffer))


def download_chunks(
    session: Session,
    manifest: dict[str, Any],
    out: Sink,
    report: Progress,
    via: dict[str, Any] | None = None,
) -> None:
    """Fetch every chunk pipelined, verify each and write them in order to the stream ``out``;
    ``report(name, done, total)`` after each chunk; ``via``: see :func:`iter_chunks`."""
    done = 0
    for piece in iter_chunks(session, manifest, via=via):
        out.write(piece)
        done += len(piece)
        report(manifest["name"], done, manifest["size"])


def download_to_file(
    session: Session,
    manifest: dict[str, Any],
    out: BinaryIO,
    report: Progress,
    via: dict[str, Any] | None = None,
) -> None:
    """Fetch every chunk pipelined into the file ``out`` (open for writing, empty): while this
    thread receives, :data:`VERIFY_THREADS` threads check each chunk against its digest and
    write it at its offset (hashlib and ``os.pwrite`` release the GIL), so hashing, writing and
    receiving overlap.  Only verified bytes are written; a chunk that fails is fetched once
    more from storage itself.  ``report(name, done, total)`` as chunks land, in order.

    :raises IntegrityError: a chunk does not match its digest, also from storage.
    """
    from concurrent.futures import ThreadPoolExecutor  # not imported for small files

    out.flush()
    fd, chunk_size = out.fileno(), manifest["chunk_size"]
    window = session.data_window(chunk_size)
    requests = (
        (i, "chunk", {**chunk_fields(manifest, i), **(via or {})}, None)
        for i in range(len(manifest["chunks"]))
    )
    # (index, data, verified and written) in arrival order
    pending: collections.deque[tuple[int, memoryview, Future[bool]]] = collections.deque()
    done = 0
    with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="fms-verify") as pool:

        def settle() -> None:
            nonlocal done
            i, data, future = pending.popleft()
            if not future.result():
                _write_at(fd, _refetch(session, manifest, i), i * chunk_size)
            done += len(data)
            report(manifest["name"], done, manifest["size"])

        for i, _header, frame in session.pipeline(requests, window):
            data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
            pending.append((i, data, pool.submit(_verify_and_write, fd, manifest, i, data)))
            while pending and (len(pending) > window or pending[0][2].done()):
                settle()
        while pending:
            settle()


def _verify_and_write(fd: int, manifest: dict[str, Any], i: int, data: p.BytesLike) -> bool:
    """Write chunk ``i`` at its offset if it is what the manifest says.  :return: whether."""
    if not _chunk_ok(manifest, i, data):
        return False
    _write_at(fd, data, i * manifest["chunk_size"])
    return True


def _write_at(fd: int, data: p.BytesLike, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _chunk_ok(manifest: dict[str, Any], i: int, data: p.BytesLike) -> bool:
    return (
        len(data) == p.chunk_length(i, manifest["size"], manifest["chunk_size"])
        and p.sha256(data) == manifest["chunks"][i]
    )


def _refetch(session: Session, manifest: dict[str, Any], i: int) -> memoryview:
    """Chunk ``i`` once more, from storage itself (``fresh``: the broker bypasses the cache),
    verified.  :raises IntegrityError: it does not match either."""
    with session.aside() as aside:
        _, frame = aside.call("chunk", **chunk_fields(manifest, i), fresh=True)
    data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
    if not _chunk_ok(manifest, i, data):
        raise IntegrityError(
            f"chunk {i} of {manifest['name']!r} does not match its sha256, "
            f"also from storage; nothing was written, try again"
        )
    return data


def fetch_chunk(
    session: Session, manifest: dict[str, Any], i: int, via: dict[str, Any] | None = None
) -> memoryview:
    """Chunk ``i`` alone, verified (from storage itself if the first copy does not match)."""
    _, frame = session.call("chunk", **chunk_fields(manifest, i), **(via or {}))
    data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
    return data if _chunk_ok(manifest, i, data) else _refetch(session, manifest, i)


def iter_chunks(
    session: Session,
    manifest: dict[str, Any],
    start: int = 0,
    via: dict[str, Any] | None = None,
) -> Iterator[memoryview]:
    """Yield the chunks of ``manifest`` from index ``start`` on, in order, each verified;
    ``window`` requests stay in flight and out-of-order arrivals wait (at most ``window``).
    ``via``: fields of every chunk request: the GET they belong to (``of``), or ``fresh``
    (from storage); see fms.client.api.Client._chunk_fields.

    :raises IntegrityError: a chunk does not match its sha256.
    """
    chunks = manifest["chunks"]
    held: dict[int, memoryview] = {}  # chunks that came before the next one in order
    next_index = start
    requests = (
        (i, "chunk", {**chunk_fields(manifest, i), **(via or {})}, None)
        for i in range(start, len(chunks))
    )
    for i, _header, frame in session.pipeline(
        requests, session.data_window(manifest["chunk_size"])
    ):
        data = p.unpack_data(frame.buffer) if frame is not None else memoryview(b"")
        if not _chunk_ok(manifest, i, data):
            data = _refetch(session, manifest, i)
        held[i] = data
        while next_index in held:
            yield held.pop(next_index)
            next_index += 1


class RemoteFile(io.RawIOBase):
    """What :meth:`fms.Client.open` returns: read it like a local binary file."""

    def __init__(
        self,
        session: Session,
        manifest: dict[str, Any],
        inline_frame: zmq.Frame | None = None,
        via: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._session = session
        self._via = via
        self.manifest = manifest
        self.name = manifest["name"]
        self.size = manifest["size"]
        self._pos = 0
        self._buf = memoryview(b"")  # the current chunk, from offset _buf_start
        self._buf_start = 0
        self._stream: Iterator[memoryview] | None = None
        self._run = 0  # chunks read in order since the last jump
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
        chunk_size = self.manifest["chunk_size"]
        index = pos // chunk_size
        in_order = len(self._buf) and self._buf_start + len(self._buf) == index * chunk_size
        self._run = self._run + 1 if in_order else 0
        if (
            self._stream is None
            and in_order
            and (self._run >= 2 or want_end > (index + 1) * chunk_size)
        ):
            self._stream = iter_chunks(self._session, self.manifest, index, self._via)
        if self._stream is not None and in_order:
            self._buf = next(self._stream)
        else:
            self._stream = None
            self._buf = fetch_chunk(self._session, self.manifest, index, self._via)
        self._buf_start = index * chunk_size
        self._hash_in_order()

    def _hash_in_order(self) -> None:
        if self._buf_start == self._hashed_to:
            self._whole.update(self._buf)
            self._hashed_to += len(self._buf)
            if self._hashed_to == self.size and self._whole.digest() != self.manifest["sha256"]:
                raise IntegrityError(f"{self.name!r} does not match its sha256")

    def close(self) -> None:
        self._stream = None
        super().close()


def checked_whole(manifest: dict[str, Any], data: memoryview) -> memoryview:
    if len(data) != manifest["size"] or p.sha256(data) != manifest["sha256"]:
        raise IntegrityError(
            f"{manifest['name']!r} does not match its sha256; nothing was written, try again"
        )
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


def write_whole(
    dest: str, manifest: dict[str, Any], data: p.BytesLike, fsync: bool = False
) -> None:
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


def _create_temp(dest: str) -> tuple[str, int]:
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
