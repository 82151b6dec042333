"""The chunk cache, a plain object with no sockets.

:class:`ChunkCache` keeps chunks on disk, bounded in bytes, least-recently-used out first.  Chunks
are content-addressed, so they are never stale and survive restarts.
"""

import collections
import contextlib
import logging
import os
import uuid

from .. import wire as p
from ..wire.frames import read_frame

log = logging.getLogger("fms.cache")

HOT_CHUNK_MAX = 128 * 1024       # chunks up to this size may also be kept in memory...
HOT_BYTES_MAX = 32 * 1024 * 1024  # ...up to this many bytes: small-file hits skip the disk


class ChunkCache:
    """Chunks on disk under ``path``, at most ``max_bytes`` in all.

    Small chunks also live in a memory tier (at most ``HOT_BYTES_MAX``, least recently used out
    first), so a hit on a small file costs no open, read or hash: each was verified when it was
    filled or read from disk, and disk is where bytes rot.  Every read from disk is verified.

    :param path: the cache directory; created if missing.
    :param max_bytes: the bound; a chunk larger than it is never cached.
    """

    def __init__(self, path: str, max_bytes: int):
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self._hot = collections.OrderedDict()   # digest -> data frame, verified
        self._hot_bytes = 0
        self._hot_max = min(HOT_BYTES_MAX, max_bytes // 4)
        self.bytes = 0
        self.evictions = 0
        self.corrupt = 0
        self._lru = collections.OrderedDict()  # digest -> size, least recently used first
        self._tmp = os.path.join(self.path, "tmp")
        os.makedirs(self._tmp, exist_ok=True)
        os.makedirs(os.path.join(self.path, "chunks"), exist_ok=True)
        for entry in os.scandir(self._tmp):  # from a cache that died mid-write
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        self._load()

    def _load(self):
        found = []
        for root, _dirs, names in os.walk(os.path.join(self.path, "chunks")):
            for name in names:
                try:
                    digest = bytes.fromhex(name)
                    st = os.stat(os.path.join(root, name))
                except (ValueError, OSError):
                    continue
                if len(digest) == p.HASH_LEN:
                    found.append((st.st_mtime, digest, st.st_size))
        found.sort()  # by last use (mtime is touched on every hit): oldest first
        for _mtime, digest, size in found:
            self._lru[digest] = size
            self.bytes += size
        self._evict()
        log.info("event=cache_loaded entries=%d bytes=%d", len(self._lru), self.bytes)

    def _path(self, digest: bytes) -> str:
        name = digest.hex()
        return os.path.join(self.path, "chunks", name[:2], name)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, digest: bytes):
        """A verified chunk as a data frame (bin32 prefix + bytes), or None on a miss.

        A chunk that fails verification is dropped and counts as a miss, so it is refetched.
        """
        if digest not in self._lru:
            return None
        frame = self._hot.get(digest)
        if frame is not None:
            self._hot.move_to_end(digest)
            self._lru.move_to_end(digest)
            return frame
        path = self._path(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                frame, view, got = read_frame(f, size)
        except OSError:
            self._drop(digest)
            return None
        if got != size or p.sha256(view) != digest:
            log.error("event=corrupt_cache_entry chunk=%s action=dropped", digest.hex())
            self.corrupt += 1
            self._drop(digest)
            return None
        self._lru.move_to_end(digest)
        with contextlib.suppress(OSError):
            os.utime(path)  # keeps LRU order across restarts
        self._keep_hot(digest, frame)
        return frame

    def _keep_hot(self, digest: bytes, frame):
        size = len(frame)
        if size > HOT_CHUNK_MAX + p.DATA_PREFIX_LEN or size > self._hot_max:
            return
        self._hot[digest] = frame
        self._hot_bytes += size
        while self._hot_bytes > self._hot_max:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= len(old)

    def put(self, digest: bytes, payload) -> bool:
        """Cache a chunk; the caller has verified it against ``digest``.

        :return: True if it is now cached.
        """
        size = len(payload)
        if digest in self._lru:
            self._lru.move_to_end(digest)
            return True
        if size > self.max_bytes:
            return False
        final = self._path(digest)
        tmp = os.path.join(self._tmp, uuid.uuid4().hex)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            # No fsync: a torn file fails verification on read and is refetched.
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, final)
        except OSError as exc:
            log.warning("event=cache_write_failed chunk=%s error=%r", digest.hex(), exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        self._lru[digest] = size
        self.bytes += size
        self._evict()
        if digest in self._lru and size <= HOT_CHUNK_MAX:
            self._keep_hot(digest, p.pack_data(payload))
        return digest in self._lru

    def _evict(self):
        while self.bytes > self.max_bytes and self._lru:
            digest = next(iter(self._lru))
            self._drop(digest)
            self.evictions += 1

    def _drop(self, digest: bytes):
        hot = self._hot.pop(digest, None)
        if hot is not None:
            self._hot_bytes -= len(hot)
        size = self._lru.pop(digest, None)
        if size is None:
            return
        self.bytes -= size
        with contextlib.suppress(OSError):
            os.unlink(self._path(digest))
