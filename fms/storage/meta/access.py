"""Who may do what, kept in the metadata engine: identities, their credentials and grants, which
chunks each identity uploaded, the holds on retained versions, purges, and the audit log.

Kept with the names in one database, so every storage worker of a store, behind any broker,
decides alike (:mod:`fms.policy` decides; this module stores).  Every change to identities,
credentials or grants bumps the store's *access epoch* in the same transaction: a worker that
sees a newer epoch reloads the snapshot.

- **Credentials** are CURVE public keys (z85) and S3 access keys (id + secret: SigV4 needs the
  secret itself, so it is stored as given; protect the database as you protect the store).
- **Chunk owners**: an identity that may not read the whole store sees the store's dedup only
  for the chunks it uploaded itself (``have`` answers, a commit may name them), so it can never
  learn that someone else stores a content it guesses.  Rows go with the chunk when it is
  collected, and with the identity.
- **Holds**: a version retained while the store keeps versions for a time (``--keep-for``) is
  held until then: no change pushes it out before, only an admin's purge removes it.
- **Audit**: one row per change (the JSON line ``client.py audit`` prints), written in the
  change's own transaction.
"""

import collections
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import msgpack

from ...errors import BadRequest, NotFound
from ..model import Change, Copy, NewVersion, Removal, Restore, Version

if TYPE_CHECKING:
    from .sql import Cursor, Row

T = TypeVar("T")
# An identity in an access snapshot: (name, CURVE keys, [(role, prefix)], gateway)
SnapshotIdentity: TypeAlias = tuple[str, list[str], list[tuple[str, str]], bool]

CURVE = "curve"
S3 = "s3"
KINDS = (CURVE, S3)

ACCESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    name TEXT PRIMARY KEY, created {real} NOT NULL, gateway INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS credentials (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, identity TEXT NOT NULL, secret TEXT,
    created {real} NOT NULL);
CREATE INDEX IF NOT EXISTS credentials_identity ON credentials (identity);
CREATE TABLE IF NOT EXISTS grants (
    identity TEXT NOT NULL, prefix {name_type} NOT NULL, role TEXT NOT NULL,
    PRIMARY KEY (identity, prefix));
CREATE TABLE IF NOT EXISTS access_epoch (
    id INTEGER PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL);
INSERT INTO access_epoch VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS chunk_owners (
    identity TEXT NOT NULL, digest {blob} NOT NULL, PRIMARY KEY (identity, digest));
