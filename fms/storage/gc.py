"""Garbage collection and fsck: space given back, and every reference checked.

**Collection.** Bodies and pages (the stored chunk lists of long files) that nothing has
referenced for longer than the grace period are deleted first, releasing what they list (so a
removed file's pages and chunks go in the same collection).  Then a chunk that nothing
references and that has been unreferenced for longer than the grace period is deleted (see
:mod:`fms.storage.meta.base` for why this cannot race a commit).  Blobs with no row at all (a
writer died between writing and recording, or a format-1 store held chunks no manifest named)
are deleted once older than the grace period.  Tombstones and remembered commit ids are dropped
after ``RETAIN_SECONDS``, retained versions whose hold ran out (``--keep-for``) past the count
kept, and audit entries older than the store keeps them (``audit_keep``).  Each collection is
itself in the audit log.  One collector at a time per store: a lease in the metadata engine,
renewed while it works.

**fsck** walks the live versions in name order, a page at a time, reads every body, page and
chunk they list once and checks each against its digest (a list that many files share is checked
once, and a repeat costs nothing); the last page also counts orphan blobs and reference counts
that differ from a recount.  Each page reads the metadata in one snapshot, so writers running
meanwhile never show up as damage.
"""

import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .. import wire as p
from ..errors import IntegrityError, NotFound, Unavailable
from .chunks.base import ChunkBackend
from .chunks.localdir import pid_alive
from .meta.access import audit_entry
from .meta.base import RETAIN_SECONDS, ChunkRow, MetaEngine
from .model import Version

if TYPE_CHECKING:
    from .engine import Store

DEFAULT_GRACE = 3600.0  # seconds an unreferenced chunk is kept before it is collected
LEASE = "gc"
LEASE_SECONDS = 120.0  # a collector that dies holds the lease this long at most
BATCH = 500  # chunks doomed per transaction
PRUNE_BATCH = 2000  # tombstones and remembered ids dropped per transaction
LIST_BATCH = 16  # bodies and pages deleted per transaction (each up to 2 MiB)
FSCK_PAGE_BYTES = 256 * p.MiB  # chunk bytes one fsck page reads, so a page answers in seconds
FSCK_PAGE_SECONDS = 5.0  # ... or the seconds it reads for, whichever comes first (a slow disk)
HOLD_BATCH = 500  # names whose expired holds are dropped per transaction

log = logging.getLogger("fms.storage.gc")

_HOLDER = f"{socket.gethostname()}:{os.getpid()}"


def collect(
    store: "Store",
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    now: float | None = None,
    actor: str = "system",
) -> dict[str, int]:
    """Collect what has been garbage for longer than ``grace`` seconds.

    :param actor: who asked (the audit log's): an identity, or the system's own schedule.
    :return: ``chunks`` and ``bytes`` freed (or that would be, with ``dry_run``), ``orphans``
        among them (blobs no row knew), ``pages`` (stored chunk lists: pages and bodies) freed,
        ``pruned`` tombstones and remembered ids, ``expired`` retained versions dropped as their
        hold ran out.
    :raises Unavailable: another collector holds the store's lease.
    """
    now = time.time() if now is None else now
    meta, chunks = store.meta, store.chunks
    if not meta.lease(LEASE, _HOLDER, now, LEASE_SECONDS):
        holder = meta.lease_holder(LEASE)
        if holder is not None and _dead_here(holder):
            log.info("event=gc_lease_taken_over holder=%s reason='process gone'", holder)
            meta.release(LEASE, holder)
    if not meta.lease(LEASE, _HOLDER, now, LEASE_SECONDS):
        raise Unavailable(
            "another storage worker is collecting garbage in this store right now; "
            "try again in a minute"
        )
    freed = {
        "chunks": 0,
        "bytes": 0,
        "orphans": 0,
        "pages": 0,
        "pruned": 0,
        "expired": 0,
        "dry_run": dry_run,
    }
    try:
        if not dry_run:
            # First, and metadata only: an object store that fails the rest must not keep
            # tombstones (which every listing steps over) from going.
            freed["pruned"] = _prune(meta, now - RETAIN_SECONDS)
        if not dry_run:  # the chunks they release start their grace period now
            while True:
                expired = meta.expire_holds(now, HOLD_BATCH)
                freed["expired"] += expired
                if expired < HOLD_BATCH:
                    break
        cutoff = now - grace
        if dry_run:
            freed["pages"] = sum(meta.collect_lists(cutoff, 2**62, dry_run=True))
            rows = meta.doom(cutoff, 2**62, dry_run=True)
            freed["chunks"], freed["bytes"] = len(rows), sum(r.size for r in rows)
        else:
            _finish(meta, chunks, meta.doomed(2**62), freed)  # left by a collector that died
            while True:
                bodies, pages = meta.collect_lists(cutoff, LIST_BATCH)
                freed["pages"] += bodies + pages
                meta.lease(LEASE, _HOLDER, time.time(), LEASE_SECONDS)
                if bodies < LIST_BATCH and pages < LIST_BATCH:
                    break
            while True:
                rows = meta.doom(cutoff, BATCH)
                _finish(meta, chunks, rows, freed)
                meta.lease(LEASE, _HOLDER, time.time(), LEASE_SECONDS)
                if len(rows) < BATCH:
                    break
        for digest, size, mtime in chunks.list():
            if mtime >= cutoff or meta.chunk(digest) is not None:
                continue
            if dry_run or meta.adopt_orphan(digest, size):
                if not dry_run:
                    chunks.delete(digest)
                    meta.forget([digest])
                    meta.disown([digest])
                freed["orphans"] += 1
                freed["chunks"] += 1
                freed["bytes"] += size
        if not dry_run:
            meta.prune_audit(now - meta.audit_keep)
            if actor != "system" or any(_counts(freed).values()):  # a background no-op: no line
                meta.audit_write([audit_entry(now, actor, "gc", grace=grace, **_counts(freed))])
    finally:
        meta.release(LEASE, _HOLDER)
    if freed["chunks"] or freed["pruned"] or freed["pages"]:
        log.info(
            "event=gc chunks=%d bytes=%d orphans=%d pages=%d pruned=%d dry_run=%s",
            freed["chunks"],
            freed["bytes"],
            freed["orphans"],
            freed["pages"],
            freed["pruned"],
            dry_run,
        )
    return freed


