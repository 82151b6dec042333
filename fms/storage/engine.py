"""The storage engine: commit, remove, read and list over a metadata engine and a chunk backend.

It checks everything it stores (invariant 3): a commit's chunks must be in the store with the
sizes the file's shape needs, and their concatenation must hash to the file's sha256, read back
from what the store holds.  Small chunks (up to :data:`SMALL_CHUNK_MAX`) are kept in the
metadata engine itself, so a small file costs one transaction and no file of its own.
"""

import builtins
import errno
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from .. import wire as p
from ..errors import BadRequest, FmsError, IntegrityError, MissingChunks, NoSpace, NotFound
from .chunks.base import ChunkBackend
from .chunks.localdir import LocalDirChunks
from .meta.base import ChunkRow, MetaEngine
from .model import Change, Copy, NewVersion, Removal, Restore, Totals, Version

T = TypeVar("T")

SMALL_CHUNK_MAX = 64 * p.KiB  # chunks up to this size live in the metadata engine
FOLDER_END = "\U0010ffff"  # after a folder's name: sorts after every name inside it
META_FILE = "meta.db"

log = logging.getLogger("fms.storage")


class StoreError(FmsError):
    """The data directory or the metadata database cannot be used."""


class Store:
    """A store: a :class:`MetaEngine` for names and references, a :class:`ChunkBackend` for
    the bytes of chunks over :data:`SMALL_CHUNK_MAX`.  (``builtins.list`` in the annotations:
    ``list`` is also a method here.)"""

    def __init__(self, meta: MetaEngine, chunks: ChunkBackend, keep_versions: int = 0) -> None:
        self.meta = meta
        self.chunks = chunks
        meta.keep_versions = keep_versions

    @property
    def store_id(self) -> str:
        return self.meta.store_id

    def close(self) -> None:
        self.meta.close()

    # --- reads ---

    def version(self, name: str) -> Version:
        """:raises NotFound: no file by that name."""
        found = self.meta.get(name)
        if found is None:
            raise NotFound(f"{name!r} not found; see what is stored with: ls")
        return found

    def list(self, prefix: str, after: str, limit: int) -> builtins.list[Version]:
        return self.meta.list(prefix, after, limit)

    def versions(self, name: str) -> builtins.list[Version]:
        """The current version of ``name`` (if it is live) and its retained ones, newest first.

        :raises NotFound: neither.
        """
        found = ([current] if (current := self.meta.get(name)) else []) + self.meta.retained(name)
        if not found:
            raise NotFound(
                f"{name!r} not found, and no version of it is retained; see what is stored with: ls"
            )
        return found

    def retained_version(self, name: str, version: int) -> Version:
        """Version ``version`` of ``name``, current or retained.  :raises NotFound:"""
        for found in self.versions(name):
            if found.version == version:
                return found
        raise NotFound(f"{name!r} has no version {version}; list them with: versions {name}")

    def totals(self) -> Totals:
        return self.meta.totals()

    def usage(self, prefix: str) -> tuple[int, int]:
        """``(files, bytes)`` under ``prefix``: the totals for the whole store, else counted in
        the name index."""
        if not prefix:
            totals = self.meta.totals()
            return totals.files, totals.bytes
        return self.meta.usage(prefix)

    def list_folder(
        self, prefix: str, after: str, limit: int
    ) -> tuple[builtins.list[Version], builtins.list[str], str | None]:
        """One level under ``prefix``, like ``aws s3 ls``: the files directly in it and its
        sub-folders (``prefix`` + up to the next ``/``), each folder once, in name order; a
        folder is skipped over in the index, not read name by name.

        :return: ``(entries, folders, next)``: up to ``limit`` items in all; ``next`` is the
            cursor to send as ``after`` for the next page, None when done.
        """
        entries: builtins.list[Version] = []
        folders: builtins.list[str] = []
        while len(entries) + len(folders) < limit:
            page = self.meta.list(prefix, after, limit - len(entries) - len(folders))
            if not page:
                return entries, folders, None
            for version in page:
                slash = version.name.find("/", len(prefix))
                if slash < 0:
                    entries.append(version)
                    after = version.name
                    continue
                folder = version.name[: slash + 1]
                if not folders or folders[-1] != folder:
                    folders.append(folder)
                after = folder + FOLDER_END  # past every name in the folder
                break
        return entries, folders, after

    def read_chunk(self, digest: p.Digest) -> bytearray:
        """A chunk as a data frame, verified against its digest.

        :raises NotFound: no such chunk.
        :raises IntegrityError: the stored bytes do not match; a blob is set aside, so the next
            upload of the same content restores it.
        """
        row = self.meta.chunk(digest)
        if row is not None and row.data is not None:  # in the engine
            frame = p.pack_data(row.data)
            if p.sha256(row.data) != digest:
                raise IntegrityError(
                    f"chunk {digest.hex()[:16]} is corrupt in the metadata "
                    f"database; upload the file again to restore it"
                )
            return frame
        frame = self.chunks.get(digest)
        if p.sha256(memoryview(frame)[p.DATA_PREFIX_LEN :]) != digest:
            self.chunks.quarantine(digest)
            raise IntegrityError(
                f"chunk {digest.hex()[:16]} is corrupt on storage disk; "
                f"it was set aside, upload the file again to restore it"
            )
        return frame

    # --- writes ---

    def missing(self, digests: Sequence[p.Digest]) -> builtins.list[p.Digest]:
        """The digests among ``digests`` that must be uploaded; the others are protected from
        collection for the grace period (a commit naming them is on its way)."""
        known = self.meta.known(digests, time.time())
        return [d for d in digests if d not in known]

    def put_chunk(self, digest: p.Digest, data: p.BytesLike) -> bool:
        """Store a chunk after checking it against its digest.  :return: True if written.

        :raises IntegrityError: the data does not hash to ``digest``.
        """
        if p.sha256(data) != digest:
            raise IntegrityError(
                f"chunk {digest.hex()[:16]} does not match its sha256; "
                f"it was damaged in transit, upload it again"
            )
        small = len(data) <= SMALL_CHUNK_MAX
        # The row first: from then on the collector leaves the chunk alone for the grace period,
        # so the blob written next cannot be deleted under a commit that relies on it.
        if self.meta.claim_chunk(digest, len(data), time.time(), bytes(data) if small else None):
            return True
        return self.chunks.put(digest, data)

    def commit(self, change: NewVersion, inline: bytes | None = None) -> Version:
        """One commit; see :meth:`apply`.  :raises FmsError: it was refused."""
        return _raise_or(self.apply([(change, inline)])[0])

    def remove(self, name: str, rm_id: str) -> Version:
        """Remove a name (idempotent by ``rm_id``).  :return: its tombstone."""
        return _raise_or(self.apply([(Removal(name, rm_id), None)])[0])

    def copy(self, src: str, dst: str, commit: str, move: bool = False) -> Version:
        """Give ``dst`` the content of ``src`` (metadata only; idempotent by ``commit``); with
        ``move``, remove ``src`` in the same transaction.  :return: ``dst``'s new version."""
        return _raise_or(self.apply([(Copy(src, dst, commit, move), None)])[0])

    def restore(self, name: str, version: int | None, commit: str) -> Version:
        """Make a retained version current again (None: the newest); see :class:`Restore`."""
        return _raise_or(self.apply([(Restore(name, version, commit), None)])[0])

    def remove_prefix(
        self, prefix: str, limit: int, name_bytes: int
    ) -> tuple[builtins.list[Version], bool]:
        """Remove up to ``limit`` names starting with ``prefix``, whose names add up to at most
        ``name_bytes`` (in UTF-8: the list the broker is told to invalidate), in one
        transaction.

        :return: ``(tombstones, more)``: more names remain under ``prefix``.
        """
        page = self.meta.list(prefix, "", limit + 1)
        take: builtins.list[Version] = []
        total = 0
        for version in page[:limit]:
            total += len(version.name.encode())
            if take and total > name_bytes:
                break
            take.append(version)
        changes = [Removal(v.name, uuid.uuid4().hex) for v in take]
        results = self.meta.apply(changes, time.time(), {}) if changes else []
        # A name removed by someone else meanwhile is not an error of this request.
        return [r for r in results if isinstance(r, Version)], len(page) > len(take)

    def apply(
        self, requests: Sequence[tuple[Change, bytes | None]]
    ) -> builtins.list[Version | FmsError]:
        """Apply ``(change, inline bytes or None)`` pairs: each commit is checked against the
        stored chunks, then every change that passed is made in one transaction.

        :return: per request, the :class:`Version` made or the :class:`FmsError` refusing it.
        """
        results: dict[int, Version | FmsError] = {}  # by index in requests
        changes: builtins.list[Change] = []
        where: builtins.list[int] = []  # each change's index in requests
        small: dict[p.Digest, bytes] = {}  # small chunks' bytes, sent inline
        for i, (change, inline) in enumerate(requests):
            try:
                if isinstance(change, NewVersion):
                    small_bytes = self._check(change, inline)
                    if small_bytes is not None:
                        small[change.chunks[0]] = small_bytes
            except FmsError as exc:
                results[i] = exc
                continue
            except OSError as exc:  # this commit's disk trouble is not the others'
                results[i] = os_failure(exc)
                continue
            changes.append(change)
            where.append(i)
        if changes:
            if any(isinstance(c, NewVersion) and c.size > SMALL_CHUNK_MAX for c in changes):
                try:
                    self.chunks.sync()  # the blobs these commits name, on disk before they are
                except OSError as exc:
                    failure = os_failure(exc)
                    for i in where:
                        results[i] = failure
                    return [results[i] for i in range(len(requests))]
            for i, result in zip(where, self.meta.apply(changes, time.time(), small), strict=False):
                results[i] = result
        return [results[i] for i in range(len(requests))]

    def _check(self, change: NewVersion, inline: bytes | None) -> bytes | None:
        """Check a commit against its shape and the stored chunks.

        :return: the bytes of a small chunk to keep in the metadata engine (sent inline), or None.
        """
        count = p.chunk_count(change.size, change.chunk_size)
        if len(change.chunks) != count:
            raise BadRequest(
                f"a {change.size}-byte file in {change.chunk_size}-byte chunks has "
                f"{count} chunks, the commit lists {len(change.chunks)}"
            )
        if count == 0:
            if change.sha256 != p.sha256(b""):
                raise IntegrityError("an empty file's sha256 must be that of no bytes")
            return None
        if count == 1 and change.sha256 != change.chunks[0]:
            raise IntegrityError("a one-chunk file's sha256 must equal its chunk's")
        if inline is not None:
            if not p.travels_inline(change.size, count):
                raise BadRequest(
                    f"inline data is only for one-chunk files of at most {p.INLINE_MAX} bytes"
                )
            if len(inline) != change.size or p.sha256(inline) != change.sha256:
                raise IntegrityError(
                    "the inline content does not match the commit's size and "
                    "sha256; it was damaged in transit, upload it again"
                )
            if len(inline) <= SMALL_CHUNK_MAX:
                return inline
            self.put_chunk(change.sha256, inline)
            return None
        rows = self._check_sizes(change, blobs=False)  # the read-back finds absent blobs
        # One hash pass over what is stored: the whole-file sha256 covers every chunk's bytes, so
        # chunks are verified one by one only when it fails, to tell a damaged chunk (set aside,
        # and uploaded again by the client) from a wrong sha256 in the commit.  One-chunk files
        # too: blobs are not fsync'd one by one but once per commit (apply), so a blob written
        # before a power loss may be damaged, and this is where that is found.
        whole = hashlib.sha256()
        try:
            for digest, row in zip(change.chunks, rows, strict=False):
                whole.update(self._stored_bytes(digest, row))
        except NotFound:
            raise MissingChunks.absent(
                change.name, [d for d in change.chunks if not self._present(self.meta.chunk(d), d)]
            ) from None
        if whole.digest() == change.sha256:
            return None
        damaged: builtins.list[p.Digest] = []
        for digest in dict.fromkeys(change.chunks):
            try:
                self.read_chunk(digest)
            except IntegrityError:
                damaged.append(digest)
        if damaged:
            raise MissingChunks(
                f"{len(damaged)} stored chunk(s) of {change.name!r} were damaged "
                f"and set aside; upload them and commit again",
                missing=damaged,
            )
        raise IntegrityError(
            f"the chunks of {change.name!r} do not hash to the file's sha256; "
            f"the client computed it wrongly or the file changed while it was "
            f"read: upload it again"
        )

    def _present(self, row: ChunkRow | None, digest: p.Digest) -> bool:
        """Whether a chunk with this row (None: no row) is stored, row and bytes."""
        return row is not None and not row.doomed and (row.in_engine or self.chunks.has(digest))

    def _stored_bytes(self, digest: p.Digest, row: ChunkRow) -> p.BytesLike:
        """A chunk's stored bytes (``row``: its row), unverified (the caller verifies).

        :raises NotFound: its bytes are not stored.
        """
        if row.data is not None:  # in the engine
            return row.data
        return memoryview(self.chunks.get(digest))[p.DATA_PREFIX_LEN :]

    def _check_sizes(self, change: NewVersion, blobs: bool) -> builtins.list[ChunkRow]:
        """Every chunk has a row (and, with ``blobs``, its bytes are stored) with the length the
        file's shape gives it.  :return: the chunks' rows, in file order."""
        missing: builtins.list[p.Digest] = []
        rows: builtins.list[ChunkRow] = []
        for i, digest in enumerate(change.chunks):
            row = self.meta.chunk(digest)
            if row is None or row.doomed or (blobs and not self._present(row, digest)):
                missing.append(digest)
                continue
            rows.append(row)
            want = p.chunk_length(i, change.size, change.chunk_size)
            if row.size != want:
                raise IntegrityError(
                    f"chunk {i} of {change.name!r} is {row.size} bytes, the "
                    f"file's shape needs {want}"
                )
        if missing:
            raise MissingChunks.absent(change.name, missing)
        return rows


