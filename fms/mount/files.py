"""A file open in the mount: its chunk table, the local spool of the chunks written, and the
commit that makes them a new version.

**The chunk table.**  A stored file is extents of chunks (docs/PROTOCOL.md, *Chunks*); an open
file keeps that shape: its extents and, per chunk, the digest of the stored chunk, or None for
a chunk written here (a *dirty* chunk, whose bytes are in the spool).  A write never moves a
chunk boundary: it dirties the chunks it touches (reading the stored chunk into the spool first
when it covers only part of it), so the commit uploads those chunks alone and lists every other
chunk by the digest it had: a random write to a large file costs the chunks it touched.  Only
the end moves: the last extent grows (its last chunk up to its chunk size, then new chunks) or
is cut (truncate).

**The spool** is one sparse local file per open file, laid out as the file itself (a dirty
chunk's bytes at its offset), so reads of dirty chunks are a ``pread``.  What all files hold
there is bounded (``--spool-size``): past it, a file's dirty chunks that are whole are uploaded
early (not committed) and dropped from the spool; they are then read back from the store.

**Commits** happen on ``flush`` (each ``close``) and ``fsync`` when the file is dirty: the dirty
chunks are hashed, the ones storage lacks uploaded, a long chunk list sent as pages, and one
``commit`` makes the new version, which other clients then see whole or not at all.  A small
file (one chunk of up to 128 KiB) travels with its commit: one round trip.
"""

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import wire as p
from ..client import download
from ..client.api import Client
from ..client.download import RemoteFile
from ..client.listing import zero_digest
from ..errors import FmsError, MissingChunks
from .pool import ClientPool

META_MTIME_NS = "fs.mtime_ns"  # an mtime set to the nanosecond (a version's mtime is a float)
UPLOAD_WINDOW = 8  # chunks in flight while a commit uploads them
AHEAD_THREADS = 2  # chunks hashed and sent at once while a file is still being written
COMMIT_TRIES = 3  # commits of a file whose chunks storage reports missing, in all


class Spool:
    """The mount's spool folder and its byte budget, shared by every open file."""

    def __init__(self, folder: str, limit: int):
        self.folder = folder
        self.limit = limit
        self.used = 0  # bytes of dirty chunks held, all files together
        self._lock = threading.Lock()
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # Chunks written whole are hashed and sent while the file is still being written
        # (write-behind), so a commit finds most of them stored already.
        self.ahead = ThreadPoolExecutor(AHEAD_THREADS, thread_name_prefix="fms-ahead")

    def open(self) -> int:
        """A new spool file, unlinked at once: nothing is left behind whatever happens."""
        fd = os.open(self.folder, os.O_TMPFILE | os.O_RDWR, 0o600)
        return fd

    def add(self, n: int) -> None:
        with self._lock:
            self.used += n

    @property
    def full(self) -> bool:
        return self.used > self.limit


