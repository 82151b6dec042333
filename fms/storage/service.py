"""The storage service: wire -> model.  Answers storage ops (and the cache's ops when no cache
is alive).

Handlers parse and check a request's fields, call the :class:`~fms.storage.engine.Store` with
model objects and answer through ``link``; the loop is in :mod:`fms.worker`.

Commits and removes are *group committed*: those that arrive back to back (within one drain of
the worker's socket, with no other op between them) are applied in one metadata transaction, by
:meth:`StorageService.flush` (which the worker loop calls after each drain) or before the next
other op, so a burst of small uploads costs one fsync, not one each, and no commit waits behind
other work.  Under many writers on busy CPUs, a change that a drain found alone may wait a
moment for others to join its group (:mod:`fms.storage.groupwait`).
Chunk reads from a backend far away (S3: ``ChunkBackend.read_threads`` > 1) are gathered the
same way: those that arrive in one drain are fetched side by side on a pool of threads by
:meth:`StorageService.flush`, so a reader's pipeline of chunk requests costs about one round trip
to the object store, not one each.
GC and fsck run on a maintenance thread with a store of their own, so a long pass never delays
the worker's other requests; their replies are sent from the worker's thread by :meth:`tick` and
:meth:`flush`.  (Heartbeats come from the link's own thread, :mod:`fms.worker`, whatever the
service is doing.)

Every request is decided by :mod:`fms.policy` for every name it touches, as the identity its
authenticated key resolves to (:class:`~fms.storage.access.Access`, kept in ``route["who"]``
while it is handled): reads per name, listings and counts filtered to what it may read, writes
per name (both names of mv and cp), rm_prefix on the whole folder.  An identity that may not
read the whole store sees dedup only for what it uploaded itself (``have``, ``put_chunk``,
``put_page``, and the chunks or pages a commit may name: :class:`~fms.storage.access.Owner`),
and reads a chunk or a page only through a file it may read that lists it
(:class:`~fms.storage.access.Reads`).
"""

import collections
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import zmq

from .. import limits, policy
from .. import wire as p
from ..errors import (
    BadRequest,
    FmsError,
    Forbidden,
    MissingChunks,
    NoSpace,
    RemoteError,
    TooLarge,
    Unavailable,
)
from ..logutil import RateLimitedLog
from ..policy import Policy
from . import gc
from .access import Access, AccessOps, Reads
from .engine import FOLDER_END, SMALL_CHUNK_MAX, Store, os_failure, travels_inline
from .groupwait import GroupWait
from .model import Change, Copy, NewVersion, Removal, Restore, Version
from .reserve import SpaceReserve

if TYPE_CHECKING:
    from ..worker import Link

CLEAN_INTERVAL = 60.0  # seconds between sweeps of temp files left by dead writers
GC_INTERVAL = 300.0  # seconds between background collections
CHANGE_OPS = p.CHANGE_OPS  # group committed; applied even past their deadline
VERSIONS_MAX = 256  # versions one `versions` reply lists, the newest
RM_PAGE = 1000  # names an `rm_prefix` removes per request (one transaction)
RM_PAGE_NAME_BYTES = 32 * p.KiB  # ... whose names add up to at most this: the broker's `inv`
RESERVE_RM_PAGE = 100  # ... and at most this many in the room of the disk's reserve
MV_PREFIX_MAX = 10_000  # names a folder rename (`mv_prefix`) moves, in one transaction

T = TypeVar("T")
log = logging.getLogger("fms.storage")

Route: TypeAlias = dict[str, Any]  # a request's route frame (fms.worker adds its deadline)
Header: TypeAlias = dict[str, Any]  # a request's header
# A change waiting for the group commit: (route, header, change, its inline content).
Pending: TypeAlias = tuple[Route, Header, Change, bytes | None]
# A maintenance job: runs on a store, returns the reply's fields.
Job: TypeAlias = Callable[[Store], dict[str, Any]]


