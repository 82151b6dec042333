"""The durable store: content-addressed chunks plus one manifest per name, on a local directory.

Layout of a data directory (several storage worker processes may share one)::

    STORE                       msgpack {format, store_id}: written once, identifies the store
    chunks/ab/abcdef...         a chunk, named by the hex sha256 of its content; never changes
    manifests/xy/xyz...         a name's manifest (or its tombstone, once removed), named by the
                                hex sha256 of the *name*
    manifests/xy/.lock          flock'd while a name in that shard is committed or removed
    corrupt/                    chunks that failed verification on read, kept for inspection
    tmp/                        files being written; renamed into place when complete

Names never become paths (invariant 6): a manifest lives under the hash of its name.  Every
write goes to tmp/, is fsync'd and renamed into place (invariant 2).  Every chunk is verified
against its hash when written and when read (invariant 3).
"""

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
import uuid

import msgpack

from . import protocol as p
from .errors import BadRequest, FmsError, IntegrityError, NoSpace, NotFound
from .fileio import read_frame

STORE_FORMAT = 1
TMP_GRACE = 600.0  # seconds: a chunk write takes well under this, so older temp files are from dead writers

log = logging.getLogger("fms.store")


class StoreError(FmsError):
    """The data directory cannot be used."""


class Store:
    """A store on one directory.

    :param path: the data directory; created if missing (its parent must exist).
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._tmp = os.path.join(self.path, "tmp")
        if not os.path.isdir(os.path.dirname(self.path)):
            raise StoreError(f"cannot use data directory {self.path}: its parent folder does not "
                             f"exist; create it or point --data elsewhere")
        try:
            for sub in ("chunks", "manifests", "tmp", "corrupt"):
                os.makedirs(os.path.join(self.path, sub), exist_ok=True)
            self.store_id = self._load_or_create_id()
            probe = self._tmp_path("probe")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise StoreError(f"cannot use data directory {self.path}: {exc.strerror}; "
                             f"check that it exists and is writable") from None

    # --- identity ---

    def _load_or_create_id(self) -> str:
        marker = os.path.join(self.path, "STORE")
        try:
            with open(marker, "rb") as f:
                return msgpack.unpackb(f.read())["store_id"]
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{marker} is damaged; it identifies the store and must be "
                             f"restored from a copy") from None
        info = {"format": STORE_FORMAT, "store_id": uuid.uuid4().hex}
        tmp = self._tmp_path("STORE")
        self._write_durably(tmp, [p.encode(info)])
        try:
            # link() fails if another worker created the marker first: then use theirs.
            os.link(tmp, marker)
        except FileExistsError:
            pass
        os.unlink(tmp)
        return self._load_or_create_id()

    # --- chunks ---

    def _chunk_path(self, digest: bytes) -> str:
        name = digest.hex()
        return os.path.join(self.path, "chunks", name[:2], name)

    def has_chunk(self, digest: bytes) -> bool:
        return os.path.exists(self._chunk_path(digest))

    def missing(self, digests) -> list:
        """The digests among ``digests`` that the store does not hold."""
        return [d for d in digests if not self.has_chunk(d)]

    def put_chunk(self, digest: bytes, data) -> bool:
        """Store a chunk after checking it against its digest.

        :return: True if written, False if the store already had it.
        :raises IntegrityError: the data does not hash to ``digest``.
        """
        if p.sha256(data) != digest:
            raise IntegrityError(f"chunk {digest.hex()[:16]} does not match its sha256; "
                                 f"it was damaged in transit, upload it again")
        final = self._chunk_path(digest)
        if os.path.exists(final):
            return False
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = self._tmp_path("chunk")
        self._write_durably(tmp, [data])
        os.replace(tmp, final)
        return True

    def read_chunk(self, digest: bytes) -> bytearray:
        """Read and verify a chunk, returned as a ready data frame (bin32 prefix + bytes).

        :raises NotFound: no such chunk.
        :raises IntegrityError: the bytes on disk do not match; the file is moved to corrupt/
            so that the next upload of the same content restores it.
        """
        path = self._chunk_path(digest)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size > p.MAX_CHUNK_SIZE:
                    raise IntegrityError(f"chunk {digest.hex()[:16]} is {size} bytes on disk, "
                                         f"more than any chunk may be")
                frame, view, got = read_frame(f, size)
        except FileNotFoundError:
            raise NotFound(f"chunk {digest.hex()[:16]} not found in store") from None
        if got != size or p.sha256(view) != digest:
            self._quarantine(path, digest)
            raise IntegrityError(f"chunk {digest.hex()[:16]} is corrupt on storage disk; "
                                 f"it was set aside, upload the file again to restore it")
        return frame

    def chunk_size(self, digest: bytes):
        try:
            return os.stat(self._chunk_path(digest)).st_size
        except FileNotFoundError:
            return None

    def _quarantine(self, path: str, digest: bytes):
        log.error("event=corrupt_chunk chunk=%s action=quarantined", digest.hex())
        with contextlib.suppress(OSError):  # a concurrent reader may have moved it already
            os.replace(path, os.path.join(self.path, "corrupt", f"{digest.hex()}.{time.time_ns()}"))

    # --- manifests ---

    def _manifest_path(self, name: str) -> str:
        key = p.sha256(name.encode("utf-8")).hex()
        return os.path.join(self.path, "manifests", key[:2], key)

    @contextlib.contextmanager
    def _name_lock(self, name: str):
        shard = os.path.dirname(self._manifest_path(name))
        os.makedirs(shard, exist_ok=True)
        fd = os.open(os.path.join(shard, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def get_manifest(self, name: str) -> dict:
        """:raises NotFound: no file by that name (or only its tombstone)."""
        p.check_name(name)
        manifest = self._read_manifest(self._manifest_path(name), name)
        if manifest.get("deleted"):
            raise NotFound(f"{name!r} not found; see what is stored with: ls")
        return manifest

    def _read_manifest(self, path: str, name_for_errors: str) -> dict:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise NotFound(f"{name_for_errors!r} not found; see what is stored with: ls") from None
        try:
            manifest = msgpack.unpackb(raw, raw=False)
            manifest["name"]
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"manifest of {name_for_errors!r} is damaged on disk") from None
        return manifest

    def commit(self, header: dict, inline=None) -> dict:
        """Make a name point at a new version, described by a commit request's fields.

        Idempotent: committing the same ``commit`` id again returns the version it made.
        ``inline`` is the content of a single-chunk file sent along (one round trip).

        :raises BadRequest: the fields are inconsistent.
        :raises IntegrityError: a chunk is missing, has the wrong size, or inline data is bad.
        """
        name = p.check_name(p.need(header, "name", str))
        size = p.need_int(header, "size")
        chunk_size = p.need_int(header, "chunk_size", lo=p.MIN_CHUNK_SIZE, hi=p.MAX_CHUNK_SIZE)
        whole = p.need_hash(header, "sha256")
        commit_id = p.need(header, "commit", str)
        mtime = p.need(header, "mtime", (int, float), optional=True, default=time.time())
        want_chunks = -(-size // chunk_size)
        chunks = p.need_hashes(header, "chunks", max(want_chunks, 0))
        if len(chunks) != want_chunks:
            raise BadRequest(f"a {size}-byte file in {chunk_size}-byte chunks has {want_chunks} "
                             f"chunks, the commit lists {len(chunks)}")
        if want_chunks == 0 and whole != p.sha256(b""):
            raise IntegrityError("an empty file's sha256 must be that of no bytes")
        if want_chunks == 1 and whole != chunks[0]:
            raise IntegrityError("a one-chunk file's sha256 must equal its chunk's")
        if inline is not None:
            if want_chunks != 1:
                raise BadRequest("inline data is only for single-chunk files")
            self.put_chunk(chunks[0], inline)
        for i, digest in enumerate(chunks):
            expect = chunk_size if i < want_chunks - 1 else size - chunk_size * (want_chunks - 1)
            have = self.chunk_size(digest)
            if have is None:
                raise IntegrityError(f"chunk {i} ({digest.hex()[:16]}) was never uploaded; "
                                     f"upload the file again")
            if have != expect:
                raise IntegrityError(f"chunk {i} is {have} bytes, the manifest needs {expect}")
        path = self._manifest_path(name)
        with self._name_lock(name):
            try:
                old = self._read_manifest(path, name)
            except (NotFound, IntegrityError):
                old = None
            if old is not None and old.get("commit") == commit_id:
                return old  # a retried commit: already done
            manifest = {
                "name": name, "size": size, "sha256": whole, "chunk_size": chunk_size,
                "chunks": chunks, "mtime": float(mtime), "commit": commit_id,
                "version": (old["version"] + 1) if old else 1, "committed": time.time(),
            }
            tmp = self._tmp_path("manifest")
            self._write_durably(tmp, [p.encode(manifest)])
            os.replace(tmp, path)
            self._fsync_dir(os.path.dirname(path))
        return manifest

    def remove(self, name: str, rm_id: str | None = None) -> dict:
        """Remove a name by writing a tombstone; its chunks become garbage (collected later).

        Idempotent by ``rm_id``: removing again with the same id returns the same result, so a
        retried rm (after a lost reply or a dead worker) succeeds.  The tombstone keeps the
        version counting up across removal and re-creation.

        :return: the tombstone: the removed version's fields with ``deleted`` set.
        :raises NotFound: no such name.
        """
        p.check_name(name)
        rm_id = rm_id or uuid.uuid4().hex
        path = self._manifest_path(name)
        with self._name_lock(name):
            old = self._read_manifest(path, name)
            if old.get("deleted"):
                if old.get("commit") == rm_id:
                    return old
                raise NotFound(f"{name!r} not found; see what is stored with: ls")
            tombstone = {**old, "chunks": [], "deleted": True, "version": old["version"] + 1,
                         "commit": rm_id, "committed": time.time()}
            tmp = self._tmp_path("manifest")
            self._write_durably(tmp, [p.encode(tombstone)])
            os.replace(tmp, path)
            self._fsync_dir(os.path.dirname(path))
        return tombstone

    def list(self, prefix: str = ""):
        """Manifests whose name starts with ``prefix``, sorted by name."""
        found = []
        root = os.path.join(self.path, "manifests")
        for shard in os.scandir(root):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                if entry.name.startswith("."):
                    continue
                try:
                    manifest = self._read_manifest(entry.path, entry.name)
                except NotFound:
                    continue  # removed while we looked
                except IntegrityError:
                    log.error("event=damaged_manifest path=%s", entry.path)
                    continue
                if manifest["name"].startswith(prefix) and not manifest.get("deleted"):
                    found.append(manifest)
        found.sort(key=lambda m: m["name"])
        return found

    def usage(self) -> dict:
        """Files, their total size, and the bytes their chunks take on disk (after dedup)."""
        manifests = self.list()
        chunk_bytes = 0
        for root, _dirs, names in os.walk(os.path.join(self.path, "chunks")):
            for n in names:
                with contextlib.suppress(FileNotFoundError):
                    chunk_bytes += os.stat(os.path.join(root, n)).st_size
        return {"files": len(manifests), "bytes": sum(m["size"] for m in manifests),
                "chunk_bytes": chunk_bytes}

    # --- temp files ---

    def _tmp_path(self, kind: str) -> str:
        # host and pid in the name let clean_tmp tell a dead writer's file from a live one's.
        return os.path.join(self._tmp, f"{kind}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}")

    def _write_durably(self, path: str, parts):
        try:
            with open(path, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("storage disk is full; nothing was changed: free space on the "
                              "storage volume and try again") from None
            raise

    @staticmethod
    def _fsync_dir(path: str):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def clean_tmp(self, older_than: float = TMP_GRACE) -> int:
        """Remove temp files left by dead writers: those of this host whose process is gone, and
        any older than ``older_than`` (writers on other hosts sharing the directory).

        :return: how many were removed.
        """
        removed = 0
        cutoff = time.time() - older_than
        for entry in os.scandir(self._tmp):
            parts = entry.name.split(".")
            mine_and_dead = (len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit()
                             and not _pid_alive(int(parts[2])))
            with contextlib.suppress(FileNotFoundError):
                if mine_and_dead or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed


_HOST = socket.gethostname().replace(".", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # alive, someone else's
    return True
