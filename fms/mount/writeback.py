"""``--writeback``: small files committed after ``close`` returns, in the background.

With it, ``close`` of a small file (one chunk of at most 128 KiB) hands the file's content to
this committer and returns at once; the committer sends the versions it holds many to a
``commit_many`` message (one transaction each), a few messages in flight, so a program that
writes many small files (``tar -x``, ``git checkout``, ``cp -r``) waits for no round trip per
file. ``mkdir`` hands its folder's marker over too. A change of mode, owner or mtime of a file
or folder still waiting is made to the waiting version (one commit, not two, and no wait). The
price, as with JuiceFS's ``--writeback``: a commit that fails after its ``close`` returned is
logged, not reported to the program, and a mount process killed before its committer drained
loses those files. ``fsync``, ``open`` of such a file, a truncate of it, every change of a name,
and unmounting wait until the committer holds nothing.
"""

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import wire as p
from ..errors import FmsError
from .pool import ClientPool

if TYPE_CHECKING:
    from .fs import Entry

log = logging.getLogger("fms.mount")

WINDOW = 4  # commit_many messages in flight
BATCH = 1024  # versions taken from the queue at once
BATCH_FILES = 128  # versions in one commit_many (at most MAX_BATCH_FILES)


@dataclass
class Pending:
    """A small file's version (or a folder's marker: a name ending in ``/``, no content)
    waiting for its commit."""

    name: str
    content: bytes
    chunk_size: int
    meta: dict
    mtime: float
    entry: "Entry"  # what the mount shows for the name until the commit lands
    sent: bool = False  # taken by the committer: changed no more


class Committer:
    """One thread committing what :meth:`put` hands it, in order: a name's later version
    replaces an earlier one still waiting, and a batch lands whole before the next is sent."""

    def __init__(self, pool: ClientPool):
        self.pool = pool
        self.pending: dict[str, Pending] = {}  # name -> its newest version waiting
        self.failed = 0
        self._queue: list[Pending] = []
        self._busy = False
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="fms-writeback", daemon=True)
        self._thread.start()

    def put(self, item: Pending) -> None:
        with self._cond:
            self._queue.append(item)
            self.pending[item.name] = item
            self._cond.notify_all()

    def amend(self, name: str, change: "Callable[[Pending], None]") -> bool:
        """Apply the metadata ``change`` (mode, owner, mtime) to ``name``'s version still
        waiting, so it is committed with it; the entry shown follows.  :return: whether one was
        waiting (False: none, or it is being sent: the caller commits the change itself)."""
        with self._cond:
            item = self.pending.get(name)
            if item is None or item.sent:
                return False
            change(item)
            item.entry.meta, item.entry.mtime = item.meta, item.mtime
            return True

    def entry(self, name: str) -> "Entry | None":
        with self._cond:
            item = self.pending.get(name)
        return None if item is None else item.entry

    def under(self, folder: str) -> "dict[str, Entry]":
        """The waiting names (files, and folders' markers) directly in ``folder``: base name ->
        entry."""
        out = {}
        with self._cond:
            for name, item in self.pending.items():
                if name.startswith(folder):
                    base = name[len(folder) :].removesuffix("/")
                    if base and "/" not in base:
                        out[base] = item.entry
        return out

    def drain(self) -> None:
        """Wait until every version handed over is committed (or failed, and logged)."""
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()

    def stop(self) -> None:
        self.drain()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop and not self._queue:
                    return
                batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
                for item in batch:
                    item.sent = True
                self._busy = True
            latest = {item.name: item for item in batch}  # later versions of a name win
            try:
                self._send(list(latest.values()))
            finally:
                with self._cond:
                    for name, item in latest.items():
                        if self.pending.get(name) is item:
                            del self.pending[name]
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, items: list[Pending]) -> None:
        """Commit ``items``, many to a ``commit_many`` message (one transaction each), a few
        messages in flight; each file that fails is logged."""
        hash_fn = self.pool.hasher()
        try:
            with self.pool.client() as client:
                replies = client.session.pipeline(_batches(items, hash_fn), WINDOW, errors=True)
                for batch, header, _ in replies:
                    results = header.get("results") or [header] * len(batch)
                    for item, result in zip(batch, results, strict=False):
                        if not result.get("ok"):
                            self.failed += 1
                            log.error(
                                "event=writeback_failed name=%r error=%s message=%r",
                                item.name,
                                result.get("error"),
                                result.get("message"),
                            )
        except FmsError as exc:
            self.failed += len(items)
            log.error("event=writeback_failed files=%d error=%r", len(items), str(exc))


def _batches(
    items: list[Pending], hash_fn: p.Hasher
) -> Iterator[tuple[list[Pending], str, dict, bytearray | None]]:
    """``commit_many`` requests of ``items``, in order: each of one chunk size and one
    metadata map, at most :data:`BATCH_FILES` files and ``MAX_BATCH_BYTES`` of content."""
    batch: list[Pending] = []
    size = 0
    for item in [*items, None]:
        if item is not None and item.name.endswith("/"):  # a folder's marker: a commit
            fields: dict = {
                "name": item.name,
                "extents": b"",
                "chunks": [],
                "digest": p.inline_digest((), [], hash_fn),
                "mtime": item.mtime,
                "commit": os.urandom(16).hex(),
                "meta": item.meta,
            }
            yield [item], "commit", fields, None
            continue
        if batch and (
            item is None
            or len(batch) == BATCH_FILES
            or item.chunk_size != batch[0].chunk_size
            or item.meta != batch[0].meta  # a message's files share its metadata
            or size + len(item.content) > p.MAX_BATCH_BYTES
        ):
            fields = {
                "names": [i.name for i in batch],
                "sizes": [len(i.content) for i in batch],
                "hashes": [hash_fn(i.content) for i in batch],
                "mtimes": [i.mtime for i in batch],
                "commits": [os.urandom(16).hex() for _ in batch],
                "chunk_size": batch[0].chunk_size,
                "meta": batch[0].meta,
            }
            yield batch, "commit_many", fields, p.pack_data(b"".join(i.content for i in batch))
            batch, size = [], 0
        if item is not None:
            batch.append(item)
            size += len(item.content)