def _prune(meta: MetaEngine, cutoff: float) -> int:
    """Drop every tombstone and remembered id older than ``cutoff``, however many, a batch per
    transaction so that writers never wait long; the lease is renewed as it goes."""
    pruned = 0
    while True:
        n = meta.prune(cutoff, PRUNE_BATCH)
        pruned += n
        if n < PRUNE_BATCH:
            return pruned
        meta.lease(LEASE, _HOLDER, time.time(), LEASE_SECONDS)


def _counts(freed: dict) -> dict:
    return {k: v for k, v in freed.items() if k != "dry_run"}


def _dead_here(holder: str) -> bool:
    """Whether a lease holder (``host:pid``) is a process of this host that no longer runs."""
    host, _, pid = holder.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def _finish(
    meta: MetaEngine, chunks: ChunkBackend, rows: Sequence[ChunkRow], freed: dict[str, int]
) -> None:
    """Delete the blobs of doomed rows, then the rows."""
    blobs = [r for r in rows if not r.in_engine]
    for row in blobs:
        chunks.delete(row.digest)
    meta.forget([r.digest for r in blobs])
    meta.disown([r.digest for r in rows])  # whoever uploaded them has them no more
    freed["chunks"] += len(rows)
    freed["bytes"] += sum(r.size for r in rows)


def fsck_page(
    store: "Store",
    after: str = "",
    page_bytes: int = FSCK_PAGE_BYTES,
    page_seconds: float = FSCK_PAGE_SECONDS,
) -> dict[str, Any]:
    """Check the live versions after name ``after``, reading about ``page_bytes`` of chunks
    (and of the pages and bodies that list them) or for about ``page_seconds``, whichever comes
    first (at least one name).

    The metadata of a page is read in one snapshot (:meth:`MetaEngine.snapshot`), so what
    writers change meanwhile never looks like damage; a chunk whose bytes looked missing or
    corrupt is looked at again once the snapshot is over, and reported only if a stored file
    still uses it.

    :return: ``names`` and ``chunks`` checked, ``bytes`` read, ``damaged`` (a list of
        ``{chunk, problem, names}``: problem is ``missing`` or ``corrupt``, and ``kind`` is
        ``page`` or ``body`` when ``chunk`` is the id of one), ``next`` (the name to continue
        after, or None when done).  The last page adds ``orphans`` (blobs no row knows, and
        unreferenced rows whose grace has not run out count as pending, not orphans) and
        ``refcount_errors``.
    :raises Unavailable: the metadata database or the chunk store cannot be reached.
    """
    # the page's reply (fsck's wire fields)
    out: dict[str, Any] = {"names": 0, "chunks": 0, "bytes": 0, "damaged": [], "next": None}
    check = _Check(store, out)
    last = after
    end = time.monotonic() + page_seconds
    with store.meta.snapshot():
        while out["bytes"] < page_bytes and time.monotonic() < end:
            versions = store.meta.iter_versions(last, 100)
            if not versions:
                break
            for version in versions:
                for ident in check.version(version):
                    check.damaged[ident]["names"].append(version.name)
                out["names"] += 1
                last = version.name
                if out["bytes"] >= page_bytes or time.monotonic() >= end:
                    break
        more = bool(store.meta.iter_versions(last, 1))
        if not more:
            out["refcount_errors"] = len(store.meta.refcount_errors())
    out["damaged"] = [
        {**{k: v for k, v in d.items() if k != "recheck"}, "names": sorted(set(d["names"]))}
        for d in check.damaged.values()
        if not d.get("recheck") or _still_damaged(store, d["chunk"])
    ]
    if more:
        out["next"] = last
    else:
        out["orphans"] = _orphans(store)
    return out