class StorageService:
    """Storage handlers over a :class:`Store`.

    :param store: the store.
    :param link: where replies go (a :class:`~fms.worker.BrokerLink` or a test recorder).
    :param gc_grace: seconds an unreferenced chunk is kept before collection.
    :param maintenance_store: a second :class:`Store` on the same data (its own connections) for
        the maintenance thread; None runs GC and fsck inline (tests).
    """

    def __init__(
        self,
        store: Store,
        link: "Link",
        gc_grace: float = gc.DEFAULT_GRACE,
        maintenance_store: Store | None = None,
    ) -> None:
        self.store = store
        self.link = link
        self.gc_grace = gc_grace
        self.served = 0
        self._pending: list[Pending] = []  # awaiting flush()
        self.group_wait = GroupWait()  # linger(): a lone change's wait for company
        # (route, header, digest): chunk reads awaiting flush(), fetched side by side
        self._reads: list[tuple[Route, Header, p.Digest]] = []
        threads = getattr(store.chunks, "read_threads", 1)
        self._reader = ThreadPoolExecutor(threads, "fms-read") if threads > 1 else None
        self._next_clean = 0.0
        self._next_gc = time.monotonic() + GC_INTERVAL
        self._maintenance = _Maintenance(maintenance_store) if maintenance_store else None
        # With the disk full, removals and collections run again in this room (None: the
        # metadata is not on this machine's disk).
        self.reserve = SpaceReserve.for_store(store)
        self.access = Access(store.meta)
        self.access_ops = AccessOps(store, self.access, lambda: self.link, self._policy_changed)
        self.reads = Reads(store)
        self._quiet = RateLimitedLog(log)
        self._handlers = {
            "get": self.op_get,
            "chunk": self.op_chunk,
            "page": self.op_page,
            "get_many": self.op_get_many,
            "have": self.op_have,
            "put_chunk": self.op_put_chunk,
            "put_page": self.op_put_page,
            "commit": self.op_commit,
            "commit_many": self.op_commit_many,
            "ls": self.op_ls,
            "stat": self.op_stat,
            "rm": self.op_rm,
            "usage": self.op_usage,
            "gc": self.op_gc,
            "fsck": self.op_fsck,
            "cache_stats": self.op_cache_stats,
            "mv": self.op_mv,
            "cp": self.op_cp,
            "rm_prefix": self.op_rm_prefix,
            "mv_prefix": self.op_mv_prefix,
            "du": self.op_du,
            "versions": self.op_versions,
            "get_version": self.op_get_version,
            "restore": self.op_restore,
            "purge": self.op_purge,
            **self.access_ops.handlers(),
        }

    def handle_request(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        op = header.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None or not isinstance(op, str):
            raise BadRequest(f"storage does not serve op {op!r}")
        p.check_version(header)
        # The broker checked what it decoded; a large commit or have it only peeked at is
        # checked whole here, against the same table.
        p.check_request(op, header)
        if self._pending and op not in CHANGE_OPS:
            self._apply_pending()  # a group is commits that arrive back to back: none waits
        if self._reads and op != "chunk":
            self._read_pending()  # answered in the order they came
        self.served += 1
        log.debug("event=request op=%s id=%r", op, header.get("id"))
        if route.get("deadline", math.inf) < time.monotonic() and op not in CHANGE_OPS:
            # Its client stopped waiting (fms.worker stamps the deadline from the broker's ttl):
            # a short answer gives the broker its credit back, the work is not done.
            raise Unavailable("the request's deadline passed before storage could handle it; retry")
        who = route["who"] = self.access.resolve(route, header)
        try:
            handler(route, header, data)
        except Forbidden as exc:
            self.access.refused(who, str(op), header, exc)
            raise

    def handle_reply(self, header: Header, data: zmq.Frame | None) -> None:
        log.warning("event=unexpected_reply id=%r", header.get("id"))

    def on_register(self, at: int | None = None) -> None:
        # The broker lets the store's identities in, and passes this on to the cache workers.
        self._policy_changed(self.access.policy)

    def on_policy(self, snapshot: Policy) -> None:
        """Another storage worker's newer snapshot, passed on by the broker: decide with it at
        once (the epoch check would find it within a second)."""
        if snapshot.epoch > self.access.policy.epoch:
            self.access.policy = snapshot

    def on_invalidate(self, name: str, at: int | None = None) -> None:
        pass

    def tick(self, now: float) -> None:
        self.flush()
        if self.reserve is not None:
            self.reserve.refill()  # a no-op while it is whole
        try:
            if self.access.refresh(time.monotonic()):
                self._policy_changed(self.access.policy)
        except FmsError as exc:  # the database is away: decide with what we have meanwhile
            self._quiet.warning("event=access_refresh_failed error=%r", str(exc))
        if now >= self._next_clean:
            self._next_clean = now + CLEAN_INTERVAL
            removed = self.store.chunks.clean_tmp()
            if removed:
                log.info("event=temp_files_removed count=%d", removed)
        if self._maintenance is not None and now >= self._next_gc:
            self._next_gc = now + GC_INTERVAL
            self._maintenance.submit(None, None, self._background_gc)

    def close(self) -> None:
        """Stop the maintenance thread and the readers, and close both stores (SQLite folds its
        WAL back in)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        if self._maintenance is not None:
            self._maintenance.stop()
            self._maintenance.join()
            self._maintenance.store.close()
        self.store.close()

    def _policy_changed(self, snapshot: Policy) -> None:
        """Identities or grants changed (here, or seen by the epoch): tell the broker, which
        tells the cache workers and this store's other workers (when it can)."""
        send = getattr(self.link, "send_policy", None)
        if send is not None:
            send(snapshot)

    # --- read ops (also what the cache forwards on a miss) ---

    @staticmethod
    def _name(
        route: Route,
        header: Header,
        op: str,
        key: str = "name",
        role: str | None = None,
        check: Callable[[object], str] = p.check_name,
    ) -> str:
        """A name the request touches, checked (by ``check``: a folder marker's name too with
        :func:`~fms.wire.check_entry_name`) and allowed for its identity."""
        name = check(p.need(header, key, str))
        policy.check(route["who"], op, name, role)
        return name

    def op_get(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        self._reply_manifest(route, header, self.store.version(self._name(route, header, "get")))

    def op_get_version(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """A retained (or the current) version's manifest, as ``get`` answers it."""
        version = self.store.retained_version(
            self._name(route, header, "get_version"), p.need_int(header, "version", lo=1)
        )
        self._reply_manifest(route, header, version)

    def _reply_manifest(self, route: Route, header: Header, version: Version) -> None:
        frame = _inline_frame(self.store, version)
        manifest = version.manifest(self.store.digest_fn)
        self.link.reply(route, p.ok_reply(header["id"], manifest=manifest), frame)

    def op_versions(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        # The newest VERSIONS_MAX: a stat is at most ~3.3 KiB (its name and metadata), so the
        # reply stays within the 1 MiB the broker reserves for it, whatever --keep-versions is.
        found = self.store.versions(self._name(route, header, "versions"))[:VERSIONS_MAX]
        current = found[0].version if self.store.meta.get(found[0].name, lists=False) else None
        self.link.reply(
            route,
            p.ok_reply(
                header["id"],
                versions=[{**v.summary(), "current": v.version == current} for v in found],
            ),
        )

    def op_get_many(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """Many names in one message (fms.wire.batch): what the cache asks for its misses."""
        names = p.need_names(header)
        # per name: its refusal, or None (allowed: read below, the batch in one snapshot)
        refused: list[RemoteError | None] = []
        for name in names:
            try:
                policy.check(route["who"], "get_many", name)
                refused.append(None)
            except RemoteError as exc:
                refused.append(exc)
        read = iter(
            self.store.read_many([n for n, r in zip(names, refused, strict=True) if r is None])
        )
        batch = p.BatchReply()
        for refusal in refused:
            result = refusal if refusal is not None else next(read)
            if isinstance(result, RemoteError):  # this name's failure, not the batch's
                batch.error(result.code, str(result))
                continue
            version, frame = result
            batch.manifest(
                version.manifest(self.store.digest_fn),
                p.unpack_data(frame) if frame is not None else None,
            )
        self.link.reply(route, p.ok_reply(header["id"], results=batch.results), batch.frame())

    def op_chunk(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        digest = p.need_hash(header, "hash")
        if not route["who"].all:
            # By digest alone a chunk would tell whether anyone stores a content one guesses,
            # and give it to whoever learnt the digest: it is read through a file one may read.
            self.reads.check_chunk(route["who"], header, digest)
        size = p.need_int(header, "len", hi=p.MAX_CHUNK_SIZE, optional=True)
        if self._reader is not None and size is not None and size > SMALL_CHUNK_MAX:
            # A blob (never kept in the metadata engine): read with the others of this drain.
            self._reads.append((route, header, digest))
            return
        frame = self.store.read_chunk(digest)
        self.link.reply(route, p.ok_reply(header["id"]), frame)

    def _read_pending(self) -> None:
        """Fetch the chunk reads gathered since the last flush side by side, then answer each
        (verified; a chunk the backend cannot give whole is read again the careful way, which
        marks it lost or sets it aside)."""
        reads, self._reads = self._reads, []
        assert self._reader is not None  # reads are gathered only with a pool of readers
        fetched = self._reader.map(self._fetch_blob, [digest for _r, _h, digest in reads])
        for (route, header, digest), frame in zip(reads, fetched, strict=True):
            try:
                if frame is None:
                    frame = self.store.read_chunk(digest)
            except FmsError as exc:
                self._answer(route, header, exc)
                continue
            except OSError as exc:
                self._answer(route, header, os_failure(exc))
                continue
            self.link.reply(route, p.ok_reply(header["id"]), frame)

    def _fetch_blob(self, digest: p.Digest) -> bytearray | None:
        """A blob from the backend if it is there and verifies, else None (on a read thread)."""
        try:
            frame = self.store.chunks.get(digest)
        except (FmsError, OSError):
            return None
        if self.store.hash(memoryview(frame)[p.DATA_PREFIX_LEN :]) != digest:
            return None
        return frame

    def op_page(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """A page of a chunk list, or a body, by its id (what a client reads a long list by)."""
        ident = p.need_hash(header, "hash")
        if not route["who"].all:
            self.reads.check_page(route["who"], header, ident)
        blob = self.reads.blob(ident)
        self.link.reply(route, p.ok_reply(header["id"]), p.pack_data(blob))

    def op_stat(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        version = self.store.version(
            self._name(route, header, "stat", check=p.check_entry_name), lists=False
        )  # a folder marker's too
        self.link.reply(route, p.ok_reply(header["id"], stat=version.summary()))

    def op_ls(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        prefix = p.check_prefix(p.need(header, "prefix", str, optional=True, default=""))
        after = p.need(header, "after", str, optional=True, default="")
        limit = p.need_int(
            header, "limit", lo=1, hi=p.LS_PAGE_MAX, optional=True, default=p.LS_PAGE_DEFAULT
        )
        # A page holds at most `limit` items and `limit` x LS_ENTRY_MAX bytes (what the broker
        # reserves for the reply): entries with large metadata maps make shorter pages.
        budget = limit * p.LS_ENTRY_MAX
        scans = policy.scans(route["who"], policy.READ, prefix)
        if p.need(header, "folders", bool, optional=True, default=False):
            entries, folders, cursor = self.store.list_folder(prefix, after, limit, scans)
            items: list[tuple[str, dict[str, Any] | None]] = sorted(
                [(v.name, v.summary()) for v in entries] + [(f, None) for f in folders],
                key=lambda item: item[0],
            )
            kept = _fitting(items, budget)
            if kept < len(items):
                name, stat = items[kept - 1]
                cursor = name if stat is not None else name + FOLDER_END  # past the folder
            self.link.reply(
                route,
                p.ok_reply(
                    header["id"],
                    entries=[stat for _name, stat in items[:kept] if stat is not None],
                    folders=[name for name, stat in items[:kept] if stat is None],
                    next=cursor,
                    more=cursor is not None,
                ),
            )
            return
        page = self.store.list(prefix, after, limit + 1, scans)
        items = [(v.name, v.summary()) for v in page[:limit]]
        kept = _fitting(items, budget)
        self.link.reply(
            route,
            p.ok_reply(
                header["id"],
                entries=[stat for _name, stat in items[:kept]],
                more=len(page) > kept,
            ),
        )

    def op_du(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        prefix = p.check_prefix(p.need(header, "prefix", str, optional=True, default=""))
        files, nbytes = self.store.usage(prefix, policy.scans(route["who"], policy.READ, prefix))
        self.link.reply(route, p.ok_reply(header["id"], du={"files": files, "bytes": nbytes}))

    def op_cache_stats(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """Storage gets the cache's ops when no cache worker is connected: no cache, no counters."""
        self.link.reply(route, p.ok_reply(header["id"], cache=None))

    def op_usage(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        who = route["who"]
        if who.all:
            self.link.reply(route, p.ok_reply(header["id"], store=self.store.totals().as_dict()))
            return
        # What it may read; the chunks held (after dedup) are the whole store's: not its.
        files, nbytes = self.store.usage("", policy.scans(who, policy.READ, ""))
        self.link.reply(route, p.ok_reply(header["id"], store={"files": files, "bytes": nbytes}))

    # --- write ops ---

    @staticmethod
    def _owner(route: Route) -> str | None:
        """The identity whose dedup is its own (it may not read the whole store), or None.
        A gateway's own requests are not scoped: it may act for any identity anyway, and it
        commits the parts of its users' multipart uploads (their chunks) in its own folder."""
        who = route["who"]
        return None if who.all or who.gateway else who.name

    def op_have(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        policy.check_op(route["who"], "have")
        hashes = p.need_hashes(header, "hashes", p.MAX_HAVE_BATCH)
        missing = self.store.missing(hashes, self._owner(route))
        self.link.reply(route, p.ok_reply(header["id"], missing=missing))

    def op_put_chunk(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        policy.check_op(route["who"], "put_chunk")
        digest = p.need_hash(header, "hash")
        if data is None:
            raise BadRequest("put_chunk needs a data frame")
        payload = p.unpack_data(data.buffer)
        if len(payload) > p.MAX_CHUNK_SIZE:
            raise TooLarge(f"chunk of {len(payload)} bytes; chunks are at most {p.MAX_CHUNK_SIZE}")
        written = self.store.put_chunk(digest, payload, self._owner(route))
        self.link.reply(route, p.ok_reply(header["id"], written=written))

    def op_put_page(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        policy.check_op(route["who"], "put_page")
        page_id = p.need_hash(header, "hash")
        if data is None:
            raise BadRequest("put_page needs a data frame: the page's digests back to back")
        blob = p.unpack_data(data.buffer)
        owner = self._owner(route)
        if owner is not None:
            # A page may list only chunks its sender uploaded (else it could list another's and
            # read them through a file of its own): it sends those first.
            unowned = self.store.unowned(owner, p.split_digests(blob))
            if unowned:
                raise MissingChunks(
                    f"{len(unowned)} chunk(s) this page lists are not in the store; upload "
                    f"them and send the page again",
                    missing=unowned,
                )
        written = self.store.put_page(page_id, blob)
        if owner is not None:
            written = bool(self.store.meta.own(owner, [page_id]))
        self.link.reply(route, p.ok_reply(header["id"], written=written))

    def op_commit(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """A commit, pending until the group's transaction (:meth:`flush`).

        Its fields are read as they are: :meth:`handle_request` checked every one against the
        table first (:func:`fms.wire.check_request`: types and ranges, ``digest_kind``, the
        name's and the metadata's rules, the extents' shape), and checking them again here
        cost a small commit about a tenth of its Python."""
        chunks, pages = header.get("chunks"), header.get("pages")
        if (chunks is None) == (pages is None):  # nil: absent
            raise BadRequest("a commit lists either its chunks or its pages")
        name = header["name"]
        if not (name.isascii() and name.isprintable()):
            # The table said it is a name; this is it in NFC (printable ASCII is already).
            name = p.check_entry_name(name)
        policy.check(route["who"], "commit", name)
        extents = p.unpack_extents(header["extents"])
        if extents and p.is_folder_name(name):
            raise BadRequest(f"{name!r} is a folder's marker (it ends in '/'): it holds no content")
        mtime = header.get("mtime")
        change = NewVersion(
            name,
            extents,
            header["digest"],
            float(mtime) if mtime is not None else time.time(),
            header["commit"],
            tuple(chunks) if chunks is not None else None,
            tuple(pages) if pages is not None else None,
            meta=header.get("meta") or {},
            actor=route["who"].name,
        )
        inline = bytes(p.unpack_data(data.buffer)) if data is not None else None
        owner = self._owner(route)
        if owner is not None:
            # Only its own chunks (or pages): naming another's would tell it that someone stores
            # them, and let it read them.  It uploads the others (the reply lists them).
            listed = change.pages if change.pages is not None else change.chunks or ()
            unowned = self.store.unowned(owner, listed[1:] if inline else listed)
            if unowned:
                raise MissingChunks.absent(name, unowned)
        self._pending.append((route, header, change, inline))

    def op_commit_many(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """Small files (one chunk each, content inline, back to back in the data frame, each
        with its entry of ``metas``, else the message's ``meta``) in one message and one
        transaction; one reply with a result per file."""
        names = p.need(header, "names", list)
        count = len(names)
        if not 1 <= count <= p.MAX_BATCH_FILES:
            raise BadRequest(f"commit_many takes 1 to {p.MAX_BATCH_FILES} files, got {count}")
        columns = {
            key: p.need(header, key, list) for key in ("sizes", "hashes", "mtimes", "commits")
        }
        if any(len(column) != count for column in columns.values()):
            raise BadRequest(
                "commit_many: names, sizes, hashes, mtimes and commits must have one entry per file"
            )
        meta = p.check_meta(p.need(header, "meta", dict, optional=True, default={}))
        metas = p.need(header, "metas", list, optional=True)
        if metas is not None:  # one per file, in place of the message's
            if len(metas) != count:
                raise BadRequest("commit_many: metas must have one entry per file")
            metas = [p.decode_meta(m) for m in metas]
        chunk_size = p.need_int(header, "chunk_size", lo=p.MIN_CHUNK_SIZE, hi=p.MAX_CHUNK_SIZE)
        payload = p.unpack_data(data.buffer) if data is not None else memoryview(b"")
        if len(payload) > p.MAX_BATCH_BYTES:
            raise TooLarge(
                f"commit_many carries {len(payload)} bytes of content; at most "
                f"{p.MAX_BATCH_BYTES} a message: send the rest in another"
            )
        requests: list[tuple[Change, bytes | None]] = []
        offsets: list[int] = []
        offset = 0
        for i in range(count):
            item = {
                "size": columns["sizes"][i],
                "hash": columns["hashes"][i],
                "mtime": columns["mtimes"][i],
                "commit": columns["commits"][i],
            }
            size = p.need_int(item, "size", hi=min(p.INLINE_MAX, chunk_size))
            digest = p.need_hash(item, "hash")
            extents, chunks = (((chunk_size, size),), (digest,)) if size else ((), ())
            change = NewVersion(
                p.check_name(names[i]),
                extents,
                p.inline_digest(extents, chunks, self.store.hash),  # derived: content comes along
                p.check_mtime(p.need(item, "mtime", (int, float))),
                _commit_id(item),
                chunks=chunks,
                meta=meta if metas is None else metas[i],
                actor=route["who"].name,
            )
            requests.append((change, bytes(payload[offset : offset + size]) if size else None))
            offsets.append(offset)
            offset += size
        if offset != len(payload):
            raise BadRequest(
                f"commit_many: the sizes add up to {offset} bytes, the data frame "
                f"holds {len(payload)}"
            )
        if self._pending:
            self._apply_pending()  # changes apply in the order they arrived
        who = route["who"]
        allowed: list[int] = []
        results: list[Version | FmsError | None] = [None] * count
        for i, (asked, _inline) in enumerate(requests):
            try:
                policy.check(who, "commit_many", asked.name)
                allowed.append(i)
            except Forbidden as exc:  # this file's refusal, not the batch's
                self.access.refused(who, "commit_many", {"name": asked.name}, exc)
                results[i] = exc
        made = self.store.apply([requests[i] for i in allowed])
        for i, one in zip(allowed, made, strict=True):
            results[i] = one
        self._own_inline(
            route, [req for req, r in zip(requests, results, strict=True) if not _failed(r)]
        )
        out: list[dict[str, Any]] = []
        changed: list[str] = []
        offered: list[tuple[int, bytes] | None] = []
        for (asked, inline), at, result in zip(requests, offsets, results, strict=True):
            assert result is not None  # each was refused or applied above
            if isinstance(result, FmsError):
                out.append(
                    {
                        "ok": False,
                        "error": getattr(result, "code", "internal"),
                        "message": p.result_message(str(result)),
                    }
                )
                continue
            out.append({"ok": True, "stat": result.summary()})
            changed.append(result.name)
            fill = self._fill_of(asked, result) if inline is not None else None
            offered.append((at, fill) if fill is not None else None)
        # The broker drops every changed name from the cache before it forwards this ack, and
        # may hand the files made from the content carried here to it (`fills`).
        self.link.reply(
            route,
            p.ok_reply(header["id"], results=out),
            invalidate=changed,
            fills=_within_route(changed, offered),
        )

    def _own_inline(self, route: Route, requests: Sequence[tuple[Change, bytes | None]]) -> None:
        """An identity whose dedup is its own owns the chunks it sent inline with commits that
        were made (it sent their content)."""
        owner = self._owner(route)
        if owner is None:
            return
        digests = [
            c.chunks[0]
            for c, inline in requests
            if inline is not None and isinstance(c, NewVersion) and c.chunks
        ]
        if digests:
            self.store.meta.own(owner, digests)

    def op_rm(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        change = Removal(
            self._name(route, header, "rm", check=p.check_entry_name),
            _commit_id(header, optional=True),
            route["who"].name,
        )
        self._pending.append((route, header, change, None))

    def op_mv(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        self._pending.append((route, header, self._copy(route, header, "mv"), None))

    def op_cp(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        self._pending.append((route, header, self._copy(route, header, "cp"), None))

    def _copy(self, route: Route, header: Header, op: str) -> Copy:
        """mv needs write on both names (the source goes), cp read on the source."""
        return Copy(
            self._name(route, header, op, "src", policy.WRITE if op == "mv" else policy.READ),
            self._name(route, header, op),
            _commit_id(header),
            op == "mv",
            route["who"].name,
        )

    def op_restore(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        change = Restore(
            self._name(route, header, "restore"),
            p.need_int(header, "version", lo=1, optional=True, default=None),
            _commit_id(header),
            route["who"].name,
        )
        self._pending.append((route, header, change, None))

    def op_purge(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """Remove a version (``version``), or every version (``all``), of a name for good,
        held or not: an admin's.  The broker drops the name from the cache before the ack."""
        name = self._name(route, header, "purge")
        version = p.need_int(header, "version", lo=1, optional=True, default=None)
        every = p.need(header, "all", bool, optional=True, default=False)
        if (version is None) == (not every):
            raise BadRequest("purge takes one of 'version' (a number) or 'all': true")
        if self._pending:
            self._apply_pending()  # changes apply in the order they arrived
        purged = self.store.meta.purge(
            name, version, every, time.time(), route["who"].name, _commit_id(header, optional=True)
        )
        log.info("event=purge name=%r versions=%s by=%s", name, purged, route["who"].name)
        self.link.reply(route, p.ok_reply(header["id"], purged=purged), invalidate=name)

    def op_rm_prefix(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """A page of the names under the folder ``prefix`` removed in one transaction: `rm -r`
        costs one request per page, not one per name.  ``album`` and ``album/`` both mean the
        names under ``album/``, never ``albumX``."""
        prefix = p.check_folder(p.need(header, "prefix", str))
        if not prefix:
            raise BadRequest("rm_prefix needs a non-empty prefix")
        policy.check_folder(route["who"], "rm_prefix", prefix)
        limit = p.need_int(header, "limit", lo=1, hi=RM_PAGE, optional=True, default=RM_PAGE)
        if self._pending:
            self._apply_pending()  # changes apply in the order they arrived
        removed, more = self._freeing(
            lambda in_reserve: self.store.remove_prefix(
                prefix,
                min(limit, RESERVE_RM_PAGE) if in_reserve else limit,
                RM_PAGE_NAME_BYTES,
                route["who"].name,
            )
        )
        names = [v.name for v in removed]
        # The broker drops every removed name from the cache before it forwards this ack.
        self.link.reply(route, p.ok_reply(header["id"], removed=names, more=more), invalidate=names)

    def op_mv_prefix(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        """Rename a folder: every name under ``prefix`` moves under ``dest`` in one
        transaction (metadata only); the caches drop both folders before the ack."""
        prefix = p.check_folder_name(p.need(header, "prefix", str))
        dest = p.check_folder_name(p.need(header, "dest", str))
        for folder in (prefix, dest):  # write on every name under both (mv needs it on both)
            policy.check_folder(route["who"], "mv_prefix", folder)
        commit = _commit_id(header)
        if self._pending:
            self._apply_pending()  # changes apply in the order they arrived
        moved = self.store.move_prefix(prefix, dest, commit, MV_PREFIX_MAX, route["who"].name)
        # An `inv` entry ending in '/' is a folder: the caches drop every name under it.
        self.link.reply(route, p.ok_reply(header["id"], moved=moved), invalidate=[prefix, dest])

    def linger(self) -> float:
        """Seconds the worker loop should wait for more messages before :meth:`flush`: more
        than 0 only while changes are pending and nothing else (:mod:`.groupwait`)."""
        return 0.0 if self._reads else self.group_wait.seconds(len(self._pending))

    def flush(self) -> None:
        """Apply the commits and removes received since the last flush in one transaction,
        answer them, and send what the maintenance thread finished."""
        self.access.flush()  # refusals first: they came before the changes pending now
        if self._pending:
            self._apply_pending()
        if self._reads:
            self._read_pending()
        if self._maintenance is not None:
            for route, header, result in self._maintenance.finished():
                self._answer(route, header, result)

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        self.group_wait.applied(len(pending))
        results: list[Version | FmsError]
        try:
            results = self.store.apply([(change, inline) for _r, _h, change, inline in pending])
        except FmsError as exc:  # the transaction itself failed: nothing applied
            results = [exc] * len(pending)
        except OSError as exc:  # the transaction's own disk trouble
            results = [os_failure(exc)] * len(pending)
        except Exception as exc:  # a bug: every commit of the group still gets an answer
            log.exception("event=group_commit_crashed error=%r", exc)
            results = [FmsError(f"internal error: {exc!r}")] * len(pending)
        self._remove_in_reserve(pending, results)
        for (route, header, change, inline), result in zip(pending, results, strict=False):
            if inline is not None and not _failed(result):
                self._own_inline(route, [(change, inline)])
            self._answer_change(route, header, change, result, inline is not None)

    def _remove_in_reserve(self, pending: list[Pending], results: list[Version | FmsError]) -> None:
        """With the disk full, the removals of a group run again in the room of the disk's
        reserve (they are how space comes back); its other changes keep their ``no_space``."""
        again = [
            i
            for i, (_r, _h, change, _i) in enumerate(pending)
            if isinstance(change, Removal) and isinstance(results[i], NoSpace)
        ]
        if not again or self.reserve is None:
            return
        retried: list[Version | FmsError]
        try:
            with self.reserve.released():
                retried = self.store.apply([(pending[i][2], None) for i in again])
        except FmsError as exc:
            retried = [exc] * len(again)
        except OSError as exc:
            retried = [os_failure(exc)] * len(again)
        for i, result in zip(again, retried, strict=True):
            results[i] = result

    def _freeing(self, work: Callable[[bool], T]) -> T:
        """Run ``work(in_reserve)``, a write that gives space back; if the disk is full, once
        more in the room of the disk's reserve (``in_reserve`` True: do less at once)."""
        try:
            return work(False)
        except NoSpace:
            if self.reserve is None:
                raise
        with self.reserve.released():
            return work(True)

    def _answer_change(
        self,
        route: Route,
        header: Header,
        change: Change,
        result: Version | FmsError,
        inline: bool = False,
    ) -> None:
        """Answer a change; ``inline``: a commit that carried its content (its whole content,
        when the new version travels inline: the broker may hand it to the cache, ``fill``)."""
        if isinstance(result, FmsError):
            self._answer(route, header, result)
            return
        # DEBUG: a line per change cost 7% of the small-commit rate at INFO (and 19 MB of log
        # per 200,000 commits); its isinstance chain is skipped too unless DEBUG is on.
        if log.isEnabledFor(logging.DEBUG):
            _log_change(change, result)
        # The broker sees `invalidate` and tells the cache before it forwards this ack (an mv
        # changes two names).
        names = change.names
        self.link.reply(
            route,
            p.ok_reply(header["id"], stat=result.summary()),
            invalidate=names[0] if len(names) == 1 else list(names),
            fill=self._fill_of(change, result) if inline else None,
        )

    def _fill_of(self, change: Change, made: Version) -> bytes | None:
        """The manifest (encoded) of a version this commit just made whose content came whole
        with the request (one chunk, small enough to travel inline), for the broker to hand to
        the cache with the request's data frame (docs/PROTOCOL.md, *Fills on commit*); None
        otherwise.  Only a version made now comes with its chunk list: a retried commit
        answered from the log has a stat (the name may have changed since), so it never
        fills, and neither does a tombstone (no chunk list either)."""
        if not isinstance(change, NewVersion) or not travels_inline(made):
            return None
        return p.encode(made.manifest(self.store.digest_fn))

    def _answer(
        self, route: Route | None, header: Header | None, result: dict[str, Any] | FmsError
    ) -> None:
        if route is None or header is None:
            return  # a background job: nobody waits for it
        if isinstance(result, FmsError):
            code = getattr(result, "code", "internal")
            extra = result.reply_fields() if hasattr(result, "reply_fields") else {}
            self.link.reply(route, {**p.error_reply(header["id"], code, str(result)), **extra})
        else:
            self.link.reply(route, p.ok_reply(header["id"], **result))

    # --- maintenance ops ---

    def op_gc(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        policy.check_op(route["who"], "gc")
        grace = p.need(header, "grace", (int, float), optional=True, default=self.gc_grace)
        if not 0 <= grace <= p.MAX_GC_GRACE:
            raise BadRequest(f"grace {grace!r} must be between 0 seconds and 10 years")
        dry_run = p.need(header, "dry_run", bool, optional=True, default=False)
        actor = route["who"].name
        self._run(
            route,
            header,
            lambda store: {
                "gc": self._freeing(lambda _: gc.collect(store, float(grace), dry_run, actor=actor))
            },
        )

    def op_fsck(self, route: Route, header: Header, data: zmq.Frame | None) -> None:
        policy.check_op(route["who"], "fsck")
        after = p.need(header, "after", str, optional=True, default="")
        deadline = route.get("deadline")

        def page(store: Store) -> dict[str, Any]:
            # A page ends in half the time its client has left (a page answers, and the next
            # page goes on, rather than one page outliving its client's wait).
            seconds = gc.FSCK_PAGE_SECONDS
            if deadline is not None:
                seconds = min(seconds, (deadline - time.monotonic()) / 2)
            return {"fsck": gc.fsck_page(store, after, page_seconds=seconds)}

        self._run(route, header, page)

    def _run(self, route: Route, header: Header, job: Job) -> None:
        if self._maintenance is None:
            result: dict[str, Any] | FmsError
            try:
                result = job(self.store)
            except FmsError as exc:
                result = exc
            self._answer(route, header, result)
        else:
            self._maintenance.submit(route, header, job)

    def _background_gc(self, store: Store) -> dict[str, Any]:
        self._freeing(lambda _: gc.collect(store, self.gc_grace))
        return {}


def _inline_frame(store: Store, version: Version) -> bytearray | None:
    """The content of a small file, which travels with its manifest (its one chunk), else None."""
    if travels_inline(version) and version.chunks:
        return store.read_chunk(version.chunks[0])
    return None


def _fitting(items: list[tuple[str, dict[str, Any] | None]], budget: int) -> int:
    """How many of the leading ``(name, stat or None for a folder)`` items take at most
    ``budget`` bytes on the wire (at least one)."""
    used = 0
    for n, (name, stat) in enumerate(items):
        used += len(p.encode(stat)) if stat is not None else len(name.encode()) + 3
        if used > budget and n:
            return n
    return len(items)


def _failed(result: Version | FmsError | None) -> bool:
    return result is None or isinstance(result, FmsError)


def _hashes(header: Header, key: str, limit: int) -> tuple[p.Digest, ...] | None:
    return tuple(p.need_hashes(header, key, limit)) if header.get(key) is not None else None


def _log_change(change: Change, result: Version) -> None:
    """A DEBUG line for a change made."""
    if isinstance(change, Removal):
        log.debug("event=rm name=%r version=%d", result.name, result.version)
    elif isinstance(change, Restore):
        log.debug("event=restore name=%r version=%d", result.name, result.version)
    elif isinstance(change, Copy):
        log.debug(
            "event=%s src=%r name=%r version=%d",
            "mv" if change.move else "cp",
            change.src,
            result.name,
            result.version,
        )
    else:
        log.debug(
            "event=commit name=%r version=%d size=%d", result.name, result.version, result.size
        )


def _commit_id(header: Mapping[str, Any], optional: bool = False) -> str:
    commit = p.need(header, "commit", str, optional=optional, default=None)
    if commit is None:
        return uuid.uuid4().hex
    if not 1 <= len(commit) <= p.MAX_COMMIT_ID:
        raise BadRequest(
            f"field 'commit' must be 1 to {p.MAX_COMMIT_ID} characters: a fresh random id"
        )
    return commit


class _Maintenance:
    """One thread running GC and fsck jobs in order, on a store of its own."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # (route, header, job): route and header None for a background job; None: stop
        self._jobs: queue.Queue[tuple[Route | None, Header | None, Job] | None] = queue.Queue()
        # (route, header, the reply's fields or the error): appended by the thread, taken by
        # the worker's (a deque's append and popleft are atomic; a Queue's get_nowait cost
        # every flush a lock and an Empty exception, about 1 µs, when nothing was done)
        self._done: collections.deque[
            tuple[Route | None, Header | None, dict[str, Any] | FmsError]
        ] = collections.deque()
        self._thread = threading.Thread(target=self._run, name="fms-maintenance", daemon=True)
        self._thread.start()

    def submit(self, route: Route | None, header: Header | None, job: Job) -> None:
        self._jobs.put((route, header, job))

    def finished(
        self,
    ) -> Iterator[tuple[Route | None, Header | None, dict[str, Any] | FmsError]]:
        done = self._done
        while done:
            yield done.popleft()

    def stop(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            route, header, job = item
            result: dict[str, Any] | FmsError
            try:
                if route is not None and route.get("deadline", math.inf) < time.monotonic():
                    # Its client stopped waiting while it queued (and may have asked again):
                    # the work is not done, so retries never pile up here.
                    raise Unavailable(
                        "the request's deadline passed before storage got to it; retry"
                    )
                result = job(self.store)
            except FmsError as exc:
                result = exc
            except Exception as exc:  # a bug must cost one job, not the thread
                log.exception("event=maintenance_crashed error=%r", exc)
                result = FmsError(f"internal error: {exc!r}")
            self._done.append((route, header, result))


def _within_route(
    names: list[str], offered: list[tuple[int, bytes] | None]
) -> list[tuple[int, bytes] | None] | None:
    """A ``commit_many``'s fills (per changed name: the offset of its content in the request's
    data and its new manifest, or None) as many as fit beside the names in the reply's route
    frame (``FILL_ROUTE_BYTES`` of names and manifests: the broker hands them on in one
    ``inv``, which must stay under ``MAX_HEADER``); None if there are none."""
    room = limits.FILL_ROUTE_BYTES - sum(len(name.encode()) for name in names)
    kept: list[tuple[int, bytes] | None] = []
    for fill in offered:
        if fill is not None and len(fill[1]) <= room:
            room -= len(fill[1])
            kept.append(fill)
        else:
            kept.append(None)
    return kept if any(kept) else None
