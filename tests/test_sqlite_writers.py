"""SQLite's writers queue on a lock file beside the database (``meta.db-writers``) before they
ask for SQLite's write lock: each write transaction holds it from its BEGIN to its end, however it
ends, so that the next writer (another storage worker) is woken when it is done rather than when
SQLite's busy handler next looks."""

import contextlib
import fcntl
import gc
import os
import threading

import pytest
from storage_helpers import h, new_version

from fms.errors import FmsError, Unavailable
from fms.storage.meta.sqlite import SQLiteMeta

NOW = 1_800_000_000.0


def queued(path: str) -> bool:
    """Whether a writer holds the queue's lock of the database at ``path`` now."""
    fd = os.open(path + "-writers", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (and with it the lock this took, if it took one)
    return False


def commit(meta: SQLiteMeta, name: str, data: bytes):
    """A small file's commit, its content along (as commit_many brings it)."""
    [result] = meta.apply([new_version(name, data, f"c-{name}")], NOW, {h(data): data})
    return result


@pytest.fixture
def meta(tmp_path):
    engine = SQLiteMeta(str(tmp_path / "meta.db"))
    yield engine
    engine.close()


def test_a_write_transaction_holds_the_queue_to_its_commit(meta):
    assert not queued(meta.path)
    with meta._write():
        assert queued(meta.path)
    assert not queued(meta.path)
    assert commit(meta, "a", b"x" * 10).name == "a" and not queued(meta.path)


def test_a_transaction_that_fails_leaves_the_queue(meta):
    with pytest.raises(RuntimeError), meta._write():
        assert queued(meta.path)
        raise RuntimeError("the work failed")
    assert not queued(meta.path) and not meta.in_transaction


def test_a_writer_that_cannot_begin_leaves_the_queue(meta, tmp_path):
    other = SQLiteMeta(meta.path)
    try:
        other.writers = None  # a writer that does not queue (another program) holds SQLite's lock
        other.db.execute("BEGIN IMMEDIATE")
        meta.db.execute("PRAGMA busy_timeout = 50")
        with pytest.raises(Unavailable, match="busy"), meta._write():
            pass
        assert not queued(meta.path)
        other.db.execute("ROLLBACK")
    finally:
        other.close()
    with meta._write():
        pass


def test_the_next_writer_waits_in_the_queue_and_goes_on_when_the_first_is_done(meta):
    second = SQLiteMeta(meta.path)
    waiting, done = threading.Event(), []

    def write() -> None:
        waiting.set()
        done.append(commit(second, "b", b"y" * 10))

    try:
        with meta._write():
            thread = threading.Thread(target=write, daemon=True)
            thread.start()
            assert waiting.wait(10)
            thread.join(0.2)  # it cannot get past the queue while this transaction is open
            assert not done
        thread.join(10)
        assert [v.name for v in done] == ["b"]
    finally:
        second.close()


def test_without_a_queue_file_the_store_still_writes(tmp_path):
    path = str(tmp_path / "meta.db")
    os.mkdir(path + "-writers")  # cannot be opened as the queue's file
    engine = SQLiteMeta(path)
    try:
        assert engine.writers is None
        assert commit(engine, "a", b"x" * 10).name == "a"
    finally:
        engine.close()


def open_on(path: str) -> int:
    """Descriptors of this process open on the file at ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own, closed since)
            count += os.readlink(f"/proc/self/fd/{fd}") == path
    return count


def test_an_engine_dropped_without_close_leaves_no_descriptor(tmp_path):
    """An engine that is never closed (one whose opening failed further on, a test's) closes
    its queue's file when it is collected, as sqlite3 closes its connection."""
    path = str(tmp_path / "meta.db")
    SQLiteMeta(path).close()
    for _ in range(3):
        engine = SQLiteMeta(path)
        assert open_on(path + "-writers") == 1
        del engine
        gc.collect()
    assert open_on(path + "-writers") == 0


def test_a_writer_waits_in_the_queue_no_longer_than_for_sqlites_lock(meta):
    """A worker stopped or stuck in its transaction (here: one left open) holds the queue: the
    next writer gives up after the busy timeout with ``unavailable``, as it did on SQLite's lock
    alone, rather than waiting forever; once the first is done, it writes again."""
    stuck = SQLiteMeta(meta.path)
    outcome: list[object] = []
    try:
        assert meta.writers is not None
        meta.writers.timeout = 0.2
        with stuck._write():
            thread = threading.Thread(target=lambda: outcome.append(_attempt(meta)), daemon=True)
            thread.start()
            thread.join(10)
            assert not thread.is_alive(), "the writer waited on past the timeout"
            assert isinstance(outcome[0], Unavailable) and "busy" in str(outcome[0])
            assert not meta.in_transaction
        for waiter in threading.enumerate():  # the given-up wait's thread takes the turn
            if waiter.name == "fms-writers-queue":  # now, and drops it with its descriptor
                waiter.join(10)
        assert not queued(meta.path)  # (the abandoned file's last): it holds nothing after
        assert commit(meta, "a", b"x" * 10).name == "a" and not queued(meta.path)
    finally:
        stuck.close()


def _attempt(meta: SQLiteMeta) -> object:
    try:
        return commit(meta, "late", b"z" * 10)
    except Unavailable as exc:
        return exc


def test_a_transaction_closed_under_it_leaves_no_other_queue(meta):
    """close() from another thread while a write transaction is under way (a worker shutting
    down while its maintenance thread still writes) closes the queue's file; the transaction
    then fails on the closed database and leaves the queue as a no-op.  It left it by the
    closed descriptor: its number, reused by the next file opened (here: another engine's
    queue, whose writer holds the lock), was unlocked, or flock failed (EBADF) and an OSError
    replaced the transaction's own error."""
    other: SQLiteMeta | None = None
    try:
        with pytest.raises(FmsError, match="closed database"), meta._write():
            closer = threading.Thread(target=meta.close)
            closer.start()
            closer.join(10)
            other = SQLiteMeta(meta.path)  # its queue's file takes the lowest free number
            assert other.writers is not None
            other.writers.enter()  # a writer of the other engine holds the queue
        assert queued(meta.path)  # it still does
        other.writers.leave()
        assert not queued(meta.path)
    finally:
        if other is not None:
            other.close()
