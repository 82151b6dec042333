"""The cache tier as plain objects: the chunk cache, the manifest cache, the service handlers
driven through a recording link instead of a socket."""

import contextlib
import os
import sqlite3
import threading
import zlib

import pytest
from conftest import wait_for
from storage_helpers import digest_name, h, use_digest
from storage_helpers import manifest_of as storage_manifest

from fms import wire as p
from fms.cache import CacheService, ChunkCache, ManifestCache
from fms.cache import manifests as manifests_module
from fms.cache.chunks import SMALL_MAX


def chunk(i: int, size: int = 1000) -> tuple:
    data = (i.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return h(data), data


# --- ChunkCache ---


def test_chunk_cache_round_trip(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=10_000)
    digest, data = chunk(1)
    assert cache.get(digest) is None
    assert cache.put(digest, data)
    assert bytes(p.unpack_data(cache.get(digest))) == data


def test_chunk_cache_stays_within_max_bytes_and_keeps_what_is_read_often(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=3100)  # room for three, and a window
    keys = [chunk(i) for i in range(3)]
    for digest, data in keys:
        cache.get(digest)  # the miss counts towards the frequency
        cache.put(digest, data)
    for _ in range(3):
        cache.get(keys[0][0])  # 0 is read often
    d3, data3 = chunk(3)
    cache.get(d3)
    cache.put(d3, data3)  # read once: not worth 0, nor 1 or 2
    assert cache.bytes <= 3100
    assert keys[0][0] in cache and d3 not in cache and cache.refused == 1
    for _ in range(3):
        cache.get(d3)  # now it is read more than 1 and 2
    cache.put(d3, data3)
    assert d3 in cache and keys[0][0] in cache and cache.evictions == 1
    assert cache.bytes <= 3100


def test_chunk_larger_than_the_cache_is_not_cached(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=500)
    digest, data = chunk(1, 1000)
    assert not cache.put(digest, data)
    assert cache.bytes == 0


def disk_files(cache) -> list:
    """The entries on disk: files under chunks/, and rows of small.db (by their hex digest)."""
    cache.flush()
    files = [
        name
        for _root, _dirs, names in os.walk(os.path.join(cache.path, "chunks"))
        for name in names
    ]
    return files + [digest.hex() for digest in rows(cache)]


def rows(cache) -> dict:
    """small.db's rows, read through a connection of the test's own: digest -> (crc, data)."""
    cache.flush()
    with contextlib.closing(sqlite3.connect(os.path.join(cache.path, "small.db"))) as db:
        return {
            bytes(d): (crc, data)
            for d, crc, data in db.execute("SELECT digest, crc, data FROM entries")
        }


def rewrite_row(cache, digest: bytes, sql: str, *args) -> None:
    cache.flush()
    with contextlib.closing(sqlite3.connect(os.path.join(cache.path, "small.db"))) as db:
        with db:
            assert db.execute(sql, (*args, digest)).rowcount == 1


def age(cache, digest: bytes, when: float) -> None:
    """Make a disk entry look filled at ``when``: a file's mtime, a row's ``filled``."""
    if digest in cache._in_db:
        rewrite_row(cache, digest, "UPDATE entries SET filled = ? WHERE digest = ?", when)
    else:
        os.utime(cache._path(digest), (when, when))


SMALL, LARGE = 1000, SMALL_MAX + 1000  # a row of small.db, a file of its own


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_chunk_cache_keeps_chunks_across_restarts_most_recent_first(tmp_path, size):
    cache = ChunkCache(str(tmp_path), max_bytes=size * 10)
    keys = [chunk(i, size) for i in range(3)]
    for n, (digest, data) in enumerate(keys):
        cache.put(digest, data, counted=False)
        cache.flush()
        age(cache, digest, 1000 + n)
    cache.close()
    reopened = ChunkCache(str(tmp_path), max_bytes=size * 2 + size // 20)  # room for two
    assert len(reopened) == 2 and reopened.bytes == 2 * size
    assert keys[0][0] not in reopened  # the oldest went
    assert bytes(p.unpack_data(reopened.get(keys[2][0]))) == keys[2][1]
    assert len(disk_files(reopened)) == 2  # and from the disk
    reopened.close()


def test_hits_come_from_memory_and_disk_reads_are_checked_against_their_crc(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB, memory_bytes=600 * 1024)
    first, first_data = chunk(1, 512 * 1024)
    second, second_data = chunk(2, 512 * 1024)
    cache.put(first, first_data, counted=False)
    cache.put(second, second_data, counted=False)
    assert len(disk_files(cache)) == 2  # main entries are on disk
    assert bytes(p.unpack_data(cache.get(first))) == first_data  # read, now in memory
    os.unlink(cache._path(first))
    assert bytes(p.unpack_data(cache.get(first))) == first_data  # memory answers
    with open(cache._path(second), "r+b") as f:  # bit rot on disk
        f.write(b"\xff")
    assert cache.get(second) is None and cache.corrupt == 1 and second not in cache


def test_memory_tier_is_bounded(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=400_000)  # memory tier: half
    for i in range(50):
        digest, data = chunk(i, 20_000)
        cache.put(digest, data, counted=False)
        cache.flush()
        cache.get(digest)
    assert 0 < cache._hot_bytes <= 200_000 and cache.bytes <= 400_000


def test_the_memory_a_cache_holds_is_bounded_whatever_its_size_on_disk(tmp_path, monkeypatch):
    """A cache of 100 GiB filled with 200 MiB of new chunks while its disk is stalled: its
    window, hot tier and chunks waiting for the disk stay within their bounds (a window of 1 %
    of the bytes once held a whole large file in memory), and what did not fit is not cached."""
    from fms.cache import chunks as chunk_module
    from fms.cache.policy import WINDOW_BYTES_MAX

    stalled = threading.Event()
    real = chunk_module._WriteBehind._write
    monkeypatch.setattr(
        chunk_module._WriteBehind, "_write", lambda self, *a: stalled.wait(30) and real(self, *a)
    )
    cache = ChunkCache(str(tmp_path), max_bytes=100 * p.GiB)
    bound = WINDOW_BYTES_MAX + chunk_module.HOT_BYTES_MAX + chunk_module.WRITE_BEHIND_MAX
    peak = 0
    for i in range(200):
        digest, data = chunk(i, p.MiB)
        cache.get(digest)
        cache.put(digest, data)
        cache.get(digest)  # read back at once: the hot tier fills too
        peak = max(peak, cache.memory_held)
    assert peak <= bound
    assert cache.refused > 0  # past the write-behind bound: not admitted
    stalled.set()
    cache.flush()
    held = [i for i in range(200) if chunk(i, p.MiB)[0] in cache]
    assert held and all(cache.get(chunk(i, p.MiB)[0]) is not None for i in held)
    cache.close()


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_corrupt_cache_entry_is_dropped_not_served(tmp_path, size):
    cache = ChunkCache(str(tmp_path), max_bytes=size * 10, memory_bytes=0)
    digest, data = chunk(7, size)
    cache.put(digest, data, counted=False)
    cache.flush()
    if size <= SMALL_MAX:  # bit rot in the row's bytes: same length, another CRC
        rewrite_row(
            cache, digest, "UPDATE entries SET data = ? WHERE digest = ?", b"\xff" + data[1:]
        )
    else:
        with open(cache._path(digest), "r+b") as f:
            f.write(b"\xff")
    assert cache.get(digest) is None
    assert digest not in cache and cache.corrupt == 1
    assert digest.hex() not in disk_files(cache)  # and the entry is deleted
    assert cache.put(digest, data) and bytes(p.unpack_data(cache.get(digest))) == data  # refilled


# --- small entries: rows of small.db ---


@pytest.fixture
def no_window(monkeypatch):
    """Caches made now have no admission window: every entry goes to the disk tier at once."""
    from fms.cache import policy

    monkeypatch.setattr(policy, "WINDOW_BYTES_MAX", 1)


def test_small_entries_are_rows_of_one_database_and_large_ones_files(tmp_path, no_window):
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB, memory_bytes=0)
    small, small_data = chunk(1, SMALL_MAX)  # the largest that is a row
    large, large_data = chunk(2, SMALL_MAX + 1)
    cache.put(small, small_data, counted=False)
    cache.put(large, large_data, counted=False)
    cache.flush()
    assert not os.path.exists(cache._path(small)) and os.path.exists(cache._path(large))
    crc, data = rows(cache)[small]
    assert data == small_data and crc == zlib.crc32(small_data)  # its CRC, with it
    assert list(rows(cache)) == [small]
    for digest, data in ((small, small_data), (large, large_data)):  # read from disk
        assert bytes(p.unpack_data(cache.get(digest))) == data
    cache.close()


def test_a_row_written_before_it_is_read_is_answered_from_memory_until_committed(
    tmp_path, no_window
):
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB, memory_bytes=0)
    digest, data = chunk(1, 4096)
    with cache.batch():
        cache.put(digest, data, counted=False)
        assert bytes(p.unpack_data(cache.get(digest))) == data  # pending: from memory
    cache.flush()
    assert bytes(p.unpack_data(cache.get(digest))) == data  # from the row
    cache.close()


