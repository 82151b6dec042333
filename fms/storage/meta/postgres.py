"""The metadata engine on PostgreSQL (psycopg 3), for storage workers on several hosts.

``storage_worker.py --meta postgresql://USER[:PASSWORD]@HOST:PORT/DB``.  Every worker keeps one
connection (and one more for its maintenance thread).  A lost connection is opened again on the
next request; meanwhile requests get ``unavailable``, which clients retry.  A commit whose
outcome a lost connection hid is safe to send again: its id makes the repeat a no-op.
"""

import contextlib
import logging
import re
import uuid
from collections.abc import Sequence

import psycopg
from psycopg import errors as pgerrors

from ...errors import FmsError, NoSpace, Unavailable
from .sql import ConnectionLost, Cursor, Retry, SQLMeta

CONNECT_TIMEOUT = 5  # seconds to reach the server
SCHEMA_LOCK = 0x666D73  # advisory lock key held while creating the tables ("fms")

log = logging.getLogger("fms.storage.meta")


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class PostgresMeta(SQLMeta):
    """:param url: a libpq connection URL (``postgresql://...``)."""

    types = {
        "blob": "BYTEA",
        "real": "DOUBLE PRECISION",
        "name_type": 'TEXT COLLATE "C"',
        "serial": "BIGSERIAL PRIMARY KEY",
    }
    begin_write = "BEGIN"
    begin_read = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    lazy_commit = ("SET synchronous_commit TO OFF", "SET synchronous_commit TO ON")
    for_update = " FOR UPDATE"
    skip_locked = " SKIP LOCKED"
    locks_names = True
    serial_writes = False

    def __init__(self, url: str, store_id: str | None = None, digest_fn: str | None = None) -> None:
        self.url = url
        self.db: psycopg.Connection | None = None
        try:
            self._connect()
            self._create_schema(store_id or uuid.uuid4().hex, digest_fn)
        except psycopg.Error as exc:
            raise FmsError(
                f"cannot use PostgreSQL at {redact(url)}: {_first_line(exc)}; check "
                f"--meta (postgresql://USER[:PASSWORD]@HOST:PORT/DB), that the server "
                f"runs and that the database exists"
            ) from None
        except Unavailable as exc:
            raise FmsError(f"cannot use PostgreSQL at {redact(url)}: {exc}") from None
        self.store_id = self._stored_id()

    def _connect(self) -> psycopg.Connection:
        self.db = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        return self.db

    def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        db = self.db
        if db is None or db.closed or db.broken:
            if self.in_transaction:  # reconnecting now would run the rest outside it
                raise psycopg.OperationalError("the connection was lost during a transaction")
            db = self._connect()
        return db.execute(sql.replace("?", "%s"), args)

    def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        if self.db is None:  # run only inside a transaction, which connected
            raise psycopg.OperationalError("not connected")
        with self.db.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def _lock_names(self, names: Sequence[str]) -> None:
        for name in names:
            self._execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (name,))

    def _rename_key_index(self, table: str) -> None:
        self._execute(f"ALTER INDEX IF EXISTS {table}_pkey RENAME TO {table}_v2_pkey")

    def _lock_schema(self) -> None:
        self._execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))

    def _translate(self, exc: BaseException) -> FmsError | Retry | None:
        if isinstance(exc, (pgerrors.DeadlockDetected, pgerrors.SerializationFailure)):
            return Retry()
        if isinstance(exc, pgerrors.DiskFull):
            return NoSpace(
                "the metadata database's disk is full; nothing was changed: free "
                "space on the database server and try again"
            )
        if isinstance(exc, psycopg.OperationalError) or (self.db is not None and self.db.broken):
            log.warning(
                "event=database_unreachable url=%s error=%r", redact(self.url), _first_line(exc)
            )
            if self.db is not None:
                with contextlib.suppress(Exception):
                    self.db.close()
            return ConnectionLost(
                f"the metadata database (PostgreSQL) cannot be reached: "
                f"{_first_line(exc)}; retrying"
            )
        if isinstance(exc, psycopg.Error):
            log.error("event=database_error error=%r", _first_line(exc))
            return FmsError(f"metadata database error: {_first_line(exc)}")
        return None

    def close(self) -> None:
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
