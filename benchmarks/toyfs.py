"""The floor of a Python FUSE file system here: files in memory (a dict of paths to
bytearrays), no store behind them, served through mfusepy with the FUSE options, the timeouts
and the call wrappers ``fms mount`` uses.  benchmarks/mount.py times it beside the mount: no
Python mount on mfusepy can be faster than this one on the same machine.

    python -m benchmarks.toyfs MOUNTPOINT [--cache-time 1]

It serves in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``).
"""

import argparse
import errno
import stat
import sys
import threading
import time
from typing import Any

import mfusepy

from fms.mount import fuse_options
from fms.mount.fs import UTIME_NOW, UTIME_OMIT, FmsFuse, configure


def _fail(code: int) -> Exception:
    return mfusepy.FuseOSError(code)


class ToyFs(mfusepy.Operations):
    """Folders and files in dicts; a file's bytes in a bytearray; attributes in a dict."""

    use_ns = True

    def __init__(self, cache_time: float) -> None:
        self.cache_time = cache_time
        self.mutex = threading.Lock()  # not `lock`: that name is a FUSE call
        now = time.time_ns()
        self.attrs: dict[str, dict[str, int]] = {"/": self._attrs(stat.S_IFDIR | 0o755, now)}
        self.data: dict[str, bytearray] = {}
        self.handles: dict[int, str] = {}
        self.next_fh = 1

    @staticmethod
    def _attrs(mode: int, now: int) -> dict[str, int]:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return {
            "st_mode": mode,
            "st_nlink": 2 if stat.S_ISDIR(mode) else 1,
            "st_size": 0,
            "st_mtime": now,
            "st_atime": now,
            "st_ctime": now,
            "st_uid": uid,
            "st_gid": gid,
        }

    def _get(self, path: str) -> dict[str, int]:
        found = self.attrs.get(path)
        if found is None:
            raise _fail(errno.ENOENT)
        return found

    def init_with_config(self, conn: Any, config: Any) -> None:
        configure(conn, config, self.cache_time)

    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        if path is None:
            path = self.handles[fh.fh]
        attrs = dict(self._get(path))
        if path in self.data:
            attrs["st_size"] = len(self.data[path])
        return attrs

    def readdir(self, path: str | None, fh: int) -> list[str]:
        base = (self.handles[fh] if path is None else path).rstrip("/") + "/"
        names = [p[len(base) :] for p in self.attrs if p != base and p.startswith(base)]
        return [".", "..", *(n for n in names if "/" not in n)]

    def mkdir(self, path: str, mode: int) -> int:
        self.attrs[path] = self._attrs(stat.S_IFDIR | mode, time.time_ns())
        return 0

    def rmdir(self, path: str) -> int:
        if len(self.readdir(path, 0)) > 2:
            raise _fail(errno.ENOTEMPTY)
        del self.attrs[path]
        return 0

    def create(self, path: str, mode: int, fi: Any) -> int:
        with self.mutex:
            self.attrs[path] = self._attrs(stat.S_IFREG | mode, time.time_ns())
            self.data[path] = bytearray()
            fi.fh, self.next_fh = self.next_fh, self.next_fh + 1
            self.handles[fi.fh] = path
        return 0

    def open(self, path: str, fi: Any) -> int:
        self._get(path)
        with self.mutex:
            fi.fh, self.next_fh = self.next_fh, self.next_fh + 1
            self.handles[fi.fh] = path
        return 0

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        return bytes(self.data[self.handles[fi.fh]][offset : offset + size])

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        content = self.data[self.handles[fi.fh]]
        if offset > len(content):
            content.extend(bytes(offset - len(content)))
        content[offset : offset + len(data)] = data
        return len(data)

    def truncate(self, path: str | None, length: int, fi: Any = None) -> int:
        content = self.data[self.handles[fi.fh] if fi is not None else path or ""]
        del content[length:]
        content.extend(bytes(length - len(content)))
        return 0

    def flush(self, path: str | None, fi: Any) -> int:
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        with self.mutex:
            self.handles.pop(fi.fh, None)
        return 0

    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        return 0

    def unlink(self, path: str) -> int:
        self._get(path)
        del self.attrs[path]
        self.data.pop(path, None)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        moved = [p for p in self.attrs if p == old or p.startswith(old + "/")]
        for p in moved:
            self.attrs[new + p[len(old) :]] = self.attrs.pop(p)
            if p in self.data:
                self.data[new + p[len(old) :]] = self.data.pop(p)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        attrs = self._get(path)
        attrs["st_mode"] = stat.S_IFMT(attrs["st_mode"]) | (mode & 0o7777)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        attrs = self._get(path)
        if uid != -1:
            attrs["st_uid"] = uid
        if gid != -1:
            attrs["st_gid"] = gid
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        mtime = time.time_ns() if times is None or times[1] == UTIME_NOW else times[1]
        if mtime != UTIME_OMIT and path is not None:
            self._get(path)["st_mtime"] = mtime
        return 0

    def opendir(self, path: str) -> int:
        with self.mutex:
            fh, self.next_fh = self.next_fh, self.next_fh + 1
            self.handles[fh] = path
        return fh

    def releasedir(self, path: str | None, fh: int) -> int:
        with self.mutex:
            self.handles.pop(fh, None)
        return 0

    def dir_kept(self, path: str) -> bool:
        return False

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 20, "f_bfree": 1 << 20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--cache-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        FmsFuse(ToyFs(args.cache_time), args.mountpoint, **fuse_options())
    except RuntimeError as exc:
        if exc.args != (8,):  # ended by a signal
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