@pytest.fixture
def commits(monkeypatch) -> list:
    """The size (in rows) of each transaction the cache's writer commits to small.db."""
    from fms.cache import chunks as chunk_module

    sizes: list = []
    real = chunk_module._WriteBehind._commit
    monkeypatch.setattr(
        chunk_module._WriteBehind,
        "_commit",
        lambda self, rows: sizes.append(len(rows)) or real(self, rows),
    )
    return sizes


def test_the_rows_of_a_batch_are_written_in_one_transaction(tmp_path, no_window, commits):
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB)
    keys = [chunk(i, 4096) for i in range(200)]
    with cache.batch():
        for digest, data in keys:
            cache.put(digest, data, counted=False)
    cache.flush()
    assert commits == [200] and len(rows(cache)) == 200
    assert all(bytes(p.unpack_data(cache.get(d))) == data for d, data in keys)
    cache.close()


def test_rows_handed_over_one_by_one_while_the_writer_lingers_share_a_transaction(
    tmp_path, no_window, commits, monkeypatch
):
    """The writer, woken by one row, waits (WRITE_LINGER) for more before its transaction: a
    fill on commit at a time would otherwise cost a transaction each.  A flush cuts the wait
    short (the linger here is far longer than the test may take)."""
    from fms.cache import chunks as chunk_module

    monkeypatch.setattr(chunk_module, "WRITE_LINGER", 600.0, raising=False)
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB)
    keys = [chunk(i, 4096) for i in range(4)]
    cache.put(*keys[0], counted=False)
    wait_for(lambda: cache._writer._queue.qsize() == 0, 30, "the writer to take the first row")
    for digest, data in keys[1:]:
        cache.put(digest, data, counted=False)
    cache.flush()
    assert commits == [4] and len(rows(cache)) == 4
    cache.close()


def test_a_missing_row_is_a_miss(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=10_000, memory_bytes=0)
    digest, data = chunk(1)
    cache.put(digest, data, counted=False)
    rewrite_row(cache, digest, "DELETE FROM entries WHERE digest = ?")
    assert cache.get(digest) is None and digest not in cache and cache.corrupt == 0
    cache.close()


class StaleIndexDb:
    """The event loop's connection to small.db, its index pointing a lookup of ``asked`` at
    the row of ``instead`` (as a stale page of the index could after a machine's crash)."""

    def __init__(self, db, asked: bytes, instead: bytes):
        self.db, self.asked, self.instead = db, asked, instead

    def execute(self, sql, args=()):
        if "WHERE digest" in sql and args == (self.asked,):
            args = (self.instead,)
        return self.db.execute(sql, args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_row_found_under_another_digest_is_a_miss_not_its_bytes(tmp_path, no_window):
    cache = ChunkCache(str(tmp_path), max_bytes=10_000, memory_bytes=0)
    (one, one_data), (other, other_data) = chunk(1), chunk(2)
    with cache.batch():
        cache.put(one, one_data, counted=False)
        cache.put(other, other_data, counted=False)
    cache.flush()
    cache._db = StaleIndexDb(cache._db, asked=one, instead=other)
    assert cache.get(one) is None  # the other row's bytes, whose CRC is right, are not served
    assert one not in cache and cache.corrupt == 1
    assert bytes(p.unpack_data(cache.get(other))) == other_data
    cache.close()


def test_the_rows_of_an_earlier_layout_are_kept(tmp_path):
    """small.db as an earlier fms made it (a WITHOUT ROWID table keyed by the digest): its rows
    move to the table of this one when the cache starts."""
    keys = [chunk(i, 4096) for i in range(3)]
    db_path = os.path.join(tmp_path, "small.db")
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE entries (digest BLOB PRIMARY KEY, crc INTEGER NOT NULL, "
            "filled REAL NOT NULL, data BLOB NOT NULL) WITHOUT ROWID"
        )
        db.executemany(
            "INSERT INTO entries VALUES (?, ?, ?, ?)",
            [(d, zlib.crc32(data), 1000.0 + i, data) for i, (d, data) in enumerate(keys)],
        )
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB, memory_bytes=0)
    assert len(cache) == 3 and cache.bytes == 3 * 4096
    assert all(bytes(p.unpack_data(cache.get(d))) == data for d, data in keys)
    cache.close()
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        tables = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
    assert [name for name, _sql in tables] == ["entries"]
    assert "WITHOUT ROWID" not in tables[0][1].upper()


def test_evicted_and_dropped_rows_are_deleted_and_counted_no_more(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=3100, memory_bytes=0)  # room for three
    keys = [chunk(i) for i in range(4)]
    for digest, data in keys[:3]:
        cache.get(digest)
        cache.put(digest, data)
    assert set(rows(cache)) == {d for d, _ in keys[:3]} and cache.bytes == 3000
    for _ in range(3):
        cache.get(keys[3][0])  # read often: worth a place
    cache.put(keys[3][0], keys[3][1])
    assert cache.evictions == 1 and cache.bytes <= 3100 and len(cache) == 3
    assert set(rows(cache)) == {d for d, _ in keys if d in cache}  # the victim's row went
    cache.drop(keys[3][0])
    assert keys[3][0] not in rows(cache) and cache.bytes == 2000
    cache.close()
    reopened = ChunkCache(str(tmp_path), max_bytes=3100)
    assert len(reopened) == 2 and reopened.bytes == 2000  # what is left, and no more
    reopened.close()


def test_put_says_a_chunk_is_not_cached_when_the_write_behind_backlog_refuses_it(
    tmp_path, no_window, monkeypatch
):
    """ChunkCache.put returns whether the chunk is now cached (review6): one promoted out of
    the window and refused because too much waits for the disk is not."""
    from fms.cache import chunks as chunk_module

    monkeypatch.setattr(chunk_module, "WRITE_BEHIND_MAX", 0)  # every disk write is refused
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB, memory_bytes=0)
    digest, data = chunk(1)
    cached = cache.put(digest, data, counted=False)
    assert digest not in cache and cache.refused == 1
    assert cached is False
    cache.close()


