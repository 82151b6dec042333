"""Storage's CPU per small commit, in one process: what a storage worker does for the commit of
a 4 KiB object as fms's S3 gateway sends it (one ``commit`` with its content inline), by the
size of the group committed in one transaction.

    .venv/bin/python -m benchmarks.commitcpu [--groups 1,2,4] [--commits 3000] [--two]
        [--statements]

The commits go through the worker's own path (:func:`fms.worker._dispatch` of the broker's
frames, :class:`~fms.storage.service.StorageService`, its group commit at
:meth:`~fms.storage.service.StorageService.flush`, and each reply encoded as
:class:`~fms.worker.BrokerLink` encodes it, not sent) over a SQLite store in a scratch
directory, ``synchronous=FULL`` as fms runs it.  Reported per group size: CPU ms per commit
(the thread's CPU time, the kernel's share of the fsync included), wall ms per commit, and the
WAL frames (pages) a commit writes; ``--statements``: the CPU of each SQL statement per commit;
``--two``: two workers' stores on the one file take turns, as fms up's two storage workers do.
No ZeroMQ socket, no broker: a floor under what a worker costs in a cluster, where the same
work runs among other processes (``benchmarks.profile_s3small --op put`` measures that).
"""

import argparse
import collections
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from fms import wire as p
from fms import worker
from fms.client import upload
from fms.storage.engine import Store, open_local
from fms.storage.meta import sqlite
from fms.storage.service import StorageService
from fms.worker import reply_frames

WARM = 200  # commits made before the timing starts (tables and caches warm)
log = logging.getLogger("benchmarks.commitcpu")


class EncodingLink:
    """Encodes every reply as :meth:`fms.worker.BrokerLink.reply` does
    (:func:`fms.worker.reply_frames`), sends nothing; counts them and the refusals."""

    def __init__(self) -> None:
        self.replies = 0
        self.refused: list[dict[str, Any]] = []

    def reply(self, route: dict[str, Any], header: dict[str, Any], *args, **kwargs) -> None:
        if not header.get("ok"):
            self.refused.append(header)
        reply_frames(route, header, *args, **kwargs)
        self.replies += 1


def messages(count: int, digest_fn: str, start: int = 0) -> list[list[bytes]]:
    """The broker's frames of ``count`` commits of distinct 4 KiB objects, content inline."""
    hash_fn = p.hasher(digest_fn)
    out = []
    for i in range(start, start + count):
        data = os.urandom(4096)
        plan = upload.plan_bytes(data, 1 << 20, None, hash_fn)
        plan.meta = {"etag": hashlib.md5(data).hexdigest()}
        fields = upload._commit_fields(f"bucket/object-{i:07d}", plan)
        header = {"v": p.PROTOCOL_VERSION, "id": i, "op": "commit", **fields}
        route = {"t": "req", "k": i, "ttl": 60_000}
        out.append([p.encode(route), p.encode(header), bytes(p.pack_data(plan.content()))])
    return out


def commit_all(
    services: Sequence[StorageService], link: EncodingLink, frames: list[list[bytes]], group: int
) -> None:
    """Hand the commits to the services ``group`` at a time (one drain each), the services
    taking turns, and flush after each group (what the worker does after a drain)."""
    for turn, first in enumerate(range(0, len(frames), group)):
        service = services[turn % len(services)]
        for message in frames[first : first + group]:
            worker._dispatch(service, link, [zmq.Frame(f) for f in message], log)  # type: ignore[arg-type]
        service.flush()


def wal_frames(path: str) -> int:
    try:
        return max(0, (os.path.getsize(path + "-wal") - 32) // (24 + 4096))
    except OSError:
        return 0


def measure(
    group: int, commits: int, two: bool, statements: bool, count_frames: bool = False
) -> dict[str, Any]:
    """One group size on a fresh store: CPU and wall ms per commit and, with ``statements``,
    {statement: CPU µs per commit}; with ``count_frames``, the WAL frames per commit (the WAL
    is then never checkpointed, so the times are not what fms pays: a pass of its own)."""
    scratch = tempfile.mkdtemp(prefix="fms-commitcpu-")
    stores: list[Store] = []
    spent: collections.Counter[str] = collections.Counter()
    plain = sqlite.SQLiteMeta._execute
    try:
        data = os.path.join(scratch, "data")
        stores = [open_local(data) for _ in range(2 if two else 1)]
        for store in stores if count_frames else ():  # the WAL grows: its frames are counted
            store.meta.db.execute("PRAGMA wal_autocheckpoint=0")  # type: ignore[attr-defined]
        link = EncodingLink()
        services = [StorageService(store, link) for store in stores]
        digest_fn = stores[0].digest_fn
        commit_all(services, link, messages(WARM, digest_fn), group)
        timed = messages(commits, digest_fn, WARM)
        if statements:
            sqlite.SQLiteMeta._execute = _timing(plain, spent)  # type: ignore[method-assign]
        before = wal_frames(os.path.join(data, "meta.db"))
        cpu, wall = time.thread_time(), time.perf_counter()
        commit_all(services, link, timed, group)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        frames = wal_frames(os.path.join(data, "meta.db")) - before
        if link.refused:
            raise SystemExit(f"a commit was refused: {link.refused[0]}")
        return {
            "group": group,
            "cpu_ms": cpu * 1000 / commits,
            "wall_ms": wall * 1000 / commits,
            "wal_frames": frames / commits,
            "statements": {k: v * 1e6 / commits for k, v in spent.most_common()},
        }
    finally:
        sqlite.SQLiteMeta._execute = plain  # type: ignore[method-assign]
        for store in stores:
            store.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _timing(plain: Callable[..., Any], spent: collections.Counter[str]) -> Callable[..., Any]:
    def execute(self: sqlite.SQLiteMeta, sql: str, args: Sequence[object] = ()) -> Any:
        start = time.thread_time()
        try:
            return plain(self, sql, args)
        finally:
            spent[" ".join(sql.split())[:60]] += time.thread_time() - start

    return execute


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="1,2,4", help="group sizes, comma separated")
    ap.add_argument("--commits", type=int, default=3000, help="commits timed per group size")
    ap.add_argument("--two", action="store_true", help="two stores on one file, taking turns")
    ap.add_argument("--statements", action="store_true", help="CPU per SQL statement")
    args = ap.parse_args(argv)
    print(f"4 KiB commits, content inline, {args.commits} per group size; load {_load()}")
    print("group  CPU ms/commit  wall ms/commit  WAL frames/commit")
    for group in [int(g) for g in args.groups.split(",")]:
        r = measure(group, args.commits, args.two, args.statements)
        frames = measure(group, min(args.commits, 1000), args.two, False, True)["wal_frames"]
        print(f"{group:5d}  {r['cpu_ms']:13.3f}  {r['wall_ms']:14.3f}  {frames:17.1f}")
        for sql, us in r["statements"].items():
            print(f"       {us:7.1f} µs  {sql}")
    return 0


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    raise SystemExit(main())
