"""The embedded metadata engine: one SQLite file in the data directory.

WAL mode, ``synchronous=FULL`` (a transaction is on disk before its commit returns, so before the
client's ack), ``BEGIN IMMEDIATE`` for every write (writers queue on the lock instead of failing
midway), and a long busy timeout, so several worker processes on one machine can share one store.
"""

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Sequence

from ...errors import FmsError, NoSpace, Unavailable
from .sql import Cursor, Retry, SQLMeta, WrongDigest

BUSY_TIMEOUT = 60.0  # seconds a writer waits for another worker's transaction

log = logging.getLogger("fms.storage.meta")


class LockFileQueue:
    """The writers of one SQLite file queue on a lock file beside it (``flock``) before they
    ask for SQLite's write lock, so that the kernel hands the turn on the moment a transaction
    ends.  SQLite's own busy handler polls instead, sleeping 1, 2, 5, 10, 15 ms and more between
    tries: two storage workers sharing a store left it idle for milliseconds after each other's
    transaction (a ``put -r`` of small files was 8 % slower with two workers than with one).
    SQLite's lock stays the one that keeps transactions apart; this queue only orders them.
    A writer that does not queue here (another program) is still waited for by the busy
    handler.  Each connection opens the file itself: ``flock`` excludes other open files, in
    this process too.

    A writer waits here no longer than it would for SQLite's lock (``timeout``): a worker
    stopped or stuck in its transaction must cost the others ``unavailable`` after that, as the
    busy handler's timeout does, not hold them forever.  ``flock`` itself has no timeout, so a
    contended wait is made on a thread of its own over a duplicate of the descriptor; one given
    up is left to that thread, and this queue goes on with a new open file (the abandoned one's
    lock, if the thread ever gets it, goes when the thread closes the last descriptor of it)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.fd: int | None = None  # None: closed or given up (see _abandon), not queuing
        self._open()

    def _open(self) -> None:
        """Open the file, closed again when this queue is dropped without close() (an engine
        whose constructor failed further on, a test): a descriptor per engine would leak."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._closer = weakref.finalize(self, os.close, self.fd)

    def enter(self) -> None:
        """Wait for the turn.  :raises Unavailable: it did not come within ``timeout``."""
        if self.fd is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waiter = os.dup(self.fd)  # the thread's own: it closes it whatever happens here
        got = threading.Event()
        failed: list[OSError] = []

        def wait() -> None:
            try:
                fcntl.flock(waiter, fcntl.LOCK_EX)
            except OSError as exc:
                failed.append(exc)
            finally:
                os.close(waiter)
                got.set()

        try:
            threading.Thread(target=wait, name="fms-writers-queue", daemon=True).start()
        except BaseException:
            os.close(waiter)
            raise
        try:
            if got.wait(self.timeout):
                if failed:
                    raise failed[0]
                return
        except BaseException:
            self._abandon()
            raise
        self._abandon()
        raise Unavailable(f"the metadata database stayed busy for {self.timeout:.0f} s; try again")

    def _abandon(self) -> None:
        """Leave this open file (and the lock a waiting thread may yet take on it) behind."""
        closed = self.fd is None  # (by close() meanwhile: no new file then)
        self._closer()  # (the thread still holds its duplicate, if it waits on)
        if closed:
            return
        self.fd = None
        try:
            self._open()
        except OSError as exc:  # out of descriptors: SQLite's busy handler alone
            log.warning("event=writer_queue_unavailable path=%s error=%r", self.path, exc)

    def leave(self) -> None:
        fd = self.fd
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file (its lock goes with it).  A transaction under way, which keeps this
        queue to leave it (``_Write``), leaves it as a no-op: its descriptor's number may
        already be another file's (flock on it would fail, or unlock that file)."""
        self.fd = None
        self._closer()


class SQLiteMeta(SQLMeta):
    """:param path: the database file (created with its tables if missing)."""

    begin_write = "BEGIN IMMEDIATE"
    writers: LockFileQueue | None = None
    lazy_commit = ("PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL")

    def __init__(
        self, path: str, store_id: str | None = None, digest_fn: str | None = None
    ) -> None:
        self.path = path
        try:
            self.writers = LockFileQueue(path + "-writers", BUSY_TIMEOUT)
        except OSError as exc:  # a read-only directory: SQLite's busy handler alone
            log.info("event=writer_queue_unavailable path=%s error=%r", path, exc)
        try:
            self._open(store_id, digest_fn)
        except BaseException:
            if self.writers is not None:
                self.writers.close()
            raise
        self.store_id = self._stored_id()

    def _open(self, store_id: str | None, digest_fn: str | None) -> None:
        """Connect, in WAL mode, and create or upgrade the tables, waiting for other workers
        doing the same."""
        path = self.path
        deadline = time.monotonic() + BUSY_TIMEOUT
        wait = 0.01
        while True:
            try:
                self.db = sqlite3.connect(
                    path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
                )
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self._create_schema(store_id or uuid.uuid4().hex, digest_fn)
                break
            except (sqlite3.OperationalError, Unavailable) as exc:
                # Switching to WAL and creating the tables can meet another worker doing the
                # same (or migrating) with SQLITE_BUSY, which the busy handler does not cover.
                with contextlib.suppress(sqlite3.Error):
                    self.db.close()
                if (
                    "locked" not in str(exc) and "busy" not in str(exc)
                ) or time.monotonic() > deadline:
                    raise _cannot_open(path, exc) from None
                time.sleep(wait)
                wait = min(wait * 2, 0.5)
            except WrongDigest:
                raise
            except (sqlite3.DatabaseError, FmsError) as exc:
                raise _cannot_open(path, exc) from None

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        return self.db.execute(sql, args)

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.db.executemany(sql, rows)

    def _translate(self, exc: BaseException) -> FmsError | Retry | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        text = str(exc)
        if "full" in text:
            return NoSpace(
                "storage disk is full; nothing was changed: free space on the storage "
                "volume and try again"
            )
        if "locked" in text or "busy" in text:
            return Unavailable(
                f"the metadata database stayed busy for {BUSY_TIMEOUT:.0f} s; try again"
            )
        log.error("event=database_error error=%r", text)
        return FmsError(f"metadata database error: {text}")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
        if self.writers is not None:
            self.writers.close()
            self.writers = None


def _cannot_open(path: str, exc: Exception) -> FmsError:
    return FmsError(
        f"cannot open the metadata database {path}: {exc}; check that the file is an "
        f"fms database on a writable disk"
    )