class FailingDb:
    """The writer's connection, failing as a full or broken disk would: each of its next
    ``writes`` statements of many rows is done, then raises; each of its next ``rollbacks``
    ROLLBACKs raises, leaving the connection inside its transaction."""

    def __init__(self, db, writes=1, rollbacks=0):
        self.db, self.writes, self.rollbacks = db, writes, rollbacks

    def executemany(self, sql, args):
        self.db.executemany(sql, args)
        if self.writes:
            self.writes -= 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, *args):
        if sql == "ROLLBACK" and self.rollbacks:
            self.rollbacks -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def fail_writes(cache, **failures) -> None:
    cache.flush()  # the writer is idle: its connection can be swapped
    cache._writer._db = FailingDb(cache._writer._db, **failures)


@pytest.mark.parametrize("writes", [1, 2], ids=["deletes-retried-at-once", "deletes-retried-later"])
def test_a_failed_commit_forgets_the_rows_it_did_not_write_and_still_deletes(tmp_path, writes):
    cache = ChunkCache(str(tmp_path), max_bytes=3100, memory_bytes=0)  # room for three
    keys = [chunk(i) for i in range(4)]
    for digest, data in keys[:3]:
        cache.get(digest)
        cache.put(digest, data)
    assert set(rows(cache)) == {d for d, _ in keys[:3]}
    fail_writes(cache, writes=writes)  # the new row's write, and with 2 the deletes alone too
    for _ in range(3):
        cache.get(keys[3][0])
    with cache.batch():  # one transaction: the new row and the victim's delete
        cache.put(keys[3][0], keys[3][1])
    assert cache.evictions == 1
    (victim,) = [d for d, _ in keys[:3] if d not in cache]
    assert victim not in rows(cache)  # its delete was not lost with the transaction
    # the row not written is not counted (nor found missing only when read)...
    assert keys[3][0] not in cache and len(cache) == 2 and cache.bytes == 2000
    # ...so the disk holds what is counted, within max_bytes
    assert set(rows(cache)) == {d for d, _ in keys if d in cache}
    assert sum(len(data) for _crc, data in rows(cache).values()) == cache.bytes
    assert cache.put(keys[3][0], keys[3][1], counted=False)  # the disk works again
    cache.flush()
    assert keys[3][0] in rows(cache) and bytes(p.unpack_data(cache.get(keys[3][0]))) == keys[3][1]
    cache.close()


def test_a_writer_whose_rollback_fails_reconnects_and_writes_again(tmp_path, no_window):
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB, memory_bytes=0)
    lost, lost_data = chunk(1, 4096)
    # one failed write, and from then on this connection cannot roll back (an I/O error):
    # on it every later BEGIN would fail, "cannot start a transaction within a transaction"
    fail_writes(cache, writes=1, rollbacks=10**9)
    cache.put(lost, lost_data, counted=False)
    cache.flush()
    assert lost not in cache and rows(cache) == {}
    keys = [chunk(i, 4096) for i in range(2, 5)]
    with cache.batch():
        for digest, data in keys:
            cache.put(digest, data, counted=False)
    cache.flush()
    assert set(rows(cache)) == {d for d, _ in keys}  # a new transaction could begin
    assert all(bytes(p.unpack_data(cache.get(d))) == data for d, data in keys)
    cache.close()


def test_a_start_whose_rollback_fails_reconnects_and_keeps_no_lock(tmp_path, monkeypatch):
    from fms.cache import chunks as chunk_module

    cache = ChunkCache(str(tmp_path), max_bytes=10_000)
    keys = [chunk(i) for i in range(3)]
    for digest, data in keys:
        cache.put(digest, data, counted=False)
    cache.close()
    monkeypatch.setattr(chunk_module, "DB_TIMEOUT", 0.05)  # a writer locked out fails at once
    real = chunk_module._open_small_db
    monkeypatch.setattr(  # the delete of what no longer fits fails, and so does its ROLLBACK
        chunk_module,
        "_open_small_db",
        lambda path, sync: (lambda db, rows: (FailingDb(db, writes=1, rollbacks=10**9), rows))(
            *real(path, sync)
        ),
    )
    small = ChunkCache(str(tmp_path), max_bytes=2100, memory_bytes=0)  # room for two
    kept = [(d, data) for d, data in keys if d in small]
    assert len(kept) == 2
    small.drop(kept[0][0])
    small.flush()
    # the start's failed transaction held no lock that kept the writer out...
    assert kept[0][0] not in rows(small)
    # ...and the rows kept are read through the new connection
    assert bytes(p.unpack_data(small.get(kept[1][0]))) == kept[1][1]
    small.close()


def test_restart_keeps_rows_and_files_alike_and_drops_what_does_not_fit(tmp_path, no_window):
    cache = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB)
    keys = [chunk(i, 4096) for i in range(50)] + [chunk(99, SMALL_MAX + 1)]
    with cache.batch():
        for digest, data in keys:
            cache.put(digest, data, counted=False)
    cache.close()
    reopened = ChunkCache(str(tmp_path), max_bytes=10 * p.MiB, memory_bytes=0)
    assert len(reopened) == 51 and reopened.bytes == 50 * 4096 + SMALL_MAX + 1
    assert all(bytes(p.unpack_data(reopened.get(d))) == data for d, data in keys)
    reopened.close()
    small = ChunkCache(str(tmp_path), max_bytes=20 * 4096)  # room for about 20 rows
    assert 0 < len(small) <= 20 and len(rows(small)) == len(small)  # the others deleted
    small.close()


def test_a_damaged_database_is_started_afresh(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=10_000)
    digest, data = chunk(1)
    cache.put(digest, data, counted=False)
    cache.close()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tmp_path, "small.db" + suffix))
    with open(os.path.join(tmp_path, "small.db"), "wb") as f:
        f.write(b"not a database" * 100)
    reopened = ChunkCache(str(tmp_path), max_bytes=10_000)
    assert len(reopened) == 0 and reopened.get(digest) is None
    assert reopened.put(digest, data, counted=False)
    reopened.close()
    assert len(ChunkCache(str(tmp_path), max_bytes=10_000)) == 1


def boot(monkeypatch, boot_id) -> None:
    """The machine's boot id, as the cache reads it (None: none to read)."""
    from fms.cache import chunks as chunk_module

    monkeypatch.setattr(chunk_module, "_boot_id", lambda: boot_id)


def synchronous(cache) -> int:
    """The ``synchronous`` mode of the cache's connections (0: OFF, 1: NORMAL)."""
    cache.flush()
    modes = {
        db.execute("PRAGMA synchronous").fetchone()[0] for db in (cache._db, cache._writer._db)
    }
    assert len(modes) == 1
    return modes.pop()


def die(cache) -> None:
    """The cache's process dies: its connections go, and nothing else is done."""
    cache._writer.close()
    cache._db.close()


def mark(tmp_path):
    path = os.path.join(tmp_path, "small.db.open")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def test_small_db_is_written_without_fsync_while_marked_open_with_the_boot(tmp_path, monkeypatch):
    boot(monkeypatch, "boot-1")
    cache = ChunkCache(str(tmp_path), max_bytes=10_000)
    assert mark(tmp_path) == "boot-1" and synchronous(cache) == 0
    digest, data = chunk(1)
    cache.put(digest, data, counted=False)
    cache.close()
    assert mark(tmp_path) is None  # closed, its file fsync'd: nothing to fear from a stop
    boot(monkeypatch, "boot-2")
    reopened = ChunkCache(str(tmp_path), max_bytes=10_000, memory_bytes=0)
    assert len(reopened) == 1 and bytes(p.unpack_data(reopened.get(digest))) == data
    reopened.close()