class OpenFile:
    """One stored (or new) file open in this mount, shared by every handle open on it.

    :param name: its name in the store.
    :param manifest: the stored version's manifest (None: a new file).
    :param inline: the content of a small file that came with its manifest.
    """

    def __init__(
        self,
        name: str,
        manifest: dict | None,
        inline: bytes | None,
        spool: Spool,
        pool: ClientPool,
        chunk_size: int,
        meta: dict,
        mtime: float,
    ):
        self.name = name
        self.lock = threading.RLock()
        self.handles = 0
        self.unlinked = False  # removed while open: never committed
        # its last handle was released: a metadata change goes as for a closed file (FmsMount._set)
        self.released = False
        self.spool = spool
        self.pool = pool
        self.chunk_size = chunk_size
        self.meta = dict(meta)  # the version's metadata: mode, owner, what others stored
        self.mtime = mtime
        self.version = manifest["version"] if manifest else 0
        self.size = manifest["size"] if manifest else 0
        self.changed = manifest is None  # something to commit (a new file is, even empty)
        self._manifest = manifest
        self._inline = inline
        self._reader: RemoteFile | None = None
        self._reader_client: Client | None = None
        # The chunk table, made on the first change (a file only read never builds it).
        self._extents: list[list[int]] | None = None if manifest else []
        self._digests: list[bytes | None] = []
        self._starts: list[int] = []  # first chunk of each extent
        self._offsets: list[int] = []  # first byte of each extent
        self._spool_fd = -1
        self._spooled = 0  # dirty bytes this file holds in the spool
        self._unloaded: set[int] = set()  # chunks uploaded early and dropped from the spool
        self._gen: dict[int, int] = {}  # chunk -> writes to it so far (a write-behind's check)
        self._ahead: dict[int, tuple[int, Future]] = {}  # chunk -> (its gen, its upload)

    # --- the chunk table ---

    def _table(self) -> None:
        """Build the chunk table from the stored version's chunk list (once)."""
        if self._extents is not None:
            return
        assert self._manifest is not None
        with self.pool.client() as client:
            listing = download.chunk_list(client.session, self._manifest)
            with contextlib.closing(listing):
                self._extents = [[cs, size] for cs, size in listing.extents]
                self._digests = [d for _i, _o, _n, d, _z in listing.items()]
        self._layout()

    def _layout(self) -> None:
        assert self._extents is not None
        self._starts, self._offsets = [], []
        index = offset = 0
        for chunk_size, size in self._extents:
            self._starts.append(index)
            self._offsets.append(offset)
            index += -(-size // chunk_size)
            offset += size

    def _chunk(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``i``."""
        assert self._extents is not None
        e = _last_at_most(self._starts, i)
        chunk_size, size = self._extents[e]
        j = i - self._starts[e]
        return self._offsets[e] + j * chunk_size, min(chunk_size, size - j * chunk_size)

    def _index_at(self, offset: int) -> int:
        assert self._extents is not None
        e = _last_at_most(self._offsets, offset)
        return self._starts[e] + (offset - self._offsets[e]) // self._extents[e][0]

    # --- reads ---

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            end = min(self.size, offset + size)
            if offset >= end:
                return b""
            if self._extents is None or None not in self._digests:
                return self._read_stored(offset, end)
            out = bytearray()
            at = offset
            while at < end:  # runs of dirty chunks from the spool, of stored ones as one read
                i = self._index_at(at)
                dirty = self._digests[i] is None
                stop = sum(self._chunk(i))
                while stop < end and (self._digests[i + 1] is None) == dirty:
                    i += 1
                    stop = sum(self._chunk(i))
                stop = min(stop, end)
                if dirty:
                    out += os.pread(self._spool_fd, stop - at, at).ljust(stop - at, b"\0")
                else:
                    out += self._read_stored(at, stop)
                at = stop
            return bytes(out)

    def _read_stored(self, offset: int, end: int) -> bytes:
        """Bytes of the stored content (chunks not written here), from the cache tier: a
        ranged read fetches the chunks that hold them, reading on in order streams ahead
        (:class:`fms.client.download.RemoteFile`)."""
        if self._inline is not None:  # a small file, whole in memory
            return self._inline[offset:end]
        reader = self._stored()
        reader.seek(offset)
        return reader.read(end - offset)

    def _stored(self) -> RemoteFile:
        if self._reader is None:
            if self._extents is None:  # not written to: the stored version as it is
                assert self._manifest is not None
                manifest = self._manifest
            else:
                manifest = self._table_manifest()
            client = self.pool.factory()  # a connection of its own: it streams
            try:
                self._reader = RemoteFile(client.session, manifest)
            except BaseException:
                client.close()
                raise
            self._reader_client = client
        return self._reader

    def _table_manifest(self) -> dict:
        """The chunk table as a manifest (every digest listed) for reading the stored chunks;
        the dirty ones are never read through it."""
        assert self._extents is not None
        digests = [d if d is not None else bytes(p.HASH_LEN) for d in self._digests]
        extents = [(e[0], e[1]) for e in self._extents]
        return {
            "name": self.name,
            "size": self.size,
            "count": len(digests),
            "digest_kind": p.DIGEST_CONTENT,  # not checked: the chunks are, one by one
            "digest": bytes(p.HASH_LEN),
            "extents": p.pack_extents(extents),
            "chunks": digests,
            "chunk_size": extents[0][0] if extents else 0,
            "mtime": self.mtime,
            "version": max(1, self.version),
            "digest_fn": self.pool.digest_fn(),  # what each chunk is checked with
        }

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._reader_client is not None:
            self._reader_client.close()
            self._reader_client = None

    # --- changes ---

    def write(self, offset: int, data: bytes) -> int:
        with self.lock:
            self._table()
            end = offset + len(data)
            if end > self.size:
                self._grow(end)
            i = self._index_at(offset)
            while i < len(self._digests):
                start, length = self._chunk(i)
                if start >= end:
                    break
                if self._digests[i] is not None:
                    whole = offset <= start and start + length <= end
                    self._dirty(i, fill=not whole)
                i += 1
            _write_all(self._spool_fd, data, offset)
            self._behind(self._index_at(offset), end)
            self.mtime = time.time()
            self.meta.pop(META_MTIME_NS, None)
            self.changed = True
            if self.spool.full:
                self._unload()
            return len(data)

    def _behind(self, first: int, end: int) -> None:
        """Chunks ``first`` on were written up to byte ``end``: each counts one more write, and
        each written to its end (but the file's last, which may grow) is hashed and sent now,
        in the background; the commit uses what it sent if the chunk was not written since."""
        last = len(self._digests) - 1
        i = first
        while i <= last:
            start, length = self._chunk(i)
            if start >= end:
                break
            gen = self._gen[i] = self._gen.get(i, 0) + 1
            if start + length <= end and i != last:
                job = self.spool.ahead.submit(self._send_ahead, start, length)
                self._ahead[i] = (gen, job)
            i += 1

    def _send_ahead(self, start: int, length: int) -> bytes:
        frame, view = _frame_at(self._spool_fd, start, length)
        digest = self.pool.hasher()(view)
        with self.pool.client() as client:
            client.call("put_chunk", data=frame, hash=digest)
        return digest

    def _settle_ahead(self) -> dict[int, bytes]:
        """Wait for the uploads sent ahead; :return: the digests of those still valid (their
        chunk not written since), by chunk."""
        done = {}
        for i, (gen, job) in self._ahead.items():
            try:
                digest = job.result()
            except (FmsError, OSError):
                continue  # sent again with the commit, which reports what fails
            if self._gen.get(i) == gen and i < len(self._digests) and self._digests[i] is None:
                done[i] = digest
        self._ahead.clear()
        return done

    def truncate(self, size: int) -> None:
        with self.lock:
            if size == self.size and self._extents is not None:
                return
            self._table()
            if size > self.size:
                self._grow(size)
            elif size < self.size:
                self._shrink(size)
            for i in self._ahead:  # their lengths may have changed: sent again if dirty
                self._gen[i] = self._gen.get(i, 0) + 1
            self.mtime = time.time()
            self.meta.pop(META_MTIME_NS, None)
            self.changed = True

    def _spool(self) -> int:
        if self._spool_fd < 0:
            self._spool_fd = self.spool.open()
        return self._spool_fd

    def _dirty(self, i: int, fill: bool, length: int | None = None) -> None:
        """Chunk ``i`` is about to change: with ``fill``, its stored bytes (the first
        ``length`` of them) go to the spool first, so the bytes a write leaves alone stay."""
        fd = self._spool()
        digest = self._digests[i]
        start, full = self._chunk(i)
        self._gen[i] = self._gen.get(i, 0) + 1
        if fill and digest is not None:
            n = full if length is None else length
            if digest != zero_digest(full, self.pool.hasher()):
                piece = self._stored_chunk(i, start, full)
                _write_all(fd, memoryview(piece)[:n], start)
        self._digests[i] = None
        self._spooled += full
        self.spool.add(full)

    def _stored_chunk(self, i: int, start: int, length: int) -> bytes:
        digest = self._digests[i]
        assert digest is not None
        if self._inline is not None:  # a small file: its one chunk is in memory
            return self._inline
        listing = download.FileOf(self.name, self.pool.hasher())
        with self.pool.client() as client:
            return bytes(download.fetch_chunk(client.session, listing, digest, length))

    def _grow(self, size: int) -> None:
        """The file grows to ``size``: its last extent grows (zeros), its last chunk first up
        to the extent's chunk size; a new file gets one extent in this mount's chunk size."""
        assert self._extents is not None
        old = self.size
        if not self._extents:
            self._extents.append([self.chunk_size, size])
        else:
            last = len(self._digests) - 1
            length = self._chunk(last)[1]
            if self._digests[last] is not None and length < self._extents[-1][0]:
                self._dirty(last, fill=True)  # its stored bytes stay, zeros follow
            self._extents[-1][1] += size - old
        self._layout()
        count = self._starts[-1] + -(-self._extents[-1][1] // self._extents[-1][0])
        added = count - len(self._digests)
        self._digests.extend([None] * added)
        self._spooled += size - old
        self.spool.add(size - old)
        os.ftruncate(self._spool(), size)
        self.size = size

    def _shrink(self, size: int) -> None:
        """The file is cut to ``size``: the chunk it now ends in is cut (its stored bytes
        before the cut kept), every chunk after it dropped."""
        assert self._extents is not None
        if size == 0:
            self._extents, self._digests = [], []
        else:
            i = self._index_at(size - 1)
            start, length = self._chunk(i)
            if size - start < length and self._digests[i] is not None:
                self._dirty(i, fill=True, length=size - start)
            e = _last_at_most(self._starts, i)
            del self._extents[e + 1 :]
            self._extents[e][1] = size - self._offsets[e]
            del self._digests[i + 1 :]
        self._layout()
        os.ftruncate(self._spool(), size)
        self.size = size

    def _unload(self) -> None:
        """The spool is over its budget: upload this file's dirty chunks that are whole (all
        but the last), not committing them, and free their room in the spool."""
        last = len(self._digests) - 1
        todo = [i for i, d in enumerate(self._digests) if d is None and i != last]
        if not todo:
            return
        done = self._upload(todo)
        self._drop_reader()  # it knew these chunks as dirty
        for i, digest in done.items():
            self._unloaded.add(i)
            start, length = self._chunk(i)
            self._digests[i] = digest
            _punch(self._spool_fd, start, length)
            self._spooled -= length
            self.spool.add(-length)

    def _upload(self, todo: list[int]) -> dict[int, bytes]:
        """Hash the dirty chunks ``todo`` and upload those storage lacks, reading each from the
        spool once to hash it and once more to send it (memory: the chunks in flight).
        :return: their digests, by index."""
        hash_fn = self.pool.hasher()  # the store's digest function
        digests = {i: hash_fn(_frame_at(self._spool_fd, *self._chunk(i))[1]) for i in todo}
        distinct = list(dict.fromkeys(digests.values()))
        with self.pool.client() as client:
            missing = set()
            for at in range(0, len(distinct), p.MAX_HAVE_BATCH):
                header, _ = client.call("have", hashes=distinct[at : at + p.MAX_HAVE_BATCH])
                missing.update(header["missing"])

            def requests() -> Iterator[tuple[int, str, dict[str, Any], bytearray]]:
                sent = set()
                for i in todo:
                    if digests[i] in missing and digests[i] not in sent:
                        sent.add(digests[i])
                        frame = _frame_at(self._spool_fd, *self._chunk(i))[0]
                        yield i, "put_chunk", {"hash": digests[i]}, frame

            window = client.session.data_window(max(cs for cs, _ in self._extents or [[1]]))
            for _ in client.session.pipeline(requests(), min(window, UPLOAD_WINDOW)):
                pass
        return digests

    def hand_over(self) -> tuple[bytes, int] | None:
        """For ``--writeback``: the content of a changed file of one small chunk (and its chunk
        size), which the caller commits later; the file counts as committed from now on (its
        bytes stay readable here).  None: not such a file."""
        with self.lock:
            if not self.changed or self.unlinked:
                return None
            self._table()
            assert self._extents is not None
            if len(self._digests) > 1 or self.size > p.INLINE_MAX:
                return None
            content = self.read(0, self.size)
            self.changed = False
            return content, self._extents[0][0] if self._extents else self.chunk_size

    def commit(self) -> dict | None:
        """Make what was written here the file's new version, if anything was.  :return: the
        new version's stat, or None (nothing to commit, or the file was removed)."""
        with self.lock:
            if not self.changed or self.unlinked:
                return None
            self._table()
            for i, digest in self._settle_ahead().items():
                self._digests[i] = digest
            dirty = [i for i, d in enumerate(self._digests) if d is None]
            inline = None
            if len(self._digests) == 1 and self.size <= p.INLINE_MAX:
                inline = self.read(0, self.size) if dirty else None
            if inline is not None:
                self._digests[0] = self.pool.hasher()(inline)
            elif dirty:
                for i, digest in self._upload(dirty).items():
                    self._digests[i] = digest
            stat = self._send_commit(inline)
            self._clean()
            self.version = stat["version"]
            return stat

    def _send_commit(self, inline: bytes | None) -> dict:
        assert self._extents is not None
        extents = _merged(self._extents)
        digests = [d for d in self._digests if d is not None]
        fields: dict = {
            "name": self.name,
            "extents": p.pack_extents(extents),
            "mtime": self.mtime,
            "commit": os.urandom(16).hex(),
        }
        if self.meta:
            fields["meta"] = self.meta
        hash_fn = self.pool.hasher()  # the store's digest function
        with self.pool.client() as client:
            for attempt in range(COMMIT_TRIES):
                try:
                    if len(digests) <= p.INLINE_CHUNKS:
                        fields["chunks"] = digests
                        fields["digest"] = p.inline_digest(extents, digests, hash_fn)
                    else:
                        pages = [p.join_digests(page) for page in p.pages_of(extents, digests)]
                        ids = [hash_fn(page) for page in pages]
                        unique = dict(zip(ids, pages, strict=True))
                        requests = [
                            (pid, "put_page", {"hash": pid}, p.pack_data(page))
                            for pid, page in unique.items()
                        ]
                        for _ in client.session.pipeline(requests, UPLOAD_WINDOW):
                            pass
                        fields["pages"] = ids
                        fields["digest"] = p.tree_digest(extents, ids, hash_fn)
                    data = p.pack_data(inline) if inline is not None else None
                    header, _ = client.call("commit", data=data, **fields)
                    return header["stat"]
                except MissingChunks as exc:
                    # Collected since `have` said it held them: send what the spool still has.
                    if attempt == COMMIT_TRIES - 1 or not self._resend(client, set(exc.missing)):
                        raise
        raise FmsError("unreachable")

    def _resend(self, client: Client, missing: set) -> bool:
        """Upload chunks of this file that storage lost, from the spool.  :return: whether
        every one of them could be sent."""
        sent = set()
        for i, digest in enumerate(self._digests):
            if digest in missing and digest not in sent and self._in_spool(i):
                start, length = self._chunk(i)
                frame = _frame_at(self._spool_fd, start, length)[0]
                client.call("put_chunk", data=frame, hash=digest)
                sent.add(digest)
        return bool(sent)

    def _in_spool(self, i: int) -> bool:
        """Whether chunk ``i``'s bytes are in the spool (written here, not uploaded early)."""
        return self._spool_fd >= 0 and i not in self._unloaded

    def _clean(self) -> None:
        """After a commit: every chunk is stored, the spool is emptied, and reads go to the
        store through the new chunk table."""
        self.changed = False
        self._settle_ahead()  # none reads the spool any more
        self._gen.clear()
        if self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1
        self.spool.add(-self._spooled)
        self._spooled = 0
        self._unloaded.clear()
        self._drop_reader()
        self._inline = None
        self._manifest = None

    def close(self) -> None:
        """The last handle is gone: free the spool and the reader."""
        with self.lock:
            self._drop_reader()
            self._settle_ahead()  # none reads the spool any more
            if self._spool_fd >= 0:
                os.close(self._spool_fd)
                self._spool_fd = -1
            self.spool.add(-self._spooled)
            self._spooled = 0


def _merged(extents: list[list[int]]) -> list[tuple[int, int]]:
    """Extents as stored: an extent that holds only whole chunks and the next one of the same
    chunk size are one extent (the same chunks, fewer extents)."""
    out: list[list[int]] = []
    for chunk_size, size in extents:
        if out and out[-1][0] == chunk_size and out[-1][1] % chunk_size == 0:
            out[-1][1] += size
        else:
            out.append([chunk_size, size])
    return [(cs, size) for cs, size in out]


def _last_at_most(starts: list[int], value: int) -> int:
    import bisect

    return bisect.bisect_right(starts, value) - 1


def _write_all(fd: int, data: p.BytesLike, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _frame_at(fd: int, offset: int, length: int) -> tuple[bytearray, memoryview]:
    """Bytes ``offset`` to ``offset + length`` of the spool as a data frame (a hole reads as
    zeros)."""
    frame = p.data_buffer(length)
    view = memoryview(frame)[p.DATA_PREFIX_LEN :]
    got = os.preadv(fd, [view], offset) if length else 0
    if got < length:
        view[got:] = bytes(length - got)
    return frame, view


def _punch(fd: int, offset: int, length: int) -> None:
    """Free the spool's room for bytes now stored (a hole: reads give zeros); a file system
    without holes keeps the bytes, and only room is lost."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    keep_size, punch_hole = 0x01, 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    libc.fallocate(fd, keep_size | punch_hole, ctypes.c_long(offset), ctypes.c_long(length))
