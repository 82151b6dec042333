"""The format-1 layout (fms before the metadata engine), read once to migrate it in place.

Format 1: ``STORE`` (msgpack ``{format, store_id}``), ``chunks/ab/<hex sha256>`` and one
``manifests/xy/<hex sha256 of the name>`` msgpack file per name (a tombstone once removed).
Chunks stay where they are: the local chunk backend uses the same layout.

Migration is one SQLite transaction (every name, tombstone and chunk, read into format 2's
tables and upgraded from there as any format-2 store is, references counted anew), so a process
killed midway leaves the database as it was and the next start does it again; only once it is
committed is ``manifests/`` moved away and deleted.  Workers starting together take turns on the
database's write lock; the second finds the work done.
"""

import collections
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgpack

from ... import wire as p
from ...errors import BadRequest, FmsError
from ...wire.fields import Digest
from .sql import SCHEMA_V2

if TYPE_CHECKING:
    from ..chunks.base import ChunkBackend
    from .sqlite import SQLiteMeta

log = logging.getLogger("fms.storage.migrate")

MANIFESTS = "manifests"
DONE = "manifests.migrated"  # renamed here once the database holds everything, then deleted


def store_id(path: str) -> str | None:
    """The store id a format-1 directory carries in ``STORE``, so migration keeps it."""
    try:
        with open(os.path.join(path, "STORE"), "rb") as f:
            return msgpack.unpackb(f.read())["store_id"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise FmsError(
            f"{os.path.join(path, 'STORE')} is damaged; it identifies the store and "
            f"must be restored from a copy"
        ) from None


def manifests(path: str, damaged: list[str]) -> Iterator[dict[str, Any]]:
    """Every readable manifest of a format-1 directory; the paths of damaged ones (not msgpack,
    fields missing) are added to ``damaged``.

    :raises OSError: a manifest could not be read at all: the migration must not go on without
        it (its name would be lost when ``manifests/`` is removed).
    """
    root = os.path.join(path, MANIFESTS)
    for shard in sorted(os.scandir(root), key=lambda e: e.name):
        if not shard.is_dir():
            continue
        for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            with open(entry.path, "rb") as f:
                raw = f.read()
            try:
                manifest = msgpack.unpackb(raw, raw=False)
                name, size, chunk_size = manifest["name"], manifest["size"], manifest["chunk_size"]
                manifest["version"], manifest["sha256"]
                if not manifest.get("deleted") and len(manifest["chunks"]) != p.chunk_count(
                    size, chunk_size
                ):
                    raise ValueError("chunk count")
                name.encode("utf-8")
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeError):
                log.error(
                    "event=migrate_damaged_manifest path=%s action=kept_in_corrupt", entry.path
                )
                damaged.append(entry.path)
                continue
            yield manifest


def migrate(path: str, meta: "SQLiteMeta", chunks: "ChunkBackend") -> None:
    """Upgrade a format-1 directory in place; a no-op when there is nothing to migrate."""
    pending, done = os.path.join(path, MANIFESTS), os.path.join(path, DONE)
    if os.path.isdir(pending) and meta.setting("migrated") is None:
        damaged: list[str] = []  # paths of the manifests that could not be read
        try:
            _copy(path, meta, chunks, damaged)
        except OSError as exc:
            raise FmsError(
                f"cannot migrate {path}: reading a manifest failed ({exc.strerror}); "
                f"nothing was changed: fix the disk error and start again"
            ) from None
        keep = os.path.join(path, "corrupt", "manifests")
        for item in damaged:  # kept for inspection, out of the way of the clean-up
            os.makedirs(keep, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy2(item, os.path.join(keep, os.path.basename(item)))
    # Another worker may be finishing the same clean-up at the same moment: both are harmless.
    if os.path.isdir(pending):
        with contextlib.suppress(FileNotFoundError):
            os.replace(pending, done)
    if os.path.isdir(done):
        shutil.rmtree(done, ignore_errors=True)
        log.info("event=migrated_layout_removed path=%s", done)


def _valid_mtime(manifest: dict[str, Any], now: float) -> float:
    """A format-1 manifest's mtime, or ``now`` where format 1 let a NaN or infinity in."""
    try:
        return p.check_mtime(manifest.get("mtime", now))
    except (BadRequest, TypeError, ValueError):
        log.warning(
            "event=migrate_bad_mtime name=%r mtime=%r action=set_to_now",
            manifest["name"],
            manifest.get("mtime"),
        )
        return now


def _copy(path: str, meta: "SQLiteMeta", chunks: "ChunkBackend", damaged: list[str]) -> None:
    started = time.time()
    log.info("event=migrate_start path=%s from_format=1", path)
    db = meta.db
    names = files = total = 0
    refs: collections.Counter[Digest] = collections.Counter()
    with meta._write():
        if meta.setting("migrated") is not None:
            return  # another worker finished it while we waited for the lock
        meta._create(SCHEMA_V2)
        for digest, size, _mtime in chunks.list():
            db.execute(
                "INSERT OR IGNORE INTO chunks (digest, size, refs, since) VALUES (?, ?, 0, ?)",
                (digest, size, started),
            )
        sizes: dict[Digest, int] = {}
        for m in manifests(path, damaged):
            deleted = bool(m.get("deleted"))
            listed = b"".join(m.get("chunks") or [])
            db.execute(
                "INSERT OR REPLACE INTO names_v2 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    m["name"],
                    m["version"],
                    m["size"],
                    m["sha256"],
                    m["chunk_size"],
                    b"" if deleted else listed,
                    _valid_mtime(m, started),
                    str(m.get("commit", "")),
                    float(m.get("committed", started)),
                    int(deleted),
                ),
            )
            names += 1
            if not deleted:
                files += 1
                total += m["size"]
                digests = p.split_digests(listed)
                refs.update(digests)
                for i, d in enumerate(digests):
                    sizes[d] = p.chunk_length(i, m["size"], m["chunk_size"])
            if names % 1000 == 0:
                log.info("event=migrate_progress names=%d", names)
        # A chunk a manifest names but the directory lacks still gets its row and count, so
        # the references stay exact: fsck names it, and uploading the file again restores it.
        absent = [d for d in refs if meta.chunk(d) is None]
        db.executemany(
            "INSERT INTO chunks (digest, size, refs, since, lost) VALUES (?, ?, 0, ?, 1)",
            [(d, sizes[d], started) for d in absent],
        )
        db.execute(
            "UPDATE totals SET files = ?, bytes = ?, chunks = (SELECT count(*) FROM chunks), "
            "chunk_bytes = (SELECT coalesce(sum(size), 0) FROM chunks)",
            (files, total),
        )
        meta._upgrade_v2(started)  # the references are counted there
        meta.set_setting("migrated", f"format 1 at {started:.0f}")
    log.info(
        "event=migrate_done names=%d files=%d seconds=%.1f missing_chunks=%d damaged=%d",
        names,
        files,
        time.time() - started,
        len(absent),
        len(damaged),
    )
    if absent:
        log.error("event=migrate_missing_chunks count=%d hint='run: client.py fsck'", len(absent))