@pytest.mark.parametrize("after", ["process died", "machine stopped"])
def test_small_db_is_started_afresh_if_the_machine_stopped_while_it_was_open(
    tmp_path, monkeypatch, after
):
    boot(monkeypatch, "boot-1")
    cache = ChunkCache(str(tmp_path), max_bytes=10_000)
    digest, data = chunk(1)
    cache.put(digest, data, counted=False)
    cache.flush()
    die(cache)
    assert mark(tmp_path) == "boot-1"
    if after == "machine stopped":  # its latest writes may be half on disk: not trusted
        boot(monkeypatch, "boot-2")
    reopened = ChunkCache(str(tmp_path), max_bytes=10_000, memory_bytes=0)
    if after == "machine stopped":
        assert len(reopened) == 0 and reopened.get(digest) is None and rows(reopened) == {}
        assert mark(tmp_path) == "boot-2"
    else:  # what the process wrote was the OS's: kept
        assert len(reopened) == 1 and bytes(p.unpack_data(reopened.get(digest))) == data
    assert reopened.put(digest, data, counted=False)
    reopened.close()
    assert len(ChunkCache(str(tmp_path), max_bytes=10_000)) == 1


@pytest.mark.parametrize("why", ["no boot id", "mark not writable"])
def test_small_db_is_written_with_synchronous_normal_when_it_cannot_be_marked(
    tmp_path, monkeypatch, why
):
    if why == "no boot id":
        boot(monkeypatch, None)
    else:
        boot(monkeypatch, "boot-1")
        os.mkdir(os.path.join(tmp_path, "small.db.open"))  # in the way of the mark
    cache = ChunkCache(str(tmp_path), max_bytes=10_000)
    assert synchronous(cache) == 1
    digest, data = chunk(1)
    cache.put(digest, data, counted=False)
    cache.close()
    reopened = ChunkCache(str(tmp_path), max_bytes=10_000)
    assert len(reopened) == 1 and synchronous(reopened) == 1
    reopened.close()


@pytest.mark.parametrize("locking", ["rollback journal", "exclusive wal"])
def test_a_locked_database_is_an_error_that_says_why_and_is_not_deleted(
    tmp_path, monkeypatch, locking
):
    from fms.cache import chunks as chunk_module
    from fms.errors import FmsError

    monkeypatch.setattr(chunk_module, "DB_TIMEOUT", 0.05)
    cache = ChunkCache(str(tmp_path), max_bytes=10_000)
    digest, data = chunk(1)
    cache.put(digest, data, counted=False)
    cache.close()
    db_path = os.path.join(tmp_path, "small.db")
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as other:
        if locking == "rollback journal":  # switching it back to WAL needs the lock
            other.execute("PRAGMA journal_mode=DELETE")
        else:  # a process that keeps the database to itself
            other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(FmsError, match="another cache worker may be using this folder"):
            ChunkCache(str(tmp_path), max_bytes=10_000)
        other.execute("COMMIT")
    reopened = ChunkCache(str(tmp_path), max_bytes=10_000, memory_bytes=0)
    assert len(reopened) == 1 and bytes(p.unpack_data(reopened.get(digest))) == data
    reopened.close()


def test_a_one_time_scan_neither_displaces_the_hot_set_nor_touches_the_disk(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=100 * 4096)
    hot = [chunk(i, 4096) for i in range(120)]  # more than fits: the cache is full
    for _ in range(4):
        for digest, data in hot:
            if cache.get(digest) is None:
                cache.put(digest, data)
    held = [digest for digest, _ in hot if digest in cache]
    written = set(disk_files(cache))
    assert len(held) >= 95
    for i in range(1000, 1500):  # 5x the cache, read once each
        digest, data = chunk(i, 4096)
        if cache.get(digest) is None:
            cache.put(digest, data)
    # A scan chunk sharing all four sketch counters with popular ones may get in: a few at most.
    assert sum(digest in cache for digest in held) >= len(held) - 3
    assert len(set(disk_files(cache)) - written) <= 3  # the scan was not written
    assert cache.refused >= 490


# --- ManifestCache: the read-after-write rule ---


def test_fill_started_before_an_invalidation_is_stale():
    m = ManifestCache()
    token = m.begin_fetch()
    m.invalidate("a")
    assert not m.fill("a", {"name": "a", "chunks": []}, token)
    assert m.lookup("a") is None
    assert m.fill(
        "a", {"name": "a", "chunks": []}, m.begin_fetch()
    )  # a fetch started after is fine


def test_invalidating_another_name_does_not_spoil_a_fill():
    m = ManifestCache()
    token = m.begin_fetch()
    m.invalidate("b")
    assert m.fill("a", {"name": "a", "chunks": []}, token)


def test_invalidate_all_spoils_every_fill_in_flight():
    m = ManifestCache()
    token = m.begin_fetch()
    m.invalidate_all()
    assert not m.fill("a", {"name": "a", "chunks": []}, token)


def test_forgetting_old_invalidations_keeps_pending_fetches_honest():
    m = ManifestCache()
    token = m.begin_fetch()
    m.invalidate("a")
    m.forget_before(token)  # the fetch is still pending
    assert not m.fresh("a", token)


def test_a_folder_invalidation_drops_every_name_under_it_and_spoils_their_fills():
    m = ManifestCache()
    for name in ("d/a", "d/sub/b", "dx"):
        assert m.fill(name, {"name": name, "chunks": []}, m.begin_fetch())
    token = m.begin_fetch()
    m.invalidate_folder("d/")
    assert m.lookup("d/a") is None and m.lookup("d/sub/b") is None
    assert m.lookup("dx") is not None  # shares the letters, not the folder
    assert not m.fill("d/c", {"name": "d/c", "chunks": []}, token)  # in flight across it
    assert m.fill("e/c", {"name": "e/c", "chunks": []}, token)
    m.forget_before(token)  # the fetch is still pending
    assert not m.fresh("d/c", token)
    m.forget_before(None)
    assert m.fill("d/c", {"name": "d/c", "chunks": []}, m.begin_fetch())


# --- CacheService through a recording link ---


class Link:
    """Records what the service sends instead of sending it."""

    def __init__(self):
        self.replies = []  # (route, header, data)
        self.requests = []  # (service, header)
        self.outcomes = []  # "hit" / "miss", as the route frame tells the broker
        self.chunks = []  # chunk requests to follow a get, as the route frame tells
        self.batches = []  # a get_many's (names served whole from the cache, names fetched)

    def reply(self, route, header, data=None, invalidate=None, cache=None, chunks=None, batch=None):
        self.replies.append((route, header, data))
        self.outcomes.append(cache)
        self.chunks.append(chunks)
        self.batches.append(batch)

    def request(self, service, header, data=None):
        self.requests.append((service, header))


class Frame:
    """Stands in for a zmq.Frame: exposes .buffer."""

    def __init__(self, data):
        self.buffer = memoryview(data)


def route(key: int) -> dict:
    """The route of the broker's request number ``key``; the reply's route carries it back."""
    return {"t": "req", "k": key}


def get(name, req_id):
    return {"v": p.PROTOCOL_VERSION, "op": "get", "id": req_id, "name": name}


def manifest_of(name, content, version=1):
    return storage_manifest(name, content, version, p.DEFAULT_CHUNK_SIZE)


@pytest.fixture(params=p.DIGEST_FUNCTIONS)
def service(request, tmp_path):
    """A cache of a store of each digest function (every test that takes it runs for both)."""
    use_digest(request.param)  # what the tests' manifests and digests are made with
    service = CacheService(ChunkCache(str(tmp_path), 10 * p.MiB), Link())
    service.on_store(request.param)  # what the broker's welcome says
    return service


def storage_answers(service, fetch_header, content, version):
    reply = p.ok_reply(
        fetch_header["id"], manifest=manifest_of(fetch_header["name"], content, version)
    )
    service.handle_reply(reply, Frame(p.pack_data(content)))


