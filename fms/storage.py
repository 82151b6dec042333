"""The storage service: answers storage ops (and the cache's ops when no cache is alive).

Handlers take decoded messages and answer through ``link``; the loop is in :mod:`fms.worker`.
"""

import logging
import time

from . import protocol as p
from .errors import BadRequest, TooLarge
from .store import Store

LS_PAGE_MAX = 5000   # manifests per ls reply, so a reply stays far below MAX_FRAME_SIZE
CLEAN_INTERVAL = 60.0  # seconds between sweeps of temp files left by dead writers

log = logging.getLogger("fms.storage")


def summary(manifest: dict) -> dict:
    """A manifest without its chunk list: what ls and stat return."""
    return {
        "name": manifest["name"], "size": manifest["size"], "sha256": manifest["sha256"],
        "mtime": manifest["mtime"], "version": manifest["version"],
        "chunk_size": manifest["chunk_size"], "chunks": len(manifest["chunks"]),
        "committed": manifest.get("committed"),
    }


class StorageService:
    """Storage handlers over a :class:`~fms.store.Store`.

    :param store: the store.
    :param link: where replies go (a :class:`~fms.worker.BrokerLink` or a test recorder).
    :param delay: seconds to wait before handling each request; only for tests that need work
        in flight at a chosen moment (cache fills across a write, a kill mid-upload).
    """

    def __init__(self, store: Store, link, delay: float = 0.0):
        self.store = store
        self.link = link
        self.delay = delay
        self.served = 0
        self._next_clean = 0.0
        self._handlers = {
            "get": self.op_get, "chunk": self.op_chunk, "have": self.op_have,
            "put_chunk": self.op_put_chunk, "commit": self.op_commit, "ls": self.op_ls,
            "stat": self.op_stat, "rm": self.op_rm, "usage": self.op_usage,
        }

    def handle_request(self, route: dict, header: dict, data):
        op = header.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            raise BadRequest(f"storage does not serve op {op!r}")
        if header.get("v") != p.PROTOCOL_VERSION:
            raise BadRequest(f"protocol version {header.get('v')!r} not supported; "
                             f"this worker speaks {p.PROTOCOL_VERSION}")
        self.served += 1
        log.debug("event=request op=%s id=%r", op, header.get("id"))
        if self.delay:
            time.sleep(self.delay)
        handler(route, header, data)

    def handle_reply(self, header, data):
        log.warning("event=unexpected_reply id=%r", header.get("id"))

    def on_register(self):
        pass

    def on_invalidate(self, name):
        pass

    def tick(self, now):
        if now >= self._next_clean:
            self._next_clean = now + CLEAN_INTERVAL
            removed = self.store.clean_tmp()
            if removed:
                log.info("event=temp_files_removed count=%d", removed)

    # --- read ops (also what the cache forwards on a miss) ---

    def op_get(self, route, header, data):
        manifest = self.store.get_manifest(p.need(header, "name", str))
        frame = None
        if manifest["size"] <= p.INLINE_MAX and len(manifest["chunks"]) == 1:
            frame = self.store.read_chunk(manifest["chunks"][0])
        self.link.reply(route, p.ok_reply(header["id"], manifest=manifest), frame)

    def op_chunk(self, route, header, data):
        frame = self.store.read_chunk(p.need_hash(header, "hash"))
        self.link.reply(route, p.ok_reply(header["id"]), frame)

    def op_stat(self, route, header, data):
        manifest = self.store.get_manifest(p.need(header, "name", str))
        self.link.reply(route, p.ok_reply(header["id"], stat=summary(manifest)))

    def op_ls(self, route, header, data):
        prefix = p.check_prefix(p.need(header, "prefix", str, optional=True, default=""))
        after = p.need(header, "after", str, optional=True, default="")
        limit = p.need_int(header, "limit", lo=1, hi=LS_PAGE_MAX, optional=True,
                           default=LS_PAGE_MAX)
        entries = [summary(m) for m in self.store.list(prefix) if m["name"] > after]
        page = entries[:limit]
        self.link.reply(route, p.ok_reply(header["id"], entries=page,
                                          more=len(entries) > limit))

    def op_usage(self, route, header, data):
        self.link.reply(route, p.ok_reply(header["id"], store=self.store.usage()))

    # --- write ops ---

    def op_have(self, route, header, data):
        hashes = p.need_hashes(header, "hashes", p.MAX_HAVE_BATCH)
        self.link.reply(route, p.ok_reply(header["id"], missing=self.store.missing(hashes)))

    def op_put_chunk(self, route, header, data):
        digest = p.need_hash(header, "hash")
        if data is None:
            raise BadRequest("put_chunk needs a data frame")
        payload = p.unpack_data(data.buffer)
        if len(payload) > p.MAX_CHUNK_SIZE:
            raise TooLarge(f"chunk of {len(payload)} bytes; chunks are at most {p.MAX_CHUNK_SIZE}")
        written = self.store.put_chunk(digest, payload)
        self.link.reply(route, p.ok_reply(header["id"], written=written))

    def op_commit(self, route, header, data):
        inline = p.unpack_data(data.buffer) if data is not None else None
        manifest = self.store.commit(header, inline)
        log.info("event=commit name=%r version=%d size=%d", manifest["name"],
                 manifest["version"], manifest["size"])
        # The broker sees `invalidate` and tells the cache before it forwards this ack.
        self.link.reply(route, p.ok_reply(header["id"], stat=summary(manifest)),
                        invalidate=manifest["name"])

    def op_rm(self, route, header, data):
        old = self.store.remove(p.need(header, "name", str),
                                p.need(header, "commit", str, optional=True))
        log.info("event=rm name=%r version=%d", old["name"], old["version"])
        self.link.reply(route, p.ok_reply(header["id"], stat=summary(old)),
                        invalidate=old["name"])
