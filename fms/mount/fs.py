"""The mount's file system: FUSE calls (through mfusepy) over a store's names.

**Names and folders.**  The path ``/a/b`` is the name ``PREFIX/a/b``.  A folder exists while a
name is stored under it, or while its *marker* is: the name ``a/`` (stored by ``mkdir``, with
the folder's mode, owner and mtime in its metadata), so an empty folder persists, and every
client lists it (``fms ls``, fsspec).  A store may hold a file ``a`` and names under ``a/`` at
once (written by other clients); the mount then shows the folder.

**Caches.**  A folder's listing (one ``ls`` page of up to :data:`LISTING_MAX` entries: the
files with their stats, the sub-folders) is kept for the attribute cache time, and answers
lookups and ``getattr`` of its names (negative answers too) without a round trip; the kernel
keeps what it was told for the same time (``attr_timeout``, ``entry_timeout``) and keeps a
folder's entries (``cache_readdir``) until the listing changes.  What this mount changes is
written into its caches at once.  ``open`` always asks for the current version
(close-to-open): a file is read as the latest version committed before it was opened.

**Attributes** live in a version's metadata: ``fs.mode`` (the permission bits, octal),
``fs.uid`` and ``fs.gid``, and ``fs.type`` (``symlink``; a symlink's target is its content).
A file written by another client has none: it shows as ``0644`` (folders ``0755``), owned by
the user who mounted.
"""

import ctypes
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import mfusepy

from .. import wire as p
from ..client import download
from ..errors import (
    BadRequest,
    Conflict,
    FmsError,
    Forbidden,
    NoSpace,
    NotFound,
    Refused,
    TooLarge,
)
from .files import META_MTIME_NS, OpenFile, Spool
from .pool import ClientPool
from .writeback import Committer, Pending

FileInfo: TypeAlias = Any  # mfusepy's fuse_file_info (a ctypes structure): fh, flags
# what a metadata change (chmod, chown, utimens, truncate) is applied to
Changed: TypeAlias = "OpenFile | _MetaHolder"
Change: TypeAlias = Callable[[Changed], None]


class Attributed(Protocol):
    """What a change of mode, owner or mtime is made to: an open file, a folder's marker, or a
    version waiting for its commit (``--writeback``)."""

    meta: dict[str, Any]
    mtime: float


MetaChange: TypeAlias = Callable[[Attributed], None]

log = logging.getLogger("fms.mount")

LISTING_MAX = 5000  # entries of a folder listed in one page and kept (a larger one: asked)
FILE_MODE, DIR_MODE, LINK_MODE = 0o644, 0o755, 0o777  # what a name stored without modes shows
BLOCK = 4096  # the block size statfs and st_blocks count in
CAPACITY = 1 << 50  # bytes statfs reports as the store's size: no limit is known (1 PiB)
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

META_MODE, META_UID, META_GID, META_TYPE = "fs.mode", "fs.uid", "fs.gid", "fs.type"


def _error(exc: FmsError) -> int:
    """The errno a program sees for an fms error."""
    if isinstance(exc, NotFound):
        return errno.ENOENT
    if isinstance(exc, BadRequest):
        return errno.ENAMETOOLONG if "bytes long" in str(exc) else errno.EINVAL
    if isinstance(exc, NoSpace):
        return errno.ENOSPC
    if isinstance(exc, TooLarge):
        return errno.EFBIG
    if isinstance(exc, Refused | Forbidden):
        return errno.EACCES  # the key, or its identity's grants, may not do this here
    if isinstance(exc, Conflict):
        return errno.ENOTEMPTY
    return errno.EIO  # the cluster cannot be reached, did not answer, or sent damaged bytes


def _fail(code: int) -> Exception:
    return mfusepy.FuseOSError(code)


@dataclass
class Entry:
    """What the mount knows of a name: a file (``kind`` ``file`` or ``link``) or a folder."""

    kind: str
    size: int = 0
    mtime: float = 0.0
    ctime: float = 0.0
    meta: dict = field(default_factory=dict)
    version: int = 0

    @classmethod
    def of_stat(cls, stat_: dict) -> "Entry":
        meta = stat_.get("meta") or {}
        kind = "link" if meta.get(META_TYPE) == "symlink" else "file"
        return cls(
            kind,
            stat_["size"],
            stat_["mtime"],
            stat_.get("committed", stat_["mtime"]),
            meta,
            stat_.get("version", 0),
        )