def test_concurrent_misses_for_one_name_make_one_fetch_and_all_are_answered(service):
    for i in range(5):
        service.handle_request(route(i), get("f", i), None)
    assert len(service.link.requests) == 1
    storage_answers(service, service.link.requests[0][1], b"content", 1)
    assert sorted(h["id"] for _, h, _ in service.link.replies) == [0, 1, 2, 3, 4]
    assert all(bytes(p.unpack_data(d)) == b"content" for _, _, d in service.link.replies)


def test_hit_is_answered_without_storage(service):
    service.handle_request(route(1), get("f", 1), None)
    storage_answers(service, service.link.requests[0][1], b"v1", 1)
    service.handle_request(route(1), get("f", 2), None)
    assert len(service.link.requests) == 1
    assert service.hits == 1 and service.misses == 1
    assert service.link.outcomes == ["miss", "hit"]
    assert service.link.replies[-1][1]["manifest"]["version"] == 1


def test_fill_in_flight_across_an_invalidation_is_not_kept_nor_given_to_later_readers(service):
    service.handle_request(route(101), get("f", 1), None)  # miss: fetch #1 starts
    service.on_invalidate("f")  # a write of f is acked
    service.handle_request(route(102), get("f", 2), None)  # must not join fetch #1
    assert len(service.link.requests) == 2
    first, second = (h for _, h in service.link.requests)
    storage_answers(service, first, b"old", 1)  # the stale fill lands
    assert [(r["k"], h["manifest"]["version"]) for r, h, _ in service.link.replies] == [
        (101, 1)
    ]  # only the early reader
    assert service.manifests.lookup("f") is None  # and it was not stored
    storage_answers(service, second, b"new", 2)
    assert service.link.replies[-1][0]["k"] == 102
    assert service.link.replies[-1][1]["manifest"]["version"] == 2
    assert service.manifests.lookup("f")["version"] == 2


def test_lone_fill_in_flight_across_an_invalidation_is_not_kept(service):
    service.handle_request(route(101), get("f", 1), None)
    service.on_invalidate("f")
    storage_answers(service, service.link.requests[0][1], b"old", 1)
    assert service.link.replies[0][0]["k"] == 101  # answered: it came before
    assert service.manifests.lookup("f") is None  # but not kept
    service.handle_request(route(102), get("f", 2), None)
    assert len(service.link.requests) == 2  # a later read refetches


def test_reregistering_drops_every_manifest(service):
    service.handle_request(route(1), get("f", 1), None)
    storage_answers(service, service.link.requests[0][1], b"v1", 1)
    service.on_register()
    service.handle_request(route(1), get("f", 2), None)
    assert len(service.link.requests) == 2  # a miss again


# --- fills on commit: a small file's content handed over with its commit's invalidation ---


def commit_fill(service, name, content, version, since, at):
    """The broker hands over the commit (request key ``since``) of ``content`` as ``version``
    of ``name`` with its invalidation (``at``)."""
    manifest = p.encode(manifest_of(name, content, version))
    service.on_fill(name, at, since, manifest, Frame(p.pack_data(content)))


def cached_version(service, name):
    found = service.manifests.peek(name)
    return found["version"] if found is not None else None


def test_a_commit_fill_makes_the_next_read_a_hit_with_the_new_content(service):
    service.on_register(0)
    service.handle_request(route(1), get("f", 1), None)
    storage_answers(service, service.link.requests[0][1], b"v1", 1)
    commit_fill(service, "f", b"v2", 2, since=5, at=5)
    service.handle_request(route(2), get("f", 2), None)
    assert len(service.link.requests) == 1  # no fetch: a hit
    assert service.link.outcomes[-1] == "hit"
    _route, header, data = service.link.replies[-1]
    assert header["manifest"]["version"] == 2 and bytes(p.unpack_data(data)) == b"v2"
    assert service.stats()["commit_fills"] == 1
    assert service.beat()["filled"] == len(p.pack_data(b"v2"))


def test_a_commit_fill_overtaken_by_a_later_change_of_its_name_is_not_kept(service):
    service.on_register(0)
    service.on_invalidate("f", 6)  # an rm (admitted after the commit) was acked first
    commit_fill(service, "f", b"old", 1, since=5, at=7)
    assert cached_version(service, "f") is None
    commit_fill(service, "g", b"v2", 2, since=9, at=9)  # two commits acked out of order:
    commit_fill(service, "g", b"v1", 1, since=8, at=10)  # the older one is not kept
    assert cached_version(service, "g") is None
    assert service.stats()["commit_fills_refused"] == 2
    commit_fill(service, "f", b"new", 3, since=11, at=11)  # newer than all heard: kept
    assert cached_version(service, "f") == 3


def test_a_commit_fill_under_a_folder_renamed_since_is_not_kept(service):
    service.on_register(0)
    service.on_invalidate("d/", 6)  # mv of a folder onto d/
    commit_fill(service, "d/sub/x", b"old", 1, since=5, at=7)
    commit_fill(service, "dx", b"other", 1, since=5, at=8)  # shares the letters only
    assert cached_version(service, "d/sub/x") is None and cached_version(service, "dx") == 1
    commit_fill(service, "d/sub/x", b"new", 2, since=9, at=9)
    assert cached_version(service, "d/sub/x") == 2


def test_no_commit_fill_older_than_the_welcome_or_after_an_inv_without_order_is_kept(service):
    service.on_register(10)  # invalidations may have been lost while cut off
    commit_fill(service, "f", b"v1", 1, since=9, at=11)
    assert cached_version(service, "f") is None
    commit_fill(service, "f", b"v2", 2, since=12, at=12)
    assert cached_version(service, "f") == 2
    service.on_invalidate("other")  # a broker that does not say `at`
    commit_fill(service, "f", b"v3", 3, since=13, at=13)
    assert cached_version(service, "f") is None
    assert service.beat()["filled"] > 0
    service.on_register(20)
    assert service.beat()["filled"] == 0  # counted afresh, as the broker does
    commit_fill(service, "f", b"v4", 4, since=21, at=21)
    assert cached_version(service, "f") == 4


def test_a_commit_fill_that_does_not_match_its_digest_is_dropped_and_still_invalidates(service):
    service.on_register(0)
    commit_fill(service, "f", b"v1", 1, since=1, at=1)
    manifest = p.encode(manifest_of("f", b"v2", 2))
    service.on_fill("f", 3, 2, manifest, Frame(p.pack_data(b"not v2")))
    assert cached_version(service, "f") is None  # v1 dropped, v2 not kept
    service.on_fill("f", 5, 4, manifest, Frame(p.pack_data(b"v2")))
    assert cached_version(service, "f") == 2
    other = p.encode(manifest_of("g", b"v2", 2))
    service.on_fill("f", 7, 6, other, Frame(p.pack_data(b"v2")))  # another name's manifest
    assert cached_version(service, "f") is None and cached_version(service, "g") is None


def test_a_commit_fill_of_content_the_cache_holds_is_kept_without_hashing_it_again(
    service, monkeypatch
):
    """Its bytes are neither kept nor served (the cache's own copy, verified when it was
    filled, is): the digest check would be of bytes thrown away.  Other content is checked."""
    service.on_register(0)
    commit_fill(service, "f", b"same", 1, since=1, at=1)
    hashed = []
    inline_ok = p.inline_ok
    monkeypatch.setattr(
        p, "inline_ok", lambda m, data: hashed.append(m["name"]) or inline_ok(m, data)
    )
    commit_fill(service, "g", b"same", 1, since=2, at=2)
    assert cached_version(service, "g") == 1 and hashed == []
    manifest = p.encode(manifest_of("h", b"new!", 1))
    service.on_fill("h", 4, 3, manifest, Frame(p.pack_data(b"old!")))  # same size, not held
    assert cached_version(service, "h") is None and hashed == ["h"]
    service.on_fill("h", 6, 5, p.encode(manifest_of("h", b"same", 1)), Frame(p.pack_data(b"sam")))
    assert cached_version(service, "h") is None  # held, but not its size
    service.handle_request(route(1), get("g", 1), None)
    assert service.link.outcomes[-1] == "hit"
    assert bytes(p.unpack_data(service.link.replies[-1][2])) == b"same"


