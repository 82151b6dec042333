"""``--writeback``: small files committed after ``close`` returns, in the background.

With it, ``close`` of a small file (one chunk of at most 128 KiB) hands the file's content to
this committer and returns at once; the committer sends the commits it holds pipelined (many in
flight: storage applies those that arrive back to back in one transaction), so a program that
writes many small files (``tar -x``, ``git checkout``, ``cp -r``) waits for no round trip per
file.  The price, as with JuiceFS's ``--writeback``: a commit that fails after its ``close``
returned is logged, not reported to the program, and a mount process killed before its
committer drained loses those files.  ``fsync``, ``open`` of such a file, every change of its
name, and unmounting wait until the committer holds nothing.
"""

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import wire as p
from ..errors import FmsError
from .pool import ClientPool

if TYPE_CHECKING:
    from .fs import Entry

log = logging.getLogger("fms.mount")

WINDOW = 32  # commits in flight
BATCH = 256  # commits taken from the queue at once


@dataclass
class Pending:
    """A small file's version waiting for its commit."""

    name: str
    content: bytes
    chunk_size: int
    meta: dict
    mtime: float
    entry: "Entry"  # what the mount shows for the name until the commit lands

    def fields(self, hash_fn: p.Hasher) -> dict:
        """The commit's fields, its digests made with ``hash_fn`` (the store's function)."""
        extents = ((self.chunk_size, len(self.content)),) if self.content else ()
        chunks = [hash_fn(self.content)] if self.content else []
        fields = {
            "name": self.name,
            "extents": p.pack_extents(extents),
            "chunks": chunks,
            "digest": p.inline_digest(extents, chunks, hash_fn),
            "mtime": self.mtime,
            "commit": os.urandom(16).hex(),
        }
        if self.meta:
            fields["meta"] = self.meta
        return fields


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

    def entry(self, name: str) -> "Entry | None":
        with self._cond:
            item = self.pending.get(name)
        return None if item is None else item.entry

    def under(self, folder: str) -> "dict[str, Entry]":
        """The waiting names directly in ``folder``: base name -> entry."""
        with self._cond:
            return {
                n[len(folder) :]: i.entry
                for n, i in self.pending.items()
                if n.startswith(folder) and "/" not in n[len(folder) :]
            }

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

    def _send(self, items: list) -> None:
        hash_fn = self.pool.hasher()
        requests = [
            (
                item,
                "commit",
                item.fields(hash_fn),
                p.pack_data(item.content) if item.content else None,
            )
            for item in items
        ]
        try:
            with self.pool.client() as client:
                for item, header, _ in client.session.pipeline(requests, WINDOW, errors=True):
                    if not header.get("ok"):
                        self.failed += 1
                        log.error(
                            "event=writeback_failed name=%r error=%s message=%r",
                            item.name,
                            header.get("error"),
                            header.get("message"),
                        )
        except FmsError as exc:
            self.failed += len(items)
            log.error("event=writeback_failed files=%d error=%r", len(items), str(exc))
