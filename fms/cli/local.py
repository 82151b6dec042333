"""The local side of the commands: what ``put`` reads (files, folder trees, streams) and where
``get``, ``get -r`` and ``sync`` write, each checked before anything moves, so that a bad path
is one clear error and nothing half done."""

import io
import os
import stat
from collections.abc import Callable
from typing import Literal

from ..errors import FmsError

STDIN = "-"


class Stream:
    """A source read as a stream, to its end: stdin (``-``), a pipe, a FIFO or a device."""

    def __init__(self, path: str) -> None:
        self.path = path

    def open(self) -> io.FileIO:
        """The unbuffered binary stream to read."""
        if self.path == STDIN:
            return os.fdopen(os.dup(0), "rb", buffering=0)
        try:
            return open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise FmsError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def __repr__(self) -> str:
        return f"Stream({self.path!r})"


def source(path: str, recursive: bool) -> Literal["file", "folder"] | Stream:
    """What ``put`` reads at ``path``: ``"file"``, ``"folder"`` or a :class:`Stream`.

    :raises FmsError: nothing there, a broken link, a socket, a folder without ``-r``, or a
        path that cannot be read.
    """
    if path == STDIN:
        return Stream(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise FmsError(f"{path} is a broken symbolic link (to {os.readlink(path)})") from None
        raise FmsError(f"no such file: {path}") from None
    except OSError as exc:
        raise FmsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        if not recursive:
            raise FmsError(f"{path} is a folder; upload it with: put -r {path}")
        return "folder"
    if stat.S_ISREG(mode):
        if not os.access(path, os.R_OK):
            raise FmsError(f"cannot read {path}: Permission denied")
        return "file"
    if stat.S_ISSOCK(mode):
        raise FmsError(f"{path} is a socket: there is nothing to read from it")
    return Stream(path)  # a FIFO or a device: read to its end, as cp does


def tree(
    folder: str,
    prefix: str | None,
    wanted: Callable[[str], bool] | None = None,
    allow_empty: bool = False,
) -> list[tuple[str, str]]:
    """``(path, name)`` of every regular file under ``folder``, named ``prefix/<relative
    path>`` (``prefix`` None: the folder's base name), in name order; ``wanted(relative
    path)``: a filter (:func:`fms.cli.filters.selector`).  Links to files are followed, links
    to folders are not (as ``cp -r`` and rclone do); FIFOs, sockets and devices in a tree are
    left out.

    :raises FmsError: ``folder`` is not a folder, a folder in it cannot be read, or (unless
        ``allow_empty``) there is no file to take.
    """
    if not os.path.isdir(folder):
        raise FmsError(f"{folder} is not a folder")
    if prefix is None:
        prefix = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    prefix = prefix.strip("/")

    def unreadable(exc: OSError) -> None:
        raise FmsError(
            f"cannot read the folder {exc.filename}: {exc.strerror}; nothing was sent"
        ) from None

    items: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for fname in sorted(files):
            path = os.path.join(root, fname)
            if not os.path.isfile(path):
                continue  # sockets, fifos, broken links
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if wanted is not None and not wanted(rel):
                continue
            items.append((path, f"{prefix}/{rel}" if prefix else rel))
    if not items and not allow_empty:
        raise FmsError(
            f"no files under {folder}" + (" that the filters let through" if wanted else "")
        )
    return items


def inside(folder: str, rel: str) -> str:
    """``folder/rel``, refusing anything that would land outside ``folder``."""
    base = os.path.abspath(folder)
    path = os.path.normpath(os.path.join(base, rel))
    if not path.startswith(base.rstrip(os.sep) + os.sep):
        raise FmsError(f"refusing to write {rel!r} outside {folder}")
    return path


def _name_max(folder: str) -> int:
    """The longest file name (bytes) the file system under ``folder`` takes."""
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_tree(items: list[tuple[str, str]], action: str = "downloaded") -> None:
    """Refuse, before anything is written, a download tree ``[(name, dest path)]`` in which
    a path would be both a file and a folder (stored names like ``a`` and ``a/b``, or a local
    folder (file) where a file (folder) is to go), or a part of a path is longer than the
    file system takes."""
    nothing = f"nothing was {action}"
    dests = {dest for _name, dest in items}
    name_max = _name_max(os.path.dirname(items[0][1])) if items else 255
    for name, dest in items:
        for part in dest.split(os.sep):
            if len(os.fsencode(part)) > name_max:
                raise FmsError(
                    f"{name!r} cannot be written here: its part {part[:40]!r}... is "
                    f"{len(os.fsencode(part))} bytes, longer than the {name_max} this file system "
                    f"takes; fetch it alone under a shorter name (get NAME DEST); {nothing}"
                )
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise FmsError(
                f"{dest} is a folder, so {name!r} cannot be written there; move it "
                f"away or choose another destination; {nothing}"
            )
    folders: dict[str, str] = {}  # folder -> the first name under it
    for name, dest in items:
        folder = os.path.dirname(dest)
        while folder not in folders:
            folders[folder] = name
            folder = os.path.dirname(folder)
    for folder, name in folders.items():
        if folder in dests:
            clash = next(n for n, d in items if d == folder)
            raise FmsError(
                f"{clash!r} and {name!r} are both stored: {clash!r} would be a file "
                f"and a folder at once; fetch them one by one (get NAME DEST); {nothing}"
            )
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise FmsError(
                f"{folder} is a file, so {name!r} cannot be written under it; "
                f"move it away or choose another destination; {nothing}"
            )


def file_dest(dest: str | None, name: str) -> str:
    """Where ``get NAME [DEST]`` writes, as ``cp`` decides it: into a folder under the base
    name; a folder that does not exist is an error (``cp`` does not make it either)."""
    base = os.path.basename(name)
    if dest is None:
        return base
    if os.path.isdir(dest):
        return os.path.join(dest, base)
    folder = os.path.dirname(dest) if not dest.endswith("/") else dest
    if folder and not os.path.isdir(folder):
        raise FmsError(
            f"no folder {folder}: create it first (mkdir -p {folder}), or name another destination"
        )
    return dest


def clobbers(path: str) -> bool:
    """Whether writing ``path`` would replace a file that is there (``--no-clobber`` skips
    it); writing into a device or a FIFO replaces nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return os.path.islink(path)  # a broken link: cp -n leaves it too
    return stat.S_ISREG(mode)