@pytest.mark.parametrize("digest_fn", p.DIGEST_FUNCTIONS)
def test_a_commit_fill_not_hashed_because_held_is_never_kept_once_the_held_copy_is_gone(
    tmp_path, no_window, digest_fn
):
    """A fill's content is not hashed when the cache holds its digest (review6): but a chunk
    whose disk write failed is still counted as held until the cache next looks at what
    failed, which ChunkCache.put does first.  The unhashed bytes must then not be kept (nor
    served) in place of the copy that was lost: every byte verified (invariant 3)."""
    use_digest(digest_fn)
    service = CacheService(ChunkCache(str(tmp_path), 10 * p.MiB, memory_bytes=0), Link())
    service.on_store(digest_fn)
    service.on_register(0)
    fail_writes(service.chunks, writes=1)  # the next transaction of small.db fails
    commit_fill(service, "f", b"same", 1, since=1, at=1)  # verified, kept: its row not written
    service.chunks._writer.flush()  # the writer is done; the cache has not looked yet
    digest = manifest_of("f", b"same")["chunks"][0]
    assert digest in service.chunks  # still counted as held
    # A fill naming that digest, with other bytes of its size (the bytes are not checked).
    service.on_fill("g", 3, 2, p.encode(manifest_of("g", b"same", 1)), Frame(p.pack_data(b"evil")))
    for i, name in enumerate(("g", "f"), start=1):
        answered = len(service.link.replies)
        service.handle_request(route(i), get(name, i), None)  # a hit, or a fetch from storage
        if len(service.link.replies) > answered and service.link.outcomes[-1] == "hit":
            assert bytes(p.unpack_data(service.link.replies[-1][2])) == b"same", name
    service.chunks.close()


def test_a_commit_fill_never_puts_back_a_version_older_than_one_the_cache_fetched(service):
    """C1 (key 5) then C2 (key 6) of f land in that order; a miss reads C2's version before
    either ack reaches the broker; then C1's ack comes (at 6) with its fill.  The reader that
    was given version 2 must not be given version 1 by its next get."""
    service.on_register(0)
    service.handle_request(route(1), get("f", 1), None)
    storage_answers(service, service.link.requests[0][1], b"v2", 2)
    assert service.link.replies[-1][1]["manifest"]["version"] == 2
    commit_fill(service, "f", b"v1", 1, since=5, at=6)
    assert cached_version(service, "f") != 1
    service.handle_request(route(2), get("f", 2), None)
    if len(service.link.requests) == 2:  # a miss: storage has version 2
        storage_answers(service, service.link.requests[1][1], b"v2", 2)
    assert [h["manifest"]["version"] for _r, h, _d in service.link.replies] == [2, 2]


def test_a_commit_fill_is_checked_against_every_folder_above_its_name(service):
    service.on_register(0)
    for at, folder in enumerate(("a/", "a/b/", "a/b/c/", "z/"), start=10):
        service.on_invalidate(folder, at)
    commit_fill(service, "a/b/c/f", b"x", 1, since=12, at=14)  # a/b/c/ changed at 12
    assert cached_version(service, "a/b/c/f") is None
    commit_fill(service, "a/b/f", b"x", 1, since=12, at=15)  # a/b/ at 11, a/ at 10: kept
    assert cached_version(service, "a/b/f") == 1
    commit_fill(service, "a/bf", b"x", 1, since=11, at=16)  # not under a/b/; a/ at 10
    assert cached_version(service, "a/bf") == 1
    commit_fill(service, "a/bg", b"x", 1, since=10, at=17)  # a/ changed at 10
    assert cached_version(service, "a/bg") is None


def commit_many_fills(service, files, version, since, at, filled=None, data=None):
    """The broker hands over a ``commit_many`` (request key ``since``) of ``files`` (name ->
    content, back to back in its data) with its invalidation (``at``): a fill for each of
    ``filled`` (default: every file)."""
    names = list(files)
    offsets = {n: sum(len(files[m]) for m in names[: names.index(n)]) for n in names}
    fills = [
        (n, offsets[n], p.encode(manifest_of(n, files[n], version)))
        for n in (names if filled is None else filled)
    ]
    frame = Frame(p.pack_data(data if data is not None else b"".join(files.values())))
    service.on_fills(names, at, since, fills, frame)
    return frame


def test_a_commit_manys_fills_make_the_next_reads_hits_and_drop_the_other_names(service):
    service.on_register(0)
    for i, name in enumerate(("a", "b", "c"), start=1):  # each cached at version 1
        service.handle_request(route(i), get(name, i), None)
        storage_answers(service, service.link.requests[-1][1], b"old " + name.encode(), 1)
    files = {"a": b"new a", "b": b"the new b", "c": b"c!", "d": b"dd"}
    frame = commit_many_fills(service, files, 2, since=5, at=5, filled=["a", "b", "d"])
    fetches = len(service.link.requests)
    for i, name in enumerate(("a", "b", "d"), start=10):
        service.handle_request(route(i), get(name, i), None)
        assert service.link.outcomes[-1] == "hit", name
        _route, header, data = service.link.replies[-1]
        assert header["manifest"]["version"] == 2 and bytes(p.unpack_data(data)) == files[name]
    assert len(service.link.requests) == fetches  # no fetch
    assert cached_version(service, "c") is None  # changed, not filled: dropped
    assert service.stats()["commit_fills"] == 3
    assert service.beat()["filled"] == len(frame.buffer)  # the message, once


def test_a_commit_manys_fill_that_does_not_check_is_dropped_alone(service):
    service.on_register(0)
    files = {"a": b"aaaa", "b": b"bbbb", "c": b"cccc"}
    data = b"aaaaXXXXcccc"  # b's bytes are not its content
    commit_many_fills(service, files, 1, since=3, at=3, data=data)
    assert [cached_version(service, n) for n in files] == [1, None, 1]
    assert service.stats()["commit_fills_refused"] == 1
    files = {"e": b"eeee", "f": b"ffffff"}  # f's content runs past the end of the data
    commit_many_fills(service, files, 1, since=4, at=4, data=b"eeeefff")
    assert [cached_version(service, n) for n in files] == [1, None]


def test_a_commit_manys_fills_overtaken_by_later_changes_are_not_kept(service):
    service.on_register(0)
    service.on_invalidate("a", 6)  # an rm of a (admitted after the commit_many) acked first
    service.on_invalidate("d/", 7)  # and a folder renamed
    files = {"a": b"1", "b": b"2", "d/x": b"3"}
    commit_many_fills(service, files, 1, since=5, at=8)
    assert [cached_version(service, n) for n in files] == [None, 1, None]
    assert service.stats()["commit_fills_refused"] == 2