def _still_damaged(store: "Store", digest: bytes) -> bool:
    """After the snapshot: whether a chunk whose bytes looked missing or corrupt still do, and
    it is still used (an overwrite may have released it and a collection deleted it since).
    Reading it sets a corrupt blob aside and marks the row lost, so an upload restores it."""
    row = store.meta.chunk(digest)
    if row is None or row.doomed or row.refs == 0:
        return False
    try:
        store.read_chunk(digest)  # uploaded again since: healed
    except (NotFound, IntegrityError):
        return True
    return False


def _orphans(store: "Store") -> int:
    """Blobs that no row knows.  Outside any snapshot, and each one looked at again: a blob's
    row is written before the blob, and a collector deletes a blob before its row, so a blob
    listed while it was written or collected is not counted."""
    return sum(
        1
        for digest, _size, _mtime in store.chunks.list()
        if store.meta.chunk(digest) is None and store.chunks.has(digest)
    )


class _Check:
    """One fsck page's checks: each chunk, page and body read once, and what was found damaged
    under each list remembered, so a file costs what it lists that no file before it did.
    Pages and bodies are rows of the metadata, read in the page's snapshot: one that is absent
    or wrong there is damage whatever writers do."""

    def __init__(self, store: "Store", out: dict[str, Any]) -> None:
        self.store, self.out = store, out
        # id -> {chunk, problem, names[, kind][, recheck]}
        self.damaged: dict[bytes, dict[str, Any]] = {}
        self.seen: set[p.Digest] = set()  # chunks checked
        self.lists: dict[bytes, set[bytes]] = {}  # page or body id -> the damaged ids under it

    def version(self, version: Version) -> set[bytes]:
        """The ids of what is damaged among what ``version`` lists."""
        if version.chunks is not None:
            return self.chunks(version.chunks)
        if version.body is None:
            return set()  # an empty file
        return self.list("body", version.body)

    def list(self, kind: str, ident: bytes) -> set[bytes]:
        if ident in self.lists:
            return self.lists[ident]
        bad: set[bytes] = set()
        try:
            blob = self.store.read_list(ident)
        except NotFound:
            bad = {ident}
            self.damaged[ident] = {"chunk": ident, "problem": "missing", "kind": kind, "names": []}
        except IntegrityError:
            bad = {ident}
            self.damaged[ident] = {"chunk": ident, "problem": "corrupt", "kind": kind, "names": []}
        else:
            self.out["bytes"] += len(blob)
            if kind == "body":
                for page in dict.fromkeys(p.unpack_body(blob)[1]):
                    bad |= self.list("page", page)
            else:
                bad = self.chunks(p.split_digests(blob))
        self.lists[ident] = bad
        return bad

    def chunks(self, digests: Iterable[p.Digest]) -> set[bytes]:
        bad: set[bytes] = set()
        for digest in dict.fromkeys(digests):
            if digest in self.damaged:
                bad.add(digest)
            elif digest not in self.seen:
                self.seen.add(digest)
                problem, recheck = _check_chunk(self.store, digest, self.out)
                if problem:
                    self.damaged[digest] = {
                        "chunk": digest,
                        "problem": problem,
                        "names": [],
                        "recheck": recheck,
                    }
                    bad.add(digest)
        return bad


def _check_chunk(store: "Store", digest: p.Digest, out: dict[str, Any]) -> tuple[str | None, bool]:
    """Read-only (it runs in the page's snapshot; what a damaged chunk needs, set aside or
    marked lost, is done by :func:`_still_damaged` after it).

    :return: ``(problem or None, whether only the bytes were found wanting)``.  A row that is
        absent or doomed while a version uses it is damage whatever writers do (both change in
        one transaction); bytes that are absent or wrong may have been released and collected
        since the snapshot, so those are looked at again after it.
    """
    out["chunks"] += 1
    row = store.meta.chunk(digest)
    if row is None or row.doomed:
        return "missing", False
    data: p.BytesLike
    if row.data is not None:  # in the engine itself (row.in_engine)
        data = row.data
    else:
        try:
            data = memoryview(store.chunks.get(digest))[p.DATA_PREFIX_LEN :]
        except NotFound:
            return "missing", True
    if store.hash(data) != digest:  # the store's digest function
        return "corrupt", True
    out["bytes"] += len(data)
    return None, False
