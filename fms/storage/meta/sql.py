"""The metadata engine in SQL, shared by SQLite and PostgreSQL.

A subclass supplies the connection and the few places where the two differ (:class:`Dialect`):
column types, how a write transaction starts, how rows and names are locked, and how driver
errors translate into the wire's errors.  Every statement is written once, here.

Concurrency.  On SQLite a write transaction holds the database's one write lock (``BEGIN
IMMEDIATE``), so transactions are serial.  On PostgreSQL (READ COMMITTED) transactions run side
by side, so each takes what it changes: a commit or rm takes a transaction-scoped advisory lock
on each of its names (in sorted order, all at the start) and ``FOR UPDATE`` on the chunk rows it
references (sorted by digest); the collector takes the rows it dooms with ``FOR UPDATE SKIP
LOCKED``, so it never waits on a commit and never dooms a row a commit holds.  The totals row is
always changed last.  A deadlock or serialization failure that remains is retried whole.
"""

import builtins
import collections
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

import msgpack

from ...errors import BadRequest, FmsError, MissingChunks, NotFound, Unavailable
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
    pack_digests,
    unpack_digests,
)
from .base import ChunkRow, MetaEngine

FORMAT = 2  # the store's format; 1 was one manifest file per name
RETRIES = 5  # a transaction that deadlocked is tried this many times in all

log = logging.getLogger("fms.storage.meta")

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS names (
    name {name_type} PRIMARY KEY, version BIGINT NOT NULL, size BIGINT NOT NULL,
    sha256 {blob} NOT NULL, chunk_size BIGINT NOT NULL, chunks {blob} NOT NULL,
    mtime {real} NOT NULL, commit_id TEXT NOT NULL, committed {real} NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS names_tombstones ON names (committed) WHERE deleted = 1;
CREATE TABLE IF NOT EXISTS chunks (
    digest {blob} PRIMARY KEY, size BIGINT NOT NULL, refs BIGINT NOT NULL DEFAULT 0,
    since {real} NOT NULL, doomed INTEGER NOT NULL DEFAULT 0, data {blob});
CREATE INDEX IF NOT EXISTS chunks_unreferenced ON chunks (since) WHERE refs = 0;
CREATE TABLE IF NOT EXISTS commits (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, sha256 {blob},
    result {blob} NOT NULL, at {real} NOT NULL);
CREATE INDEX IF NOT EXISTS commits_at ON commits (at);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1), files BIGINT NOT NULL, bytes BIGINT NOT NULL,
    chunks BIGINT NOT NULL, chunk_bytes BIGINT NOT NULL);
INSERT INTO totals VALUES (1, 0, 0, 0, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, until {real} NOT NULL);
CREATE TABLE IF NOT EXISTS retained (
    name {name_type} NOT NULL, version BIGINT NOT NULL, size BIGINT NOT NULL,
    sha256 {blob} NOT NULL, chunk_size BIGINT NOT NULL, chunks {blob} NOT NULL,
    mtime {real} NOT NULL, commit_id TEXT NOT NULL, committed {real} NOT NULL,
    PRIMARY KEY (name, version))