@pytest.mark.parametrize("many", [False, True])
def test_a_fill_whose_data_frame_is_not_bin_still_drops_every_name(service, many):
    """The names are dropped whatever is wrong with the fills (read-after-write): a data frame
    that is not msgpack bin too, which the cache must find out only after it has dropped them."""
    service.on_register(0)
    commit_fill(service, "a", b"v1", 1, since=1, at=1)
    commit_fill(service, "b", b"v1", 1, since=2, at=2)
    manifest = p.encode(manifest_of("a", b"v2", 2))
    if many:
        service.on_fills(["a", "b"], 4, 3, [("a", 0, manifest)], Frame(b"\x01not bin"))
    else:
        service.on_fill("a", 4, 3, manifest, Frame(b"\x01not bin"))
    assert cached_version(service, "a") is None
    assert cached_version(service, "b") == (None if many else 1)
    assert service.stats()["commit_fills_refused"] == 1


def test_a_commit_manys_fill_with_a_page_list_is_refused_and_the_later_names_still_drop(service):
    """A manifest that checks but lists its one chunk by a page (no ``chunks``) is no fill
    the cache can take: refused, and every name after it in the ``commit_many`` is dropped."""
    service.on_register(0)
    for i, name in enumerate(("b", "c"), start=1):
        commit_fill(service, name, b"old", 1, since=i, at=i)
    paged = manifest_of("a", b"new", 2)
    digest = paged.pop("chunks")[0]
    paged |= {"pages": [digest], "body": digest}
    fills = [("a", 0, p.encode(paged)), ("c", 3, p.encode(manifest_of("c", b"new", 2)))]
    service.on_fills(["a", "b", "c"], 6, 5, fills, Frame(p.pack_data(b"newnew")))
    assert [cached_version(service, n) for n in ("a", "b", "c")] == [None, None, 2]
    assert service.stats()["commit_fills_refused"] == 1


def test_a_commit_manys_fill_that_crashes_still_leaves_no_name_cached(service, monkeypatch):
    """A bug met while one fill is kept (here the chunk cache's) costs the fills, never the
    invalidation of the names after it (read-after-write)."""
    service.on_register(0)
    for i, name in enumerate(("a", "b", "c"), start=1):
        commit_fill(service, name, b"old " + name.encode(), 1, since=i, at=i)

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service.chunks, "put", crash)
    files = {"a": b"new a", "b": b"new b", "c": b"new c"}
    with pytest.raises(RuntimeError):
        commit_many_fills(service, files, 2, since=5, at=5, filled=["a"])
    assert [cached_version(service, n) for n in files] == [None, None, None]


def test_a_name_listed_twice_in_a_commit_many_never_leaves_its_first_version_cached(service):
    """Storage makes two versions of it in order, and offers both: whichever entries the cache
    is given, it holds no version but the second (here none: its own first drop is a change
    heard at or after the request's key)."""
    service.on_register(0)
    commit_fill(service, "a", b"v0", 1, since=1, at=1)
    first, second = (p.encode(manifest_of("a", d, v)) for d, v in ((b"v1", 2), (b"v2!", 3)))
    frame = Frame(p.pack_data(b"v1v2!"))
    service.on_fills(["a", "a"], 5, 5, [("a", 0, first), ("a", 2, second)], frame)
    assert cached_version(service, "a") in (None, 3)
    service.on_fills(["a", "a"], 7, 7, [("a", 2, second), ("a", 0, first)], frame)
    assert cached_version(service, "a") is None  # the entries out of order: nothing kept


def test_what_the_cache_remembers_for_commit_fills_is_bounded(monkeypatch):
    monkeypatch.setattr(manifests_module, "CHANGED_MAX", 8)
    m = ManifestCache()
    m.welcomed(0)
    for at in range(1, 101):
        m.heard(f"n{at}", at)
    assert len(m._changed) <= 8
    assert not m.may_fill("n1", 50)  # forgotten: the floor refuses older fills
    assert not m.may_fill("n100", 100)
    assert m.may_fill("n100", 101) and m.may_fill("new", 101)


def test_storage_error_is_forwarded_to_every_waiter(service):
    service.handle_request(route(b"a"), get("gone", 1), None)
    service.handle_request(route(b"b"), get("gone", 2), None)
    fetch = service.link.requests[0][1]
    service.handle_reply(p.error_reply(fetch["id"], "not_found", "'gone' not found"), None)
    assert [(h["id"], h["error"]) for _, h, _ in service.link.replies] == [
        (1, "not_found"),
        (2, "not_found"),
    ]


def test_corrupt_data_from_storage_is_never_delivered(service):
    service.handle_request(
        route(b"a"),
        {"v": p.PROTOCOL_VERSION, "op": "chunk", "id": 1, "hash": h(b"good")},
        None,
    )
    fetch = service.link.requests[0][1]
    service.handle_reply(p.ok_reply(fetch["id"]), Frame(p.pack_data(b"evil")))
    ((_, header, data),) = service.link.replies
    assert header["ok"] is False and header["error"] == "integrity" and data is None
    assert h(b"good") not in service.chunks


@pytest.mark.parametrize("store_digest", p.DIGEST_FUNCTIONS)
def test_a_cache_checks_storage_with_the_stores_digest_function_and_none_before_it_knows(
    tmp_path, store_digest
):
    other = next(d for d in p.DIGEST_FUNCTIONS if d != store_digest)
    service = CacheService(ChunkCache(str(tmp_path), 10 * p.MiB), Link())
    chunk = os.urandom(5000)

    def fetch(req_id):
        service.handle_request(
            route(b"a"),
            {"v": p.PROTOCOL_VERSION, "op": "chunk", "id": req_id, "hash": h(chunk)},
            None,
        )
        service.handle_reply(
            p.ok_reply(service.link.requests[-1][1]["id"]), Frame(p.pack_data(chunk))
        )
        return service.link.replies[-1][1]

    # Not told yet (the broker says it before any storage reply can come): nothing unchecked
    # is delivered or cached.
    assert fetch(1)["error"] == "integrity" and h(chunk) not in service.chunks
    service.on_store(other)  # the chunk's digest is not its digest under this function
    assert fetch(2)["error"] == "integrity" and h(chunk) not in service.chunks
    service.on_store(store_digest)
    assert fetch(3)["ok"] is True and h(chunk) in service.chunks


def test_fetch_that_times_out_answers_its_waiters(service):
    service.handle_request(route(b"a"), get("slow", 1), None)
    fetch = next(iter(service._fetches.values()))
    service.tick(fetch.started + 60)
    assert service.link.replies[0][1]["error"] == "unavailable"
    storage_answers(service, service.link.requests[0][1], b"late", 1)  # too late: ignored
    assert len(service.link.replies) == 1


def fill(service, name, content, version=1, client=b"c", req_id=1):
    """A get of ``name`` that misses, answered by storage with ``content``."""
    service.handle_request(route(client), get(name, req_id), None)
    storage_answers(service, service.link.requests[-1][1], content, version)


def test_overwrite_drops_the_old_versions_chunk_and_the_names_popularity(service):
    for i in range(5):
        service.handle_request(route(b"c"), get("f", i), None)  # f is popular
    storage_answers(service, service.link.requests[0][1], b"old", 1)
    old = h(b"old")
    assert old in service.chunks and service.manifests.policy.sketch.frequency("f") >= 5
    service.on_invalidate("f")
    assert old not in service.chunks and service.dropped_chunks == 1
    assert service.manifests.policy.sketch.frequency("f") == 0


def test_invalidation_keeps_a_chunk_another_cached_file_shares(service):
    fill(service, "a", b"same")
    fill(service, "b", b"same", req_id=2)
    service.on_invalidate("a")
    assert h(b"same") in service.chunks
    service.on_invalidate("b")
    assert h(b"same") not in service.chunks


