"""The chunk cache, a plain object with no sockets.

:class:`ChunkCache` keeps chunks within a bound in bytes, by the W-TinyLFU policy
(:mod:`.policy`).  Chunks are content-addressed, so they are never stale and survive restarts.

Where the bytes live, and what a hit costs (issue 16: a hit must cost the cache less than a read
costs storage):

- the policy's *window* (new entries, 1 % of the bytes) is in memory only: an entry that the
  main part refuses (a scan) never touches the disk;
- the *main* part is on disk, written off the event loop by a write-behind thread; a chunk
  waiting for its write is answered from memory;
- a *hot* memory tier (least recently used out, at most ``memory_bytes``) keeps main entries
  that were read: a hit there costs no open, read or hash, since each was verified against its
  digest when it was filled;
- on disk, a chunk of up to :data:`SMALL_MAX` (64 KiB: a small file's content, a page) is a row
  of one SQLite database, ``small.db`` (its bytes, their CRC-32 and when it was filled); a
  larger one is a file of its own under ``chunks/``.  A file per 4 KiB chunk cost a directory
  operation each (create, rename; unlink on eviction) on the disk the client writes its files
  to; rows are written behind in one transaction per batch (a ``get_many``'s fills, or
  whatever queued up meanwhile);
- a read from disk is checked against the CRC-32 recorded when the chunk was filled (the last
  4 bytes of its file, or its row's ``crc``, computed by the write-behind thread, off the event
  loop), about 3x cheaper than a sha256 of the same bytes (measured: 0.19 against 0.55 ms per
  MiB); a mismatch (bit rot, a torn write) drops the chunk, which is refetched and verified.
  Storage and the client keep checking the store's digest (DESIGN.md invariant 3).
"""

import collections
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Iterator

from .. import wire as p
from ..errors import FmsError
from ..limits import BytesLike
from ..wire.fields import Digest
from ..wire.frames import read_frame
from .policy import WTinyLFU

log = logging.getLogger("fms.cache")

# What the cache holds in memory, whatever its size on disk: the window (the policy's
# WINDOW_BYTES_MAX, 16 MiB), the hot tier and the chunks waiting for the disk: at most 96 MiB of
# chunks in all, so a cache process stays under 150 MiB while it moves files of any size.
HOT_BYTES_MAX = 48 * 1024 * 1024  # default bound of the hot memory tier...
HOT_SHARE = 0.5  # ...and at most this share of the cache's bytes
WRITE_BEHIND_MAX = 32 * 1024 * 1024  # bytes waiting for the disk; past this, not admitted
CRC_LEN = 4  # the CRC-32 after a disk entry's bytes
SMALL_MAX = 64 * 1024  # chunks up to this size are rows of small.db, not files
SMALL_DB = "small.db"
OPEN_MARK = "small.db.open"  # while a cache has small.db open: the boot id of its machine
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # Linux: a new one at every boot
WRITE_BATCH_MAX = 4096  # disk jobs the writer takes in one go (one transaction for the rows)
# A few rows woke the writer: it waits this long for more before its transaction (a row in a
# transaction of its own cost 27 µs of CPU, in one of 4 rows 15, of 16 12: the commit's), as
# long as fewer than LINGER_ROWS came and fewer than LINGER_BYTES wait, and no flush is asked.
WRITE_LINGER = 0.01  # seconds
LINGER_ROWS = 64
LINGER_BYTES = 1024 * 1024
DB_TIMEOUT = 10.0  # seconds a connection to small.db waits for a lock before it gives up

# A disk job: (digest, frame to write or None to delete, its file or None for a row of small.db)
Job = tuple[Digest, BytesLike | None, str | None]


