"""The metadata engine in SQL, shared by SQLite and PostgreSQL.

A subclass supplies the connection and the few places where the two differ (:class:`Dialect`):
column types, how a write transaction starts, how rows and names are locked, and how driver
errors translate into the wire's errors.  Every statement is written once, here.

**Chunk lists** (:mod:`fms.wire.manifest`).  A version keeps a short chunk list (at most
``INLINE_CHUNKS`` digests) in its own row, and holds one reference on each *distinct* chunk of
it.  A longer list is in *pages* (table ``pages``: a page's digests back to back, stored once
under its id however many files list it), which a *body* lists (table ``bodies``: the extents
and page ids, stored once under its id); such a version holds one reference on its body, and
keeps a copy of the body's extents and page ids in its row when they are small.  A body holds
one reference on each distinct page it lists, a page one on each distinct chunk it lists; they
are taken when the page or body is stored and released when the collector deletes it.  So a
repeat costs nothing, and ``cp``, ``mv`` and ``restore`` take one reference whatever the size of
the file.  Pages and bodies unreferenced for the grace period are deleted by the collector
(:meth:`SQLMeta.collect_lists`), which releases what they list, so a removed file's pages and
chunks go in one collection.

Concurrency.  On SQLite a write transaction holds the database's one write lock (``BEGIN
IMMEDIATE``), so transactions are serial.  On PostgreSQL (READ COMMITTED) transactions run side
by side, so each takes what it changes: a commit or rm takes a transaction-scoped advisory lock
on each of its names (in sorted order, all at the start) and ``FOR UPDATE`` on the rows it
references (bodies, then pages, then chunks, each sorted by id); the collector takes the rows it
deletes or dooms with ``FOR UPDATE SKIP LOCKED``, so it never waits on a commit and never
deletes a row a commit holds.  The totals row is always changed last.  A deadlock or
serialization failure that remains is retried whole.  A reader that needs one consistent view
over several statements (fsck's pages) reads in a :meth:`SQLMeta.snapshot`: REPEATABLE READ,
READ ONLY on PostgreSQL; on SQLite (WAL) a read transaction, which sees the database as of its
first read.
"""

import builtins
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, Protocol, TypeAlias, TypedDict, TypeVar

import msgpack

from ... import wire as p
from ...errors import (
    BadRequest,
    Conflict,
    FmsError,
    MissingChunks,
    NotFound,
    TooLarge,
    Unavailable,
)
from ...limits import BytesLike
from ...wire.fields import Digest
from ..model import (
    Change,
    Copy,
    NewVersion,
    Removal,
    Restore,
    Totals,
    Version,
    check_chunks,
    check_pages,
)
from .access import AccessSQL, audit_entry, change_entry
from .base import ChunkRow, MetaEngine

FORMAT = 3  # the store's format; 1 was one manifest file per name, 2 a chunk list per row
RETRIES = 5  # a transaction that deadlocked is tried this many times in all
IN_BATCH = 500  # ids per `IN (...)` list
LIST_BATCH = 16  # bodies or pages the collector deletes per transaction (up to 2 MiB each)
RECOUNT_CHUNKS = 1 << 20  # chunk rows a reference recount holds counts for at once
ROW_LISTS_MAX = 1024  # a body's extents and page ids are copied into its versions' rows
# while they take at most this many bytes, so a get never reads the body itself