def os_failure(exc: OSError) -> FmsError:
    """What a client is told when storage's disk failed a request."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(
            "storage disk is full (space or inodes); nothing was changed: free space "
            "on the storage volume and try again"
        )
    log.error("event=disk_error error=%r", str(exc))
    return FmsError(f"storage could not read or write its disk: {exc.strerror or exc}")


def _raise_or(result: Version | FmsError) -> Version:
    if isinstance(result, BaseException):
        raise result
    return result


def _optional(extra: str, package: str, load: Callable[[], T]) -> T:
    """A server-side backend whose library is an optional extra: a clear error if missing."""
    try:
        return load()
    except ModuleNotFoundError as exc:
        if exc.name != package and not (exc.name or "").startswith(package + "."):
            raise
        from .. import install_hint

        raise StoreError(
            f"this backend needs {package}, which is not installed: {install_hint(extra)}"
        ) from None


def open_local(path: str, keep_versions: int = 0) -> Store:
    """The store in data directory ``path``: ``meta.db`` (SQLite) and ``chunks/``."""
    return open_store(path, keep_versions=keep_versions)


def open_store(
    data: str, meta: str | None = None, chunks: str | None = None, keep_versions: int = 0
) -> Store:
    """Open a store.

    :param data: the data directory: the whole store by default (``meta.db`` and ``chunks/``; a
        directory in the format-1 layout is migrated in place first), scratch space only when
        both ``meta`` and ``chunks`` point elsewhere.
    :param meta: None for SQLite in ``data``, or ``postgresql://USER@HOST:PORT/DB``.
    :param chunks: None for ``data/chunks``, or ``s3://BUCKET/PREFIX``.
    :param keep_versions: versions an overwrite or removal replaces kept per name (0: none).
    :raises StoreError: it cannot be used, with what to do about it.
    """
    data = os.path.abspath(data)
    if not os.path.isdir(os.path.dirname(data)):
        raise StoreError(
            f"cannot use data directory {data}: its parent folder does not "
            f"exist; create it or point --data elsewhere"
        )
    backend: ChunkBackend
    engine: MetaEngine
    try:
        os.makedirs(data, exist_ok=True)
        if chunks is None:
            backend = LocalDirChunks(data)
            probe = backend.tmp_path("probe")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        else:
            backend = _optional(
                "s3",
                "boto3",
                lambda: __import__("fms.storage.chunks.s3", fromlist=["S3Chunks"]).S3Chunks,
            )(chunks)
        if meta is None:
            from .meta import legacy
            from .meta.sqlite import SQLiteMeta

            engine = SQLiteMeta(os.path.join(data, META_FILE), store_id=legacy.store_id(data))
            if chunks is None:
                legacy.migrate(data, engine, backend)
        elif meta.startswith(("postgresql://", "postgres://")):
            engine = _optional(
                "postgres",
                "psycopg",
                lambda: (
                    __import__("fms.storage.meta.postgres", fromlist=["PostgresMeta"]).PostgresMeta
                ),
            )(meta)
        else:
            raise StoreError(
                f"--meta {meta!r} is not a metadata engine URL; write "
                f"postgresql://USER@HOST:PORT/DB, or leave it out for SQLite in "
                f"--data"
            )
        _tie(engine, backend, chunks or os.path.join(data, "chunks"), meta or "meta.db in --data")
    except OSError as exc:
        raise StoreError(
            f"cannot use data directory {data}: {exc.strerror}; "
            f"check that it exists and is writable"
        ) from None
    return Store(engine, backend, keep_versions)


def _tie(engine: MetaEngine, backend: ChunkBackend, chunks_where: str, meta_where: str) -> None:
    """Chunks belong to one store: a chunk store that another store's metadata uses would have
    its chunks collected as orphans, so a mismatch is refused before anything runs."""
    marker = backend.store_marker()
    if marker is None:
        backend.mark_store(engine.store_id)
        marker = backend.store_marker()
    if marker != engine.store_id:
        engine.close()
        raise StoreError(
            f"the chunks at {chunks_where} belong to store {marker}, but the "
            f"metadata ({meta_where}) is store {engine.store_id}: point --meta and "
            f"--chunks at the same store (mixing two would let gc delete the other "
            f"store's chunks)"
        )
