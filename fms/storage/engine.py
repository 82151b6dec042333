"""The storage engine: commit, remove, read and list over a metadata engine and a chunk backend.

It checks everything it stores (invariant 3), with the store's digest function (recorded by the
metadata engine when the store was created, :mod:`fms.wire.digests`): a chunk against its digest
as it arrives, a page
against its id (and that every chunk it lists is stored), and a commit against its shape: its
chunks (or pages) must be stored with the sizes their places in the file need, and its file
digest must be the one they give (:mod:`fms.wire.manifest`): derived from the chunk digests, so
nothing is read back, and the checks cost in proportion to the distinct chunks (or pages) a
commit names, never to repeats.  Small chunks (up to :data:`SMALL_CHUNK_MAX`) are
kept in the metadata engine itself, so a small file costs one transaction and no file of its own.
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from .. import wire as p
from ..errors import (
    BadRequest,
    FmsError,
    IntegrityError,
    MissingChunks,
    NoSpace,
    NotFound,
    RemoteError,
)
from ..policy import Scans
from .chunks.base import ChunkBackend
from .chunks.localdir import LocalDirChunks
from .meta.base import MetaEngine
from .meta.sql import prefix_end
from .model import Change, Copy, NewVersion, Removal, Restore, Totals, Version

SMALL_CHUNK_MAX = 64 * p.KiB  # chunks up to this size live in the metadata engine
FOLDER_END = "\U0010ffff"  # after a folder's name: sorts after every name inside it
META_FILE = "meta.db"

log = logging.getLogger("fms.storage")
T = TypeVar("T")


class StoreError(FmsError):
    """The data directory or the metadata database cannot be used."""


class Store:
    """A store: a :class:`MetaEngine` for names and references, a :class:`ChunkBackend` for
    the bytes of chunks over :data:`SMALL_CHUNK_MAX`.  (``builtins.list`` in the annotations:
    ``list`` is also a method here.)"""

    def __init__(
        self,
        meta: MetaEngine,
        chunks: ChunkBackend,
        keep_versions: int = 0,
        keep_for: float = 0.0,
    ):
        self.meta = meta
        self.chunks = chunks
        meta.keep_versions = keep_versions
        meta.keep_for = keep_for
        self.digest_fn = meta.digest_fn  # the store's digest function, as it recorded it
        self.hash = meta.hash  # ... and its helper: every check below uses it

    @property
    def store_id(self) -> str:
        return self.meta.store_id

    def close(self) -> None:
        self.meta.close()

    # --- reads ---

    def version(self, name: str, lists: bool = True) -> Version:
        """The live version of ``name`` (``lists``: with what it lists; else its stat).

        :raises NotFound: no file by that name."""
        found = self.meta.get(name, lists)
        if found is None:
            raise NotFound(f"{name!r} not found; see what is stored with: ls")
        return found

    def read_many(
        self, names: Sequence[str]
    ) -> builtins.list[tuple[Version, bytearray | None] | RemoteError]:
        """For each of ``names``, its live version and, for a small file, its content as a
        data frame (what :func:`~fms.wire.travels_inline` sends with the manifest), or the
        error for that name alone (not found, its chunk lost or damaged; any other failure
        is the batch's, raised).

        The versions and the small chunks are read in one snapshot, a query for each (not two
        per name); the chunks are verified after it.  A chunk that is a blob, or whose bytes
        do not match, is read again the careful way (:meth:`read_chunk`: a damaged one is
        marked lost, which takes a write transaction, so never inside the snapshot).
        """
        with self.meta.snapshot():
            versions = self.meta.get_many(names)
            small = self.meta.small_chunks(
                v.chunks[0] for v in versions.values() if travels_inline(v) and v.chunks
            )
        results: builtins.list[tuple[Version, bytearray | None] | RemoteError] = []
        for name in names:
            version = versions.get(name)
            if version is None:
                results.append(NotFound(f"{name!r} not found; see what is stored with: ls"))
                continue
            if not travels_inline(version) or not version.chunks:
                results.append((version, None))
                continue
            digest = version.chunks[0]
            data = small.get(digest)
            try:
                if data is not None and self.hash(data) == digest:
                    results.append((version, p.pack_data(data)))
                else:
                    results.append((version, self.read_chunk(digest)))
            except RemoteError as exc:
                results.append(exc)
        return results

    def read_list(self, ident: bytes) -> bytes:
        """A page or a body by its id, verified against it.

        :raises NotFound: neither is stored (collected: the file changed since its manifest was
            read).
        :raises IntegrityError: the stored bytes do not match.
        """
        blob = self.meta.page(ident)
        if blob is None:
            blob = self.meta.body(ident)
        if blob is None:
            raise NotFound(
                f"no page or body {ident.hex()[:16]} in the store; the file changed since its "
                f"manifest was read: read it again"
            )
        if self.hash(blob) != ident:
            raise IntegrityError(f"page {ident.hex()[:16]} is corrupt in the metadata database")
        return blob

    def listing(
        self, version: Version
    ) -> tuple[tuple[p.Extent, ...], tuple[p.Digest, ...] | None, tuple[p.Digest, ...] | None]:
        """``(extents, page ids or None, chunks or None)`` of a version: its body is read if
        the version does not keep a copy of it."""
        if version.body is None or version.extents is not None:
            return version.extents or (), version.pages, version.chunks
        extents, pages = p.unpack_body(self.read_list(version.body))
        return extents, pages, None

    def digests(self, version: Version) -> Iterator[p.Digest]:
        """Every chunk digest of a version, in file order, a page at a time (memory: a page)."""
        _extents, pages, chunks = self.listing(version)
        if chunks is not None:
            yield from chunks
            return
        for page in pages or ():
            yield from p.split_digests(self.read_list(page))

    def list(
        self, prefix: str, after: str, limit: int, scans: Scans | None = None
    ) -> builtins.list[Version]:
        """Up to ``limit`` live versions under ``prefix`` after ``after``, in name order;
        ``scans`` (:func:`fms.policy.scans`): only within those parts of the index."""
        if scans is None:
            return self.meta.list(prefix, after, limit)
        out: builtins.list[Version] = []
        for kind, value in scans:
            if len(out) >= limit:
                break
            if kind == "name":
                found = self.meta.get(value) if value > after else None
                if found is not None:
                    out.append(found)
                continue
            end = prefix_end(value)
            if end is not None and after >= end:
                continue  # the whole range is before `after`
            out += self.meta.list(value, after, limit - len(out))
        return out

    def versions(self, name: str) -> builtins.list[Version]:
        """The current version of ``name`` (if it is live) and its retained ones, newest first.

        :raises NotFound: neither.
        """
        current = self.meta.get(name)
        found = ([current] if current else []) + self.meta.retained(name)
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

    def usage(self, prefix: str, scans: Scans | None = None) -> tuple[int, int]:
        """``(files, bytes)`` under ``prefix``: the totals for the whole store, else counted in
        the name index; ``scans``: only within those parts of it (:func:`fms.policy.scans`)."""
        if scans is not None:
            files = nbytes = 0
            for kind, value in scans:
                if kind == "name":
                    found = self.meta.get(value)
                    if found is not None:
                        files, nbytes = files + 1, nbytes + found.size
                else:
                    more, size = self.meta.usage(value)
                    files, nbytes = files + more, nbytes + size
            return files, nbytes
        if not prefix:
            totals = self.meta.totals()
            return totals.files, totals.bytes
        return self.meta.usage(prefix)

    def list_folder(
        self, prefix: str, after: str, limit: int, scans: Scans | None = None
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
            page = self.list(prefix, after, limit - len(entries) - len(folders), scans)
            if not page:
                return entries, folders, None
            for version in page:
                if version.name == prefix:  # the folder's own marker: not in it
                    after = version.name
                    continue
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
        :raises IntegrityError: the stored bytes do not match; a blob is set aside and the row
            marked lost, so the next upload of a file that lists it sends it and restores it.
        """
        row = self.meta.chunk(digest)
        if row is not None and row.data is not None:  # in the engine
            frame = p.pack_data(row.data)
            if self.hash(row.data) != digest:
                self.meta.mark_lost(digest)
                raise IntegrityError(
                    f"chunk {digest.hex()[:16]} is corrupt in the metadata "
                    f"database; upload the file again to restore it"
                )
            return frame
        try:
            frame = self.chunks.get(digest)
        except NotFound:
            if row is not None and not row.doomed:
                self.meta.mark_lost(digest)  # its row promises it: the next upload sends it
            raise
        if self.hash(memoryview(frame)[p.DATA_PREFIX_LEN :]) != digest:
            self.chunks.quarantine(digest)
            if row is not None:
                self.meta.mark_lost(digest)
            raise IntegrityError(
                f"chunk {digest.hex()[:16]} is corrupt on storage disk; "
                f"it was set aside, upload the file again to restore it"
            )
        return frame

    # --- writes ---

    def missing(
        self, digests: Sequence[p.Digest], owner: str | None = None
    ) -> builtins.list[p.Digest]:
        """The digests among ``digests`` that must be uploaded; the others are protected from
        collection for the grace period (a commit naming them is on its way).

        :param owner: an identity whose dedup is its own (:mod:`fms.policy`): only the chunks
            it uploaded itself count as present, so it learns nothing of others' content.
        """
        if owner is not None:
            mine = self.meta.owned(owner, digests)
            known = self.meta.known([d for d in digests if d in mine], time.time())
        else:
            known = self.meta.known(digests, time.time())
        return [d for d in digests if d not in known]

    def unowned(self, owner: str, digests: Sequence[p.Digest]) -> builtins.list[p.Digest]:
        """The digests among ``digests`` that ``owner`` did not upload (a commit of an identity
        whose dedup is its own may name only its own chunks: it uploads the others)."""
        mine = self.meta.owned(owner, list(digests))
        return list(dict.fromkeys(d for d in digests if d not in mine))

    def put_chunk(self, digest: p.Digest, data: p.BytesLike, owner: str | None = None) -> bool:
        """Store a chunk after checking it against its digest.

        :param owner: the identity uploading it, when its dedup is its own: it then owns the
            chunk, and the answer says only whether *it* had uploaded it before.
        :return: True if written (for ``owner``: new to it).
        :raises IntegrityError: the data does not hash to ``digest``.
        """
        written = self._put_chunk(digest, data)
        if owner is None:
            return written
        return bool(self.meta.own(owner, [digest]))

    def _put_chunk(self, digest: p.Digest, data: p.BytesLike) -> bool:
        if self.hash(data) != digest:
            raise IntegrityError(
                f"chunk {digest.hex()[:16]} does not match its {self.digest_fn} digest; "
                f"it was damaged in transit, upload it again"
            )
        small = len(data) <= SMALL_CHUNK_MAX
        if small:  # its bytes live in the engine: were they there already?
            row = self.meta.chunk(digest)
            held = row is not None and row.in_engine and not row.doomed
        # The row first: from then on the collector leaves the chunk alone for the grace period,
        # so the blob written next cannot be deleted under a commit that relies on it.
        if self.meta.claim_chunk(digest, len(data), time.time(), bytes(data) if small else None):
            return not (small and held)
        return self.chunks.put(digest, data)

    def put_page(self, page_id: p.Digest, blob: p.BytesLike) -> bool:
        """Store a page of digests (every chunk it lists must be stored) after checking it
        against its id.  :return: True if stored now (False: it was already).

        :raises BadRequest: not whole digests, none, or more than a page holds.
        :raises IntegrityError: the bytes do not hash to ``page_id``.
        :raises MissingChunks: chunks it lists are not stored; ``missing`` lists them.
        """
        page = bytes(blob)
        count = len(page) // p.HASH_LEN
        if len(page) % p.HASH_LEN or not 1 <= count <= p.PAGE_CHUNKS:
            raise BadRequest(
                f"a page holds 1 to {p.PAGE_CHUNKS} digests of {p.HASH_LEN} bytes, got "
                f"{len(page)} bytes"
            )
        if self.hash(page) != page_id:
            raise IntegrityError(
                f"page {page_id.hex()[:16]} does not match its id; it was damaged in transit, "
                f"send it again"
            )
        if not self.meta.has_page(page_id):
            absent = self._absent(p.split_digests(page))
            if absent:
                raise MissingChunks(
                    f"{len(absent)} chunk(s) of this page are not in the store (never "
                    f"uploaded, or collected since); upload them and send the page again",
                    missing=absent,
                )
        return self.meta.put_page(page_id, page, time.time())

    def _absent(self, digests: Iterable[p.Digest]) -> builtins.list[p.Digest]:
        """The distinct ``digests`` that are not stored: no live row, or a blob that a row
        promises but the backend does not hold whole (its write failed, or a power loss cut it).
        A chunk some stored list references was checked when that reference was taken (and one
        found lost since is marked), so only unreferenced ones are looked up in the backend: no
        content is read."""
        wanted = list(dict.fromkeys(digests))
        rows = self.meta.chunk_rows(wanted)
        absent = [d for d in wanted if d not in rows or rows[d].doomed or rows[d].lost]
        unproven = [d for d, r in rows.items() if not (r.doomed or r.lost or r.in_engine or r.refs)]
        if unproven:
            sizes = self.chunks.sizes(unproven)
            for digest in unproven:
                if sizes[digest] is not None and sizes[digest] != rows[digest].size:
                    self.chunks.quarantine(digest)  # cut short: an upload writes it anew
                if sizes[digest] != rows[digest].size:
                    absent.append(digest)
        order = {d: i for i, d in enumerate(wanted)}
        return sorted(absent, key=order.__getitem__)

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
        self, prefix: str, limit: int, name_bytes: int, actor: str = "local"
    ) -> tuple[builtins.list[Version], bool]:
        """Remove up to ``limit`` names starting with ``prefix``, whose names add up to at most
        ``name_bytes`` (in UTF-8: the list the broker is told to invalidate), in one
        transaction; ``actor``: who asked (the audit log's).

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
        changes = [Removal(v.name, uuid.uuid4().hex, actor, prefix) for v in take]
        results = self.meta.apply(changes, time.time(), {}) if changes else []
        # A name removed by someone else meanwhile is not an error of this request.
        return [r for r in results if isinstance(r, Version)], len(page) > len(take)

    def move_prefix(
        self, prefix: str, dest: str, commit: str, limit: int, actor: str = "local"
    ) -> int:
        """Rename the folder ``prefix`` to ``dest`` (both ending in ``/``): every name under it,
        in one transaction, metadata only (:meth:`MetaEngine.move_prefix`); ``actor``: who
        asked (the audit log's).  :return: names moved."""
        if prefix.startswith(dest) or dest.startswith(prefix):
            raise BadRequest(f"cannot move folder {prefix!r} to {dest!r}: one holds the other")
        return self.meta.move_prefix(prefix, dest, commit, time.time(), limit, actor)

    def apply(
        self, requests: Sequence[tuple[Change, bytes | None]]
    ) -> builtins.list[Version | FmsError]:
        """Apply ``(change, inline bytes or None)`` pairs: each commit is checked, then every
        change that passed is made in one transaction.

        :return: per request, the :class:`Version` made or the :class:`FmsError` refusing it.
        """
        results: dict[int, Version | FmsError] = {}  # by index in requests
        changes: builtins.list[Change] = []
        where: builtins.list[int] = []  # each change's index in requests
        small: dict[p.Digest, bytes] = {}  # small chunks' bytes, sent inline
        blobs = False  # whether a commit names chunks kept as blobs
        for i, (change, inline) in enumerate(requests):
            try:
                if isinstance(change, NewVersion):
                    change, small_bytes = self._check(change, inline)
                    if small_bytes is not None and change.chunks:  # kept with its one chunk
                        small[change.chunks[0]] = small_bytes
                    else:
                        blobs = blobs or change.size > SMALL_CHUNK_MAX
            except FmsError as exc:
                results[i] = exc
                continue
            except OSError as exc:  # this commit's disk trouble is not the others'
                results[i] = os_failure(exc)
                continue
            changes.append(change)
            where.append(i)
        if changes:
            if blobs:
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

    def _check(self, change: NewVersion, inline: bytes | None) -> tuple[NewVersion, bytes | None]:
        """Check a commit against its shape, its digest and the stored chunks.

        :return: ``(change, small)``: the change to apply, and the bytes of a small chunk to keep
            in the metadata engine (sent inline), or None.
        """
        count = p.check_extents(change.extents)
        if (change.chunks is None) == (change.pages is None):
            raise BadRequest("a commit lists either its chunks or its pages")
        if change.chunks is not None and len(change.chunks) != count:
            raise BadRequest(
                f"a {change.size}-byte file in {change.chunk_size}-byte chunks has "
                f"{count} chunks, the commit lists {len(change.chunks)}"
            )
        if change.pages is not None and len(change.pages) != p.file_pages(change.extents):
            raise BadRequest(
                f"the extents of {change.name!r} have {p.file_pages(change.extents)} pages, "
                f"the commit lists {len(change.pages)}"
            )
        if change.chunks is not None and len(change.chunks) > p.INLINE_CHUNKS:
            raise BadRequest(
                f"a commit lists at most {p.INLINE_CHUNKS} chunks itself; send longer lists "
                f"as pages (put_page)"
            )
        self._check_digest(change)
        if count == 0:
            return change, None
        if inline is not None:
            if change.chunks is None:
                raise BadRequest("inline data goes with a chunk list, not with pages")
            if not p.travels_inline(change.size, count):
                raise BadRequest(
                    f"inline data is only for one-chunk files of at most {p.INLINE_MAX} bytes"
                )
            if len(inline) != change.size or self.hash(inline) != change.chunks[0]:
                raise IntegrityError(
                    "the inline content does not match the commit's size and "
                    "digest; it was damaged in transit, upload it again"
                )
            if len(inline) <= SMALL_CHUNK_MAX:
                return change, inline
            self.put_chunk(change.chunks[0], inline)
            return change, None
        if change.chunks is not None:
            absent = self._absent(change.chunks)
            if absent:
                raise MissingChunks.absent(change.name, absent)
        # A paged list's pages are checked by the metadata engine, in the commit's transaction.
        return change, None

    def _check_digest(self, change: NewVersion) -> None:
        """The commit's file digest is the one its chunk list gives: derived from the chunk
        digests (:mod:`fms.wire.manifest`), in proportion to its pages; nothing is read back."""
        if change.digest_kind != p.DIGEST_TREE:
            raise BadRequest(f"a commit's digest is of kind {p.DIGEST_TREE!r}")
        if change.chunks is not None and len(change.chunks) == 1 == len(change.extents):
            # A small file's (the usual commit): its body is its one extent and one page
            want = p.one_chunk_digest(p.pack_extents(change.extents), change.chunks[0], self.hash)
        elif change.chunks is not None:
            want = p.inline_digest(change.extents, change.chunks, self.hash)
        elif change.pages is not None:
            want = p.tree_digest(change.extents, change.pages, self.hash)
        else:
            raise BadRequest("a commit lists either its chunks or its pages")
        if change.digest != want:
            raise IntegrityError(
                f"the file digest of {change.name!r} is not the one its chunk list gives; "
                f"the client computed it wrongly, or the list was damaged: upload it again"
            )


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


def open_local(
    path: str, keep_versions: int = 0, keep_for: float = 0.0, digest_fn: str | None = None
) -> Store:
    """The store in data directory ``path``: ``meta.db`` (SQLite) and ``chunks/``."""
    return open_store(path, keep_versions=keep_versions, keep_for=keep_for, digest_fn=digest_fn)


def open_store(
    data: str,
    meta: str | None = None,
    chunks: str | None = None,
    keep_versions: int = 0,
    keep_for: float = 0.0,
    digest_fn: str | None = None,
) -> Store:
    """Open a store.

    :param data: the data directory: the whole store by default (``meta.db`` and ``chunks/``; a
        directory in the format-1 layout is migrated in place first), scratch space only when
        both ``meta`` and ``chunks`` point elsewhere.
    :param meta: None for SQLite in ``data``, or ``postgresql://USER@HOST:PORT/DB``.
    :param chunks: None for ``data/chunks``, or ``s3://BUCKET/PREFIX``.
    :param keep_versions: versions an overwrite or removal replaces kept per name (0: none).
    :param keep_for: seconds each replaced version is held: kept whatever the count, until
        then (0: none).
    :param digest_fn: the digest function a new store records (None: ``p.NEW_STORE_DIGEST``);
        an existing store keeps its own, and another one named here is refused.
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

            old_id = legacy.store_id(data)
            if old_id is not None:  # a format-1 directory: its chunks are stored by sha256
                digest_fn = _old_store_digest(digest_fn)
            engine = SQLiteMeta(os.path.join(data, META_FILE), store_id=old_id, digest_fn=digest_fn)
            if chunks is None:
                legacy.migrate(data, engine, backend)
        elif meta.startswith(("postgresql://", "postgres://")):
            engine = _optional(
                "postgres",
                "psycopg",
                lambda: (
                    __import__("fms.storage.meta.postgres", fromlist=["PostgresMeta"]).PostgresMeta
                ),
            )(meta, digest_fn=digest_fn)
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
    return Store(engine, backend, keep_versions, keep_for)


def _old_store_digest(asked: str | None) -> str:
    """The digest function of a store made before the choice existed, unless another is asked
    for.  :raises StoreError:"""
    if asked not in (None, p.OLD_STORE_DIGEST):
        raise StoreError(
            f"this store's digest function is {p.OLD_STORE_DIGEST} (chosen when it was "
            f"created, it cannot change); leave out --digest, or give --digest "
            f"{p.OLD_STORE_DIGEST}"
        )
    return p.OLD_STORE_DIGEST


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


def travels_inline(version: Version) -> bool:
    """Whether a version's content travels with its manifest (one small chunk)."""
    return bool(version.chunks) and p.travels_inline(version.size, version.count)
