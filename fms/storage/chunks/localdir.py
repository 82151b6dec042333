"""Chunks as files in the data directory: ``chunks/ab/abcdef...`` (the hex digest).

Every write goes to ``tmp/`` and is renamed into place, so a process killed at any instant
leaves a chunk whole or absent (invariant 2).  Writes are not fsync'd one by one: a commit calls
:meth:`LocalDirChunks.sync` (one ``syncfs``) before its transaction, which makes every chunk it
names durable at the cost of one flush per commit instead of two per chunk; a chunk damaged by a
power loss before that is found by the commit's read-back (fms.storage.engine), set aside and
uploaded again.  Temp files left by dead writers are removed by :meth:`LocalDirChunks.clean_tmp`.
"""

import contextlib
import ctypes
import errno
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator

from ... import wire as p
from ...errors import IntegrityError, NoSpace, NotFound
from ...limits import BytesLike
from ...wire.fields import Digest
from ...wire.frames import read_frame
from .base import ChunkBackend

MARKER = "STORE"  # chunks/STORE: the id of the store the chunks belong to
TMP_GRACE = (
    600.0  # seconds: a chunk write takes far less, so older temp files are from dead writers
)
_HOST = socket.gethostname().replace(".", "_")

log = logging.getLogger("fms.storage.chunks")


class LocalDirChunks(ChunkBackend):
    """:param path: the data directory; ``chunks/``, ``tmp/`` and ``corrupt/`` live in it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.root = os.path.join(path, "chunks")
        self.tmp = os.path.join(path, "tmp")
        self.corrupt = os.path.join(path, "corrupt")
        for folder in (self.root, self.tmp, self.corrupt):
            os.makedirs(folder, exist_ok=True)

    def _path(self, digest: Digest) -> str:
        name = digest.hex()
        return os.path.join(self.root, name[:2], name)

    def has(self, digest: Digest) -> bool:
        return os.path.exists(self._path(digest))

    def size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self._path(digest)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put(self, digest: Digest, data: BytesLike) -> bool:
        final = self._path(digest)
        if os.path.exists(final):
            return False
        shard = os.path.dirname(final)
        try:
            tmp = self.tmp_path("chunk")
            write_file(tmp, [data])
            for _ in range(3):
                if not os.path.isdir(shard):
                    os.makedirs(shard, exist_ok=True)
                try:
                    os.replace(tmp, final)
                    break
                except FileNotFoundError:
                    continue  # the collector removed the shard, empty, in between: again
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _os_error(exc) from None
        return True

    def sync(self) -> None:
        try:
            syncfs(self.root)
        except OSError as exc:
            raise _os_error(exc) from None

    def get(self, digest: Digest) -> bytearray:
        path = self._path(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > p.MAX_CHUNK_SIZE:
                    raise IntegrityError(
                        f"chunk {digest.hex()[:16]} is {size} bytes on disk, "
                        f"more than any chunk may be"
                    )
                frame, _view, got = read_frame(f, size)
        except FileNotFoundError:
            raise NotFound(f"chunk {digest.hex()[:16]} not found in store") from None
        if got != size:
            raise IntegrityError(f"chunk {digest.hex()[:16]} changed size while being read")
        return frame

    def delete(self, digest: Digest) -> None:
        path = self._path(digest)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):  # a shard left empty goes too (not if in use)
            os.rmdir(os.path.dirname(path))

    def list(self) -> Iterator[tuple[Digest, int, float]]:
        for shard in os.scandir(self.root):
            if not shard.is_dir():
                continue
            try:
                entries = os.scandir(shard.path)
            except FileNotFoundError:
                continue  # its last blob was deleted (by another worker's collector) meanwhile
            with entries:
                for entry in entries:
                    try:
                        digest = bytes.fromhex(entry.name)
                        st = entry.stat()
                    except (ValueError, FileNotFoundError):
                        continue
                    if len(digest) == p.HASH_LEN:
                        yield digest, st.st_size, st.st_mtime

    def store_marker(self) -> str | None:
        try:
            with open(os.path.join(self.root, MARKER), encoding="utf-8") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def mark_store(self, store_id: str) -> None:
        tmp = self.tmp_path("marker")
        write_file(tmp, [store_id.encode()], fsync=True)
        try:
            os.link(tmp, os.path.join(self.root, MARKER))  # never replaces another's marker
            fsync_dir(self.root)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)

    def quarantine(self, digest: Digest) -> None:
        log.error("event=corrupt_chunk chunk=%s action=quarantined", digest.hex())
        with contextlib.suppress(OSError):  # a concurrent reader may have moved it already
            os.replace(
                self._path(digest), os.path.join(self.corrupt, f"{digest.hex()}.{time.time_ns()}")
            )

    # --- temp files ---

    def tmp_path(self, kind: str) -> str:
        # host and pid in the name let clean_tmp tell a dead writer's file from a live one's.
        return os.path.join(self.tmp, f"{kind}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}")

    def clean_tmp(self, older_than: float = TMP_GRACE) -> int:
        """Remove temp files left by dead writers: those of this host whose process is gone, and
        any older than ``older_than`` (writers on other hosts).  :return: how many."""
        removed = 0
        cutoff = time.time() - older_than
        for entry in os.scandir(self.tmp):
            parts = entry.name.split(".")
            mine_and_dead = (
                len(parts) == 4
                and parts[1] == _HOST
                and parts[2].isdigit()
                and not pid_alive(int(parts[2]))
            )
            with contextlib.suppress(FileNotFoundError):
                if mine_and_dead or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed


def write_file(path: str, parts: Iterable[BytesLike], fsync: bool = False) -> None:
    """Write ``parts`` to a new file at ``path`` (and fsync it); remove it if that fails."""
    try:
        with open(path, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """Flush everything written to the filesystem holding ``path`` (Linux ``syncfs``: one
    journal commit for all of it), or every filesystem (``sync``) where there is no syncfs."""
    if not hasattr(_libc, "syncfs"):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: OSError) -> OSError | NoSpace:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(
            "storage disk is full (space or inodes); nothing was changed: free space "
            "on the storage volume and try again"
        )
    return exc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True
