"""``fms mount``: a store (or a folder of it) as a local folder, over FUSE, so that every
program reads and writes it: a broker client like the command line.

The file system is :mod:`.fs` (names, folders, caches, the FUSE calls), an open file's chunk
table, spool and commit are :mod:`.files`, the connections :mod:`.pool`.  What it does and does
not do, for a user, is docs/MOUNT.md.  It needs libfuse 3 (Debian's ``fuse3`` package) and mfusepy
(``pip install 'fms-store[mount]'``).
"""

import os
import select
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..errors import FmsError

DEFAULT_SPOOL_BYTES = 1 << 30  # written bytes waiting for their commit, all files together
READY_TIMEOUT = 30.0  # seconds `fms mount --daemon` waits for the mount to be up
FUSE_DEVICE = "/dev/fuse"
LOOP_ENDED = 8  # what fuse_main returns once its loop was ended by a signal


def default_spool() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fms", "spool")


def run(
    mountpoint: str,
    client_factory: Callable,
    *,
    prefix: str = "",
    read_only: bool = False,
    daemon: bool = False,
    allow_other: bool = False,
    cache_time: float = 1.0,
    spool: str | None = None,
    spool_bytes: int = DEFAULT_SPOOL_BYTES,
    chunk_size: int = 1 << 20,
    writeback: bool = False,
) -> int:
    """Mount the store ``client_factory()`` connects to on ``mountpoint`` and serve it until
    it is unmounted (``fusermount -u``, ``umount``, Ctrl-C or SIGTERM); with ``daemon``,
    return once it is mounted and serve from a process of its own.

    :raises FmsError: it cannot be mounted (what to do about it is said).
    """
    from .. import wire as p

    if not p.MIN_CHUNK_SIZE <= chunk_size <= p.MAX_CHUNK_SIZE:
        raise FmsError(
            f"the chunk size must be {p.MIN_CHUNK_SIZE} to {p.MAX_CHUNK_SIZE} bytes, "
            f"got {chunk_size}"
        )
    if not os.path.isdir(mountpoint):
        raise FmsError(f"{mountpoint} is not a folder; create it first (mkdir {mountpoint})")
    if not os.path.exists(FUSE_DEVICE):
        raise FmsError(
            f"{FUSE_DEVICE} is missing: this machine (or container) has no FUSE; load the fuse "
            f"module, or give the container the device"
        )
    fuse = _load_fuse()
    settings = {
        "prefix": prefix,
        "read_only": read_only,
        "allow_other": allow_other,
        "cache_time": cache_time,
        "spool": spool,
        "spool_bytes": spool_bytes,
        "chunk_size": chunk_size,
        "writeback": writeback,
    }
    if not daemon:
        return _serve(fuse, mountpoint, client_factory, settings, None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        return _wait_ready(read_end, pid)
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    status = 1
    try:
        status = _serve(fuse, mountpoint, client_factory, settings, write_end)
    except BaseException as exc:
        _tell(write_end, f"error:{exc}")
    finally:
        os._exit(status)


def _load_fuse() -> ModuleType:
    try:
        from . import fs
    except ModuleNotFoundError as exc:
        if exc.name != "mfusepy":
            raise
        from .. import install_hint

        raise FmsError(
            f"fms mount needs mfusepy, which is not installed: {install_hint('mount')}"
        ) from None
    except OSError as exc:  # mfusepy found no libfuse
        raise FmsError(
            f"fms mount needs libfuse 3 ({exc}); install it (Debian and Ubuntu: the fuse3 package)"
        ) from None
    return fs


def _serve(
    fs: ModuleType,
    mountpoint: str,
    client_factory: Callable[[], Any],
    settings: dict[str, Any],
    ready_fd: int | None,
) -> int:
    from .files import Spool
    from .pool import ClientPool

    pool = ClientPool(client_factory)
    try:
        with pool.client() as client:
            client.call("status")  # the broker answers: say so now, not at the first ls
            who = client.whoami()
        may_read, may_write = access_under(who, settings["prefix"])
        if not may_read:
            shown = settings["prefix"].strip("/")
            raise FmsError(
                f"{who['identity']!r} may read nothing "
                f"{f'under {shown!r}' if shown else 'in this store'}: its grants are "
                f"{_grants_shown(who)}; ask an admin for one (fms grant {who['identity']} read "
                f"{shown or 'PREFIX'}), or mount a folder it may read (--prefix)"
            )
    except FmsError as exc:
        pool.close()
        if ready_fd is not None:
            _tell(ready_fd, f"error:{exc}")
            return 1
        raise
    read_only = settings["read_only"]
    if not read_only and not may_write:
        read_only = True  # a read-only grant gives a read-only mount: EROFS, not EACCES later
        print(
            f"fms mount: {who['identity']!r} may only read here ({_grants_shown(who)}): "
            f"mounted read-only",
            file=sys.stderr,
        )
    ops = fs.FmsMount(
        pool,
        settings["prefix"],
        Spool(settings["spool"] or default_spool(), settings["spool_bytes"]),
        settings["chunk_size"],
        read_only=read_only,
        cache_time=settings["cache_time"],
        writeback=settings["writeback"],
    )
    if ready_fd is not None:
        ops.on_ready = lambda: _tell(ready_fd, "ready")
    try:
        fs.FmsFuse(ops, mountpoint, **fuse_options(settings["allow_other"], read_only))
    except RuntimeError as exc:
        if exc.args == (LOOP_ENDED,):
            return 0  # served, then stopped by a signal (Ctrl-C, SIGTERM)
        raise FmsError(
            f"could not mount on {mountpoint} (libfuse said {exc}); is something mounted "
            f"there already? (unmount it with: fusermount3 -u {mountpoint})"
        ) from None
    return 0


def fuse_options(allow_other: bool = False, read_only: bool = False) -> dict[str, Any]:
    """The options the mount hands libfuse (benchmarks/toyfs.py mounts with the same)."""
    options: dict[str, Any] = {
        "raw_fi": True,
        "foreground": True,
        "fsname": "fms",
        "subtype": "fms",
        "default_permissions": True,  # the kernel checks the mode bits
        "auto_unmount": True,  # a mount whose process died is removed, not left broken
    }
    if allow_other:
        options["allow_other"] = True
    if read_only:
        options["ro"] = True
    return options


def access_under(whoami: dict, prefix: str) -> tuple[bool, bool]:
    """Whether the identity ``whoami`` describes (:meth:`fms.Client.whoami`) may read, and may
    write, anything under the folder ``prefix`` ("" : the whole store): a grant on the folder, on
    a folder above it or on one inside it."""
    from .. import policy

    folder = policy.normalise_prefix(prefix.strip("/"))
    roles = [
        g["role"]
        for g in whoami["grants"]
        if policy.covers(g["prefix"], folder) or policy.covers(folder, g["prefix"])
    ]
    return bool(roles), any(role in (policy.WRITE, policy.ADMIN) for role in roles)


def _grants_shown(whoami: dict) -> str:
    grants = [
        f"{g['role']} on {repr(g['prefix']) if g['prefix'] else 'the whole store'}"
        for g in whoami["grants"]
    ]
    return ", ".join(grants) or "none"


def _tell(fd: int, what: str) -> None:
    try:
        os.write(fd, what.encode("utf-8", "replace") + b"\n")
        os.close(fd)
    except OSError:
        pass


def _wait_ready(fd: int, pid: int) -> int:
    """The parent of ``--daemon``: 0 once the child says the mount is up, else its error."""
    ready, _, _ = select.select([fd], [], [], READY_TIMEOUT)
    said = os.read(fd, 65536).decode("utf-8", "replace").strip() if ready else ""
    os.close(fd)
    if said == "ready":
        return 0
    if said.startswith("error:"):
        raise FmsError(said[len("error:") :])
    if not ready:
        raise FmsError(f"the mount did not come up within {READY_TIMEOUT:.0f} s (process {pid})")
    _pid, status = os.waitpid(pid, 0)
    print(f"the mount process ended (status {status}) before the mount was up", file=sys.stderr)
    return 1
