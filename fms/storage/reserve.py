"""Room kept on a store's disk for the writes that give space back.

With the disk full, removing files and collecting garbage must still work: that is how space
comes back.  But they write too: SQLite appends every page a transaction changes to its
write-ahead log before it can change the database, and a delete that cannot append fails like
any write.  So a data directory whose metadata is SQLite keeps a file, ``reserve``, of
:data:`RESERVE_BYTES` allocated blocks (at most 1/:data:`RESERVE_SHARE` of the filesystem, for
small disks).  An ``rm``, ``rm -r`` page or collection that meets a full disk deletes it and
runs again (:meth:`SpaceReserve.released`); the reserve is allocated again, as far as the disk
has room, when that is done and at every tick until it is whole.

Several threads and several worker processes may share one data directory: the file
``reserve.lock`` is held shared by each release under way and exclusively (without waiting) by
a refill, so no refill takes the room back while a release needs it.
"""

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import wire as p

if TYPE_CHECKING:
    from .engine import Store

RESERVE_FILE = "reserve"
RESERVE_BYTES = 16 * p.MiB  # what a page of rm -r (rm_prefix) or a collection's batch needs
RESERVE_SHARE = 8  # ... but never more than this fraction of the filesystem
STEP = 1 * p.MiB  # allocated at a time, so a refill keeps what fits

log = logging.getLogger("fms.storage")


class SpaceReserve:
    """The reserve of a data directory (see the module's docstring).

    :param folder: the directory holding the metadata database.
    """

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, RESERVE_FILE)
        self.lock_path = self.path + ".lock"
        vfs = os.statvfs(folder)
        self.size = min(RESERVE_BYTES, vfs.f_blocks * vfs.f_frsize // RESERVE_SHARE)
        with open(self.lock_path, "ab"):
            pass
        self.refill()

    @classmethod
    def for_store(cls, store: "Store") -> "SpaceReserve | None":
        """The reserve of ``store``'s data directory if its metadata is SQLite there, else
        None (PostgreSQL keeps its own disk; a chunk store alone needs no room to delete)."""
        path = getattr(store.meta, "path", None)
        if path is None:
            return None
        try:
            return cls(os.path.dirname(path))
        except OSError as exc:  # no room even for the lock file: the store works without
            log.warning("event=reserve_unavailable error=%r", exc.strerror)
            return None

    def held(self) -> int:
        """Bytes the reserve holds now."""
        return held(os.path.dirname(self.path))

    def refill(self) -> bool:
        """Allocate the reserve again, as much of it as the disk has room for.

        :return: it is whole.
        """
        if self.held() >= self.size:
            return True
        with open(self.lock_path, "rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a release is under way: its room is not ours to take back
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                offset = self.held() // STEP * STEP
                while offset < self.size:
                    length = min(STEP, self.size - offset)
                    try:
                        _allocate(fd, offset, length)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            return False  # the next tick goes on
                        raise
                    offset += length
                os.fsync(fd)
            finally:
                os.close(fd)
        return True

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Give the reserve's room to the body (a write that gives space back), then allocate
        it again as far as the disk has room."""
        try:
            with open(self.lock_path, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_SH)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                    log.warning(
                        "event=reserve_released reason='disk full: a write that gives "
                        "space back runs in its room'"
                    )
                yield
        finally:
            with contextlib.suppress(OSError):
                self.refill()


def held(folder: str) -> int:
    """Bytes the reserve of data directory ``folder`` holds: allocated (not a hole), and not
    counting the blocks a filesystem adds for its own bookkeeping."""
    try:
        st = os.stat(os.path.join(folder, RESERVE_FILE))
    except FileNotFoundError:
        return 0
    return min(st.st_size, st.st_blocks * 512)


def _allocate(fd: int, offset: int, length: int) -> None:
    """Give the file real blocks from ``offset`` (a sparse file would hold no room)."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.pwrite(fd, bytes(length), offset)  # a filesystem without fallocate
