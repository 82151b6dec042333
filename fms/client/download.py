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
from collections.abc import Iterator
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
    if small_ok(manifest, data):
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
    if not small_ok(manifest, data):
        raise IntegrityError(
            f"{manifest['name']!r} does not match its digest; nothing was written, try again"
        )
    return data


def destination(dest: str) -> tuple[str, bool]:
    """Where a download to ``dest`` goes, as ``cp`` would write it: through a symlink to its
    target (the link stays a link), and into a destination that is not a regular file (a
    device, a FIFO, an open file named by /dev/stdout or /dev/fd/N) as it is, never replacing
    it.

    :return: ``(path, in_place)``: ``in_place`` means write into ``path`` as a stream (it cannot
        be replaced atomically); otherwise ``path`` is a regular file or a new path, replaced
        by :func:`atomic_file`.
    :raises FmsError: ``dest`` is a folder.
    """
    if _own_fd(dest) is not None:  # /dev/stdout, /dev/fd/N: a file this process holds open
        return dest, True
    path = dest
    try:
        mode = os.lstat(path).st_mode  # one system call for a new name, the common case
        if stat.S_ISLNK(mode):
            path = os.path.realpath(dest)
            if path.startswith("/proc/"):
                # an open file of some process (/proc/PID/fd/N), which may be a pipe (its link
                # names no path): written into through the link, as cp does
                return dest, True
            mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return path, False
    except OSError as exc:  # a name too long for the file system, a folder we may not enter
        raise FmsError(f"cannot write to {dest}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise FmsError(f"{dest} is a folder; name a file inside it")
    return path, not stat.S_ISREG(mode)


# This process's own open files by name: written through the descriptor itself
OWN_FDS = {"/dev/stdout": 1, "/dev/stderr": 2}
OWN_FD_FOLDERS = ("/dev/fd/", "/proc/self/fd/")


def _own_fd(path: str) -> int | None:
    """The descriptor ``path`` names in this process (/dev/stdout, /dev/fd/N), or None."""
    if path in OWN_FDS:
        return OWN_FDS[path]
    for folder in OWN_FD_FOLDERS:
        if path.startswith(folder) and path[len(folder) :].isdigit():
            return int(path[len(folder) :])
    return None


@contextlib.contextmanager
def in_place(path: str) -> Iterator[BinaryIO]:
    """``path`` (a device, a FIFO) opened for writing as ``cp`` opens it, or, for one of this
    process's open files (``/dev/stdout``, ``/dev/fd/N``), that file as it is open, as a shell's
    ``>`` or ``>>`` opened it (not truncated: written at its offset, as ``cat`` writes); an OS
    error (such as ENOSPC from /dev/full) becomes one clear :class:`FmsError`."""
    fd = _own_fd(path)
    try:
        with open(path, "wb") if fd is None else open(os.dup(fd), "wb") as out:
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


def write_small(
    session: Session, dest: str, manifest: dict[str, Any], data: p.BytesLike, fsync: bool = False
) -> dict[str, Any]:
    """Write a small file whose content came with its manifest (``get_many``) to ``dest`` as
    :meth:`fms.Client.get` would (through a symlink, into a device: :func:`destination`), once
    it is what ``manifest`` says; a copy that is not is asked once more from storage itself.

    Written on the caller's thread, as each batch arrives: the next batches are on their way
    meanwhile (ZeroMQ receives on a thread of its own), and the file system's work on a small
    file (create, write, link) is a few system calls, so writer threads would cost more in
    hand-offs and in the interpreter's lock than they could overlap.

    :return: the manifest of what was written.
    """
    if not small_ok(manifest, data):  # not what its manifest says: from storage itself
        manifest, data = fetch_whole(session, manifest["name"], manifest, b"")
    path, stream = destination(dest)
    if stream:
        with in_place(path) as out:
            out.write(data)
    else:
        write_whole(path, manifest, data, fsync)
    return manifest


def small_ok(manifest: dict[str, Any], data: p.BytesLike | None) -> bool:
    """Whether ``data`` is the whole content of the file ``manifest`` describes, its one chunk
    (:func:`fms.wire.inline_ok`), once the chunk list is checked against the file digest as
    :class:`~fms.client.listing.ChunkList` checks it (:func:`fms.wire.one_chunk_digest`: a
    download of many small files checks thousands).

    :raises IntegrityError: the list does not give the file digest (a damaged manifest).
    """
    hash_fn = p.manifest_hasher(manifest)
    if not p.inline_ok(manifest, data, hash_fn):
        return False
    if "chunks" not in manifest or manifest["count"] != 1:
        ChunkList(manifest, None)
    elif manifest["digest_kind"] == p.DIGEST_TREE and manifest["digest"] != p.one_chunk_digest(
        manifest["extents"], manifest["chunks"][0], hash_fn
    ):
        raise IntegrityError(
            f"the manifest of {manifest['name']!r} is damaged: its chunk list does not give "
            f"its digest; try again"
        )
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


PROC_FDS = "/proc/self/fd"  # a process's open files by number: how an unnamed file is linked
# Whether unnamed files can be made and linked on this machine (None until tried), and the
# folder PROC_FDS open (``fds``) in the process that opened it (``pid``).
_unnamed: dict[str, Any] = {"works": None, "fds": None, "pid": None}


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
    """Name the unnamed file ``fd`` ``dest``, as open(2) shows it done: ``linkat`` of its
    entry in :data:`PROC_FDS`, followed (``AT_SYMLINK_FOLLOW``), which needs no privilege
    (``AT_EMPTY_PATH`` did before Linux 6.10) and no ctypes.  What is there is replaced by
    way of a temp name and a rename (``linkat`` does not replace).  :return: False if this
    machine will not link it (no /proc; then nothing was done)."""
    fds = _proc_fds()
    if fds is None:
        return False
    at = dest
    while True:
        try:
            # A folder descriptor makes os.link call linkat(2), which follows the entry.
            os.link(str(fd), at, src_dir_fd=fds)
        except FileExistsError:
            at = _temp_name(dest)
            continue
        except OSError as exc:
            if _unnamed["works"] is None and exc.errno in (errno.EPERM, errno.EXDEV):
                _unnamed["works"] = False  # a sandbox that will not have it
                return False
            raise FmsError(f"cannot write to {dest}: {exc.strerror or exc}") from None
        _unnamed["works"] = True
        if at != dest:
            _replace(at, dest)
        return True


def _proc_fds() -> int | None:
    """:data:`PROC_FDS` open as a folder, in this process (opened again after a fork: the
    folder is the opener's), or None where there is no /proc."""
    if _unnamed["pid"] != os.getpid():
        try:
            fds = os.open(PROC_FDS, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            _unnamed["works"] = False
            return None
        _unnamed["fds"], _unnamed["pid"] = fds, os.getpid()
    return _unnamed["fds"]


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