log = logging.getLogger("fms.storage.meta")

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS names (
    name {name_type} PRIMARY KEY, version BIGINT NOT NULL, size BIGINT NOT NULL,
    digest {blob} NOT NULL, kind TEXT NOT NULL, chunk_size BIGINT NOT NULL,
    nchunks BIGINT NOT NULL, mtime {real} NOT NULL, commit_id TEXT NOT NULL,
    committed {real} NOT NULL, meta {blob}, extent_list {blob}, chunk_list {blob},
    page_list {blob}, body {blob}, deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS names_tombstones ON names (committed) WHERE deleted = 1;
CREATE INDEX IF NOT EXISTS names_live ON names (name) WHERE deleted = 0;
CREATE TABLE IF NOT EXISTS retained (
    name {name_type} NOT NULL, version BIGINT NOT NULL, size BIGINT NOT NULL,
    digest {blob} NOT NULL, kind TEXT NOT NULL, chunk_size BIGINT NOT NULL,
    nchunks BIGINT NOT NULL, mtime {real} NOT NULL, commit_id TEXT NOT NULL,
    committed {real} NOT NULL, meta {blob}, extent_list {blob}, chunk_list {blob},
    page_list {blob}, body {blob}, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS chunks (
    digest {blob} PRIMARY KEY, size BIGINT NOT NULL, refs BIGINT NOT NULL DEFAULT 0,
    since {real} NOT NULL, doomed INTEGER NOT NULL DEFAULT 0, data {blob},
    lost INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS chunks_unreferenced ON chunks (since) WHERE refs = 0;
CREATE TABLE IF NOT EXISTS pages (
    id {blob} PRIMARY KEY, data {blob} NOT NULL, nchunks BIGINT NOT NULL,
    size_head BIGINT NOT NULL, size_tail BIGINT NOT NULL, refs BIGINT NOT NULL DEFAULT 0,
    since {real} NOT NULL);
CREATE INDEX IF NOT EXISTS pages_unreferenced ON pages (since) WHERE refs = 0;
CREATE TABLE IF NOT EXISTS bodies (
    id {blob} PRIMARY KEY, data {blob} NOT NULL, refs BIGINT NOT NULL DEFAULT 0,
    since {real} NOT NULL);
CREATE INDEX IF NOT EXISTS bodies_unreferenced ON bodies (since) WHERE refs = 0;
CREATE TABLE IF NOT EXISTS commits (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, sha256 {blob},
    result {blob} NOT NULL, at {real} NOT NULL);
CREATE INDEX IF NOT EXISTS commits_at ON commits (at);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1), files BIGINT NOT NULL, bytes BIGINT NOT NULL,
    chunks BIGINT NOT NULL, chunk_bytes BIGINT NOT NULL);
INSERT INTO totals VALUES (1, 0, 0, 0, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, until {real} NOT NULL)
"""

# Format 2's tables, which an upgrade reads (renamed out of the way) and a format-1 migration
# fills before it upgrades them in the same transaction.
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS names_v2 (
    name {name_type} PRIMARY KEY, version BIGINT NOT NULL, size BIGINT NOT NULL,
    sha256 {blob} NOT NULL, chunk_size BIGINT NOT NULL, chunks {blob} NOT NULL,
    mtime {real} NOT NULL, commit_id TEXT NOT NULL, committed {real} NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS retained_v2 (
    name {name_type} NOT NULL, version BIGINT NOT NULL, size BIGINT NOT NULL,
    sha256 {blob} NOT NULL, chunk_size BIGINT NOT NULL, chunks {blob} NOT NULL,
    mtime {real} NOT NULL, commit_id TEXT NOT NULL, committed {real} NOT NULL,
    PRIMARY KEY (name, version))
"""

_STAT_COLUMNS = (
    "name, size, digest, kind, chunk_size, nchunks, mtime, version, commit_id, committed, meta"
)
_LIST_COLUMNS = "extent_list, chunk_list, page_list, body"
_ROW_COLUMNS = f"{_STAT_COLUMNS}, {_LIST_COLUMNS}"  # what a names or retained row holds
_CHUNK_COLUMNS = "digest, size, refs, since, doomed, data, lost"


class Retry(Exception):
    """The transaction met a deadlock or a serialization failure: run it again."""


class _Guard(Exception):
    """A change of a group made without savepoints was refused: the group's transaction is
    rolled back and made again with one around each change (SQLMeta.apply)."""


class _Refused(Exception):
    """The one change of a group was refused (``error``): its transaction is rolled back whole
    instead of to a savepoint."""

    def __init__(self, error: FmsError) -> None:
        super().__init__(error)
        self.error = error


class ConnectionLost(Unavailable):
    """The connection to the database was lost during a transaction: nothing of it stands, so
    no change of a group commit may be kept by rolling back to its savepoint."""


# A row as the driver returns it: the selected columns' values, of the driver's types.
Row: TypeAlias = tuple[Any, ...]
T = TypeVar("T")


class Cursor(Protocol):
    """What a statement returns, in both drivers (sqlite3, psycopg)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> builtins.list[Row]: ...
    def __iter__(self) -> Iterator[Row]: ...


class _Lists(TypedDict, total=False):
    """What a version lists, as :class:`Version`'s fields (see there)."""

    extents: tuple[p.Extent, ...] | None
    chunks: tuple[Digest, ...] | None
    pages: tuple[Digest, ...] | None
    body: Digest | None


def _blob(value: BytesLike | None) -> bytes | None:
    return bytes(value) if value is not None else None


def _version(row: Row, deleted: bool | int = False, lists: bool = True) -> Version:
    """A version from ``_STAT_COLUMNS`` (and, with ``lists``, ``_LIST_COLUMNS``) of a row."""
    name, size, digest, kind, chunk_size, count, mtime, version, commit, committed, meta = row[:11]
    fields: _Lists = {}
    if lists:
        extents, chunks, pages, body = row[11:15]
        fields = {
            "extents": p.unpack_extents(extents) if extents is not None else None,
            "chunks": tuple(p.split_digests(chunks)) if chunks is not None else None,
            "pages": tuple(p.split_digests(pages)) if pages is not None else None,
            "body": _blob(body),
        }
    return Version(
        name,
        size,
        bytes(digest),
        kind,
        chunk_size,
        count,
        mtime,
        version,
        commit,
        committed,
        msgpack.unpackb(bytes(meta), raw=False) if meta else {},
        bool(deleted),
        **fields,
    )


def _row(version: Version) -> Row:
    """A version as the values of ``_ROW_COLUMNS``."""
    return (
        version.name,
        version.size,
        version.digest,
        version.digest_kind,
        version.chunk_size,
        version.count,
        version.mtime,
        version.version,
        version.commit,
        version.committed,
        msgpack.packb(version.meta, use_bin_type=True) if version.meta else None,
        p.pack_extents(version.extents) if version.extents is not None else None,
        p.join_digests(version.chunks) if version.chunks is not None else None,
        p.join_digests(version.pages) if version.pages is not None else None,
        version.body,
    )


def _stat_fields(version: Version) -> dict[str, Any]:
    """What a remembered commit keeps of the version it made: its stat, never its chunk list
    (a dict literal: a comprehension of ``getattr`` cost a commit 1 µs)."""
    return {
        "name": version.name,
        "size": version.size,
        "digest": version.digest,
        "digest_kind": version.digest_kind,
        "chunk_size": version.chunk_size,
        "count": version.count,
        "mtime": version.mtime,
        "version": version.version,
        "commit": version.commit,
        "committed": version.committed,
        "meta": version.meta,
        "deleted": version.deleted,
    }


def _chunk(row: Row) -> ChunkRow:
    digest, size, refs, since, doomed, data, lost = row
    return ChunkRow(
        bytes(digest), size, refs, since, doomed, bytes(data) if data is not None else None, lost
    )


def _under(prefix: str, lo: str | None = None) -> tuple[str, builtins.list[object]]:
    """The condition "the name is under ``prefix``" (and at or above ``lo``, if given), and
    its arguments in order."""
    where = "name >= ?"
    args: builtins.list[object] = [prefix if lo is None else lo]
    hi = prefix_end(prefix)
    if hi is not None:
        where += " AND name < ?"
        args.append(hi)
    return where, args


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if last == 0xD800:
            last = 0xE000  # surrogates are not characters a name can hold
        if last <= 0x10FFFF:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


def _request_digest(change: NewVersion) -> Digest:
    """What identifies a commit request: every field it carries."""
    return hashlib.sha256(
        msgpack.packb(
            [
                change.name,
                p.pack_extents(change.extents),
                change.digest,
                change.digest_kind,
                p.join_digests(change.chunks or ()),
                p.join_digests(change.pages or ()),
                change.mtime,
                sorted(change.meta.items()),
            ],
            use_bin_type=True,
        )
    ).digest()


def _by_delta(counts: Mapping[bytes, int]) -> tuple[list[bytes], list[int]]:
    """``(ids, deltas)`` of a Counter of reference changes, sorted by id."""
    ids = sorted(counts)
    return ids, [counts[i] for i in ids]


def _renamed(version: Version, name: str, commit: str, now: float) -> Version:
    """``version``'s content as a new version of ``name`` made by ``commit`` now."""
    return replace(version, name=name, commit=commit, committed=now, deleted=False)


def _marks(n: int) -> str:
    return ",".join("?" * n)


# Statements a commit runs, their text made once.
_SELECT_CURRENT = f"SELECT {_ROW_COLUMNS}, deleted FROM names WHERE name = ?"
_SELECT_RETAINED = f"SELECT {_ROW_COLUMNS} FROM retained WHERE name = ? ORDER BY version DESC"
_INSTALL = (
    f"INSERT INTO names ({_ROW_COLUMNS}, deleted) VALUES ({_marks(15)}, 0) "
    "ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _ROW_COLUMNS.split(", ")[1:])
    + ", deleted = 0"
)
_REPLACE = (
    "UPDATE names SET "
    + ", ".join(f"{c} = ?" for c in _ROW_COLUMNS.split(", ")[1:])
    + " WHERE name = ?"
)
# A claim of a chunk held already (:meth:`SQLMeta._claim`): its clock starts again, it is no
# longer lost, it gains the claim's references; with its bytes, a small chunk's copy in the
# engine is healed if it differs.
_CLAIM_HELD = (
    "UPDATE chunks SET since = ?, lost = 0, refs = refs + ? WHERE digest = ? AND doomed = 0 "
    "RETURNING data IS NOT NULL"
)
_CLAIM_HELD_BYTES = (
    "UPDATE chunks SET since = ?, lost = 0, refs = refs + ?, data = CASE WHEN data IS NOT NULL "
    "AND data != ? THEN ? ELSE data END WHERE digest = ? AND doomed = 0 "
    "RETURNING data IS NOT NULL"
)


def _batches(items: Iterable[T], size: int = IN_BATCH) -> Iterator[list[T]]:
    every = list(items)
    for start in range(0, len(every), size):
        yield every[start : start + size]


class WrongDigest(FmsError):
    """The store records another digest function than the one asked for."""


class _Unread:
    """The name's current row was not read yet (:meth:`SQLMeta._install`)."""


_UNREAD = _Unread()


class WriterQueue(Protocol):
    """Writers of one store wait here, one at a time, before they begin a transaction."""

    def enter(self) -> None: ...

    def leave(self) -> None: ...


class _Write:
    """One write transaction of ``meta`` (:meth:`SQLMeta._write`), as a context manager:
    begun on entry, committed on a clean exit, else rolled back, and driver errors become the
    wire's errors; ``relaxed``: run between the two statements of ``meta.lazy_commit`` (it
    commits without waiting for the disk).  A class rather than a generator
    (``contextlib.contextmanager``): every commit enters one, and the generator's machinery
    cost a small commit about 2 µs."""

    __slots__ = ("meta", "queue", "relax", "restore")
    relax: str | None
    restore: str | None
    queue: "WriterQueue | None"  # the writers' queue it waited in (left when it ends)

    def __init__(self, meta: "SQLMeta", relaxed: bool) -> None:
        self.meta = meta
        self.relax = self.restore = self.queue = None
        if relaxed and meta.lazy_commit:
            self.relax, self.restore = meta.lazy_commit

    def __enter__(self) -> None:
        meta = self.meta
        queue = self.queue = meta.writers
        if queue is not None:
            queue.enter()
        try:
            if self.relax is not None:
                meta._execute(self.relax)
            try:
                meta._execute(meta.begin_write)
            except Exception as exc:
                error = meta._error(exc)
                if self.restore is not None:
                    meta._execute(self.restore)  # never left relaxed
                raise error from None
        except BaseException:
            if queue is not None:
                queue.leave()
            raise
        meta.in_transaction = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> Literal[False]:
        meta = self.meta
        try:
            if kind is None:
                try:
                    meta._execute("COMMIT")
                except BaseException as failed:
                    self._roll_back(failed)
                    raise
                return False
            assert exc is not None
            self._roll_back(exc)
            return False  # the body's exception goes on
        finally:
            meta.in_transaction = False
            try:
                if self.restore is not None:  # never left relaxed: if this fails, so does
                    meta._execute(self.restore)  # the request
            finally:
                if self.queue is not None:
                    self.queue.leave()

    def _roll_back(self, exc: BaseException) -> None:
        """Roll back after ``exc``; raise it as the wire's error if it is the driver's."""
        meta = self.meta
        with contextlib.suppress(Exception):
            meta._execute("ROLLBACK")
        translated = meta._translate(exc)
        if translated is not None:
            raise translated from None


class SQLMeta(AccessSQL, MetaEngine):
    """The engine over a DB-API connection ``self.db`` in autocommit mode; subclasses open it."""

    # Dialect: overridden by subclasses.
    types = {"blob": "BLOB", "real": "REAL", "name_type": "TEXT"}
    begin_write = "BEGIN"
    # A read-only transaction whose reads all see one state of the store (SQLite in WAL mode:
    # the snapshot is fixed by the first read and kept to the end).
    begin_read = "BEGIN"
    # Statements run before and after a transaction that need not be on disk when it commits
    # (the next durable commit, which names what it relied on, flushes it along): none here.
    lazy_commit: tuple[str, str] | tuple[()] = ()
    for_update = ""  # appended to SELECTs of rows about to be changed
    locks_names = False  # whether _lock_names does anything (transactions run side by side)
    skip_locked = ""  # appended to the collector's SELECT
    in_transaction = False  # a lost connection must not be silently reopened midway
    # Where the writers of the store queue before the database's own lock, if it has one of its
    # own (SQLite: see fms.storage.meta.sqlite.LockFileQueue).
    writers: "WriterQueue | None" = None
    _reading = False  # in a snapshot (see snapshot())
    keep_versions = 0  # replaced versions retained per name (the worker's --keep-versions)
    _delta: builtins.list[int]  # what the transaction under way adds to the totals row
    _chunk_refs: collections.Counter[Digest]  # the change under way's chunk references

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        raise NotImplementedError

    def _translate(self, exc: BaseException) -> FmsError | Retry | None:
        """A driver error as an :class:`FmsError` (or :class:`Retry`), or None if not one of
        the driver's."""
        raise NotImplementedError

    def _lock_names(self, names: Sequence[str]) -> None:
        """Hold ``names`` until the transaction ends (no-op where transactions are serial,
        :attr:`locks_names` false)."""

    def _lock_schema(self) -> None:
        """Hold off other workers creating the tables at the same moment (no-op if serial)."""

    # --- transactions ---

    def _create_schema(self, store_id: str, digest_fn: str | None = None) -> None:
        """Create the tables of a new store, or upgrade those of an older format in place: one
        transaction, which other workers opening the store wait for (and then find done).

        A new store records its digest function (``digest_fn``, else ``p.NEW_STORE_DIGEST``); a
        store made before the choice existed records ``p.OLD_STORE_DIGEST``, the one its chunks
        are stored under.  :raises FmsError: ``digest_fn`` is not the one the store records."""
        with self._write():
            self._lock_schema()
            self._execute(
                "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            found = self._execute("SELECT value FROM settings WHERE key = 'format'").fetchone()
            older = found is not None and found[0] == "2"
            if found is not None and not older and int(found[0]) != FORMAT:
                raise FmsError(
                    f"this store is in format {found[0]}, which this fms does not know "
                    f"(it writes format {FORMAT}); use the fms that made it"
                )
            if older:
                self._execute("ALTER TABLE chunks ADD COLUMN lost INTEGER NOT NULL DEFAULT 0")
                self._create(
                    SCHEMA_V2.replace("names_v2", "names").replace("retained_v2", "retained")
                )
                self._execute("DROP INDEX IF EXISTS names_tombstones")
                self._execute("DROP INDEX IF EXISTS names_live")  # the new names get their own
                for table in ("names", "retained"):
                    self._execute(f"ALTER TABLE {table} RENAME TO {table}_v2")
                    self._rename_key_index(table)
            self._create(SCHEMA)
            if older:
                self._upgrade_v2(time.time())
                self._execute("UPDATE settings SET value = ? WHERE key = 'format'", (str(FORMAT),))
            self._execute(
                "INSERT INTO settings VALUES ('format', ?) ON CONFLICT (key) DO NOTHING",
                (str(FORMAT),),
            )
            self._execute(
                "INSERT INTO settings VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
                (store_id,),
            )
            self._create_access_schema()
            made = (digest_fn or p.NEW_STORE_DIGEST) if found is None else p.OLD_STORE_DIGEST
            self._execute(
                "INSERT INTO settings VALUES ('digest', ?) ON CONFLICT (key) DO NOTHING",
                (made,),
            )
            (recorded,) = self._only("SELECT value FROM settings WHERE key = 'digest'")
            if recorded not in p.DIGEST_FUNCTIONS:
                raise FmsError(
                    f"this store records the digest function {recorded!r}, which this fms "
                    f"does not know; use the fms that made it"
                )
            if digest_fn is not None and digest_fn != recorded:
                raise WrongDigest(
                    f"this store's digest function is {recorded} (chosen when it was "
                    f"created, it cannot change); leave out --digest, or give --digest "
                    f"{recorded}"
                )
        self.digest_fn = recorded
        self.hash = p.hasher(self.digest_fn)

    def _create(self, schema: str) -> None:
        for statement in schema.format(**self.types).split(";"):
            if statement.strip():
                self._execute(statement)

    def _rename_key_index(self, table: str) -> None:
        """After ``table`` was renamed to ``table_v2``, free the name of its primary key's index
        for the new table (a no-op where indexes follow their table)."""

    def _upgrade_v2(self, now: float) -> None:
        """Format 2 (a whole chunk list per row, a reference per chunk listed) to this one, in
        the caller's transaction: every version of ``names_v2`` and ``retained_v2`` as the new
        rows (short lists inline, longer ones paged), the references counted anew, the
        remembered results as stats.  Memory: one row, or one page, at a time."""
        log.info("event=upgrade_start from_format=2 to_format=%d", FORMAT)
        self._execute("UPDATE chunks SET refs = 0")
        imported = 0
        for table, keys, deleted in (
            ("names", ("name",), "deleted"),
            ("retained", ("name", "version"), "0"),
        ):
            for row in self._scan(
                f"{table}_v2",
                keys,
                "version, size, sha256, chunk_size, chunks, mtime, commit_id, committed, "
                + deleted,
            ):
                # retained_v2's key is (name, version): version is listed twice
                self._import_v2(table, row if len(keys) == 1 else (row[0], *row[2:]), now)
                imported += 1
        # A chunk no version lists any more is collected after the grace period from now.
        self._execute(
            "UPDATE chunks SET since = ? WHERE refs = 0 AND doomed = 0 AND since < ?", (now, now)
        )
        for ident, result in self._scan("commits", ("id",), "result", batch=256):
            old = msgpack.unpackb(bytes(result), raw=False)
            if "sha256" not in old:
                continue
            stat = {
                "name": old["name"],
                "size": old["size"],
                "digest": old["sha256"],
                "digest_kind": p.DIGEST_CONTENT,
                "chunk_size": old["chunk_size"],
                "count": len(old.get("chunks") or ()),
                "mtime": old["mtime"],
                "version": old["version"],
                "commit": old["commit"],
                "committed": old["committed"],
                "meta": {},
                "deleted": bool(old.get("deleted")),
            }
            self._execute(
                "UPDATE commits SET result = ? WHERE id = ?",
                (msgpack.packb(stat, use_bin_type=True), ident),
            )
        self._execute("DROP TABLE names_v2")
        self._execute("DROP TABLE retained_v2")
        log.info("event=upgrade_done versions=%d", imported)

    def _import_v2(self, table: str, row: Row, now: float) -> None:
        """One format-2 version (``name, version, size, sha256, chunk_size, chunks, mtime,
        commit_id, committed, deleted``) as a row of ``table``, its references taken."""
        name, number, size, sha, chunk_size, chunks, mtime, commit, committed, deleted = row
        digests = p.split_digests(chunks)
        extents = ((chunk_size, size),) if size else ()
        lists: _Lists = {"extents": extents, "chunks": None, "pages": None, "body": None}
        if deleted:
            lists["extents"] = None
        elif len(digests) <= p.INLINE_CHUNKS:
            lists["chunks"] = tuple(digests)
            self._refs("chunks", "digest", sorted(set(digests)), 1, now)
        else:
            pages: list[Digest] = []
            last = p.chunk_length(len(digests) - 1, size, chunk_size)
            cut = p.pages_of(extents, digests)
            for i, page in enumerate(cut):
                blob = p.join_digests(page)
                pages.append(p.sha256(blob))
                tail = last if i == len(cut) - 1 else chunk_size
                head = chunk_size if len(page) > 1 else 0
                self._store_page(pages[-1], blob, page, head, tail, now)
            blob = p.pack_body(extents, pages)
            body = lists["body"] = p.sha256(blob)
            if not self._execute(
                "UPDATE bodies SET refs = refs + 1 WHERE id = ?", (body,)
            ).rowcount:
                self._insert_body(body, blob, pages, now)
            if len(pages) * p.HASH_LEN + p.EXTENT_LEN <= ROW_LISTS_MAX:
                lists["pages"] = tuple(pages)
            else:
                lists["extents"] = None
        version = Version(
            name,
            size,
            bytes(sha),
            p.DIGEST_CONTENT,
            chunk_size,
            0 if deleted else len(digests),
            mtime,
            number,
            commit,
            committed,
            deleted=bool(deleted),
            **lists,
        )
        if table == "names":
            self._execute(
                f"INSERT INTO names ({_ROW_COLUMNS}, deleted) VALUES ({_marks(16)})",
                (*_row(version), int(bool(deleted))),
            )
        else:
            self._execute(
                f"INSERT INTO retained ({_ROW_COLUMNS}) VALUES ({_marks(15)})", _row(version)
            )

    def _write(self, durable: bool = True) -> "_Write":
        """One write transaction; driver errors become the wire's errors.  ``durable=False``
        lets it commit without waiting for the disk (:attr:`lazy_commit`)."""
        return _Write(self, not durable)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        if self._reading or self.in_transaction:  # within an outer snapshot or transaction
            # (a caller's), its view is this one's
            yield
            return
        try:
            self._execute(self.begin_read)
        except Exception as exc:
            raise self._error(exc) from None
        self.in_transaction = self._reading = True
        try:
            yield
        finally:
            self.in_transaction = self._reading = False
            with contextlib.suppress(Exception):  # nothing was written: COMMIT just ends it
                self._execute("COMMIT")

    def _transaction(self, work: Callable[[], T], durable: bool = True) -> T:
        """Run ``work()`` in a write transaction, again if it deadlocked.  The totals row is
        changed once, last, with what ``work`` added up through :meth:`_bump`: every writer
        queues on that one row, so it is held for the shortest time."""
        for attempt in range(RETRIES):
            try:
                with self._write(durable):
                    self._delta = [0, 0, 0, 0]
                    result = work()
                    if any(self._delta):
                        self._execute(
                            "UPDATE totals SET files = files + ?, bytes = bytes + ?, "
                            "chunks = chunks + ?, chunk_bytes = chunk_bytes + ?",
                            self._delta,
                        )
                    return result
            except Retry:
                if attempt < RETRIES - 1:
                    log.info("event=transaction_retry attempt=%d", attempt + 1)
        raise Unavailable("the metadata database kept meeting concurrent writers; try again")

    def _bump(self, files: int = 0, nbytes: int = 0, chunks: int = 0, chunk_bytes: int = 0) -> None:
        """Add to the totals this transaction will write."""
        delta = self._delta
        delta[0] += files
        delta[1] += nbytes
        delta[2] += chunks
        delta[3] += chunk_bytes

    def _error(self, exc: Exception) -> Exception:
        translated = self._translate(exc)
        return translated if translated is not None else exc

    def _one(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        try:
            return self._execute(sql, args).fetchone()
        except Exception as exc:
            raise self._error(exc) from None

    def _only(self, sql: str, args: Sequence[object] = ()) -> Row:
        """The row of a query that always has one (an aggregate, the totals row)."""
        row = self._one(sql, args)
        assert row is not None, sql
        return row

    def _all(self, sql: str, args: Sequence[object] = ()) -> builtins.list[Row]:
        try:
            return self._execute(sql, args).fetchall()
        except Exception as exc:
            raise self._error(exc) from None

    def setting(self, key: str) -> str | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return row[0] if row else None

    def _stored_id(self) -> str:
        """The store's id, written with the tables."""
        store_id = self.setting("store_id")
        if store_id is None:
            raise FmsError("the metadata database holds no store id: it is damaged or not fms's")
        return store_id

    def set_setting(self, key: str, value: str) -> None:
        """Inside a caller's transaction (migration)."""
        self._execute(
            "INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value",
            (key, value),
        )

    # --- names ---

    def get(self, name: str, lists: bool = True) -> Version | None:
        columns = _ROW_COLUMNS if lists else _STAT_COLUMNS
        row = self._one(f"SELECT {columns} FROM names WHERE name = ? AND deleted = 0", (name,))
        return _version(row, lists=lists) if row else None

    def get_many(self, names: Iterable[str]) -> dict[str, Version]:
        out: dict[str, Version] = {}
        for part in _batches(sorted(set(names))):
            for row in self._all(
                f"SELECT {_ROW_COLUMNS} FROM names "
                f"WHERE name IN ({_marks(len(part))}) AND deleted = 0",
                part,
            ):
                version = _version(row)
                out[version.name] = version
        return out

    def list(self, prefix: str, after: str, limit: int) -> builtins.list[Version]:
        where, args = _under(prefix, max(prefix, after))
        sql = f"SELECT {_STAT_COLUMNS} FROM names WHERE {where} AND name != ?"
        sql += " AND deleted = 0 ORDER BY name LIMIT ?"
        args += [after, limit]
        return [_version(r, lists=False) for r in self._all(sql, args)]

    def usage(self, prefix: str) -> tuple[int, int]:
        where, args = _under(prefix)
        sql = f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM names WHERE {where} AND deleted = 0"
        files, nbytes = self._only(sql, args)
        return int(files), int(nbytes)

    def iter_versions(self, after: str, limit: int) -> builtins.list[Version]:
        return [
            _version(r)
            for r in self._all(
                f"SELECT {_ROW_COLUMNS} FROM names WHERE name > ? AND deleted = 0 "
                f"ORDER BY name LIMIT ?",
                (after, limit),
            )
        ]

    def retained(self, name: str) -> builtins.list[Version]:
        return [
            _version(r)
            for r in self._all(
                f"SELECT {_ROW_COLUMNS} FROM retained WHERE name = ? ORDER BY version DESC",
                (name,),
            )
        ]

    def totals(self) -> Totals:
        return Totals(*self._only("SELECT files, bytes, chunks, chunk_bytes FROM totals"))

    def apply(
        self, changes: Sequence[Change], now: float, small: Mapping[Digest, BytesLike]
    ) -> builtins.list[Version | FmsError]:
        def work(guarded: bool) -> builtins.list[Version | FmsError]:
            if self.locks_names:
                self._lock_names(
                    sorted(
                        {n for c in changes for n in c.names}
                        | {c.src for c in changes if isinstance(c, Copy)}
                    )
                )
            results: builtins.list[Version | FmsError] = []
            # A group of one needs no savepoint: a refusal rolls the whole transaction back.
            # Nor does a group's first attempt (``guarded`` False): a refusal rolls it back
            # whole, and it is made again with a savepoint around each change.  Each change's
            # savepoint is released before the next one's is taken, so all go by one name: the
            # statements' text stays the same, and the driver's statement cache (128) keeps
            # them (a name per change made a group of 64 evict every statement).
            alone = len(changes) == 1
            saved = self._delta
            for change in changes:
                if guarded:
                    self._execute("SAVEPOINT change")
                    saved = builtins.list(self._delta)
                self._chunk_refs = collections.Counter()
                self._made = False  # set by _log: this change was made now (not a retry's)
                result: Version | FmsError
                try:
                    if isinstance(change, NewVersion):
                        result = self._commit(change, now, small)
                    elif isinstance(change, Removal):
                        result = self._remove(change, now)
                    elif isinstance(change, Copy):
                        result = self._copy(change, now)
                    elif isinstance(change, Restore):
                        result = self._restore(change, now)
                    else:
                        raise TypeError(f"not a change: {change!r}")
                    # The chunk references the change takes and releases, in one pass sorted by
                    # digest: two transactions always lock shared rows in the same order.
                    if self._chunk_refs:
                        self._refs("chunks", "digest", *_by_delta(self._chunk_refs), now)
                    if self._made:
                        self._audit(change_entry(change, result, now))
                    if guarded:
                        self._execute("RELEASE SAVEPOINT change")
                except FmsError as exc:
                    if isinstance(exc, ConnectionLost):
                        raise  # the connection is gone: nothing of it stands
                    if alone:
                        raise _Refused(exc) from None  # nothing else to keep: roll back
                    if not guarded:
                        raise _Guard from None  # roll back; again, a savepoint each
                    self._execute("ROLLBACK TO SAVEPOINT change")
                    self._execute("RELEASE SAVEPOINT change")
                    self._delta = saved
                    result = exc
                results.append(result)
            return results

        try:
            try:
                return self._transaction(lambda: work(False))
            except _Guard:
                return self._transaction(lambda: work(True))
        except _Refused as refused:
            return [refused.error]

    def move_prefix(
        self, prefix: str, dest: str, commit: str, now: float, limit: int, actor: str = "local"
    ) -> int:
        request = hashlib.sha256(msgpack.packb([prefix, dest], use_bin_type=True)).digest()

        def live_under(folder: str, count: int, but: str | None = None) -> builtins.list[str]:
            where, args = _under(folder)
            sql = f"SELECT name FROM names WHERE {where} AND deleted = 0"
            if but is not None:
                sql += " AND name != ?"
                args.append(but)
            return [r[0] for r in self._execute(sql + " ORDER BY name LIMIT ?", [*args, count])]

        def work() -> int:
            row = self._execute(
                "SELECT kind, name, sha256, result FROM commits WHERE id = ?", (commit,)
            ).fetchone()
            if row is not None:
                if (row[0], row[1]) != ("mv_prefix", prefix) or bytes(row[2]) != request:
                    raise BadRequest(
                        f"id {commit!r} was already used by another request; every change "
                        f"needs a fresh random id"
                    )
                return int(msgpack.unpackb(bytes(row[3]), raw=False)["moved"])
            names = live_under(prefix, limit + 1)
            if not names:
                raise NotFound(f"no folder {prefix!r}; see what is stored with: ls")
            if len(names) > limit:
                raise TooLarge(
                    f"folder {prefix!r} holds more than {limit} names; a folder is renamed "
                    f"in one transaction only up to that many"
                )
            blocking = live_under(dest, 1, but=dest)
            if blocking:
                raise Conflict(f"folder {dest!r} is not empty (it holds {blocking[0]!r})")
            targets = [dest + name[len(prefix) :] for name in names]
            self._lock_names(sorted(set(names) | set(targets)))
            self._chunk_refs = collections.Counter()
            for i, (src, dst) in enumerate(zip(names, targets, strict=True)):
                self._copy(Copy(src, dst, f"{commit}/{i}", move=True, actor=actor), now)
            self._refs("chunks", "digest", *_by_delta(self._chunk_refs), now)
            self._audit(audit_entry(now, actor, "mv", prefix=prefix, dest=dest, moved=len(names)))
            self._execute(
                "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?)",
                (
                    commit,
                    "mv_prefix",
                    prefix,
                    request,
                    msgpack.packb({"moved": len(names)}, use_bin_type=True),
                    now,
                ),
            )
            return len(names)

        return self._transaction(work)

    def _logged(
        self, commit_id: str, kind: str, name: str, request: bytes | None
    ) -> Version | None:
        row = self._one("SELECT kind, name, sha256, result FROM commits WHERE id = ?", (commit_id,))
        if row is None:
            return None
        if (row[0], row[1]) != (kind, name) or (request is not None and bytes(row[2]) != request):
            raise BadRequest(
                f"id {commit_id!r} was already used by another request; every commit "
                f"and rm needs a fresh random id"
            )
        return Version(**msgpack.unpackb(bytes(row[3]), raw=False))

    def _log(self, kind: str, version: Version, now: float, request: bytes | None = None) -> None:
        self._made = True
        # The `sha256` column holds the digest of the whole request (see _request_digest), so a
        # retry is recognised only if it is the very same request.  The result is the stat of
        # what it made, never its chunk list.
        result = msgpack.packb(_stat_fields(version), use_bin_type=True)
        self._execute(
            "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?)",
            (version.commit, kind, version.name, request, result, now),
        )

    def _current(self, name: str) -> Version | None:
        row = self._one(_SELECT_CURRENT, (name,))
        return _version(row, deleted=row[15]) if row else None

    def _commit(
        self, change: NewVersion, now: float, small: Mapping[Digest, BytesLike] | None = None
    ) -> Version:
        """A new version of checked content (the engine checked its shape and digest): its
        chunks or pages must be stored, with the sizes their places in the file need
        (``small``: the bytes of small chunks sent with the commits of this group, by digest,
        which are claimed as they are referenced)."""
        request = _request_digest(change)
        done = self._logged(change.commit, "commit", change.name, request)
        if done is not None:
            return done
        extents: tuple[p.Extent, ...] | None = change.extents
        pages: tuple[Digest, ...] | None = None
        body: Digest | None = None
        if change.pages is not None:
            body = self._take_body(change, now)
            if len(change.extents) * p.EXTENT_LEN + len(change.pages) * p.HASH_LEN > (
                ROW_LISTS_MAX
            ):
                extents = None  # read from the body when asked for
            else:
                pages = tuple(change.pages)
        else:
            self._take_chunks(change, now, small or {})
        old = self._current(change.name)
        version = Version(
            change.name,
            change.size,
            change.digest,
            change.digest_kind,
            change.chunk_size,
            change.count,
            change.mtime,
            old.version + 1 if old is not None else 1,  # numbered here: one Version less
            change.commit,
            now,
            dict(change.meta),
            extents=extents,
            chunks=tuple(change.chunks) if change.chunks is not None else None,
            pages=pages,
            body=body,
        )
        # With its lists: a commit made now (not a retry answered from the log, a stat) may
        # hand a small file's manifest to the cache (fms.storage.service, fills on commit).
        return self._install(version, now, "commit", request, lists=True, old=old)

    def _take_chunks(
        self, change: NewVersion, now: float, small: Mapping[Digest, BytesLike]
    ) -> None:
        """A reference on each distinct chunk of a short chunk list, once each is found live
        (``FOR UPDATE``: the collector cannot doom it now) with the size its place needs.  A
        chunk whose bytes came with the group (``small``) is claimed instead, live at once, of
        their size, with its reference (one statement)."""
        chunks = change.chunks or ()
        if len(chunks) == 1:  # a small file's (claimed with its bytes, when they came along)
            data = small.get(chunks[0])
            if data is not None:
                self._claim(chunks[0], len(data), now, bytes(data), refs=1)
                check_chunks(change.name, change.extents, chunks, {chunks[0]: len(data)})
                return
        wanted = sorted(set(chunks))
        sizes: dict[Digest, int] = {}
        for digest in wanted:
            data = small.get(digest)
            if data is not None:
                self._claim(digest, len(data), now, bytes(data), refs=1)
                sizes[digest] = len(data)
        claimed = len(sizes)
        for part in _batches([d for d in wanted if d not in sizes] if claimed else wanted):
            for digest, size in self._execute(
                f"SELECT digest, size FROM chunks WHERE doomed = 0 AND digest IN "
                f"({_marks(len(part))}) ORDER BY digest{self.for_update}",
                part,
            ).fetchall():
                sizes[bytes(digest)] = size
        missing = [d for d in chunks if d not in sizes]
        if missing:
            raise MissingChunks.absent(change.name, missing)
        check_chunks(change.name, change.extents, chunks, sizes)
        self._chunk_refs.update([d for d in wanted if d not in small] if claimed else wanted)

    def _take_body(self, change: NewVersion, now: float) -> Digest:
        """A reference on the body of a paged chunk list (stored now if new: its pages must be
        stored and fit the extents).  :return: the body's id."""
        pages = change.pages or ()
        blob = p.pack_body(change.extents, pages)
        body = self.hash(blob)
        if self._execute("UPDATE bodies SET refs = refs + 1 WHERE id = ?", (body,)).rowcount:
            return body
        wanted = sorted(set(pages))
        rows: dict[Digest, tuple[int, int, int]] = {}  # page id -> (chunks, head, tail size)
        for part in _batches(wanted):
            for page, count, head, tail in self._execute(
                f"SELECT id, nchunks, size_head, size_tail FROM pages WHERE id IN "
                f"({_marks(len(part))}) ORDER BY id{self.for_update}",
                part,
            ).fetchall():
                rows[bytes(page)] = (count, head, tail)
        missing = [page for page in wanted if page not in rows]
        if missing:
            raise MissingChunks(
                f"{len(missing)} page(s) of the chunk list of {change.name!r} are not in the "
                f"store (never sent, or collected since); send them with put_page and commit "
                f"again",
                missing=missing,
            )
        check_pages(change.name, change.extents, pages, rows)
        self._insert_body(body, blob, pages, now)
        return body

    def _insert_body(self, body: Digest, blob: bytes, pages: Iterable[Digest], now: float) -> None:
        """Store a body with one reference, and take one on each distinct page it lists."""
        if self._execute(
            "INSERT INTO bodies (id, data, refs, since) VALUES (?, ?, 1, ?) "
            "ON CONFLICT (id) DO NOTHING RETURNING id",
            (body, blob, now),
        ).fetchall():
            self._refs("pages", "id", sorted(set(pages)), 1, now)
        else:  # another commit stored it meanwhile (PostgreSQL), with its references
            self._execute("UPDATE bodies SET refs = refs + 1 WHERE id = ?", (body,))

    def _store_page(
        self,
        page_id: Digest,
        blob: bytes,
        digests: Sequence[Digest],
        head: int,
        tail: int,
        now: float,
    ) -> bool:
        """Store a page unless it is, and take a reference on each distinct chunk it lists.
        ``head``: the size of every chunk but the last (0 if it lists one, -1 if they differ);
        ``tail``: the last one's.  :return: whether it was stored now."""
        if not self._execute(
            "INSERT INTO pages (id, data, nchunks, size_head, size_tail, refs, since) "
            "VALUES (?, ?, ?, ?, ?, 0, ?) ON CONFLICT (id) DO NOTHING RETURNING id",
            (page_id, blob, len(digests), head, tail, now),
        ).fetchall():
            return False
        self._refs("chunks", "digest", sorted(set(digests)), 1, now)
        return True

    def _install(
        self,
        version: Version,
        now: float,
        kind: str,
        request: bytes | None = None,
        lists: bool = False,
        old: Version | _Unread | None = _UNREAD,
    ) -> Version:
        """Make ``version`` (whose references are taken) the current one of its name: its
        number follows the old one's, which is retained or released.  ``old``: the name's row
        as :meth:`_current` read it in this transaction, ``version`` numbered after it already
        (default: read here, and ``version`` numbered).  :return: its stat (what a retry is
        answered with), or with ``lists`` the whole version."""
        if isinstance(old, _Unread):
            old = self._current(version.name)
            version = version.numbered(old.version + 1 if old else 1)
        replaced = old if old is not None and not old.deleted else None
        row = _row(version)
        if replaced is not None:
            # A live row stays live: an UPDATE that leaves `deleted` alone leaves the index of
            # live names alone too (an upsert setting it rewrote that index's page each time).
            self._execute(_REPLACE, (*row[1:], version.name))
        else:
            self._execute(_INSTALL, row)
        if replaced is not None:
            self._release(replaced, now)
        self._bump(
            files=0 if replaced is not None else 1,
            nbytes=version.size - (replaced.size if replaced is not None else 0),
        )
        self._log(kind, version, now, request)
        return version if lists else version.stat()

    def _copy(self, change: Copy, now: float) -> Version:
        """``change.name`` gets ``change.src``'s content as a new version: one reference more on
        what it lists (its body, or the chunks of a short list), nothing else is stored; a move
        then removes ``src`` (its tombstone's id is the move's, suffixed, so the two never share
        an id)."""
        kind = "mv" if change.move else "cp"
        done = self._logged(change.commit, kind, change.name, None)
        if done is not None:
            return done
        if change.src == change.name:
            raise BadRequest(f"{change.src!r} is both the source and the destination")
        src = self._current(change.src)
        if src is None or src.deleted:
            raise NotFound(f"{change.src!r} not found; see what is stored with: ls")
        self._reference(src, 1, now)
        version = self._install(_renamed(src, change.name, change.commit, now), now, kind)
        if change.move:
            self._remove(Removal(change.src, f"{change.commit}/src"), now)
        return version

    def _remove(self, change: Removal, now: float) -> Version:
        done = self._logged(change.commit, "rm", change.name, None)
        if done is not None:
            return done
        old = self._current(change.name)
        if old is None or old.deleted:
            raise NotFound(f"{change.name!r} not found; see what is stored with: ls")
        tomb = Version(
            old.name,
            old.size,
            old.digest,
            old.digest_kind,
            old.chunk_size,
            0,
            old.mtime,
            old.version + 1,
            change.commit,
            now,
            old.meta,
            deleted=True,
        )
        self._execute(
            "UPDATE names SET version = ?, nchunks = 0, extent_list = NULL, chunk_list = NULL, "
            "page_list = NULL, body = NULL, commit_id = ?, committed = ?, deleted = 1 "
            "WHERE name = ?",
            (tomb.version, tomb.commit, now, tomb.name),
        )
        self._release(old, now)
        self._bump(files=-1, nbytes=-old.size)
        self._log("rm", tomb, now)
        return tomb

    def _release(self, old: Version, now: float) -> None:
        """``old`` stops being current: retained with its references (versions kept, and held
        for ``keep_for``), or its references released; retained versions past
        :attr:`keep_versions` and no longer held release theirs."""
        if self.keep_versions > 0 or self.keep_for > 0:
            self._execute(
                f"INSERT INTO retained ({_ROW_COLUMNS}) VALUES ({_marks(15)}) "
                f"ON CONFLICT (name, version) DO NOTHING",
                _row(old),
            )
            self._hold(old.name, old.version, now)
        else:
            self._reference(old, -1, now)
        self._push_out(old.name, now)

    def _push_out(self, name: str, now: float) -> int:
        """Drop the retained versions of ``name`` past the :attr:`keep_versions` newest, but
        those still held (``--keep-for``: no change pushes them out before their time), and
        release their references.  :return: how many were dropped."""
        past = self._execute(_SELECT_RETAINED, (name,)).fetchall()[self.keep_versions :]
        if not past:
            return 0  # the usual case: no hold to look up
        held = self._held(name, now)
        dropped = 0
        for row in past:
            old = _version(row)
            if old.version in held:
                continue
            self._execute(
                "DELETE FROM retained WHERE name = ? AND version = ?", (name, old.version)
            )
            self._reference(old, -1, now)
            dropped += 1
        return dropped

    def _reference(self, version: Version, delta: int, now: float) -> None:
        """Take (``delta`` 1) or release (-1) a version's references: on its body, or on each
        distinct chunk of its short chunk list."""
        if version.body is not None:
            self._refs("bodies", "id", [version.body], delta, now)
        elif version.chunks:
            for digest in set(version.chunks):
                self._chunk_refs[digest] += delta

    def _restore(self, change: Restore, now: float) -> Version:
        done = self._logged(change.commit, "restore", change.name, None)
        if done is not None:
            return done
        sql = f"SELECT {_ROW_COLUMNS} FROM retained WHERE name = ?"
        args: builtins.list[object] = [change.name]
        if change.version is not None:
            sql += " AND version = ?"
            args.append(change.version)
        row = self._one(sql + " ORDER BY version DESC LIMIT 1", args)
        if row is None:
            which = (
                "no retained version"
                if change.version is None
                else f"no retained version {change.version}"
            )
            raise NotFound(
                f"{change.name!r} has {which}; list them with: versions "
                f"{change.name} (storage keeps them with --keep-versions N)"
            )
        old = _version(row)
        self._reference(old, 1, now)
        return self._install(_renamed(old, change.name, change.commit, now), now, "restore")

    def _refs(
        self,
        table: str,
        key: str,
        ids: Sequence[bytes],
        delta: int | Sequence[int],
        now: float,
        since_floor: float | None = None,
    ) -> None:
        """Add ``delta`` (an int, or one per id) to the references of each of ``ids`` (distinct,
        sorted: two transactions always lock shared rows in the same order).  A row whose last
        reference goes starts its grace clock now, or, with ``since_floor``, keeps the later of
        its own clock and ``since_floor`` (the clock of the list that held it: the collector)."""
        mark = now if since_floor is None else since_floor
        deltas = [delta] * len(ids) if isinstance(delta, int) else delta
        rows = [(d, d, mark, mark, i) for i, d in zip(ids, deltas, strict=True) if d]
        if rows:
            self._executemany(
                f"UPDATE {table} SET refs = refs + ?, since = CASE WHEN refs + ? = 0 "
                f"AND since < ? THEN ? ELSE since END WHERE {key} = ?",
                rows,
            )

    # --- pages and bodies ---

    def put_page(self, page_id: Digest, blob: bytes, now: float) -> bool:
        digests = p.split_digests(blob)
        wanted = sorted(set(digests))

        def work() -> bool:
            if self._execute("UPDATE pages SET since = ? WHERE id = ?", (now, page_id)).rowcount:
                return False  # stored already: protected for the grace period from now
            sizes: dict[Digest, int] = {}
            for part in _batches(wanted):
                for digest, size in self._execute(
                    f"SELECT digest, size FROM chunks WHERE doomed = 0 AND digest IN "
                    f"({_marks(len(part))}) ORDER BY digest{self.for_update}",
                    part,
                ).fetchall():
                    sizes[bytes(digest)] = size
            missing = [d for d in wanted if d not in sizes]
            if missing:
                raise MissingChunks(
                    f"{len(missing)} chunk(s) of this page are not in the store (never "
                    f"uploaded, or collected since); upload them and send the page again",
                    missing=missing,
                )
            head = sizes[digests[0]] if len(digests) > 1 else 0
            if any(sizes[d] != head for d in digests[1:-1]):
                head = -1  # mixed: no extent can list this page
            # False: another worker stored it meanwhile (PostgreSQL)
            return self._store_page(page_id, blob, digests, head, sizes[digests[-1]], now)

        return self._transaction(work, durable=False)

    def page(self, page_id: Digest) -> bytes | None:
        row = self._one("SELECT data FROM pages WHERE id = ?", (page_id,))
        return bytes(row[0]) if row else None

    def has_page(self, page_id: Digest) -> bool:
        return self._one("SELECT 1 FROM pages WHERE id = ?", (page_id,)) is not None

    def body(self, body_id: Digest) -> bytes | None:
        row = self._one("SELECT data FROM bodies WHERE id = ?", (body_id,))
        return bytes(row[0]) if row else None

    def collect_lists(
        self, cutoff: float, limit: int = LIST_BATCH, dry_run: bool = False
    ) -> tuple[int, int]:
        lock = "" if dry_run else self.for_update + self.skip_locked

        def take(table: str) -> builtins.list[tuple[bytes, bytes, float]]:
            return [
                (bytes(i), bytes(data), since)
                for i, data, since in self._execute(
                    f"SELECT id, data, since FROM {table} WHERE refs = 0 AND since < ? "
                    f"ORDER BY id LIMIT ?{lock}",
                    (cutoff, limit),
                ).fetchall()
            ]

        def work() -> tuple[int, int]:
            bodies = take("bodies")
            if dry_run:
                return len(bodies), len(take("pages"))
            # A body's pages, then a page's chunks, lose a reference; one left unreferenced
            # keeps the clock of what held it, so it goes in this same collection.
            for body, data, since in bodies:
                self._execute("DELETE FROM bodies WHERE id = ?", (body,))
                self._refs("pages", "id", sorted(set(p.unpack_body(data)[1])), -1, 0, since)
            pages = take("pages")
            for page, data, since in pages:
                self._execute("DELETE FROM pages WHERE id = ?", (page,))
                self._refs("chunks", "digest", sorted(set(p.split_digests(data))), -1, 0, since)
            return len(bodies), len(pages)

        return self._transaction(work)

    # --- chunks ---

    def known(self, digests: Sequence[Digest], now: float) -> set[Digest]:
        if not digests:
            return set()
        unique = sorted(set(digests))
        found: set[Digest] = set()

        def work() -> None:
            found.clear()
            for part in _batches(unique):
                # Referenced ones too: a list holding one may be collected, and its chunks
                # then keep the later of its clock and theirs.
                self._execute(
                    f"UPDATE chunks SET since = ? WHERE doomed = 0 "
                    f"AND digest IN ({_marks(len(part))})",
                    [now, *part],
                )
                found.update(
                    bytes(r[0])
                    for r in self._execute(
                        f"SELECT digest FROM chunks WHERE doomed = 0 AND lost = 0 AND digest IN "
                        f"({_marks(len(part))})",
                        part,
                    ).fetchall()
                )

        self._transaction(work)
        return set(found)

    def mark_lost(self, digest: Digest) -> None:
        self._transaction(
            lambda: self._execute("UPDATE chunks SET lost = 1 WHERE digest = ?", (digest,)),
            durable=False,
        )

    def chunk_rows(self, digests: Iterable[Digest]) -> dict[Digest, ChunkRow]:
        # Without their bytes: a small chunk's row says it holds them (data b"") and no more.
        columns = _CHUNK_COLUMNS.replace("data", "CASE WHEN data IS NULL THEN NULL ELSE ? END")
        out: dict[Digest, ChunkRow] = {}
        for part in _batches(sorted(set(digests))):
            for row in self._all(
                f"SELECT {columns} FROM chunks WHERE digest IN ({_marks(len(part))})",
                [b"", *part],
            ):
                chunk = _chunk(row)
                out[chunk.digest] = chunk
        return out

    def small_chunks(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        out: dict[Digest, bytes] = {}
        for part in _batches(sorted(set(digests))):
            for digest, data in self._all(
                f"SELECT digest, data FROM chunks "
                f"WHERE digest IN ({_marks(len(part))}) AND data IS NOT NULL",
                part,
            ):
                out[bytes(digest)] = bytes(data)
        return out

    def claim_chunk(self, digest: Digest, size: int, now: float, data: bytes | None = None) -> bool:
        # Not flushed on its own: a claim lost in a power loss costs an upload again (the commit
        # finds the chunk missing), and the commit that relies on it flushes it first.
        return self._transaction(lambda: self._claim(digest, size, now, data), durable=False)

    def _claim(
        self, digest: Digest, size: int, now: float, data: bytes | None, refs: int = 0
    ) -> bool:
        """Claim a chunk (see :meth:`claim_chunk`), taking ``refs`` references on it."""
        for _ in range(RETRIES):
            inserted = self._execute(
                "INSERT INTO chunks (digest, size, refs, since, doomed, data) "
                "VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (digest) DO NOTHING RETURNING digest",
                (digest, size, refs, now, data),
            ).fetchall()
            if inserted:
                self._bump(chunks=1, chunk_bytes=size)
                return data is not None
            # Held already: unless it is being collected, its clock starts again, and the bytes
            # arrive: a chunk found lost (its blob gone or damaged) is whole again once they are
            # written, which the caller does next; a small one's bytes arriving again heal a
            # damaged copy in the engine (a blob's row keeps no bytes).  One statement, which
            # says whether the engine holds its bytes.
            if data is None:
                found = self._execute(_CLAIM_HELD, (now, refs, digest)).fetchone()
            else:
                found = self._execute(_CLAIM_HELD_BYTES, (now, refs, data, data, digest)).fetchone()
            if found is not None:
                return bool(found[0])
            row = self._execute(
                f"SELECT doomed FROM chunks WHERE digest = ?{self.for_update}", (digest,)
            ).fetchone()
            if row is None or not row[0]:
                continue  # collected between the statements (PostgreSQL): insert it
            raise Unavailable(
                f"chunk {digest.hex()[:16]} is being collected right now; send it again in a moment"
            )
        raise Unavailable(
            f"chunk {digest.hex()[:16]} is being collected right now; send it again in a moment"
        )

    def chunk(self, digest: Digest) -> ChunkRow | None:
        row = self._one(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE digest = ?", (digest,))
        return _chunk(row) if row else None

    # --- garbage collection ---

    def doom(self, cutoff: float, limit: int, dry_run: bool = False) -> builtins.list[ChunkRow]:
        def work() -> builtins.list[ChunkRow]:
            rows = [
                _chunk(r)
                for r in self._execute(
                    f"SELECT {_CHUNK_COLUMNS} FROM chunks "
                    "WHERE refs = 0 AND since < ? AND doomed = 0 ORDER BY digest LIMIT ?"
                    f"{'' if dry_run else self.for_update + self.skip_locked}",
                    (cutoff, limit),
                ).fetchall()
            ]
            if dry_run or not rows:
                return rows
            in_engine = [(r.digest,) for r in rows if r.in_engine]
            self._executemany("DELETE FROM chunks WHERE digest = ?", in_engine)
            self._executemany(
                "UPDATE chunks SET doomed = 1 WHERE digest = ?",
                [(r.digest,) for r in rows if not r.in_engine],
            )
            self._bump(
                chunks=-len(in_engine), chunk_bytes=-sum(r.size for r in rows if r.in_engine)
            )
            return rows

        return self._transaction(work)

    def doomed(self, limit: int) -> builtins.list[ChunkRow]:
        return [
            _chunk(r)
            for r in self._all(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE doomed = 1 ORDER BY digest LIMIT ?",
                (limit,),
            )
        ]

    def forget(self, digests: Sequence[Digest]) -> None:
        if not digests:
            return

        def work() -> None:
            count = size = 0
            for d in sorted(digests):
                row = self._execute(
                    "DELETE FROM chunks WHERE digest = ? AND doomed = 1 RETURNING size", (d,)
                ).fetchone()
                if row is not None:
                    count, size = count + 1, size + row[0]
            self._bump(chunks=-count, chunk_bytes=-size)

        self._transaction(work)

    def adopt_orphan(self, digest: Digest, size: int) -> bool:
        def work() -> bool:
            added = self._execute(
                "INSERT INTO chunks (digest, size, refs, since, doomed) VALUES (?, ?, 0, 0, 1) "
                "ON CONFLICT (digest) DO NOTHING RETURNING digest",
                (digest, size),
            ).fetchall()
            if added:
                self._bump(chunks=1, chunk_bytes=size)
            return bool(added)

        return self._transaction(work)

    def prune(self, cutoff: float, limit: int) -> int:
        def work() -> int:
            # A removed name with retained versions keeps its tombstone: the version count
            # goes on, so a later version never takes a retained one's number.  The outer
            # conditions hold again for the row as it is when deleted: a name written since
            # the inner select is not a tombstone any more.
            n = self._execute(
                "DELETE FROM names WHERE deleted = 1 AND committed < ? AND name IN ("
                "SELECT t.name FROM names t WHERE t.deleted = 1 AND t.committed < ? AND NOT "
                "EXISTS (SELECT 1 FROM retained r WHERE r.name = t.name) LIMIT ?)",
                (cutoff, cutoff, limit),
            ).rowcount
            if n < limit:
                n += self._execute(
                    "DELETE FROM commits WHERE id IN (SELECT id FROM commits WHERE at < ? LIMIT ?)",
                    (cutoff, limit - n),
                ).rowcount
            return n

        return self._transaction(work)

    def lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        return self._transaction(
            lambda: (
                self._execute(
                    "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                    "SET holder = excluded.holder, until = excluded.until "
                    "WHERE leases.holder = excluded.holder OR leases.until <= ?",
                    (name, holder, now + seconds, now),
                ).rowcount
                == 1
            )
        )

    def release(self, name: str, holder: str) -> None:
        self._transaction(
            lambda: self._execute(
                "DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)
            )
        )

    def lease_holder(self, name: str) -> str | None:
        row = self._one("SELECT holder FROM leases WHERE name = ?", (name,))
        return row[0] if row else None

    # --- checks ---

    def _scan(
        self,
        table: str,
        keys: tuple[str, ...],
        columns: str,
        where: str = "",
        batch: int = 64,
        args: Sequence[object] = (),
    ) -> Iterator[Row]:
        """The rows of ``table`` (``keys`` then ``columns``) in key order, ``batch`` at a time,
        so a table of any size is read in the memory of one batch; ``where`` (``AND ...``,
        its parameters ``args``) chooses the rows."""
        last: Row | None = None
        key_list = ", ".join(keys)
        while True:
            cond, args_now = where, builtins.list[object](args)
            if last is not None:
                cond += f" AND ({key_list}) > ({_marks(len(keys))})"
                args_now += list(last)
            rows = self._all(
                f"SELECT {key_list}, {columns} FROM {table} WHERE 1 = 1{cond} "
                f"ORDER BY {key_list} LIMIT ?",
                [*args_now, batch],
            )
            yield from rows
            if len(rows) < batch:
                return
            last = rows[-1][: len(keys)]

    def refcount_errors(self) -> builtins.list[tuple[str, bytes, int | None, int]]:
        """Every stored reference count against a recount, in one snapshot: bodies from the
        versions, pages from the bodies, chunks from the versions' short lists and the pages.
        Memory: the distinct ids counted, never a chunk list per file; chunks are counted in
        ranges of their digests of at most about :data:`RECOUNT_CHUNKS` rows each (a pass over
        the lists per range)."""
        errors: builtins.list[tuple[str, bytes, int | None, int]] = []
        with self.snapshot():
            counted: collections.Counter[bytes] = collections.Counter()
            for table, live in (("names", " AND deleted = 0"), ("retained", "")):
                for body, n in self._all(
                    f"SELECT body, COUNT(*) FROM {table} WHERE body IS NOT NULL{live} GROUP BY body"
                ):
                    counted[bytes(body)] += n
            errors += self._recount("body", "bodies", "id", counted)
            counted = collections.Counter()
            for _id, data in self._scan("bodies", ("id",), "data", batch=8):
                counted.update(set(p.unpack_body(data)[1]))
            errors += self._recount("page", "pages", "id", counted)
            (rows,) = self._only("SELECT COUNT(*) FROM chunks")
            ranges = 1
            while ranges < 256 and rows > ranges * RECOUNT_CHUNKS:
                ranges *= 2
            for r in range(ranges):
                lo, hi = r * 256 // ranges, (r + 1) * 256 // ranges  # first bytes [lo, hi)
                counted = collections.Counter()
                for digests in self._listed_chunks():
                    counted.update({d for d in digests if lo <= d[0] < hi})
                span = (bytes([lo]), bytes([hi]) if hi < 256 else None)
                errors += self._recount("chunk", "chunks", "digest", counted, span)
        return errors

    def _listed_chunks(self) -> Iterator[builtins.list[p.Digest]]:
        """Each short list of a version, and each page, as a list of digests."""
        for table, keys, live in (
            ("names", ("name",), " AND deleted = 0"),
            ("retained", ("name", "version"), ""),
        ):
            for row in self._scan(table, keys, "chunk_list", f" AND chunk_list IS NOT NULL{live}"):
                yield p.split_digests(row[-1])
        for _id, data in self._scan("pages", ("id",), "data", batch=4):
            yield p.split_digests(data)

    def _recount(
        self,
        kind: str,
        table: str,
        key: str,
        counted: collections.Counter[bytes],
        span: tuple[bytes | None, bytes | None] = (None, None),
    ) -> builtins.list[tuple[str, bytes, int | None, int]]:
        """``(kind, id, stored refs, counted refs)`` of every row of ``table`` (with ``span``,
        those whose id is in ``[lo, hi)``) that differs from ``counted``, and of every counted
        id with no row (stored refs None)."""
        errors: builtins.list[tuple[str, bytes, int | None, int]] = []
        bounds = [(op, bound) for op, bound in ((">=", span[0]), ("<", span[1])) if bound]
        where = "".join(f" AND {key} {op} ?" for op, _bound in bounds)
        for ident, refs in self._scan(
            table, (key,), "refs", where, batch=1000, args=[b for _op, b in bounds]
        ):
            ident = bytes(ident)
            n = counted.pop(ident, 0)
            if refs != n:
                errors.append((kind, ident, refs, n))
        errors += [(kind, ident, None, n) for ident, n in counted.items()]
        return errors
