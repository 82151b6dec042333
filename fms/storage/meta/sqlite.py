"""The embedded metadata engine: one SQLite file in the data directory.

WAL mode, ``synchronous=FULL`` (a transaction is on disk before its commit returns, so before the
client's ack), ``BEGIN IMMEDIATE`` for every write (writers queue on the lock instead of failing
midway), and a long busy timeout, so several worker processes on one machine can share one store.
"""

import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Sequence

from ...errors import FmsError, NoSpace, Unavailable
from .sql import Cursor, Retry, SQLMeta, WrongDigest

BUSY_TIMEOUT = 60.0  # seconds a writer waits for another worker's transaction

log = logging.getLogger("fms.storage.meta")


class SQLiteMeta(SQLMeta):
    """:param path: the database file (created with its tables if missing)."""

    begin_write = "BEGIN IMMEDIATE"
    lazy_commit = ("PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL")

    def __init__(
        self, path: str, store_id: str | None = None, digest_fn: str | None = None
    ) -> None:
        self.path = path
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
        self.store_id = self._stored_id()

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


def _cannot_open(path: str, exc: Exception) -> FmsError:
    return FmsError(
        f"cannot open the metadata database {path}: {exc}; check that the file is an "
        f"fms database on a writable disk"
    )