CREATE INDEX IF NOT EXISTS chunk_owners_digest ON chunk_owners (digest);
CREATE TABLE IF NOT EXISTS holds (
    name {name_type} NOT NULL, version BIGINT NOT NULL, until {real} NOT NULL,
    PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS holds_until ON holds (until);
CREATE TABLE IF NOT EXISTS audit (
    seq {serial}, at {real} NOT NULL, identity TEXT NOT NULL, op TEXT NOT NULL,
    entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at)
"""

SERIAL = "INTEGER PRIMARY KEY AUTOINCREMENT"  # SQLite's; PostgreSQL's is in its dialect
OWNED_BATCH = 500  # digests per statement when asking which an identity owns
AUDIT_KEEP = 90 * 86400.0  # seconds the audit log keeps an entry (the storage workers' default)
SNAPSHOT_TRIES = 5  # an access snapshot read again if a change landed while it was read


class AccessMeta(ABC):
    """The metadata engine's access part (every method is one transaction)."""

    keep_for: float = 0.0  # seconds a replaced version is held (the worker's --keep-for)
    audit_keep: float = AUDIT_KEEP  # seconds gc keeps an audit entry (--audit-days)

    # --- identities ---

    @abstractmethod
    def access_epoch(self) -> int:
        """The store's access epoch: it grows with every change to identities or grants."""

    @abstractmethod
    def access_snapshot(self) -> tuple[int, list[SnapshotIdentity]]:
        """``(epoch, identities)``: each ``(name, curve keys, [(role, prefix)], gateway)``, all
        as of one epoch."""

    @abstractmethod
    def identities(self) -> list[dict[str, Any]]:
        """Every identity as a map: ``name``, ``created``, ``gateway``, ``keys`` (maps of
        ``kind`` and ``key``; never an S3 secret), ``grants`` (maps of ``role``, ``prefix``)."""

    # Every change below takes ``commit``: an id that makes a repeat of the same request
    # return what it returned the first time (as commits and removals), so a client may send it
    # again after a timeout.

    @abstractmethod
    def add_identity(
        self,
        name: str,
        now: float,
        actor: str,
        gateway: bool = False,
        keys: Sequence[str] = (),
        s3: tuple[str, str] | None = None,
        commit: str | None = None,
    ) -> dict[str, Any]:
        """Create identity ``name`` with CURVE ``keys`` and, with ``s3`` = ``(access key id,
        secret)``, an S3 access key.  :return: ``{"s3": {access_key, secret}}`` or ``{}``: what
        was stored.  :raises BadRequest: it exists already, or a key belongs to another."""

    @abstractmethod
    def remove_identity(self, name: str, now: float, actor: str, commit: str | None = None) -> None:
        """Remove an identity, its credentials, grants and chunk ownership.  :raises NotFound:"""

    @abstractmethod
    def add_credential(
        self,
        name: str,
        kind: str,
        key: str,
        now: float,
        actor: str,
        secret: str | None = None,
        commit: str | None = None,
    ) -> dict[str, Any]:
        """Give ``name`` a credential.  :return: ``{"s3": ...}`` for an S3 key (as stored), else
        ``{}``.  :raises NotFound: no such identity.  :raises BadRequest: the key belongs to an
        identity already."""

    @abstractmethod
    def remove_credential(
        self, name: str, key: str, now: float, actor: str, commit: str | None = None
    ) -> None:
        """:raises NotFound: ``name`` has no such key."""

    @abstractmethod
    def set_grant(
        self, name: str, role: str, prefix: str, now: float, actor: str, commit: str | None = None
    ) -> None:
        """Give ``name`` ``role`` on ``prefix`` (replacing its role there).  :raises NotFound:"""

    @abstractmethod
    def revoke(
        self, name: str, prefix: str, now: float, actor: str, commit: str | None = None
    ) -> None:
        """Take ``name``'s grant on ``prefix`` away.  :raises NotFound: it has none there."""

    @abstractmethod
    def s3_credential(self, access_key: str) -> tuple[str, str] | None:
        """``(identity name, secret)`` of an S3 access key id, or None."""

    @abstractmethod
    def first_admin(self, name: str, key: str, now: float) -> bool:
        """Create identity ``name`` with CURVE ``key`` and admin on the whole store if the store
        has never had one (once per store, whatever happens to it later).  :return: created."""

    # --- chunk owners ---

    @abstractmethod
    def own(self, identity: str, digests: Sequence[bytes]) -> set[bytes]:
        """Record that ``identity`` uploaded these chunks.  :return: those it had not before."""

    @abstractmethod
    def owned(self, identity: str, digests: Sequence[bytes]) -> set[bytes]:
        """The digests among ``digests`` that ``identity`` uploaded."""

    @abstractmethod
    def disown(self, digests: Sequence[bytes]) -> None:
        """Forget every owner of these chunks (they were collected)."""

    # --- holds, purge ---

    @abstractmethod
    def expire_holds(self, now: float, limit: int) -> int:
        """Drop the holds that ran out by ``now``, and the retained versions they kept past
        ``keep_versions`` (their chunks released), for up to ``limit`` names.  :return: how
        many versions were dropped."""

    @abstractmethod
    def purge(
        self,
        name: str,
        version: int | None,
        all_versions: bool,
        now: float,
        actor: str,
        commit: str | None = None,
    ) -> list[int]:
        """Remove versions of ``name`` for good, held or not (an admin's): ``version`` (current
        or retained), or with ``all_versions`` every version and the name's tombstone.  Their
        chunks are released (gc frees them).  :return: the version numbers removed.

        :raises NotFound: no such version.
        """

    # --- audit ---

    @abstractmethod
    def audit_write(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append audit entries (maps with ``time``, ``identity``, ``op``, ...)."""

    @abstractmethod
    def audit_read(self, since: float, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` entries at or after ``since`` whose ``seq`` is above ``after``, in
        ``seq`` order; each a map with ``seq`` added."""

    @abstractmethod
    def prune_audit(self, cutoff: float) -> int:
        """Drop audit entries older than ``cutoff``.  :return: how many."""


# json.dumps(entry, ensure_ascii=False), without making an encoder for each entry
_to_json = json.JSONEncoder(ensure_ascii=False).encode


def audit_entry(now: float, identity: str, op: str, **fields: Any) -> dict[str, Any]:
    """One line of the audit log: time, identity, op, then what the op says (names or prefix,
    versions, result)."""
    return {
        "time": now,
        "identity": identity,
        "op": op,
        **fields,
        "result": fields.get("result", "ok"),
    }


def change_entry(change: Change, result: Version, now: float) -> dict[str, Any]:
    """The audit entry of a change the engine made (a :mod:`fms.storage.model` change)."""
    if isinstance(change, NewVersion):  # the usual one, built directly (as audit_entry does)
        return {
            "time": now,
            "identity": change.actor,
            "op": "put",
            "names": [result.name],
            "versions": [result.version],
            "size": result.size,
            "result": "ok",
        }
    names = [result.name]
    extra: dict[str, Any] = {}
    if isinstance(change, Removal):
        op = "rm" if change.prefix is None else "rm -r"
        extra = {} if change.prefix is None else {"prefix": change.prefix}
    elif isinstance(change, Copy):
        op, names = ("mv" if change.move else "cp"), [change.src, result.name]
    elif isinstance(change, Restore):
        op, extra = "restore", {"restored": change.version}
    else:
        raise TypeError(f"not a change: {change!r}")
    return audit_entry(now, change.actor, op, names=names, versions=[result.version], **extra)


class AccessSQL(AccessMeta):
    """The access part in SQL, for :class:`~fms.storage.meta.sql.SQLMeta` (its connection,
    transactions and dialect)."""

    keep_for = 0.0

    if TYPE_CHECKING:  # what SQLMeta, which this is mixed into, gives it
        types: dict[str, str]
        _chunk_refs: collections.Counter[bytes]

        def _execute(self, sql: str, args: Sequence[object] = ()) -> Cursor: ...
        def _executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...
        def _one(self, sql: str, args: Sequence[object] = ()) -> Row | None: ...
        def _only(self, sql: str, args: Sequence[object] = ()) -> Row: ...
        def _all(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...
        def _transaction(self, work: Callable[[], T], durable: bool = True) -> T: ...
        def _lock_names(self, names: Sequence[str]) -> None: ...
        def _push_out(self, name: str, now: float) -> int: ...
        def _current(self, name: str) -> Version | None: ...
        def retained(self, name: str) -> list[Version]: ...
        def _reference(self, version: Version, delta: int, now: float) -> None: ...
        def _bump(
            self, files: int = 0, nbytes: int = 0, chunks: int = 0, chunk_bytes: int = 0
        ) -> None: ...
        def _refs(
            self,
            table: str,
            key: str,
            ids: Sequence[bytes],
            delta: int | Sequence[int],
            now: float,
            since_floor: float | None = None,
        ) -> None: ...

    def _create_access_schema(self) -> None:
        """Inside the schema's transaction (SQLMeta._create_schema)."""
        types = {"serial": SERIAL, **self.types}
        for statement in ACCESS_SCHEMA.format(**types).split(";"):
            if statement.strip():
                self._execute(statement)

    def _bump_epoch(self) -> None:
        self._execute("UPDATE access_epoch SET epoch = epoch + 1 WHERE id = 1")

    def _audit(self, entry: dict[str, Any]) -> None:
        """Inside a caller's transaction."""
        self._execute(
            "INSERT INTO audit (at, identity, op, entry) VALUES (?, ?, ?, ?)",
            (entry["time"], entry["identity"], entry["op"], _to_json(entry)),
        )

    def _once(
        self, commit: str | None, kind: str, name: str, now: float, work: Callable[[], T]
    ) -> tuple[T, bool]:
        """Inside a transaction: ``work()``'s result, remembered under ``commit``; or, for a
        repeat of the same request, the result it had then (``replayed`` True).

        :return: ``(result, replayed)``.
        :raises BadRequest: ``commit`` was used by another request.
        """
        if commit is not None:
            row = self._execute(
                "SELECT kind, name, result FROM commits WHERE id = ?", (commit,)
            ).fetchone()
            if row is not None:
                if (row[0], row[1]) != (kind, name):
                    raise BadRequest(
                        f"id {commit!r} was already used by another request; every change "
                        f"needs a fresh random id"
                    )
                replayed: T = msgpack.unpackb(bytes(row[2]), raw=False)
                return replayed, True
        result = work()
        if commit is not None:
            self._execute(
                "INSERT INTO commits VALUES (?, ?, ?, NULL, ?, ?)",
                (commit, kind, name, msgpack.packb(result, use_bin_type=True), now),
            )
        return result, False

    def _access_change(
        self,
        work: Callable[[], T],
        entry: dict[str, Any],
        commit: str | None = None,
        name: str = "",
    ) -> T:
        """``work()`` and its audit entry in one transaction that bumps the access epoch
        (once per request: see :meth:`_once`)."""

        def run() -> T:
            result, replayed = self._once(commit, entry["op"], name, entry["time"], work)
            if not replayed:
                self._bump_epoch()
                self._audit(entry)
            return result

        return self._transaction(run)

    # --- identities ---

    def access_epoch(self) -> int:
        return int(self._only("SELECT epoch FROM access_epoch WHERE id = 1")[0])

    def access_snapshot(self) -> tuple[int, list[SnapshotIdentity]]:
        for _ in range(SNAPSHOT_TRIES):
            epoch = self.access_epoch()
            found = self._read_identities()
            if self.access_epoch() == epoch:
                return epoch, [
                    (
                        ident["name"],
                        [k["key"] for k in ident["keys"] if k["kind"] == CURVE],
                        [(g["role"], g["prefix"]) for g in ident["grants"]],
                        ident["gateway"],
                    )
                    for ident in found
                ]
        raise BadRequest("the identities kept changing while they were read; try again")

    def identities(self) -> list[dict[str, Any]]:
        return self._read_identities()

    def _read_identities(self) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {
            name: {
                "name": name,
                "created": created,
                "gateway": bool(gateway),
                "keys": [],
                "grants": [],
            }
            for name, created, gateway in self._all(
                "SELECT name, created, gateway FROM identities ORDER BY name"
            )
        }
        for key, kind, identity in self._all(
            "SELECT key, kind, identity FROM credentials ORDER BY identity, kind, key"
        ):
            if identity in found:
                found[identity]["keys"].append({"kind": kind, "key": key})
        for identity, prefix, role in self._all(
            "SELECT identity, prefix, role FROM grants ORDER BY identity, prefix"
        ):
            if identity in found:
                found[identity]["grants"].append({"role": role, "prefix": prefix})
        return list(found.values())

    def _need_identity(self, name: str) -> None:
        if self._execute("SELECT 1 FROM identities WHERE name = ?", (name,)).fetchone() is None:
            raise NotFound(f"no identity {name!r}; list them with: client.py id ls")

    def add_identity(
        self,
        name: str,
        now: float,
        actor: str,
        gateway: bool = False,
        keys: Sequence[str] = (),
        s3: tuple[str, str] | None = None,
        commit: str | None = None,
    ) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            added = self._execute(
                "INSERT INTO identities VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING "
                "RETURNING name",
                (name, now, int(gateway)),
            ).fetchall()
            if not added:
                raise BadRequest(f"identity {name!r} exists already; see it with: client.py id ls")
            for key in keys:
                self._add_key(name, CURVE, key, None, now)
            if s3 is None:
                return {}
            self._add_key(name, S3, s3[0], s3[1], now)
            return {"s3": {"access_key": s3[0], "secret": s3[1]}}

        entry = audit_entry(
            now, actor, "id add", identity_name=name, gateway=gateway, keys=len(keys)
        )
        return self._access_change(work, entry, commit, name)

    def _add_key(self, name: str, kind: str, key: str, secret: str | None, now: float) -> None:
        if kind not in KINDS:
            raise BadRequest(f"a credential is one of {', '.join(KINDS)}, not {kind!r}")
        added = self._execute(
            "INSERT INTO credentials VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING "
            "RETURNING key",
            (key, kind, name, secret, now),
        ).fetchall()
        if not added:
            owner = self._execute(
                "SELECT identity FROM credentials WHERE key = ?", (key,)
            ).fetchone()
            raise BadRequest(
                f"this {kind} key belongs to identity {owner[0] if owner else '?'!r} "
                f"already; a key identifies one identity"
            )

    def remove_identity(self, name: str, now: float, actor: str, commit: str | None = None) -> None:
        def work() -> None:
            self._need_identity(name)
            for table, column in (
                ("credentials", "identity"),
                ("grants", "identity"),
                ("chunk_owners", "identity"),
                ("identities", "name"),
            ):
                self._execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

        entry = audit_entry(now, actor, "id rm", identity_name=name)
        self._access_change(work, entry, commit, name)

    def add_credential(
        self,
        name: str,
        kind: str,
        key: str,
        now: float,
        actor: str,
        secret: str | None = None,
        commit: str | None = None,
    ) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            self._need_identity(name)
            self._add_key(name, kind, key, secret, now)
            return {"s3": {"access_key": key, "secret": secret}} if kind == S3 else {}

        entry = audit_entry(now, actor, "id key add", identity_name=name, kind=kind, key=key)
        return self._access_change(work, entry, commit, name)

    def remove_credential(
        self, name: str, key: str, now: float, actor: str, commit: str | None = None
    ) -> None:
        def work() -> None:
            gone = self._execute(
                "DELETE FROM credentials WHERE identity = ? AND key = ? RETURNING kind",
                (name, key),
            ).fetchall()
            if not gone:
                raise NotFound(f"identity {name!r} has no key {key!r}; see its keys: id ls")

        entry = audit_entry(now, actor, "id key rm", identity_name=name, key=key)
        self._access_change(work, entry, commit, name)

    def set_grant(
        self,
        name: str,
        role: str,
        prefix: str,
        now: float,
        actor: str,
        commit: str | None = None,
    ) -> None:
        def work() -> None:
            self._need_identity(name)
            self._execute(
                "INSERT INTO grants VALUES (?, ?, ?) ON CONFLICT (identity, prefix) "
                "DO UPDATE SET role = excluded.role",
                (name, prefix, role),
            )

        entry = audit_entry(now, actor, "grant", identity_name=name, role=role, prefix=prefix)
        self._access_change(work, entry, commit, name)

    def revoke(
        self, name: str, prefix: str, now: float, actor: str, commit: str | None = None
    ) -> None:
        def work() -> None:
            gone = self._execute(
                "DELETE FROM grants WHERE identity = ? AND prefix = ? RETURNING role",
                (name, prefix),
            ).fetchall()
            if not gone:
                self._need_identity(name)
                raise NotFound(
                    f"identity {name!r} has no grant on {prefix!r}; see its grants: id ls"
                )

        entry = audit_entry(now, actor, "revoke", identity_name=name, prefix=prefix)
        self._access_change(work, entry, commit, name)

    def s3_credential(self, access_key: str) -> tuple[str, str] | None:
        row = self._one(
            "SELECT identity, secret FROM credentials WHERE key = ? AND kind = ?",
            (access_key, S3),
        )
        return (row[0], row[1]) if row else None

    def first_admin(self, name: str, key: str, now: float) -> bool:
        def work() -> bool:
            claimed = self._execute(
                "INSERT INTO settings VALUES ('first_admin', ?) ON CONFLICT (key) DO NOTHING "
                "RETURNING key",
                (name,),
            ).fetchall()
            if not claimed:
                return False
            self._execute(
                "INSERT INTO identities VALUES (?, ?, 0) ON CONFLICT (name) DO NOTHING",
                (name, now),
            )
            self._execute(
                "INSERT INTO credentials VALUES (?, ?, ?, NULL, ?) ON CONFLICT (key) DO NOTHING",
                (key, CURVE, name, now),
            )
            self._execute(
                "INSERT INTO grants VALUES (?, '', 'admin') ON CONFLICT (identity, prefix) "
                "DO UPDATE SET role = excluded.role",
                (name,),
            )
            self._bump_epoch()
            self._audit(
                audit_entry(now, "system", "id add", identity_name=name, role="admin", prefix="")
            )
            return True

        return self._transaction(work)

    # --- chunk owners ---

    def own(self, identity: str, digests: Sequence[bytes]) -> set[bytes]:
        unique = sorted(set(digests))
        if not unique:
            return set()

        def work() -> set[bytes]:
            added = set()
            for digest in unique:
                if self._execute(
                    "INSERT INTO chunk_owners VALUES (?, ?) ON CONFLICT (identity, digest) "
                    "DO NOTHING RETURNING digest",
                    (identity, digest),
                ).fetchall():
                    added.add(digest)
            return added

        # Not flushed on its own (as a chunk's claim): lost in a power loss, the identity
        # uploads the chunk again.
        return self._transaction(work, durable=False)

    def owned(self, identity: str, digests: Sequence[bytes]) -> set[bytes]:
        unique = sorted(set(digests))
        found: set[bytes] = set()
        for start in range(0, len(unique), OWNED_BATCH):
            part = unique[start : start + OWNED_BATCH]
            found.update(
                bytes(r[0])
                for r in self._all(
                    f"SELECT digest FROM chunk_owners WHERE identity = ? AND digest IN "
                    f"({','.join('?' * len(part))})",
                    [identity, *part],
                )
            )
        return found

    def disown(self, digests: Sequence[bytes]) -> None:
        unique = sorted(set(digests))
        if not unique:
            return

        def work() -> None:
            self._executemany("DELETE FROM chunk_owners WHERE digest = ?", [(d,) for d in unique])

        self._transaction(work, durable=False)

    # --- holds, purge ---

    def _hold(self, name: str, version: int, now: float) -> None:
        """Hold a version just retained for ``keep_for`` (inside the change's transaction)."""
        if self.keep_for > 0:
            self._execute(
                "INSERT INTO holds VALUES (?, ?, ?) ON CONFLICT (name, version) DO UPDATE "
                "SET until = excluded.until",
                (name, version, now + self.keep_for),
            )

    def _held(self, name: str, now: float) -> set[int]:
        """The versions of ``name`` held at ``now``."""
        return {
            r[0]
            for r in self._execute(
                "SELECT version FROM holds WHERE name = ? AND until > ?", (name, now)
            ).fetchall()
        }

    def expire_holds(self, now: float, limit: int) -> int:
        def work() -> int:
            names = [
                r[0]
                for r in self._execute(
                    "SELECT DISTINCT name FROM holds WHERE until <= ? ORDER BY name LIMIT ?",
                    (now, limit),
                ).fetchall()
            ]
            self._lock_names(names)
            self._chunk_refs = collections.Counter()
            dropped = 0
            for name in names:
                self._execute("DELETE FROM holds WHERE name = ? AND until <= ?", (name, now))
                dropped += self._push_out(name, now)
            self._flush_chunk_refs(now)
            return dropped

        return self._transaction(work)

    def _flush_chunk_refs(self, now: float) -> None:
        """Apply the chunk references gathered in ``_chunk_refs`` (sorted, as apply does)."""
        counts = self._chunk_refs
        ids = sorted(counts)
        self._refs("chunks", "digest", ids, [counts[i] for i in ids], now)

    def purge(
        self,
        name: str,
        version: int | None,
        all_versions: bool,
        now: float,
        actor: str,
        commit: str | None = None,
    ) -> list[int]:
        def work() -> list[int]:
            self._lock_names([name])
            self._chunk_refs = collections.Counter()
            purged = self._once(
                commit,
                "purge",
                name,
                now,
                lambda: self._purge(name, version, all_versions, now, actor),
            )[0]
            self._flush_chunk_refs(now)
            return purged

        return self._transaction(work)

    def _purge(
        self,
        name: str,
        version: int | None,
        all_versions: bool,
        now: float,
        actor: str,
    ) -> list[int]:
        current = self._current(name)
        retained = self.retained(name)
        live = [current] if current is not None and not current.deleted else []
        candidates = retained + live
        if all_versions:
            targets = candidates
            if current is None and not retained:
                raise NotFound(f"{name!r} has no version to purge; see: versions {name}")
        else:
            targets = [v for v in candidates if v.version == version]
            if not targets:
                raise NotFound(
                    f"{name!r} has no version {version}; list them with: versions {name}"
                )
        for v in targets:
            self._reference(v, -1, now)  # its chunks (or its body): gc frees what nothing holds
            if v is current:
                self._bump(files=-1, nbytes=-v.size)
                self._execute(
                    "UPDATE names SET version = ?, nchunks = 0, extent_list = NULL, "
                    "chunk_list = NULL, page_list = NULL, body = NULL, commit_id = ?, "
                    "committed = ?, deleted = 1 WHERE name = ?",
                    (v.version + 1, os.urandom(16).hex(), now, name),
                )
            else:
                self._execute(
                    "DELETE FROM retained WHERE name = ? AND version = ?", (name, v.version)
                )
            self._execute("DELETE FROM holds WHERE name = ? AND version = ?", (name, v.version))
        if all_versions:
            # Nothing of the name is left: its tombstone, and the remembered results of the
            # commits that made it.
            self._execute("DELETE FROM names WHERE name = ?", (name,))
            self._execute("DELETE FROM commits WHERE name = ?", (name,))
        purged = sorted(v.version for v in targets)
        self._audit(
            audit_entry(
                now, actor, "purge", names=[name], versions=purged, all_versions=all_versions
            )
        )
        return purged

    # --- audit ---

    def audit_write(self, entries: Sequence[dict[str, Any]]) -> None:
        if not entries:
            return

        def work() -> None:
            for entry in entries:
                self._audit(entry)

        self._transaction(work)

    def audit_read(self, since: float, after: int, limit: int) -> list[dict[str, Any]]:
        out = []
        for seq, entry in self._all(
            "SELECT seq, entry FROM audit WHERE at >= ? AND seq > ? ORDER BY seq LIMIT ?",
            (since, after, limit),
        ):
            item = json.loads(entry)
            item["seq"] = int(seq)
            out.append(item)
        return out

    def prune_audit(self, cutoff: float) -> int:
        def work() -> int:
            return int(self._execute("DELETE FROM audit WHERE at < ?", (cutoff,)).rowcount)

        return self._transaction(work)