def test_get_reply_tells_the_broker_how_many_chunks_follow_and_skips_large_files(tmp_path):
    service = CacheService(ChunkCache(str(tmp_path), 10 * p.MiB), Link(), max_file=2 * p.MiB)
    service.on_store(digest_name())

    def big(name, size):
        digests = [h(b"%d" % i) for i in range(-(-size // p.DEFAULT_CHUNK_SIZE))]
        return storage_manifest(name, chunk_size=p.DEFAULT_CHUNK_SIZE, size=size, digests=digests)

    for i, (name, size) in enumerate([("two", 2 * p.MiB), ("three", 3 * p.MiB)]):
        service.handle_request(route(b"c"), get(name, i), None)
        fetch = service.link.requests[-1][1]
        service.handle_reply(p.ok_reply(fetch["id"], manifest=big(name, size)), None)
    service.handle_request(route(b"c"), get("tiny", 9), None)
    storage_answers(service, service.link.requests[-1][1], b"tiny", 1)
    assert service.link.chunks == [2, 0, 0]  # 3 MiB > max_file; tiny is inline
    assert [h.get("cache") for _, h, _ in service.link.replies] == [None, False, None]


# --- get_many: hits from the cache, every miss in one storage fetch ---


def get_many(names, req_id):
    return {"v": p.PROTOCOL_VERSION, "op": "get_many", "id": req_id, "names": names}


def storage_answers_batch(service, fetch_header, contents: dict, corrupt=()):
    batch = p.BatchReply()
    for name in fetch_header["names"]:
        if name not in contents:
            batch.error("not_found", f"{name!r} not found")
            continue
        content = contents[name]
        batch.manifest(
            manifest_of(name, content), b"X" * len(content) if name in corrupt else content
        )
    frame = batch.frame()
    sent = Frame(frame) if frame is not None else None
    service.handle_reply(p.ok_reply(fetch_header["id"], results=batch.results), sent)
    return sent


def batch_answer(service, names):
    _, header, data = service.link.replies[-1]
    data = getattr(data, "buffer", data)  # storage's frame, passed on as it came
    return [
        (r.get("error"), bytes(d) if d is not None else None)
        for r, d in p.read_batch(header, data, names)
    ]


def test_get_many_answers_hits_itself_and_asks_storage_once_for_all_misses(service):
    service.handle_request(route(1), get("hot", 1), None)
    storage_answers(service, service.link.requests[0][1], b"hot!", 1)
    names = ["a", "hot", "b", "gone"]
    service.handle_request(route(1), get_many(names, 2), None)
    assert len(service.link.requests) == 2  # one fetch for 3 misses
    assert service.link.requests[1][1]["names"] == ["a", "b", "gone"]
    storage_answers_batch(service, service.link.requests[1][1], {"a": b"alpha", "b": b"beta"})
    assert batch_answer(service, names) == [
        (None, b"alpha"),
        (None, b"hot!"),
        (None, b"beta"),
        ("not_found", None),
    ]
    service.handle_request(route(1), get_many(["b", "a"], 3), None)  # filled: all hits
    assert len(service.link.requests) == 2
    assert batch_answer(service, ["b", "a"]) == [(None, b"beta"), (None, b"alpha")]
    assert service.link.outcomes[-2:] == ["miss", "hit"]


def test_get_many_never_delivers_or_keeps_content_that_does_not_verify(service):
    service.handle_request(route(1), get_many(["a", "b"], 1), None)
    storage_answers_batch(
        service, service.link.requests[0][1], {"a": b"alpha", "b": b"beta"}, corrupt={"b"}
    )
    assert batch_answer(service, ["a", "b"]) == [(None, b"alpha"), (None, None)]
    assert h(b"beta") not in service.chunks and h(b"alpha") in service.chunks


def test_a_batch_of_misses_is_answered_with_storages_frame_as_a_rebuild_would_answer_it(service):
    names = ["a", "gone", "b", "c"]
    contents = {"a": b"alpha", "b": b"beta", "c": b"gamma" * 1000}
    service.handle_request(route(1), get_many(names, 7), None)
    sent = storage_answers_batch(service, service.link.requests[0][1], contents)
    (_, header, data), batch = service.link.replies[-1], service.link.batches[-1]
    assert data is sent  # storage's data frame, passed on: no copy of the contents
    rebuilt = p.BatchReply()  # what the cache answered with before: each result rebuilt
    for name in names:
        if name in contents:
            rebuilt.manifest(manifest_of(name, contents[name]), contents[name])
        else:
            rebuilt.error("not_found", f"{name!r} not found")
    assert header == p.ok_reply(7, results=rebuilt.results)
    assert bytes(data.buffer) == bytes(rebuilt.frame())
    assert batch == (0, 4) and service.link.outcomes[-1] == "miss"
    # and filled as before: the next ask is all hits, answered from the cache alone
    service.handle_request(route(1), get_many(["c", "a", "b"], 8), None)
    assert len(service.link.requests) == 1
    assert batch_answer(service, ["c", "a", "b"]) == [
        (None, contents["c"]),
        (None, b"alpha"),
        (None, b"beta"),
    ]


def test_a_batch_of_misses_whose_every_name_is_an_error_is_answered_without_a_frame(service):
    service.handle_request(route(1), get_many(["x", "y"], 1), None)
    storage_answers_batch(service, service.link.requests[0][1], {})
    _, header, data = service.link.replies[-1]
    assert data is None
    assert [r["error"] for r in header["results"]] == ["not_found", "not_found"]


def test_a_batch_with_hits_is_rebuilt_with_the_hits_and_storages_answers(service):
    service.handle_request(route(1), get_many(["hot"], 1), None)
    storage_answers_batch(service, service.link.requests[0][1], {"hot": b"hot!"})
    service.handle_request(route(1), get_many(["a", "hot", "b"], 2), None)
    assert service.link.requests[1][1]["names"] == ["a", "b"]
    sent = storage_answers_batch(service, service.link.requests[1][1], {"a": b"A", "b": b"B"})
    _, _, data = service.link.replies[-1]
    assert data is not sent
    assert batch_answer(service, ["a", "hot", "b"]) == [
        (None, b"A"),
        (None, b"hot!"),
        (None, b"B"),
    ]
    assert service.link.batches[-1] == (1, 2)


def test_a_batch_of_misses_with_content_that_does_not_verify_is_never_passed_on(service):
    service.handle_request(route(1), get_many(["a", "b", "c"], 1), None)
    sent = storage_answers_batch(
        service,
        service.link.requests[0][1],
        {"a": b"alpha", "b": b"beta", "c": b"gamma"},
        corrupt={"b"},
    )
    _, _, data = service.link.replies[-1]
    assert data is not sent and b"XXXX" not in bytes(data)  # rebuilt from what verified
    assert batch_answer(service, ["a", "b", "c"]) == [
        (None, b"alpha"),
        (None, None),  # its manifest alone: the client asks for it by itself
        (None, b"gamma"),
    ]
    assert h(b"beta") not in service.chunks and h(b"alpha") in service.chunks


def test_get_many_fill_in_flight_across_an_invalidation_is_not_kept(service):
    service.handle_request(route(101), get_many(["f", "g"], 1), None)
    service.on_invalidate("f")  # a write of f is acked
    storage_answers_batch(service, service.link.requests[0][1], {"f": b"old", "g": b"g"})
    assert batch_answer(service, ["f", "g"]) == [(None, b"old"), (None, b"g")]  # it came before
    assert service.manifests.lookup("f") is None and service.manifests.lookup("g") is not None


def test_get_many_bad_reply_from_storage_is_an_integrity_error(service):
    service.handle_request(route(1), get_many(["a"], 1), None)
    fetch = service.link.requests[0][1]
    service.handle_reply(p.ok_reply(fetch["id"], results=[]), None)
    ((_, header, data),) = service.link.replies
    assert header["error"] == "integrity" and data is None