"""

_VERSION_COLUMNS = (
    "name, size, sha256, chunk_size, chunks, mtime, version, commit_id, committed, deleted"
)
_RETAINED_COLUMNS = _VERSION_COLUMNS.rsplit(",", 1)[0]  # a retained version is never deleted
_CHUNK_COLUMNS = "digest, size, refs, since, doomed, data"


class Retry(Exception):
    """The transaction met a deadlock or a serialization failure: run it again."""


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


def _version(row: Row) -> Version:
    name, size, sha, chunk_size, chunks, mtime, version, commit, committed, deleted = row
    return Version(
        name,
        size,
        bytes(sha),
        chunk_size,
        unpack_digests(bytes(chunks)),
        mtime,
        version,
        commit,
        committed,
        bool(deleted),
    )


def _chunk(row: Row) -> ChunkRow:
    digest, size, refs, since, doomed, data = row
    return ChunkRow(
        bytes(digest), size, refs, since, doomed, bytes(data) if data is not None else None
    )


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
                change.size,
                change.sha256,
                change.chunk_size,
                list(change.chunks),
                change.mtime,
            ],
            use_bin_type=True,
        )
    ).digest()


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SQLMeta(MetaEngine):
    """The engine over a DB-API connection ``self.db`` in autocommit mode; subclasses open it."""

    # Dialect: overridden by subclasses.
    types = {"blob": "BLOB", "real": "REAL", "name_type": "TEXT"}
    begin_write = "BEGIN"
    # Statements run before and after a transaction that need not be on disk when it commits
    # (the next durable commit, which names what it relied on, flushes it along): none here.
    lazy_commit: tuple[str, str] | tuple[()] = ()
    for_update = ""  # appended to SELECTs of rows about to be changed
    skip_locked = ""  # appended to the collector's SELECT
    in_transaction = False  # a lost connection must not be silently reopened midway
    keep_versions = 0  # replaced versions retained per name (the worker's --keep-versions)
    _delta: builtins.list[int]  # what the transaction under way adds to the totals row

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        raise NotImplementedError

    def _translate(self, exc: BaseException) -> FmsError | Retry | None:
        """A driver error as an :class:`FmsError` (or :class:`Retry`), or None if not one of
        the driver's."""
        raise NotImplementedError

    def _lock_names(self, names: Sequence[str]) -> None:
        """Hold ``names`` until the transaction ends (no-op where transactions are serial)."""

    def _lock_schema(self) -> None:
        """Hold off other workers creating the tables at the same moment (no-op if serial)."""

    # --- transactions ---

    def _create_schema(self, store_id: str) -> None:
        with self._write():
            self._lock_schema()
            for statement in SCHEMA.format(**self.types).split(";"):
                if statement.strip():
                    self._execute(statement)
            self._execute(
                "INSERT INTO settings VALUES ('format', ?) ON CONFLICT (key) DO NOTHING",
                (str(FORMAT),),
            )
            self._execute(
                "INSERT INTO settings VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
                (store_id,),
            )

    @contextlib.contextmanager
    def _write(self, durable: bool = True) -> Iterator[None]:
        """One write transaction; driver errors become the wire's errors.  ``durable=False``
        lets it commit without waiting for the disk (:attr:`lazy_commit`)."""
        if durable or not self.lazy_commit:
            yield from self._write_body()
            return
        relax, restore = self.lazy_commit
        self._execute(relax)
        try:
            yield from self._write_body()
        finally:
            self._execute(restore)  # never left relaxed: if this fails, so does the request

    def _write_body(self) -> Iterator[None]:
        try:
            self._execute(self.begin_write)
        except Exception as exc:
            raise self._error(exc) from None
        self.in_transaction = True
        try:
            yield
            self._execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._execute("ROLLBACK")
            translated = self._translate(exc)
            if translated is not None:
                raise translated from None
            raise
        finally:
            self.in_transaction = False

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
        for i, n in enumerate((files, nbytes, chunks, chunk_bytes)):
            self._delta[i] += n

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

    def get(self, name: str) -> Version | None:
        row = self._one(
            f"SELECT {_VERSION_COLUMNS} FROM names WHERE name = ? AND deleted = 0", (name,)
        )
        return _version(row) if row else None

    def list(self, prefix: str, after: str, limit: int) -> builtins.list[Version]:
        lo = max(prefix, after)
        hi = prefix_end(prefix)
        sql = f"SELECT {_VERSION_COLUMNS} FROM names WHERE name >= ? AND name != ?"
        args: builtins.list[object] = [lo, after]
        if hi is not None:
            sql += " AND name < ?"
            args.append(hi)
        sql += " AND deleted = 0 ORDER BY name LIMIT ?"
        args.append(limit)
        return [_version(r) for r in self._all(sql, args)]

    def usage(self, prefix: str) -> tuple[int, int]:
        sql = "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM names WHERE name >= ? AND deleted = 0"
        args: builtins.list[object] = [prefix]
        hi = prefix_end(prefix)
        if hi is not None:
            sql += " AND name < ?"
            args.append(hi)
        files, nbytes = self._only(sql, args)
        return int(files), int(nbytes)

    def iter_versions(self, after: str, limit: int) -> builtins.list[Version]:
        return [
            _version(r)
            for r in self._all(
                f"SELECT {_VERSION_COLUMNS} FROM names WHERE name > ? AND deleted = 0 "
                f"ORDER BY name LIMIT ?",
                (after, limit),
            )
        ]

    def totals(self) -> Totals:
        return Totals(*self._only("SELECT files, bytes, chunks, chunk_bytes FROM totals"))

    def apply(
        self, changes: Sequence[Change], now: float, small: Mapping[Digest, BytesLike]
    ) -> builtins.list[Version | FmsError]:
        def work() -> builtins.list[Version | FmsError]:
            self._lock_names(
                sorted(
                    {n for c in changes for n in c.names}
                    | {c.src for c in changes if isinstance(c, Copy)}
                )
            )
            results: builtins.list[Version | FmsError] = []
            for i, change in enumerate(changes):
                self._execute(f"SAVEPOINT c{i}")
                saved = builtins.list(self._delta)
                result: Version | FmsError
                try:
                    if isinstance(change, NewVersion):
                        for digest in sorted(set(change.chunks) & small.keys()):
                            self._claim(digest, len(small[digest]), now, bytes(small[digest]))
                        result = self._commit(change, now)
                    elif isinstance(change, Removal):
                        result = self._remove(change, now)
                    elif isinstance(change, Copy):
                        result = self._copy(change, now)
                    elif isinstance(change, Restore):
                        result = self._restore(change, now)
                    else:
                        raise TypeError(f"not a change: {change!r}")
                    self._execute(f"RELEASE SAVEPOINT c{i}")
                except FmsError as exc:
                    if isinstance(exc, ConnectionLost):
                        raise  # the connection is gone: nothing of it stands
                    self._execute(f"ROLLBACK TO SAVEPOINT c{i}")
                    self._execute(f"RELEASE SAVEPOINT c{i}")
                    self._delta = saved
                    result = exc
                results.append(result)
            return results

        return self._transaction(work)

    def _logged(self, commit_id: str, kind: str, name: str, sha256: bytes | None) -> Version | None:
        row = self._one("SELECT kind, name, sha256, result FROM commits WHERE id = ?", (commit_id,))
        if row is None:
            return None
        if (row[0], row[1]) != (kind, name) or (sha256 is not None and bytes(row[2]) != sha256):
            raise BadRequest(
                f"id {commit_id!r} was already used by another request; every commit "
                f"and rm needs a fresh random id"
            )
        fields = msgpack.unpackb(bytes(row[3]), raw=False)
        return Version(**{**fields, "chunks": tuple(fields["chunks"])})

    def _log(self, kind: str, version: Version, now: float, request: bytes | None = None) -> None:
        # The `sha256` column holds the digest of the whole request (see _request_digest), so a
        # retry is recognised only if it is the very same request.
        result = msgpack.packb(
            {f: getattr(version, f) for f in Version.__slots__}, use_bin_type=True
        )
        self._execute(
            "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?)",
            (version.commit, kind, version.name, request, result, now),
        )

    def _current(self, name: str) -> Version | None:
        row = self._one(f"SELECT {_VERSION_COLUMNS} FROM names WHERE name = ?", (name,))
        return _version(row) if row else None

    def _commit(self, change: NewVersion, now: float, kind: str = "commit") -> Version:
        request = _request_digest(change) if kind == "commit" else None
        done = self._logged(change.commit, kind, change.name, request)
        if done is not None:
            return done
        wanted = collections.Counter(change.chunks)
        digests = sorted(wanted)
        live = (
            {
                bytes(r[0])
                for r in self._all(
                    "SELECT digest FROM chunks WHERE doomed = 0 "
                    f"AND digest IN ({_marks(len(digests))}) ORDER BY digest{self.for_update}",
                    digests,
                )
            }
            if digests
            else set()
        )
        missing = [d for d in wanted if d not in live]
        if missing:
            raise MissingChunks.absent(change.name, missing)
        old = self._current(change.name)
        version = Version(
            change.name,
            change.size,
            change.sha256,
            change.chunk_size,
            tuple(change.chunks),
            change.mtime,
            old.version + 1 if old else 1,
            change.commit,
            now,
        )
        self._execute(
            "INSERT INTO names VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (name) DO UPDATE "
            "SET version = excluded.version, size = excluded.size, sha256 = excluded.sha256, "
            "chunk_size = excluded.chunk_size, chunks = excluded.chunks, mtime = excluded.mtime, "
            "commit_id = excluded.commit_id, committed = excluded.committed, deleted = 0",
            (
                version.name,
                version.version,
                version.size,
                version.sha256,
                version.chunk_size,
                pack_digests(version.chunks),
                version.mtime,
                version.commit,
                now,
            ),
        )
        replaced = old if old is not None and not old.deleted else None
        delta = wanted.copy()
        if replaced is not None:
            self._release(replaced, delta)
        self._add_refs(delta, now)
        self._bump(
            files=0 if replaced is not None else 1,
            nbytes=version.size - (replaced.size if replaced is not None else 0),
        )
        self._log(kind, version, now, request)
        return version

    def _copy(self, change: Copy, now: float) -> Version:
        """``change.name`` gets ``change.src``'s content as a new version: its chunks gain a
        reference each, nothing else is stored; a move then removes ``src`` (its tombstone's
        id is the move's, suffixed, so the two never share an id)."""
        kind = "mv" if change.move else "cp"
        done = self._logged(change.commit, kind, change.name, None)
        if done is not None:
            return done
        if change.src == change.name:
            raise BadRequest(f"{change.src!r} is both the source and the destination")
        src = self._current(change.src)
        if src is None or src.deleted:
            raise NotFound(f"{change.src!r} not found; see what is stored with: ls")
        version = self._commit(
            NewVersion(
                change.name,
                src.size,
                src.sha256,
                src.chunk_size,
                src.chunks,
                src.mtime,
                change.commit,
            ),
            now,
            kind,
        )
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
            old.sha256,
            old.chunk_size,
            (),
            old.mtime,
            old.version + 1,
            change.commit,
            now,
            deleted=True,
        )
        self._execute(
            "UPDATE names SET version = ?, chunks = ?, commit_id = ?, committed = ?, deleted = 1 "
            "WHERE name = ?",
            (tomb.version, b"", tomb.commit, now, tomb.name),
        )
        delta: collections.Counter[Digest] = collections.Counter()
        self._release(old, delta)
        self._add_refs(delta, now)
        self._bump(files=-1, nbytes=-old.size)
        self._log("rm", tomb, now)
        return tomb

    def _release(self, old: Version, delta: collections.Counter[Digest]) -> None:
        """``old`` stops being current: retained with its references (versions kept), or its
        references released; retained versions past :attr:`keep_versions` release theirs.
        Adds the reference changes to the Counter ``delta``."""
        if self.keep_versions > 0:
            self._execute(
                "INSERT INTO retained VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name, version) DO NOTHING",
                (
                    old.name,
                    old.version,
                    old.size,
                    old.sha256,
                    old.chunk_size,
                    pack_digests(old.chunks),
                    old.mtime,
                    old.commit,
                    old.committed,
                ),
            )
        else:
            delta.subtract(old.chunks)
        for version, chunks in self._execute(
            "SELECT version, chunks FROM retained WHERE name = ? ORDER BY version DESC", (old.name,)
        ).fetchall()[self.keep_versions :]:
            self._execute(
                "DELETE FROM retained WHERE name = ? AND version = ?", (old.name, version)
            )
            delta.subtract(unpack_digests(bytes(chunks)))

    def retained(self, name: str) -> builtins.list[Version]:
        return [
            _version((*r, 0))
            for r in self._all(
                f"SELECT {_RETAINED_COLUMNS} FROM retained WHERE name = ? ORDER BY version DESC",
                (name,),
            )
        ]

    def _restore(self, change: Restore, now: float) -> Version:
        done = self._logged(change.commit, "restore", change.name, None)
        if done is not None:
            return done
        sql = f"SELECT {_RETAINED_COLUMNS} FROM retained WHERE name = ?"
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
        old = _version((*row, 0))
        return self._commit(
            NewVersion(
                change.name,
                old.size,
                old.sha256,
                old.chunk_size,
                old.chunks,
                old.mtime,
                change.commit,
            ),
            now,
            "restore",
        )

    def _add_refs(self, delta: collections.Counter[Digest], now: float) -> None:
        # Sorted by digest: two transactions always lock shared rows in the same order.  An
        # unreferenced chunk's grace clock starts when its last reference goes.
        rows = [(n, n, now, d) for d, n in sorted(delta.items()) if n]
        if rows:
            self._executemany(
                "UPDATE chunks SET refs = refs + ?, "
                "since = CASE WHEN refs + ? = 0 THEN ? ELSE since END WHERE digest = ?",
                rows,
            )

    # --- chunks ---

    def known(self, digests: Sequence[Digest], now: float) -> set[Digest]:
        if not digests:
            return set()
        unique = sorted(set(digests))
        found: set[Digest] = set()

        def work() -> None:
            found.clear()
            for start in range(0, len(unique), 500):
                part = unique[start : start + 500]
                self._execute(
                    f"UPDATE chunks SET since = ? WHERE refs = 0 AND doomed = 0 "
                    f"AND digest IN ({_marks(len(part))})",
                    [now, *part],
                )
                found.update(
                    bytes(r[0])
                    for r in self._execute(
                        f"SELECT digest FROM chunks WHERE doomed = 0 AND digest IN "
                        f"({_marks(len(part))})",
                        part,
                    ).fetchall()
                )

        self._transaction(work)
        return set(found)

    def claim_chunk(self, digest: Digest, size: int, now: float, data: bytes | None = None) -> bool:
        # Not flushed on its own: a claim lost in a power loss costs an upload again (the commit
        # finds the chunk missing), and the commit that relies on it flushes it first.
        return self._transaction(lambda: self._claim(digest, size, now, data), durable=False)

    def _claim(self, digest: Digest, size: int, now: float, data: bytes | None) -> bool:
        for _ in range(RETRIES):
            inserted = self._execute(
                "INSERT INTO chunks (digest, size, refs, since, doomed, data) "
                "VALUES (?, ?, 0, ?, 0, ?) ON CONFLICT (digest) DO NOTHING RETURNING digest",
                (digest, size, now, data),
            ).fetchall()
            if inserted:
                self._bump(chunks=1, chunk_bytes=size)
                return data is not None
            row = self._execute(
                f"SELECT doomed, data IS NOT NULL FROM chunks WHERE digest = ?{self.for_update}",
                (digest,),
            ).fetchone()
            if row is None:
                continue  # collected between the two statements (PostgreSQL): insert it
            if row[0]:
                raise Unavailable(
                    f"chunk {digest.hex()[:16]} is being collected right now; "
                    f"send it again in a moment"
                )
            self._execute(
                "UPDATE chunks SET since = ? WHERE digest = ? AND refs = 0", (now, digest)
            )
            if data is not None and row[1]:  # the bytes arrive again: heal a damaged copy
                self._execute(
                    "UPDATE chunks SET data = ? WHERE digest = ? AND data != ?",
                    (data, digest, data),
                )
            return bool(row[1])
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

    def prune(self, cutoff: float) -> int:
        def work() -> int:
            # A removed name with retained versions keeps its tombstone: the version count
            # goes on, so a later version never takes a retained one's number.
            n = self._execute(
                "DELETE FROM names WHERE deleted = 1 AND committed < ? AND NOT "
                "EXISTS (SELECT 1 FROM retained r WHERE r.name = names.name)",
                (cutoff,),
            ).rowcount
            return n + self._execute("DELETE FROM commits WHERE at < ?", (cutoff,)).rowcount

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

    def refcount_errors(self) -> builtins.list[tuple[Digest, int | None, int]]:
        counted: collections.Counter[Digest] = collections.Counter()
        for (chunks,) in self._all(
            "SELECT chunks FROM names WHERE deleted = 0 UNION ALL SELECT chunks FROM retained"
        ):
            counted.update(unpack_digests(bytes(chunks)))
        stored = {bytes(d): refs for d, refs in self._all("SELECT digest, refs FROM chunks")}
        errors: builtins.list[tuple[Digest, int | None, int]] = [
            (d, refs, counted.get(d, 0)) for d, refs in stored.items() if refs != counted.get(d, 0)
        ]
        errors += [(d, None, n) for d, n in counted.items() if d not in stored]
        return errors