@dataclass
class Listing:
    """A folder's entries (base name -> :class:`Entry`), as one ``ls`` page gave them."""

    entries: dict
    expires: float
    complete: bool
    told: bool = False  # handed to the kernel, which may keep it (cache_readdir)
    own: bool = False  # made here by mkdir: a name missing from it is missing


class Handle:
    """An open file descriptor of the mount's."""

    __slots__ = ("file", "writable")

    def __init__(self, file: OpenFile, writable: bool) -> None:
        self.file, self.writable = file, writable


class FmsMount(mfusepy.Operations):
    """FUSE operations over a store (see the module's docstring).

    :param pool: connections to the broker.
    :param prefix: the folder of the store the mount shows ("" for all of it).
    :param spool: where written chunks wait for their commit.
    :param read_only: refuse every change (EROFS).
    :param cache_time: seconds listings and attributes are kept.
    :param writeback: commit small files in the background after ``close`` returns
        (:mod:`.writeback`).
    """

    use_ns = True

    def __init__(
        self,
        pool: ClientPool,
        prefix: str,
        spool: Spool,
        chunk_size: int,
        read_only: bool = False,
        cache_time: float = 1.0,
        writeback: bool = False,
    ):
        self.pool = pool
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.spool = spool
        self.chunk_size = chunk_size
        self.read_only = read_only
        self.cache_time = cache_time
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started = time.time()
        self._lock = threading.RLock()
        self._listings: dict[str, Listing] = {}  # folder name ("" or ending in /) -> listing
        self._folders: dict[str, tuple] = {}  # folder name -> (expires, its marker's Entry)
        self._open: dict[str, OpenFile] = {}  # name -> the file open in this mount
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, str] = {}
        self._next_fh = 1
        self._told: dict[str, int] = {}  # name -> version whose attributes the kernel holds
        self.committer = Committer(pool) if writeback else None

    # --- names ---

    def _name(self, path: str) -> str:
        """The store's name of ``path`` (never the root)."""
        name = self.prefix + path.strip("/")
        try:
            return p.check_name(name)
        except BadRequest as exc:
            raise _fail(_error(exc)) from None

    def _folder(self, path: str) -> str:
        """The store's folder name (ending in /, or "" for the root of a whole store)."""
        return self.prefix if path.strip("/") == "" else self._name(path) + "/"

    @staticmethod
    def _split(name: str) -> tuple[str, str]:
        cut = name.rfind("/") + 1
        return name[:cut], name[cut:]

    # --- the metadata cache ---

    def _listing(self, folder: str, fresh: bool = False) -> Listing:
        """``folder``'s first page of entries: kept for ``cache_time``; ``fresh``: asked
        again."""
        now = time.monotonic()
        with self._lock:
            found = self._listings.get(folder)
            if found is not None and not fresh and found.expires > now:
                return found
        with self.pool.client() as client:
            header, _ = client.call("ls", prefix=folder, folders=True, limit=LISTING_MAX)
        entries = {}
        for item in header["entries"]:
            entries[item["name"][len(folder) :]] = Entry.of_stat(item)
        for sub in header["folders"]:
            entries[sub[len(folder) : -1]] = Entry("dir")  # a folder wins over a file
        listing = Listing(entries, now + self.cache_time, header.get("next") is None)
        with self._lock:
            self._listings[folder] = listing
        return listing

    def _all_entries(self, folder: str) -> dict:
        """Every entry of ``folder``, all pages (a large folder is not kept)."""
        listing = self._listing(folder)
        if listing.complete:
            return listing.entries
        entries = {}
        with self.pool.client() as client:
            for item in client.iter_folder(folder, page=LISTING_MAX):
                base = item["name"][len(folder) :]
                if item.get("folder"):
                    entries[base.rstrip("/")] = Entry("dir")
                elif base.rstrip("/") not in entries:
                    entries[base] = Entry.of_stat(item)
        return entries

    def _entry(self, path: str) -> Entry:
        """What ``path`` is now.  :raises FuseOSError: ENOENT."""
        if path.strip("/") == "":
            return self._folder_entry(self.prefix)
        name = self._name(path)
        with self._lock:
            found = self._open.get(name)
        if found is not None:
            return self._open_entry(found)
        if self.committer is not None:
            waiting = self.committer.entry(name) or self.committer.entry(name + "/")
            if waiting is not None:
                return waiting  # a file, or a folder's marker, on its way to the store
        folder, base = self._split(name)
        listing = self._listing(folder)
        entry = listing.entries.get(base)
        if entry is None and not listing.own:
            # Another client may have made it since the listing was read: asked, so a name
            # closed elsewhere is found at once (a folder made here is known whole).
            entry = self._ask(name)
            if entry is not None:
                self._remember(name, entry)
        if entry is None:
            raise _fail(errno.ENOENT)
        if entry.kind == "dir":
            return self._folder_entry(name + "/")
        return entry

    def _ask(self, name: str) -> Entry | None:
        """What ``name`` is, asked (its folder is too large to keep)."""
        with self.pool.client() as client:
            try:
                return Entry.of_stat(client.stat(name))
            except NotFound:
                pass
            try:
                client.call("stat", name=name + "/")  # its marker
                return Entry("dir")
            except NotFound:
                pass
            header, _ = client.call("ls", prefix=name + "/", folders=True, limit=1)
            if header["entries"] or header["folders"] or header.get("next") is not None:
                return Entry("dir")
            return None

    def _folder_entry(self, folder: str) -> Entry:
        """A folder's attributes: its marker's, kept for ``cache_time``, else the defaults."""
        waiting = self.committer.entry(folder) if self.committer and folder else None
        if waiting is not None:
            return waiting  # its marker is on its way to the store
        now = time.monotonic()
        with self._lock:
            found = self._folders.get(folder)
        if found is not None and found[0] > now:
            return found[1]
        entry = Entry("dir", 0, self.started, self.started)
        if folder:
            try:
                with self.pool.client() as client:
                    header, _ = client.call("stat", name=folder)
                marker = Entry.of_stat(header["stat"])
                entry = Entry("dir", 0, marker.mtime, marker.ctime, marker.meta, marker.version)
            except NotFound:
                pass
        with self._lock:
            self._folders[folder] = (now + self.cache_time, entry)
        return entry

    def _open_entry(self, file: OpenFile) -> Entry:
        kind = "link" if file.meta.get(META_TYPE) == "symlink" else "file"
        return Entry(kind, file.size, file.mtime, file.mtime, file.meta, file.version)

    def _remember(self, name: str, entry: Entry | None) -> None:
        """This mount changed ``name``: its folder's kept listing says so (None: removed)."""
        folder, base = self._split(name)
        with self._lock:
            listing = self._listings.get(folder)
            if listing is not None:
                if entry is None:
                    listing.entries.pop(base, None)
                else:
                    listing.entries[base] = entry
                listing.told = False
            if entry is not None and entry.kind == "dir" and entry.version:  # a marker's
                self._folders[name + "/"] = (time.monotonic() + self.cache_time, entry)
            elif entry is None:
                self._folders.pop(name + "/", None)

    def _forget_under(self, folder: str) -> None:
        """Drop every kept listing and folder of ``folder`` and below."""
        with self._lock:
            for kept in (self._listings, self._folders):
                for key in [k for k in kept if k.startswith(folder)]:
                    del kept[key]

    def _attrs(self, entry: Entry, name: str | None = None) -> dict:
        meta = entry.meta
        if entry.kind == "dir":
            kind, default = stat.S_IFDIR, DIR_MODE
        elif entry.kind == "link":
            kind, default = stat.S_IFLNK, LINK_MODE
        else:
            kind, default = stat.S_IFREG, FILE_MODE
        try:
            mode = int(meta.get(META_MODE, ""), 8) & 0o7777
        except ValueError:
            mode = default
        mtime = int(entry.mtime * 1e9)
        exact = _int(meta.get(META_MTIME_NS), 0)
        if abs(exact - mtime) < 1_000_000:  # set here to the nanosecond, and still current
            mtime = exact
        if name is not None and entry.kind != "dir":
            with self._lock:
                self._told[name] = entry.version
        return {
            "st_mode": kind | mode,
            "st_nlink": 2 if entry.kind == "dir" else 1,
            "st_size": entry.size,
            "st_blocks": -(-entry.size // 512),
            "st_blksize": BLOCK,
            "st_mtime": mtime,
            "st_atime": mtime,
            "st_ctime": int(entry.ctime * 1e9),
            "st_uid": _int(meta.get(META_UID), self.uid),
            "st_gid": _int(meta.get(META_GID), self.gid),
        }

    def _owner_meta(self, mode: int) -> dict:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return {META_MODE: f"{mode & 0o7777:o}", META_UID: str(uid), META_GID: str(gid)}

    def _writable(self) -> None:
        if self.read_only:
            raise _fail(errno.EROFS)

    # --- FUSE: attributes and listings ---

    def getattr(self, path: str | None, fh: FileInfo | None = None) -> dict[str, Any]:
        handle = self._handles.get(fh.fh) if fh is not None else None
        if handle is not None:
            return self._attrs(self._open_entry(handle.file))
        if path is None:
            raise _fail(errno.ENOENT)
        try:
            entry = self._entry(path)
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        return self._attrs(entry, None if path.strip("/") == "" else self._name(path))

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        with self._lock:
            path = self._dir_handles.get(fh, path) if path is None else path
        if path is None:
            raise _fail(errno.EBADF)
        folder = self._folder(path)
        try:
            entries = dict(self._all_entries(folder))
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        with self._lock:
            listing = self._listings.get(folder)
            if listing is not None:
                listing.told = True
            for name, file in self._open.items():
                if self._split(name)[0] == folder and not file.unlinked:
                    entries.setdefault(self._split(name)[1], self._open_entry(file))
        if self.committer is not None:
            for base, entry in self.committer.under(folder).items():
                entries.setdefault(base, entry)
        out = [(".", {"st_mode": stat.S_IFDIR}, 0), ("..", {"st_mode": stat.S_IFDIR}, 0)]
        kinds = {"dir": stat.S_IFDIR, "link": stat.S_IFLNK, "file": stat.S_IFREG}
        out += [(base, {"st_mode": kinds[e.kind]}, 0) for base, e in sorted(entries.items())]
        return out

    def opendir(self, path: str) -> int:
        """A folder handle: its path (readdir is called without one)."""
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._dir_handles[fh] = path
        return fh

    def releasedir(self, path: str | None, fh: int) -> int:
        with self._lock:
            self._dir_handles.pop(fh, None)
        return 0

    def dir_kept(self, path: str) -> bool:
        """Whether the kernel may keep what it was told of ``path``'s entries (the listing
        was not asked for again nor changed since)."""
        with self._lock:
            listing = self._listings.get(self._folder(path))
            return listing is not None and listing.told and listing.expires > time.monotonic()

    def statfs(self, path: str) -> dict[str, int]:
        try:
            with self.pool.client() as client:
                usage = client.usage()
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        used = -(-usage["bytes"] // BLOCK)
        free = CAPACITY // BLOCK
        return {
            "f_bsize": BLOCK,
            "f_frsize": BLOCK,
            "f_blocks": used + free,
            "f_bfree": free,
            "f_bavail": free,
            "f_files": usage["files"] + free,
            "f_ffree": free,
            "f_favail": free,
            "f_namemax": 255,
        }

    # --- FUSE: files ---

    def _fetch(self, name: str) -> tuple[dict, bytes | None]:
        """The current version's manifest and, for a small file, its content."""
        with self.pool.client() as client:
            header, frame = client.call("get", name=name)
            manifest = p.check_manifest(header.get("manifest"))
            if frame is None:
                return manifest, None
            manifest, data = download.fetch_whole(
                client.session, name, manifest, p.unpack_data(frame.buffer)
            )
            return manifest, bytes(data)

    def _new_file(
        self,
        name: str,
        manifest: dict[str, Any] | None,
        inline: bytes | None,
        meta: dict[str, Any],
        mtime: float,
    ) -> OpenFile:
        return OpenFile(name, manifest, inline, self.spool, self.pool, self.chunk_size, meta, mtime)

    def _handle(self, file: OpenFile, writable: bool, fi: FileInfo) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(file, writable)
            file.handles += 1
        fi.fh = fh
        return 0

    def open(self, path: str, fi: FileInfo) -> int:
        name = self._name(path)
        flags = fi.flags
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._writable()
        with self._lock:
            file = self._open.get(name)
        if self.committer is not None and self.committer.entry(name) is not None:
            self.committer.drain()  # its version is on its way: open finds it stored
        try:
            if file is None or not file.changed:
                # Close-to-open: the version current now, whatever was kept.
                manifest, inline = self._fetch(name)
                if manifest.get("meta", {}).get(META_TYPE) == "symlink":
                    raise _fail(errno.ELOOP)
                if file is None or file.version != manifest["version"]:
                    file = self._new_file(
                        name, manifest, inline, manifest.get("meta") or {}, manifest["mtime"]
                    )
                    with self._lock:
                        self._open[name] = file
            if flags & os.O_TRUNC:
                file.truncate(0)
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        with self._lock:
            told = self._told.get(name)
        fi.keep_cache = int(told == file.version)
        if told is not None and told != file.version:
            self._invalidate(path)  # the kernel holds an older version's size
        return self._handle(file, writable, fi)

    def _invalidate(self, path: str) -> None:
        context = mfusepy._libfuse.fuse_get_context()
        if context:
            fuse = ctypes.c_void_p(context.contents.fuse)
            mfusepy._libfuse.fuse_invalidate_path(fuse, path.encode("utf-8", "surrogateescape"))

    def create(self, path: str, mode: int, fi: FileInfo) -> int:
        self._writable()
        name = self._name(path)
        file = self._new_file(name, None, None, self._owner_meta(mode), time.time())
        with self._lock:
            old = self._open.get(name)
            if old is not None:
                old.unlinked = True  # replaced: its handles keep what they wrote, uncommitted
            self._open[name] = file
        self._remember(name, self._open_entry(file))
        return self._handle(file, True, fi)

    def read(self, path: str | None, size: int, offset: int, fi: FileInfo) -> bytes:
        handle = self._handles[fi.fh]
        try:
            return handle.file.read(offset, size)
        except FmsError as exc:
            raise _fail(_error(exc)) from None

    def write(self, path: str | None, data: bytes, offset: int, fi: FileInfo) -> int:
        handle = self._handles[fi.fh]
        if not handle.writable:
            raise _fail(errno.EBADF)
        try:
            return handle.file.write(offset, data)
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        except OSError as exc:  # the spool's disk
            raise _fail(exc.errno or errno.EIO) from None

    def truncate(self, path: str | None, length: int, fi: FileInfo | None = None) -> int:
        self._writable()
        handle = self._handles.get(fi.fh) if fi is not None else None
        if handle is not None:
            handle.file.truncate(length)
            return 0
        assert path is not None  # no open handle: the kernel names the file
        name = self._name(path)
        with self._lock:
            file = self._open.get(name)
        if file is not None:
            file.truncate(length)
            return 0
        self._change(path, lambda f: f.truncate(length))
        return 0

    def _change(self, path: str, change: Change) -> None:
        """Apply ``change`` to the closed file ``path`` and commit it at once (a truncate, a
        chmod or chown, new times); a folder's marker gets the new metadata (with
        ``--writeback``, a new marker handed to the committer)."""
        name = self._name(path)
        entry = self._entry(path)
        try:
            if entry.kind == "dir":
                self._commit_marker(name + "/", entry, change)
                return
            self._drain()
            entry = self._entry(path)
            manifest, inline = self._fetch(name)
            file = self._new_file(name, manifest, inline, manifest.get("meta") or {}, entry.mtime)
            file.mtime = manifest["mtime"]
            change(file)
            file.changed = True
            try:
                made = file.commit()
            finally:
                file.close()
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        if made is not None:
            self._remember(name, Entry.of_stat(made))

    def _commit_marker(self, folder: str, entry: Entry, change: Change) -> None:
        holder = _MetaHolder(dict(entry.meta), entry.mtime)
        change(holder)
        if self.committer is not None:
            self._hand_marker(folder, holder.meta, holder.mtime)
        else:
            self._mkdir(folder, holder.meta, holder.mtime)

    def _hand_marker(self, folder: str, meta: dict, mtime: float) -> None:
        """With ``--writeback``: a new version of ``folder``'s marker goes to the committer
        (after any it holds), and shows at once."""
        assert self.committer is not None
        entry = Entry("dir", 0, mtime, mtime, meta)
        self.committer.put(Pending(folder, b"", self.chunk_size, meta, mtime, entry))
        self._remember(folder[:-1], entry)
        with self._lock:
            self._folders.pop(folder, None)  # what was kept of it is older

    def _mkdir(self, folder: str, meta: dict, mtime: float) -> None:
        with self.pool.client() as client:
            made = client.mkdir(folder, meta=meta, mtime=mtime)
        entry = Entry(
            "dir", 0, made["mtime"], made.get("committed", mtime), made["meta"], made["version"]
        )
        self._remember(folder[:-1], entry)

    def _drain(self) -> None:
        """With ``--writeback``: wait until the versions handed over are stored (before a
        change of names, so it applies after them)."""
        if self.committer is not None:
            self.committer.drain()

    def _commit(self, file: OpenFile, background: bool = False) -> None:
        if background and self.committer is not None:
            handed = file.hand_over()
            if handed is not None:
                content, chunk_size = handed
                entry = self._open_entry(file)
                self.committer.put(
                    Pending(file.name, content, chunk_size, dict(file.meta), file.mtime, entry)
                )
                self._remember(file.name, entry)
                return
        try:
            made = file.commit()
        except FmsError as exc:
            log.warning("event=commit_failed name=%r error=%r", file.name, str(exc))
            raise _fail(_error(exc)) from None
        except OSError as exc:
            raise _fail(exc.errno or errno.EIO) from None
        if made is not None:
            with self._lock:
                self._told[file.name] = made["version"]
            self._remember(file.name, Entry.of_stat(made))

    def flush(self, path: str | None, fi: FileInfo) -> int:
        self._commit(self._handles[fi.fh].file, background=True)
        return 0

    def fsync(self, path: str | None, datasync: int, fi: FileInfo) -> int:
        self._drain()
        self._commit(self._handles[fi.fh].file)
        return 0

    def release(self, path: str | None, fi: FileInfo) -> int:
        with self._lock:
            handle = self._handles.pop(fi.fh, None)
        if handle is None:
            return 0
        file = handle.file
        committed = False
        try:
            if file.handles == 1:
                self._commit(file, background=True)  # written since the last flush (mmap)
            committed = True
        finally:
            with self._lock:
                file.handles -= 1
                last = file.handles == 0
                if last and self._open.get(file.name) is file:
                    del self._open[file.name]
            if last:
                # A chown or chmod may have found the file open after the commit above took its
                # metadata (FUSE's release comes after close has returned): committed again, or
                # it would be lost.  From here on such a change goes as for a closed file.
                with file.lock:
                    file.released = True
                    again = committed and file.changed and not file.unlinked
                try:
                    if again:
                        self._commit(file, background=True)
                finally:
                    file.close()
        return 0

    def unlink(self, path: str) -> int:
        self._writable()
        self._drain()
        name = self._name(path)
        entry = self._entry(path)
        if entry.kind == "dir":
            raise _fail(errno.EISDIR)
        with self._lock:
            file = self._open.pop(name, None)
            if file is not None:
                file.unlinked = True  # its handles read on, nothing is committed
        try:
            with self.pool.client() as client:
                client.rm(name)
        except NotFound:
            pass  # never stored (made here, not closed yet), or removed by another client
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        self._remember(name, None)
        return 0

    def symlink(self, path: str, target: str) -> int:
        self._writable()
        name = self._name(path)
        data = os.fsencode(target)
        meta = {**self._owner_meta(LINK_MODE), META_TYPE: "symlink"}
        try:
            with self.pool.client() as client:
                made = client.put_bytes(data, name, time.time(), meta=meta)
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        self._remember(name, Entry.of_stat(made))
        return 0

    def readlink(self, path: str) -> str:
        name = self._name(path)
        try:
            with self.pool.client() as client:
                return os.fsdecode(client.get_bytes(name))
        except FmsError as exc:
            raise _fail(_error(exc)) from None

    def link(self, target: str, source: str) -> int:
        raise _fail(errno.EOPNOTSUPP)  # hard links: a name is one file

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise _fail(errno.EOPNOTSUPP)  # devices, FIFOs and sockets are not stored

    # --- FUSE: folders ---

    def mkdir(self, path: str, mode: int) -> int:
        self._writable()
        name = self._name(path)
        try:
            self._entry(path)
            raise _fail(errno.EEXIST)
        except mfusepy.FuseOSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        meta, now = self._owner_meta(mode), time.time()
        if self.committer is not None:  # the marker is committed with the files, after mkdir
            self._hand_marker(name + "/", meta, now)
        else:
            try:
                self._mkdir(name + "/", meta, now)
            except FmsError as exc:
                raise _fail(_error(exc)) from None
        with self._lock:
            self._listings[name + "/"] = Listing(
                {}, time.monotonic() + self.cache_time, True, own=True
            )
        return 0

    def rmdir(self, path: str) -> int:
        self._writable()
        if path.strip("/") == "":
            raise _fail(errno.EBUSY)
        self._drain()
        name = self._name(path)
        if self._entry(path).kind != "dir":
            raise _fail(errno.ENOTDIR)
        folder = name + "/"
        with self._lock:
            if any(n.startswith(folder) and not f.unlinked for n, f in self._open.items()):
                raise _fail(errno.ENOTEMPTY)
        try:
            if self._listing(folder, fresh=True).entries:
                raise _fail(errno.ENOTEMPTY)
            with self.pool.client() as client:
                client.call("rm", name=folder, commit=os.urandom(16).hex())
        except NotFound:
            pass  # a folder no marker kept: gone with its last name
        except FmsError as exc:
            raise _fail(_error(exc)) from None
        self._forget_under(folder)
        self._remember(name, None)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._writable()
        if flags & RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)  # exchanging two names is not supported
        self._drain()
        src, dst = self._name(old), self._name(new)
        entry = self._entry(old)
        try:
            target = self._entry(new)
        except mfusepy.FuseOSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            target = None
        if target is not None and flags & RENAME_NOREPLACE:
            raise _fail(errno.EEXIST)
        try:
            if entry.kind == "dir":
                self._rename_folder(src, dst, target)
            else:
                self._rename_file(src, dst, target)
        except FmsError as exc:
            raise _fail(errno.EXDEV if isinstance(exc, TooLarge) else _error(exc)) from None
        return 0

    def _rename_file(self, src: str, dst: str, target: Entry | None) -> None:
        if target is not None and target.kind == "dir":
            raise _fail(errno.EISDIR)
        with self._lock:
            file = self._open.get(src)
        if file is not None and file.changed:
            self._commit(file)  # written here and not yet stored: it moves as a version
        with self.pool.client() as client:
            made = client.mv(src, dst)
        with self._lock:
            file = self._open.pop(src, None)
            if file is not None:
                replaced = self._open.pop(dst, None)
                if replaced is not None:
                    replaced.unlinked = True
                file.name = dst
                self._open[dst] = file
            self._told.pop(src, None)
        self._remember(src, None)
        self._remember(dst, Entry.of_stat(made))

    def _rename_folder(self, src: str, dst: str, target: Entry | None) -> None:
        if target is not None and target.kind != "dir":
            raise _fail(errno.ENOTDIR)
        if (dst + "/").startswith(src + "/"):
            raise _fail(errno.EINVAL)  # into itself
        with self._lock:
            pending = [f for n, f in self._open.items() if n.startswith(src + "/") and f.changed]
        for file in pending:
            self._commit(file)  # stored first, so they move with the folder
        with self.pool.client() as client:
            client.mv_folder(src, dst)
        with self._lock:
            for name in [n for n in self._open if n.startswith(src + "/")]:
                file = self._open.pop(name)
                file.name = dst + name[len(src) :]
                self._open[file.name] = file
            self._told.clear()
        self._forget_under(src + "/")
        self._forget_under(dst + "/")
        self._remember(src, None)
        self._remember(dst, Entry("dir", 0, time.time(), time.time()))

    # --- FUSE: metadata ---

    def chmod(self, path: str, mode: int) -> int:
        self._writable()
        self._set(path, lambda f: f.meta.update({META_MODE: f"{mode & 0o7777:o}"}))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._writable()

        def change(f: Attributed) -> None:
            if uid != -1:
                f.meta[META_UID] = str(uid)
            if gid != -1:
                f.meta[META_GID] = str(gid)

        self._set(path, change)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        self._writable()
        mtime_ns = time.time_ns() if times is None else times[1]
        if mtime_ns == UTIME_OMIT:
            return 0
        mtime_ns = time.time_ns() if mtime_ns == UTIME_NOW else mtime_ns

        def change(f: Attributed) -> None:
            f.mtime = mtime_ns / 1e9
            if int(f.mtime * 1e9) == mtime_ns:
                f.meta.pop(META_MTIME_NS, None)  # the mtime says it exactly (whole seconds)
            else:
                f.meta[META_MTIME_NS] = str(mtime_ns)

        self._set(path, change)
        return 0

    def _set(self, path: str | None, change: MetaChange) -> None:
        """A metadata change: kept with the open file (committed with it), else committed."""
        if path is None:
            return  # a file removed while open: nothing of it is stored any more
        name = self._name(path) if path.strip("/") else None
        with self._lock:
            file = self._open.get(name) if name else None
        if file is not None:
            with file.lock:
                if not file.released:
                    change(file)
                    file.changed = True
                    return
            # Released since it was looked up: its commit is made or waits in the committer.
        if name is None:
            return  # the mount's root folder keeps no metadata
        if self.committer is not None and (
            self.committer.amend(name, change) or self.committer.amend(name + "/", change)
        ):
            return  # made to the version (or marker) waiting for its commit: sent with it
        self._change(path, change)

    # --- lifecycle ---

    def init_with_config(self, conn: Any, config: Any) -> None:
        configure(conn, config, self.cache_time)
        ready = getattr(self, "on_ready", None)
        if ready is not None:
            ready()

    def destroy(self, path: str | None) -> None:
        """Unmounted: what open files hold is committed (they were not closed: a courtesy)."""
        if self.committer is not None:
            self.committer.stop()
            self.committer = None
        with self._lock:
            files = list(self._open.values())
        for file in files:
            try:
                file.commit()
            except (FmsError, OSError) as exc:
                log.error("event=commit_lost name=%r error=%r", file.name, str(exc))
            file.close()
        self.pool.close()


def configure(conn: Any, config: Any, cache_time: float) -> None:
    """libfuse's settings for a mount, at its start (benchmarks/toyfs.py takes the same)."""
    if config is not None:
        config.entry_timeout = cache_time
        config.attr_timeout = cache_time
        config.negative_timeout = 0.0
        config.hard_remove = 1  # an unlinked open file is ours to keep, not renamed
        config.nullpath_ok = 1
        config.use_ino = 0
    if conn is not None:
        conn.max_write = p.MiB
        conn.max_readahead = p.MiB


class _MetaHolder:
    """A folder marker's metadata and mtime, changed as an open file's are."""

    def __init__(self, meta: dict[str, Any], mtime: float) -> None:
        self.meta, self.mtime = meta, mtime

    def truncate(self, size: int) -> None:
        raise _fail(errno.EISDIR)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class FmsFuse(mfusepy.FUSE):
    """mfusepy's FUSE with what it leaves out: rename's flags, the raw times of utimens
    (UTIME_NOW, UTIME_OMIT), and a folder's entries kept by the kernel (``cache_readdir``)."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.truncate(decoded, length, fip.contents if fip else None)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
        )

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            mtime = buf.contents.modtime
            if mtime.tv_nsec in (UTIME_NOW, UTIME_OMIT):
                times = (0, mtime.tv_nsec)
            else:
                times = (0, mtime.tv_sec * 10**9 + mtime.tv_nsec)
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.utimens(decoded, times)

    def opendir(self, path: bytes, fip: Any) -> int:
        decoded = path.decode(self.encoding, self.errors)
        fip.contents.fh = self.operations.opendir(decoded)
        if self.operations.dir_kept(decoded):
            fip.contents.keep_cache = 1
        fip.contents.cache_readdir = 1
        return 0