class ChunkCache:
    """Chunks under ``path``, at most ``max_bytes`` in all.

    :param path: the cache directory; created if missing.
    :param max_bytes: the bound; a chunk larger than it is never cached.
    :param memory_bytes: bound of the hot memory tier (default: the smaller of
        ``HOT_BYTES_MAX`` and half of ``max_bytes``); 0 reads every hit from disk.
    """

    def __init__(self, path: str, max_bytes: int, memory_bytes: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.policy: WTinyLFU[Digest] = WTinyLFU(max_bytes)
        if memory_bytes is None:
            memory_bytes = min(HOT_BYTES_MAX, int(max_bytes * HOT_SHARE))
        self.memory_bytes = memory_bytes
        # digest -> data frame: in the window, memory only
        self._window: dict[Digest, BytesLike] = {}
        # digest -> data frame, main entries, verified
        self._hot: collections.OrderedDict[Digest, BytesLike] = collections.OrderedDict()
        self._hot_bytes = 0
        self._on_disk: set[Digest] = set()  # main entries: written, or handed to the writer
        self._in_db: set[Digest] = set()  # those of them that are rows of small.db
        self.corrupt = 0
        self.backlog_refused = 0  # promotions dropped: the disk was behind
        self._tmp = os.path.join(self.path, "tmp")
        os.makedirs(self._tmp, exist_ok=True)
        os.makedirs(os.path.join(self.path, "chunks"), exist_ok=True)
        for entry in os.scandir(self._tmp):  # from a cache that died mid-write
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        db_path = os.path.join(self.path, SMALL_DB)
        self._db_path = db_path
        self._sync = _mark_open(db_path)
        # this thread's connection (the event loop's: reads), and the rows kept from before
        self._db, rows = _open_small_db(db_path, self._sync)
        self._writer = _WriteBehind(self._tmp, db_path, self._sync)
        self._load(rows)

    def _load(self, rows: list[tuple[bytes, int, float]]) -> None:
        """Put back what an earlier run left on disk (``rows``: small.db's), the most recently
        filled first while there is room; the rest is deleted."""
        # (mtime or time filled, digest, size, whether it is a row of small.db)
        found = [(filled, bytes(digest), size, True) for digest, size, filled in rows]
        for root, _dirs, names in os.walk(os.path.join(self.path, "chunks")):
            for name in names:
                full = os.path.join(root, name)
                try:
                    digest = bytes.fromhex(name)
                    st = os.stat(full)
                except (ValueError, OSError):
                    digest, st = b"", None
                if len(digest) != p.HASH_LEN or st is None or st.st_size < CRC_LEN:
                    # Not ours, or of an older layout (the CRC in the name): a cache may forget.
                    with contextlib.suppress(OSError):
                        os.unlink(full)
                    continue
                found.append((st.st_mtime, digest, st.st_size - CRC_LEN, False))
        found.sort(reverse=True)  # the most recently filled first, while there is room
        unwanted: list[Digest] = []  # rows of small.db
        for _mtime, digest, size, in_db in found:
            if self.policy.restore(digest, size):
                self._on_disk.add(digest)
                if in_db:
                    self._in_db.add(digest)
            elif in_db:  # no room, or held as a file too (a duplicate of either kind goes)
                unwanted.append(digest)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(self._path(digest))
        if unwanted:  # by the writer, in one transaction, before the cache serves
            with self.batch():
                for digest in unwanted:
                    self._writer.delete(digest, None)
            self._writer.flush()
        log.info(
            "event=cache_loaded entries=%d bytes=%d rows=%d",
            len(self.policy),
            self.bytes,
            len(self._in_db),
        )

    def _path(self, digest: Digest) -> str:
        """The file of a disk entry: the chunk's bytes, then their CRC-32 (big-endian)."""
        name = digest.hex()
        return os.path.join(self.path, "chunks", name[:2], name)

    def __contains__(self, digest: Digest) -> bool:
        return digest in self.policy

    def __len__(self) -> int:
        return len(self.policy)

    @property
    def bytes(self) -> int:
        return self.policy.bytes

    @property
    def memory_held(self) -> int:
        """Bytes of chunks held in memory: the window's, the hot tier's and those waiting for
        the disk (a frame in two of them counted twice)."""
        window = sum(len(frame) for frame in self._window.values())
        return window + self._hot_bytes + self._writer.backlog

    @property
    def evictions(self) -> int:
        return self.policy.evictions

    @property
    def refused(self) -> int:
        return self.policy.refused + self.backlog_refused

    def get(self, digest: Digest) -> BytesLike | None:
        """A verified chunk as a data frame (bin32 prefix + bytes), or None on a miss.

        Every lookup counts towards the chunk's frequency, hit or miss.  A chunk read from
        disk that fails its CRC is dropped and counts as a miss, so it is refetched.
        """
        if self._writer.failed:
            self._forget_failed()
        self.policy.access(digest)
        frame = self._window.get(digest)
        if frame is not None:
            return frame
        frame = self._hot.get(digest)
        if frame is not None:
            self._hot.move_to_end(digest)
            return frame
        if digest not in self._on_disk:
            return None
        frame = self._writer.pending(digest)
        if frame is None:
            frame = self._read_row(digest) if digest in self._in_db else self._read(digest)
            if frame is None:
                return None
        self._keep_hot(digest, frame)
        return frame

    def _read(self, digest: Digest) -> bytearray | None:
        path = self._path(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size - CRC_LEN
                if size < 0:
                    raise OSError("shorter than its CRC")
                frame, view, got = read_frame(f, size)
                crc = f.read(CRC_LEN)
        except OSError:
            self.drop(digest)
            return None
        if got != size or zlib.crc32(view).to_bytes(CRC_LEN, "big") != crc:
            self._corrupt(digest)
            return None
        return frame

    def _read_row(self, digest: Digest) -> bytearray | None:
        """A small entry from small.db, checked against the CRC-32 recorded with it."""
        try:
            row = self._db.execute(
                "SELECT digest, crc, data FROM entries WHERE digest = ?", (digest,)
            ).fetchone()
        except sqlite3.Error as exc:
            log.warning("event=cache_read_failed chunk=%s error=%r", digest.hex(), str(exc))
            row = None
        if row is None:  # gone (a write that failed): a miss
            self.drop(digest)
            return None
        # The row's own digest is checked too: the index is another b-tree than the rows, and
        # after a machine's crash one could point at another row (whose CRC would be right).
        found, crc, data = row
        if found != digest or not isinstance(data, bytes) or zlib.crc32(data) != crc:
            self._corrupt(digest)
            return None
        return p.pack_data(data)

    def _corrupt(self, digest: Digest) -> None:
        log.error("event=corrupt_cache_entry chunk=%s action=dropped", digest.hex())
        self.corrupt += 1
        self.drop(digest)

    def _keep_hot(self, digest: Digest, frame: BytesLike) -> None:
        size = len(frame)
        if size > self.memory_bytes:
            return
        self._hot[digest] = frame
        self._hot_bytes += size
        while self._hot_bytes > self.memory_bytes:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= len(old)

    def put(
        self,
        digest: Digest,
        payload: BytesLike,
        counted: bool = True,
        frame: BytesLike | None = None,
    ) -> bool:
        """Offer a chunk the caller has verified against ``digest`` to the policy.

        :param counted: whether the lookup that missed it went through :meth:`get` (else it is
            counted here).
        :param frame: the data frame ``payload`` came in (a view of the received message):
            kept as it is when it holds exactly ``payload`` behind a bin32 prefix, so a miss's
            chunk is not copied (a copy into a new buffer cost the cache's loop a third of its
            time on a cold GET); else, or if it holds more (a batch), ``payload`` is copied.
        :return: True if it is now cached.
        """
        if self._writer.failed:
            self._forget_failed()
        policy = self.policy
        # One pass over the policy's segments says whether it is held (access's, when the
        # lookup is counted here), and insert_new does not look again.
        if policy.access(digest) if not counted else digest in policy:
            return True
        window, size = self._window, len(payload)
        if frame is not None and len(frame) == p.DATA_PREFIX_LEN + size:
            window[digest] = frame
        else:
            window[digest] = p.pack_data(payload)
        dropped, promoted = policy.insert_new(digest, size)
        kept = True  # held in the window, or promoted and handed to the disk
        for key in promoted:
            if not self._to_disk(key, window.pop(key)) and key == digest:
                kept = False  # promoted, but too much waits for the disk
        if dropped:
            for key in dropped:
                self._forget_data(key)
            kept = kept and digest not in dropped
        return kept

    def _to_disk(self, digest: Digest, frame: BytesLike) -> bool:
        """Hand a chunk promoted out of the window to the disk.  :return: False if too much
        waits for the disk already: then it is not cached."""
        if self._writer.backlog + len(frame) > WRITE_BEHIND_MAX:
            self.backlog_refused += 1
            self.policy.remove(digest)
            return False
        self._on_disk.add(digest)
        if len(frame) - p.DATA_PREFIX_LEN <= SMALL_MAX:
            self._in_db.add(digest)
            self._writer.write(digest, frame, None)
        else:
            self._writer.write(digest, frame, self._path(digest))
        return True

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hand the disk writes and deletes made inside to the writer together, when it ends:
        the rows among them are written in one transaction (a ``get_many``'s fills)."""
        self._writer.hold()
        try:
            yield
        finally:
            self._writer.release()

    def drop(self, digest: Digest, forget: bool = False) -> None:
        """Take a chunk out (bit rot, a dead version); ``forget`` also clears its count."""
        self.policy.remove(digest, forget=forget)
        self._forget_data(digest)

    def _forget_data(self, digest: Digest) -> None:
        self._window.pop(digest, None)
        hot = self._hot.pop(digest, None)
        if hot is not None:
            self._hot_bytes -= len(hot)
        if digest in self._on_disk:
            self._on_disk.discard(digest)
            if digest in self._in_db:
                self._in_db.discard(digest)
                self._writer.delete(digest, None)
            else:
                self._writer.delete(digest, self._path(digest))

    def flush(self) -> None:
        """Wait until every write and delete handed to the disk is done (tests, shutdown)."""
        self._writer.flush()
        while self._writer.failed:  # their deletes too (which fail no write)
            self._forget_failed()
            self._writer.flush()

    def _forget_failed(self) -> None:
        """Take out the entries the writer could not write (disk full, I/O error), so they are
        neither counted towards ``max_bytes`` nor looked for on disk.  Dropping one also deletes
        it: an older row of the same chunk that the failed transaction was to replace."""
        for digest in self._writer.take_failed():
            if digest in self._on_disk:
                self.drop(digest)

    def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self._sync == "OFF":
            _mark_closed(self._db_path)


class _WriteBehind:
    """Writes and deletes disk entries on a thread of its own, in order, off the event loop.

    A chunk waiting for its write stays readable through :meth:`pending`.  The thread takes
    every job queued when it wakes (at most ``WRITE_BATCH_MAX``; woken by a few rows, it waits
    ``WRITE_LINGER`` for more first): files one by one, rows of small.db in one transaction.
    No fsync: a torn file fails its CRC on read and is refetched;
    small.db is in WAL mode with ``synchronous=OFF`` (see :func:`_mark_open` for why that is
    safe for a cache), else ``NORMAL``.
    """

    def __init__(self, tmp_dir: str, db_path: str, sync: str) -> None:
        self._tmp = tmp_dir
        self._db_path = db_path
        self._sync = sync
        # used on the writer's thread only; None after a reconnection failed (tried again)
        self._db: sqlite3.Connection | None = _connect(db_path, sync)
        # chunks whose write failed, for the cache to forget (:meth:`take_failed`)
        self.failed: list[Digest] = []
        self._retry: set[Digest] = set()  # rows whose delete failed: tried again with the next
        # lists of jobs handed over together; None stops the thread
        self._queue: queue.Queue[list[Job] | None] = queue.Queue()
        self._pending: dict[Digest, BytesLike] = {}  # digest -> frame being written
        self._lock = threading.Lock()
        self._held: list[Job] | None = None  # jobs of a batch not yet handed over
        self._holds = 0
        self.backlog = 0  # bytes queued
        self._hurry = threading.Event()  # set while someone waits for the queue (no lingering)
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def pending(self, digest: Digest) -> BytesLike | None:
        with self._lock:
            return self._pending.get(digest)

    def take_failed(self) -> list[Digest]:
        """The chunks whose write failed since the last call, in order."""
        with self._lock:
            failed, self.failed = self.failed, []
        return failed

    def write(self, digest: Digest, frame: BytesLike, path: str | None) -> None:
        with self._lock:
            self._pending[digest] = frame
            self.backlog += len(frame)
        self._hand((digest, frame, path))

    def delete(self, digest: Digest, path: str | None) -> None:
        with self._lock:
            self._pending.pop(digest, None)
        self._hand((digest, None, path))

    def _hand(self, job: Job) -> None:
        if self._held is not None:
            self._held.append(job)
        else:
            self._queue.put([job])

    def hold(self) -> None:
        self._holds += 1
        if self._held is None:
            self._held = []

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self._held is not None:
            held, self._held = self._held, None
            if held:
                self._queue.put(held)

    def flush(self) -> None:
        self._hurry.set()  # no lingering for more: this waits
        self._queue.join()
        self._hurry.clear()

    def close(self) -> None:
        self._hurry.set()
        self._queue.put(None)
        self._thread.join()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            taken, stop = 1, first is None
            jobs: list[Job] = list(first or ())
            if not stop and self._linger(jobs):
                self._hurry.wait(WRITE_LINGER)  # the rows that come meanwhile: one transaction
            while not stop and len(jobs) < WRITE_BATCH_MAX:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is None:
                    stop = True
                else:
                    jobs.extend(more)
            try:
                self._apply(jobs)
            except Exception:  # never let the thread die: the loop would wait on it forever
                log.exception("event=cache_writer_failed")
            finally:
                for _ in range(taken):
                    self._queue.task_done()
            if stop:
                return

    def _linger(self, jobs: list[Job]) -> bool:
        """Whether to wait for more jobs before these: a few rows of small.db (a file is
        written alone anyway), and little waiting for the disk (:attr:`backlog`)."""
        return (
            len(jobs) < LINGER_ROWS
            and self.backlog < LINGER_BYTES
            and not self._hurry.is_set()
            and all(path is None for _digest, _frame, path in jobs)
        )

    def _apply(self, jobs: list[Job]) -> None:
        # digest -> its last job's frame (None: gone); first the deletes that failed before
        rows: dict[Digest, BytesLike | None] = dict.fromkeys(self._retry)
        self._retry.clear()
        written: list[tuple[Digest, BytesLike]] = []  # rows' writes, to clear once committed
        for digest, frame, path in jobs:
            if path is None:
                rows[digest] = frame
                if frame is not None:
                    written.append((digest, frame))
            elif frame is None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            else:
                self._write(digest, frame, path)
        if rows:
            try:
                self._commit(rows)
            finally:
                with self._lock:
                    for digest, frame in written:
                        if self._pending.get(digest) is frame:
                            del self._pending[digest]
                        self.backlog -= len(frame)

    def _commit(self, rows: dict[Digest, BytesLike | None]) -> None:
        """Rows written and deleted in one transaction, each written one with its CRC-32.

        If it fails, the rows it was to write are handed to the cache to forget
        (:attr:`failed`), and its deletes are tried again at once on their own, else with the
        next transaction: an entry the cache no longer counts must not stay on the disk.
        """
        now = time.time()
        puts = []
        for digest, frame in rows.items():
            if frame is not None:
                payload = memoryview(frame)[p.DATA_PREFIX_LEN :]
                puts.append((digest, zlib.crc32(payload), now, payload))
        gone = [(digest,) for digest, frame in rows.items() if frame is None]
        try:
            self._transaction(puts, gone)
            return
        except sqlite3.Error as exc:
            log.warning("event=cache_write_failed rows=%d error=%r", len(rows), str(exc))
        with self._lock:
            self.failed.extend(digest for digest, _crc, _now, _payload in puts)
        if gone and puts:
            try:
                self._transaction([], gone)
                return
            except sqlite3.Error as exc:
                log.warning("event=cache_write_failed rows=%d error=%r", len(gone), str(exc))
        self._retry.update(digest for (digest,) in gone)

    def _transaction(
        self, puts: list[tuple[Digest, int, float, memoryview]], gone: list[tuple[Digest]]
    ) -> None:
        """Write ``puts`` and delete ``gone`` in one transaction; if it fails, leave the
        connection out of it (rolled back, or replaced), and raise."""
        if self._db is None:  # a reconnection failed: try again
            self._db = _connect(self._db_path, self._sync)
        db = self._db
        try:
            db.execute("BEGIN")
            if puts:
                db.executemany(
                    "INSERT OR REPLACE INTO entries (digest, crc, filled, data) "
                    "VALUES (?, ?, ?, ?)",
                    puts,
                )
            if gone:
                db.executemany("DELETE FROM entries WHERE digest = ?", gone)
            db.execute("COMMIT")
        except BaseException:
            self._db = None
            with contextlib.suppress(sqlite3.Error):
                self._db = _out_of_transaction(db, self._db_path, self._sync)
            raise

    def _write(self, digest: Digest, frame: BytesLike, path: str) -> None:
        tmp = os.path.join(self._tmp, uuid.uuid4().hex)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            payload = memoryview(frame)[p.DATA_PREFIX_LEN :]
            with open(tmp, "wb") as f:
                f.write(payload)
                f.write(zlib.crc32(payload).to_bytes(CRC_LEN, "big"))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("event=cache_write_failed chunk=%s error=%r", digest.hex(), exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with self._lock:
                self.failed.append(digest)
        finally:
            with self._lock:
                if self._pending.get(digest) is frame:
                    del self._pending[digest]
                self.backlog -= len(frame)


def _boot_id() -> str | None:
    """This boot's id (Linux), or None where there is none to read."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _mark_open(db_path: str) -> str:
    """Before small.db is opened: start it afresh if the machine stopped while a cache had it
    open, then say that this boot has it open.  :return: the ``synchronous`` mode to use.

    small.db is written with ``synchronous=OFF``: no fsync, neither at commit nor at a WAL
    checkpoint (the checkpoints' fsyncs were most of the write-behind thread's time in a cold
    ``get -r``).  That is safe for a cache:

    - a process that dies (crash, kill -9) loses nothing the OS was handed: its writes are in
      the page cache, and a WAL transaction is atomic without fsync (a commit that did not
      reach the WAL whole is rolled back when the database is next opened);
    - a machine that stops (power loss, kernel crash) may lose rows, or leave the database
      damaged in a way that reads could not tell (a checkpoint's pages half on disk, a stale
      page of the index).  So while small.db is open, ``small.db.open`` holds the boot id
      (written and fsync'd before any write to the database); :meth:`ChunkCache.close` fsyncs
      the database, then deletes it.  A cache that finds it naming another boot starts
      small.db afresh: a cache may forget, and it does after such a stop, whatever the
      database looks like.  The same boot's (a process that died) is no reason to.

    Where there is no boot id, or the mark cannot be written (a full or read-only disk),
    small.db is written with ``synchronous=NORMAL`` as before (a power loss may lose its latest
    transactions but not damage it).
    """
    mark = os.path.join(os.path.dirname(db_path), OPEN_MARK)
    boot = _boot_id()
    try:
        with open(mark) as f:
            before = f.read().strip()
    except OSError:
        before = None
    if before is not None and before != boot:
        log.warning("event=cache_db_reset path=%s reason=machine_stopped_while_open", db_path)
        for path in (db_path, db_path + "-wal", db_path + "-shm", mark):
            with contextlib.suppress(OSError):
                os.unlink(path)
    if boot is None:
        return "NORMAL"
    tmp = f"{mark}.{uuid.uuid4().hex}"
    try:
        with open(tmp, "w") as f:
            f.write(boot + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, mark)
        folder = os.open(os.path.dirname(mark), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        log.warning("event=cache_db_unmarked path=%s error=%r", mark, exc.strerror)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return "NORMAL"
    return "OFF"


def _mark_closed(db_path: str) -> None:
    """After small.db's connections are closed: once its file is on disk (fsync'd), delete the
    mark of :func:`_mark_open`.  If the fsync fails the mark stays (a cache may forget)."""
    try:
        for suffix in ("", "-wal"):  # the WAL is gone after a clean close, unless kept
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(db_path + suffix, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        os.unlink(os.path.join(os.path.dirname(db_path), OPEN_MARK))
    except OSError as exc:
        log.warning("event=cache_db_unsynced path=%s error=%r", db_path, exc.strerror)


def _connect(path: str, sync: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=DB_TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA synchronous={sync}")
    except BaseException:
        db.close()
        raise
    return db


def _out_of_transaction(db: sqlite3.Connection, path: str, sync: str) -> sqlite3.Connection:
    """``db`` after a failed transaction, rolled back; or if ROLLBACK fails too, closed (which
    rolls back and releases its lock) and a new connection in its place, since on ``db`` every
    later BEGIN would fail ("cannot start a transaction within a transaction").

    :raises sqlite3.Error: if no new connection can be opened.
    """
    with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")
    with contextlib.suppress(sqlite3.Error):
        if not db.in_transaction:
            return db
    log.warning("event=cache_db_reconnect path=%s", path)
    with contextlib.suppress(sqlite3.Error):
        db.close()
    return _connect(path, sync)


def _unusable(path: str, exc: sqlite3.Error) -> FmsError:
    """The error of a small.db that cannot be used now (not damaged): locked, an I/O error."""
    hint = (
        "another cache worker may be using this folder: stop it, or give this one a "
        "--dir of its own"
        if "locked" in str(exc) or "busy" in str(exc)
        else "check the disk and the folder's permissions, then start the cache again"
    )
    return FmsError(f"cannot use the cache database {path}: {exc}; {hint}")


# small.db's one table.  A rowid table with an index on the digest, not a WITHOUT ROWID table
# keyed by it: a row of a few KiB is larger than a page, and each insert at a random place in a
# b-tree of such rows split and rewrote pages (measured, 1000 rows of 4 KiB in one transaction:
# 39 ms of CPU against 16 ms; 1000 reads by digest 17 ms against 9 ms).  Rows are appended, and
# only the index of small keys takes the random inserts.
ENTRIES = (
    "CREATE TABLE IF NOT EXISTS entries (digest BLOB NOT NULL UNIQUE, crc INTEGER NOT NULL, "
    "filled REAL NOT NULL, data BLOB NOT NULL)"
)


def _make_table(db: sqlite3.Connection) -> None:
    """Create small.db's table, or move the rows of an earlier fms's (WITHOUT ROWID) into it, in
    one transaction."""
    found = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'entries'")
    row = found.fetchone()
    if row is not None and "WITHOUT ROWID" not in str(row[0]).upper():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if row is not None:
            db.execute("ALTER TABLE entries RENAME TO entries_old")
        db.execute(ENTRIES)
        if row is not None:
            db.execute(
                "INSERT OR IGNORE INTO entries (digest, crc, filled, data) "
                "SELECT digest, crc, filled, data FROM entries_old"
            )
            db.execute("DROP TABLE entries_old")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _open_small_db(
    path: str, sync: str
) -> tuple[sqlite3.Connection, list[tuple[bytes, int, float]]]:
    """small.db, with its table, and ``(digest, size, time filled)`` of every row.

    One that is damaged (not a database, malformed) is started afresh (a cache may forget).
    One that cannot be used now (locked by another process, an I/O error, a full or read-only
    disk) is left as it is: :class:`~fms.errors.FmsError` says what to do.
    """
    for attempt in range(2):
        db = None
        try:
            db = _connect(path, sync)
            db.execute("PRAGMA journal_mode=WAL")
            _make_table(db)
            rows = db.execute("SELECT digest, length(data), filled FROM entries").fetchall()
            return db, rows
        except sqlite3.OperationalError as exc:  # not damage: nothing to delete
            if db is not None:
                db.close()
            raise _unusable(path, exc) from None
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            if attempt:
                raise
            log.warning("event=cache_db_reset path=%s error=%r", path, str(exc))
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(path + suffix)
    raise AssertionError("unreachable")
