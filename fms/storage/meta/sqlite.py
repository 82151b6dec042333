"""The embedded metadata engine: one SQLite file in the data directory.

WAL mode, ``synchronous=FULL`` (a transaction is on disk before its commit returns, so before the
client's ack), ``BEGIN IMMEDIATE`` for every write (writers queue on the lock instead of failing
midway), and a long busy timeout, so several worker processes can share one store.
"""

import collections
import contextlib
import logging
import sqlite3
import time
import uuid

import msgpack

from ...errors import BadRequest, FmsError, MissingChunks, NoSpace, NotFound, Unavailable
from ..model import NewVersion, Removal, Totals, Version, pack_digests, unpack_digests
from .base import RETAIN_SECONDS, ChunkRow, MetaEngine

FORMAT = 2            # the data directory's format; 1 was one manifest file per name
BUSY_TIMEOUT = 60.0   # seconds a writer waits for another worker's transaction

log = logging.getLogger("fms.storage.meta")

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, size INTEGER NOT NULL,
    sha256 BLOB NOT NULL, chunk_size INTEGER NOT NULL, chunks BLOB NOT NULL,
    mtime REAL NOT NULL, commit_id TEXT NOT NULL, committed REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS names_tombstones ON names (committed) WHERE deleted = 1;
CREATE TABLE IF NOT EXISTS chunks (
    digest BLOB PRIMARY KEY, size INTEGER NOT NULL, refs INTEGER NOT NULL DEFAULT 0,
    since REAL NOT NULL, doomed INTEGER NOT NULL DEFAULT 0, data BLOB);
CREATE INDEX IF NOT EXISTS chunks_unreferenced ON chunks (since) WHERE refs = 0;
CREATE TABLE IF NOT EXISTS commits (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, sha256 BLOB,
    result BLOB NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS commits_at ON commits (at);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1), files INTEGER NOT NULL, bytes INTEGER NOT NULL,
    chunks INTEGER NOT NULL, chunk_bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0, 0);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until REAL NOT NULL);
"""

_VERSION_COLUMNS = "name, size, sha256, chunk_size, chunks, mtime, version, commit_id, committed, deleted"


def _version(row) -> Version:
    name, size, sha, chunk_size, chunks, mtime, version, commit, committed, deleted = row
    return Version(name, size, bytes(sha), chunk_size, unpack_digests(chunks), mtime, version,
                   commit, committed, bool(deleted))


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if last == 0xD800:
            last = 0xE000          # surrogates are not characters a name can hold
        if last <= 0x10FFFF:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


class SQLiteMeta(MetaEngine):
    """:param path: the database file (created with its tables if missing)."""

    def __init__(self, path: str, store_id: str | None = None):
        self.path = path
        deadline = time.monotonic() + BUSY_TIMEOUT
        wait = 0.01
        while True:
            try:
                self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                          check_same_thread=False)
                self._setup(store_id)
                break
            except (sqlite3.OperationalError, Unavailable) as exc:
                # Switching to WAL and creating the tables can meet another worker doing the
                # same (or migrating) with SQLITE_BUSY that the busy handler does not cover.
                with contextlib.suppress(sqlite3.Error):
                    self.db.close()
                if "locked" not in str(exc) and "busy" not in str(exc) \
                        or time.monotonic() > deadline:
                    raise FmsError(f"cannot open the metadata database {path}: {exc}; check that "
                                   f"the file is an fms database on a writable disk") from None
                time.sleep(wait)
                wait = min(wait * 2, 0.5)
            except sqlite3.DatabaseError as exc:
                raise FmsError(f"cannot open the metadata database {path}: {exc}; check that "
                               f"the file is an fms database on a writable disk") from None
        self.store_id = self.setting("store_id")

    def _setup(self, store_id):
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self._write():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            self.db.execute("INSERT OR IGNORE INTO settings VALUES ('format', ?)", (str(FORMAT),))
            self.db.execute("INSERT OR IGNORE INTO settings VALUES ('store_id', ?)",
                            (store_id or uuid.uuid4().hex,))

    # --- transactions ---

    @contextlib.contextmanager
    def _write(self):
        """One write transaction; SQLite errors become the wire's errors."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _translate(exc) from None
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise _translate(exc) from None
            raise

    def _one(self, sql, args=()):
        return self.db.execute(sql, args).fetchone()

    def setting(self, key: str):
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return row[0] if row else None

    def set_setting(self, key: str, value: str):
        """Outside :meth:`apply`'s transactions: used by migration, in its own transaction."""
        self.db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    # --- names ---

    def get(self, name):
        row = self._one(f"SELECT {_VERSION_COLUMNS} FROM names WHERE name = ? AND deleted = 0",
                        (name,))
        return _version(row) if row else None

    def list(self, prefix, after, limit):
        lo = max(prefix, after)
        hi = prefix_end(prefix)
        sql = f"SELECT {_VERSION_COLUMNS} FROM names WHERE name >= ? AND name != ?"
        args = [lo, after]
        if hi is not None:
            sql += " AND name < ?"
            args.append(hi)
        sql += " AND deleted = 0 ORDER BY name LIMIT ?"
        args.append(limit)
        return [_version(r) for r in self.db.execute(sql, args)]

    def iter_versions(self, after, limit):
        return [_version(r) for r in self.db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM names WHERE name > ? AND deleted = 0 "
            f"ORDER BY name LIMIT ?", (after, limit))]

    def totals(self):
        return Totals(*self._one("SELECT files, bytes, chunks, chunk_bytes FROM totals"))

    def apply(self, changes, now, small):
        results = []
        with self._write():
            for i, change in enumerate(changes):
                self.db.execute(f"SAVEPOINT c{i}")
                try:
                    if isinstance(change, NewVersion):
                        for digest in set(change.chunks) & small.keys():
                            self._claim(digest, len(small[digest]), now, bytes(small[digest]))
                        result = self._commit(change, now)
                    elif isinstance(change, Removal):
                        result = self._remove(change, now)
                    else:
                        raise TypeError(f"not a change: {change!r}")
                    self.db.execute(f"RELEASE c{i}")
                except FmsError as exc:
                    self.db.execute(f"ROLLBACK TO c{i}")
                    self.db.execute(f"RELEASE c{i}")
                    result = exc
                results.append(result)
        return results

    def _logged(self, commit_id, kind, name, sha256):
        row = self._one("SELECT kind, name, sha256, result FROM commits WHERE id = ?",
                        (commit_id,))
        if row is None:
            return None
        if (row[0], row[1]) != (kind, name) or (sha256 is not None and bytes(row[2]) != sha256):
            raise BadRequest(f"id {commit_id!r} was already used by another request; every commit "
                             f"and rm needs a fresh random id")
        fields = msgpack.unpackb(row[3], raw=False)
        return Version(**{**fields, "chunks": tuple(fields["chunks"])})

    def _log(self, kind, version: Version, now):
        result = msgpack.packb({f: getattr(version, f) for f in Version.__slots__},
                               use_bin_type=True)
        self.db.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?)",
                        (version.commit, kind, version.name,
                         version.sha256 if kind == "commit" else None, result, now))

    def _current(self, name):
        row = self._one(f"SELECT {_VERSION_COLUMNS} FROM names WHERE name = ?", (name,))
        return _version(row) if row else None

    def _commit(self, change: NewVersion, now) -> Version:
        done = self._logged(change.commit, "commit", change.name, change.sha256)
        if done is not None:
            return done
        wanted = collections.Counter(change.chunks)
        live = {bytes(r[0]) for r in self.db.execute(
            f"SELECT digest FROM chunks WHERE doomed = 0 AND digest IN "
            f"({','.join('?' * len(wanted))})", list(wanted))} if wanted else set()
        missing = [d for d in wanted if d not in live]
        if missing:
            raise MissingChunks(f"{len(missing)} chunk(s) of {change.name!r} are not in the store "
                                f"(never uploaded, or collected since); upload them and commit "
                                f"again", missing=missing)
        old = self._current(change.name)
        version = Version(change.name, change.size, change.sha256, change.chunk_size,
                          tuple(change.chunks), change.mtime, old.version + 1 if old else 1,
                          change.commit, now)
        self.db.execute(
            "INSERT OR REPLACE INTO names VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            (version.name, version.version, version.size, version.sha256, version.chunk_size,
             pack_digests(version.chunks), version.mtime, version.commit, now))
        self._add_refs(wanted, now)
        was_live = old is not None and not old.deleted
        if was_live:
            self._add_refs(collections.Counter(old.chunks), now, sign=-1)
        self.db.execute("UPDATE totals SET files = files + ?, bytes = bytes + ?",
                        (0 if was_live else 1, version.size - (old.size if was_live else 0)))
        self._log("commit", version, now)
        return version

    def _remove(self, change: Removal, now) -> Version:
        done = self._logged(change.commit, "rm", change.name, None)
        if done is not None:
            return done
        old = self._current(change.name)
        if old is None or old.deleted:
            raise NotFound(f"{change.name!r} not found; see what is stored with: ls")
        tomb = Version(old.name, old.size, old.sha256, old.chunk_size, (), old.mtime,
                       old.version + 1, change.commit, now, deleted=True)
        self.db.execute(
            "UPDATE names SET version = ?, chunks = ?, commit_id = ?, committed = ?, deleted = 1 "
            "WHERE name = ?", (tomb.version, b"", tomb.commit, now, tomb.name))
        self._add_refs(collections.Counter(old.chunks), now, sign=-1)
        self.db.execute("UPDATE totals SET files = files - 1, bytes = bytes - ?", (old.size,))
        self._log("rm", tomb, now)
        return tomb

    def _add_refs(self, counts, now, sign=1):
        # An unreferenced chunk's grace clock starts when its last reference goes.
        self.db.executemany(
            "UPDATE chunks SET refs = refs + ?, since = CASE WHEN refs + ? = 0 THEN ? ELSE since END "
            "WHERE digest = ?", [(sign * n, sign * n, now, d) for d, n in counts.items()])

    # --- chunks ---

    def known(self, digests, now):
        if not digests:
            return set()
        unique = list(set(digests))
        found = set()
        with self._write():
            for start in range(0, len(unique), 500):
                part = unique[start:start + 500]
                marks = ",".join("?" * len(part))
                found.update(bytes(r[0]) for r in self.db.execute(
                    f"SELECT digest FROM chunks WHERE doomed = 0 AND digest IN ({marks})", part))
                self.db.execute(f"UPDATE chunks SET since = ? WHERE refs = 0 AND doomed = 0 "
                                f"AND digest IN ({marks})", [now, *part])
        return found

    def claim_chunk(self, digest, size, now, data=None):
        with self._write():
            return self._claim(digest, size, now, data)

    def _claim(self, digest, size, now, data):
        row = self._one("SELECT doomed, data IS NOT NULL FROM chunks WHERE digest = ?", (digest,))
        if row is None:
            self.db.execute("INSERT INTO chunks (digest, size, refs, since, data) VALUES (?, ?, 0, ?, ?)",
                            (digest, size, now, data))
            self.db.execute("UPDATE totals SET chunks = chunks + 1, chunk_bytes = chunk_bytes + ?",
                            (size,))
            return data is not None
        if row[0]:
            raise Unavailable(f"chunk {digest.hex()[:16]} is being collected right now; "
                              f"send it again in a moment")
        self.db.execute("UPDATE chunks SET since = ? WHERE digest = ? AND refs = 0", (now, digest))
        return bool(row[1])

    def chunk(self, digest):
        row = self._one("SELECT digest, size, refs, since, doomed, data FROM chunks WHERE digest = ?",
                        (digest,))
        return ChunkRow(bytes(row[0]), *row[1:]) if row else None

    # --- garbage collection ---

    def doom(self, cutoff, limit, dry_run=False):
        with self._write():
            rows = [ChunkRow(bytes(r[0]), *r[1:]) for r in self.db.execute(
                "SELECT digest, size, refs, since, doomed, data FROM chunks "
                "WHERE refs = 0 AND since < ? AND doomed = 0 LIMIT ?", (cutoff, limit))]
            if dry_run or not rows:
                return rows
            in_engine = [r.digest for r in rows if r.in_engine]
            blobs = [r.digest for r in rows if not r.in_engine]
            self.db.executemany("DELETE FROM chunks WHERE digest = ?", [(d,) for d in in_engine])
            self.db.executemany("UPDATE chunks SET doomed = 1 WHERE digest = ?",
                                [(d,) for d in blobs])
            freed = sum(r.size for r in rows if r.in_engine)
            self.db.execute("UPDATE totals SET chunks = chunks - ?, chunk_bytes = chunk_bytes - ?",
                            (len(in_engine), freed))
        return rows

    def doomed(self, limit):
        return [ChunkRow(bytes(r[0]), *r[1:]) for r in self.db.execute(
            "SELECT digest, size, refs, since, doomed, data FROM chunks WHERE doomed = 1 LIMIT ?",
            (limit,))]

    def forget(self, digests):
        if not digests:
            return
        with self._write():
            for d in digests:
                row = self._one("SELECT size FROM chunks WHERE digest = ? AND doomed = 1", (d,))
                if row is None:
                    continue
                self.db.execute("DELETE FROM chunks WHERE digest = ?", (d,))
                self.db.execute("UPDATE totals SET chunks = chunks - 1, "
                                "chunk_bytes = chunk_bytes - ?", (row[0],))

    def adopt_orphan(self, digest, size):
        with self._write():
            if self._one("SELECT 1 FROM chunks WHERE digest = ?", (digest,)):
                return False
            self.db.execute("INSERT INTO chunks (digest, size, refs, since, doomed) "
                            "VALUES (?, ?, 0, 0, 1)", (digest, size))
            self.db.execute("UPDATE totals SET chunks = chunks + 1, chunk_bytes = chunk_bytes + ?",
                            (size,))
            return True

    def prune(self, cutoff):
        with self._write():
            n = self.db.execute("DELETE FROM names WHERE deleted = 1 AND committed < ?",
                                (cutoff,)).rowcount
            n += self.db.execute("DELETE FROM commits WHERE at < ?", (cutoff,)).rowcount
        return n

    def lease(self, name, holder, now, seconds):
        with self._write():
            row = self._one("SELECT holder, until FROM leases WHERE name = ?", (name,))
            if row is not None and row[0] != holder and row[1] > now:
                return False
            self.db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)",
                            (name, holder, now + seconds))
            return True

    def release(self, name, holder):
        with self._write():
            self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def lease_holder(self, name):
        row = self._one("SELECT holder FROM leases WHERE name = ?", (name,))
        return row[0] if row else None

    # --- checks ---

    def refcount_errors(self):
        counted = collections.Counter()
        for (chunks,) in self.db.execute("SELECT chunks FROM names WHERE deleted = 0"):
            counted.update(unpack_digests(chunks))
        stored = {bytes(d): refs for d, refs in self.db.execute("SELECT digest, refs FROM chunks")}
        errors = [(d, refs, counted.get(d, 0)) for d, refs in stored.items()
                  if refs != counted.get(d, 0)]
        errors += [(d, None, n) for d, n in counted.items() if d not in stored]
        return errors

    def close(self):
        with contextlib.suppress(sqlite3.Error):
            self.db.close()


def _translate(exc: sqlite3.OperationalError) -> FmsError:
    text = str(exc)
    if "full" in text:
        return NoSpace("storage disk is full; nothing was changed: free space on the storage "
                       "volume and try again")
    if "locked" in text or "busy" in text:
        return Unavailable(f"the metadata database stayed busy for {BUSY_TIMEOUT:.0f} s; "
                           f"try again")
    log.error("event=database_error error=%r", text)
    return FmsError(f"metadata database error: {text}")


