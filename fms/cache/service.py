"""The cache service: answers get and chunk from the cache, forwards misses to storage.

A miss becomes one fetch to storage however many requests wait for the same key; storage pushes
the data back here, the cache verifies it (with the store's digest function, which the broker's
``welcome`` names: :meth:`CacheService.on_store`), fills itself and answers every waiter.
Manifest fills go through :class:`~fms.cache.manifests.ManifestCache`, which refuses stale ones
(see there).

Each reply's route frame tells the broker whether it was a hit, and a ``get`` reply how many
chunk requests the client will make for that file (0 when its content came along, or when it is
too large to cache, ``max_file``: then the reply says ``cache: false`` and the client reads the
chunks from storage).  The broker counts a client's GET as a hit only when the manifest and every
chunk came from the cache (fms.metrics.ReadTally); a ``get_many`` reply's route counts its names
served whole from here (``gh``) and those fetched (``gm``).

**Who may read.** A hit is answered without storage, so the cache decides too, with the same
:mod:`fms.policy` and the store's access snapshot that storage sends through the broker
(:meth:`CacheService.on_policy`): ``get`` and each name of ``get_many`` need read on the name;
a ``chunk`` or ``page`` of an identity that may not read the whole store names its file
(``name``, and for a chunk of a long list the ``page`` listing it and its place ``at``), which
it must be able to read and whose cached manifest (and cached page or body) must list it; when
what would tell is not here, storage decides (the fetch is then made for that identity, with
``as``).  A request without a key (no CURVE) is the local user's and costs no check.  Until
the first snapshot arrives, requests with a key get ``unavailable``.
"""

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import zmq

from .. import policy
from .. import wire as p
from ..errors import BadRequest, Forbidden, Unavailable
from ..limits import BytesLike
from ..logutil import RateLimitedLog
from ..policy import Identity, Policy
from ..worker import Link
from .chunks import ChunkCache
from .manifests import ManifestCache

# Seconds a storage fetch may stay unanswered before its waiters get `unavailable`.  Longer than
# the broker needs to declare a worker dead and hand its requests to another (3 heartbeats + 1).
FETCH_TIMEOUT = 8.0

log = logging.getLogger("fms.cache")

# A hit: a manifest and, for a small file, the data frame of its content (None: not inline).
Hit: TypeAlias = tuple[dict[str, Any], BytesLike | None]
# Who waits for a fetch: the request's route and its id.
Waiter: TypeAlias = tuple[dict[str, Any], int | str]


@dataclass
class Fetch:
    kind: str  # "get", "chunk", "page" or "get_many"
    key: str | p.Digest | tuple[str, ...]  # the name, the digest, or the names missed
    token: int  # ManifestCache clock when the fetch started
    started: float
    waiters: list[Waiter] = field(default_factory=list)
    # get_many: per name asked, its hit (or the refusal of its name to the identity asking)
    found: list[Hit | Forbidden | None] = field(default_factory=list)


class CacheService:
    """Cache handlers.

    :param chunks: the on-disk chunk cache.
    :param link: where replies and fetches go.
    :param manifests: the manifest cache (a fresh one by default).
    :param max_file: files larger than this are not cached: their chunks are read from storage
        (default: a quarter of the chunk cache).
    """

    def __init__(
        self,
        chunks: ChunkCache,
        link: Link,
        manifests: ManifestCache | None = None,
        max_file: int | None = None,
    ) -> None:
        self.chunks = chunks
        self.manifests = manifests or ManifestCache()
        self.link = link
        self.max_file = chunks.max_bytes // 4 if max_file is None else max_file
        self.dropped_chunks = 0  # chunks of dead versions dropped on invalidation
        self.hits = 0
        self.misses = 0
        self.fetches = 0
        self.fills = 0  # fills on commit kept
        self.fills_refused = 0  # fills on commit refused: a later change heard, or bad
        self.filled_bytes = 0  # bytes of fills on commit taken since registering (beat)
        self._bad_fill = RateLimitedLog(log)
        # the store's digest function's helper, once the broker has said it
        self.hash: p.Hasher | None = None
        self._ids = itertools.count(1)
        self._fetches: dict[int, Fetch] = {}  # fetch id -> Fetch
        # (kind, key) -> fetch id of the newest fetch for that key
        self._open: dict[tuple[str, str | p.Digest], int] = {}
        self.policy: Policy | None = (
            None  # the store's access snapshot (fms.policy.Policy), once sent
        )

    # --- requests from clients ---

    def handle_request(
        self, route: dict[str, Any], header: dict[str, Any], data: zmq.Frame | None
    ) -> None:
        op = header.get("op")
        p.check_version(header)
        if op == "get":
            self._get(route, header, self._who(route, header))
        elif op in ("chunk", "page"):
            self._chunk(route, header, op, self._who(route, header))
        elif op == "get_many":
            self._get_many(route, header, self._who(route, header))
        elif op == "cache_stats":
            self.link.reply(route, p.ok_reply(header["id"], cache=self.stats()))
        else:
            raise BadRequest(f"cache does not serve op {op!r}")

    def on_policy(self, snapshot: Policy) -> None:
        """The store's access snapshot (from storage, through the broker): the newest wins."""
        if self.policy is None or snapshot.epoch > self.policy.epoch:
            self.policy = snapshot

    def _who(self, route: dict[str, Any], header: dict[str, Any]) -> Identity:
        """The identity a request comes from (fms.policy), by the key the broker authenticated.

        :raises Unavailable: a key, and no snapshot to resolve it in yet.
        """
        key = route.get("u")
        if key is None and "as" not in header:
            return policy.LOCAL  # no CURVE: the local user, no check
        if self.policy is None:
            raise Unavailable("the cache has not received the store's identities yet; retry")
        if key is not None and not isinstance(key, str):
            raise BadRequest("the broker sent a user key that is not a str")
        return self.policy.resolve(key, route.get("l") is True, header.get("as"))

    def _get(self, route: dict[str, Any], header: dict[str, Any], who: Identity) -> None:
        name = p.check_name(p.need(header, "name", str))
        policy.check(who, "get", name)
        hit = self._lookup(name)
        if hit is not None:
            self.hits += 1
            manifest, frame = hit
            self._reply_get(route, header["id"], {}, manifest, frame, "hit")
            return
        self.misses += 1
        self._wait("get", name, route, header["id"])

    def _reply_get(
        self,
        route: dict[str, Any],
        req_id: int | str,
        header: dict[str, Any],
        manifest: dict[str, Any],
        frame: p.BytesLike | None,
        outcome: str,
    ) -> None:
        """Answer a get; the route tells the broker how many chunk requests will follow."""
        fields: dict[str, Any] = {"manifest": manifest}
        chunks = 0 if _inline(manifest) else manifest["count"]
        if manifest["size"] > self.max_file:
            fields["cache"] = False  # the client reads these chunks from storage
            chunks = 0
        self.link.reply(
            route, {**header, **p.ok_reply(req_id, **fields)}, frame, cache=outcome, chunks=chunks
        )

    def _lookup(self, name: str) -> Hit | None:
        """A hit: ``(manifest, data frame of its content or None)``; None on a miss (no
        manifest, or a small file's content is not cached)."""
        manifest = self.manifests.lookup(name)
        if manifest is None:
            return None
        if not _inline(manifest):
            return manifest, None
        frame = self.chunks.get(manifest["chunks"][0])
        return (manifest, frame) if frame is not None else None

    def _get_many(self, route: dict[str, Any], header: dict[str, Any], who: Identity) -> None:
        """Many names: the hits from here, all the misses in one storage fetch (not joined with
        other fetches: one round trip per batch)."""
        names = p.need_names(header)
        found = [self._lookup_for(who, name) for name in names]
        missed = tuple(name for name, hit in zip(names, found, strict=False) if hit is None)
        self.hits += sum(isinstance(hit, tuple) for hit in found)
        self.misses += len(missed)
        fetch = Fetch(
            "get_many",
            missed,
            self.manifests.begin_fetch(),
            time.monotonic(),
            [(route, header["id"])],
            found,
        )
        if not missed:
            self._answer_batch(fetch, missed, {}, "hit")
            return
        fetch_id = next(self._ids)
        self._fetches[fetch_id] = fetch
        self.fetches += 1
        self.link.request(
            p.STORAGE,
            {
                "v": p.PROTOCOL_VERSION,
                "op": "get_many",
                "id": fetch_id,
                "ttl_ms": int(FETCH_TIMEOUT * 1000),
                "names": list(missed),
            },
        )

    def _lookup_for(self, who: Identity, name: str) -> Hit | Forbidden | None:
        """:meth:`_lookup`, or the Forbidden refusing ``who`` the name."""
        try:
            policy.check(who, "get_many", name)
        except Forbidden as refused:
            return refused
        return self._lookup(name)

    def _chunk(
        self, route: dict[str, Any], header: dict[str, Any], kind: str, who: Identity
    ) -> None:
        """A chunk, or a page of a chunk list (``kind`` ``page``): both are blobs named by their
        digest, kept in the chunk cache alike.  ``fresh`` (a page the client found damaged):
        from storage, whatever is cached."""
        digest = p.need_hash(header, "hash")
        # The chunk's length, as the client gave it, goes along on a fetch: storage reads a
        # blob from a backend far away side by side with the others (fms.storage.service).
        size = p.need_int(header, "len", hi=p.MAX_CHUNK_SIZE, optional=True)
        if not who.all and not self._listed(who, header, kind, digest):
            # Its file's manifest (or page) is not here to tell: storage decides, for `who`.
            where: dict[str, Any] = {k: header[k] for k in ("name", "page", "at") if k in header}
            self._wait(kind, digest, route, header["id"], {**where, "as": who.name}, size)
            return
        fresh = p.need(header, "fresh", bool, optional=True, default=False)
        frame = None if fresh else self.chunks.get(digest)
        if frame is not None:
            self.hits += 1
            self.link.reply(route, p.ok_reply(header["id"]), frame, cache="hit")
            return
        self.misses += 1
        self._wait(kind, digest, route, header["id"], size=size)

    def _listed(self, who: Identity, header: dict[str, Any], kind: str, digest: bytes) -> bool:
        """Whether ``who`` (who may not read the whole store) reads this chunk or page through
        the file ``name``: it may read the name, and its cached manifest lists it (a short list
        itself; a long one as its body or a page, a chunk by the cached page ``page`` at
        ``at``).  False: what would tell is not cached.  :raises Forbidden: no name, or one it
        may not read."""
        name = policy.check_through_file(who, header, kind)
        manifest = self.manifests.peek(name)
        if manifest is None:
            return False
        if "chunks" in manifest:
            return kind == "chunk" and digest in manifest["chunks"]
        pages = manifest.get("pages")
        if kind == "page":
            return digest == manifest.get("body") or (pages is not None and digest in pages)
        page, at = header.get("page"), header.get("at")
        if (
            pages is None
            or not isinstance(page, bytes)
            or page not in pages
            or not isinstance(at, int)
        ):
            return False  # a body not kept with the manifest: storage reads it
        frame = self.chunks.get(page)
        if frame is None:
            return False
        listed = p.unpack_data(frame)[at * p.HASH_LEN : (at + 1) * p.HASH_LEN]
        return bytes(listed) == digest

    def _wait(
        self,
        kind: str,
        key: str | p.Digest,
        route: dict[str, Any],
        req_id: int | str,
        extra: dict[str, Any] | None = None,
        size: int | None = None,
    ) -> None:
        """Join the open fetch for this key if it is still fresh, else start one; ``extra``
        fields (a fetch made for one identity) make a fetch of its own, joined by none.
        ``size``: a chunk's length as the client gave it, sent along on the fetch (storage
        reads a blob from a backend far away side by side with the others)."""
        fetch_id = self._open.get((kind, key)) if extra is None else None
        fetch = self._fetches.get(fetch_id) if fetch_id is not None else None
        # a get (its key is a name) joins a fetch only while no invalidation came since
        if fetch is None or (isinstance(key, str) and not self.manifests.fresh(key, fetch.token)):
            fetch_id = next(self._ids)
            fetch = Fetch(kind, key, self.manifests.begin_fetch(), time.monotonic())
            self._fetches[fetch_id] = fetch
            if extra is None:
                self._open[(kind, key)] = fetch_id
            self.fetches += 1
            fields: dict[str, Any] = {"name": key} if kind == "get" else {"hash": key}
            if size is not None:
                fields["len"] = size
            fields.update(extra or {})
            self.link.request(
                p.STORAGE,
                {
                    "v": p.PROTOCOL_VERSION,
                    "op": kind,
                    "id": fetch_id,
                    "ttl_ms": int(FETCH_TIMEOUT * 1000),
                    **fields,
                },
            )
        fetch.waiters.append((route, req_id))

    # --- storage pushes the data back ---

    def handle_reply(self, header: dict[str, Any], data: zmq.Frame | None) -> None:
        fetch_id = header.get("id")
        fetch = self._close(fetch_id) if isinstance(fetch_id, int) else None
        if fetch is None:
            return  # timed out already; its waiters were answered
        if header.get("ok") is not True:
            # Storage's error, passed on as an error reply of the protocol's, whatever it held.
            code = header.get("error")
            if header.get("ok") is False and code in p.ERROR_CODES:
                self._fail(fetch, code, str(header.get("message", "")))
            else:
                self._fail(fetch, "internal", "storage sent something that is not a reply; retry")
            return
        key = fetch.key
        if isinstance(key, tuple):  # a get_many: the names it missed
            self._fill_batch(fetch, key, header, data)
            return
        to_cache: tuple[p.Digest, memoryview] | None
        try:
            payload = p.unpack_data(data.buffer) if data is not None else None
            if isinstance(key, bytes):  # a chunk or a page, by its digest
                to_cache = self._check_chunk(key, payload)
            else:  # a get, by its name
                to_cache = self._fill_manifest(key, fetch.token, header, payload)
        except BadRequest as exc:
            self._fail(fetch, "integrity", f"storage sent a bad reply: {exc}")
            return
        self._answer(fetch, header, data)
        if to_cache is not None:
            # Verified already; written after the answers, so the disk write is not on their
            # path (the reply frames are not touched by it).  A chunk's miss was counted by its
            # lookup; a small file's content is counted here (its manifest missed).
            frame = data.buffer if data is not None else None
            self.chunks.put(*to_cache, counted=fetch.kind == "chunk", frame=frame)

    def _check_chunk(
        self, digest: p.Digest, payload: memoryview | None
    ) -> tuple[p.Digest, memoryview]:
        """:return: the digest to cache ``payload`` under, and ``payload``, once they match."""
        if self.hash is None:  # the broker names it before any storage reply can come
            raise BadRequest("the store's digest function is not known yet")
        if payload is None or self.hash(payload) != digest:
            raise BadRequest(f"chunk {digest.hex()[:16]} does not match its digest")
        return digest, payload

    def _fill_manifest(
        self, name: str, token: int, header: dict[str, Any], payload: memoryview | None
    ) -> tuple[p.Digest, memoryview] | None:
        """Store a fetched manifest of ``name`` if still fresh.

        :return: the digest to cache the inline content under, and the content, or None.
        """
        manifest = p.check_manifest(p.need(header, "manifest", dict))
        if manifest["name"] != name:
            raise BadRequest("manifest is for another name")
        inline = None
        if _inline(manifest):
            if payload is None or not p.inline_ok(manifest, payload):
                raise BadRequest("inline content does not match its digest")
            inline = manifest["chunks"][0], payload
        if not self.manifests.fill(name, manifest, token):
            log.debug("event=stale_fill_dropped name=%r", name)
        return inline

    def _fill_batch(
        self,
        fetch: Fetch,
        names: tuple[str, ...],
        header: dict[str, Any],
        data: zmq.Frame | None,
    ) -> None:
        """Storage's answer to a batch of misses (``names``): verify what came, answer the
        waiter with the hits and these, then fill the manifests and cache the content (off
        the answer's path).

        A batch of nothing but misses whose every inline content verified is answered with
        storage's data frame as it came (:meth:`_pass_batch`): the reply a rebuild would make,
        without copying each content into a new frame."""
        try:
            results = p.read_batch(header, data.buffer if data is not None else None, list(names))
        except BadRequest as exc:
            self._fail(fetch, "integrity", f"storage sent a bad reply: {exc}")
            return
        # name -> (manifest, verified inline content or None), or its error result
        fetched: dict[str, tuple[dict[str, Any], memoryview | None] | dict[str, Any]] = {}
        verified: list[tuple[p.Digest, memoryview]] = []
        refused = False  # an inline content that did not verify: not passed on
        for name, (result, payload) in zip(names, results, strict=False):
            if "error" in result:
                fetched[name] = result
                continue
            manifest = result["manifest"]
            if payload is not None and not (_inline(manifest) and p.inline_ok(manifest, payload)):
                payload = None  # the client fetches this one alone, from storage if need be
                refused = True
            if payload is not None:
                verified.append((manifest["chunks"][0], payload))
            fetched[name] = (manifest, payload)
        if (
            refused
            or any(hit is not None for hit in fetch.found)
            or sum(len(payload) for _digest, payload in verified) > p.MAX_BATCH_BYTES
        ):
            self._answer_batch(fetch, names, fetched, "miss")
        else:
            self._pass_batch(fetch, names, fetched, data if verified else None)
        for name in names:
            got = fetched[name]
            if isinstance(got, tuple) and not self.manifests.fill(name, got[0], fetch.token):
                log.debug("event=stale_fill_dropped name=%r", name)
        with self.chunks.batch():  # the rows this writes: one transaction
            for digest, payload in verified:
                self.chunks.put(digest, payload, counted=False)

    def _pass_batch(
        self,
        fetch: Fetch,
        names: tuple[str, ...],
        fetched: dict[str, tuple[dict[str, Any], memoryview | None] | dict[str, Any]],
        data: zmq.Frame | None,
    ) -> None:
        """Answer a get_many that missed every name with storage's reply: its results as
        :meth:`_answer_batch` writes them, and its data frame ``data`` as it came, which holds
        exactly the inline contents, back to back, every one verified (the caller's checks:
        :func:`fms.wire.read_batch` and :func:`fms.wire.inline_ok` for each)."""
        route, req_id = fetch.waiters[0]
        if self._expired(route, req_id, "miss"):
            return
        batch = p.BatchReply()  # its results only: its frame would be a copy of ``data``
        for name in names:
            got = fetched[name]
            if isinstance(got, dict):
                batch.error(str(got["error"]), str(got.get("message", "")))
            else:
                batch.manifest(*got)
        self.link.reply(
            route,
            p.ok_reply(req_id, results=batch.results),
            data,
            cache="miss",
            batch=(0, len(names)),
        )

    def _answer_batch(
        self,
        fetch: Fetch,
        missed: tuple[str, ...],
        fetched: dict[str, tuple[dict[str, Any], memoryview | None] | dict[str, Any]],
        cache: str,
    ) -> None:
        """Answer a get_many: each name from ``fetch.found`` (a hit) or ``fetched`` (storage's
        ``(manifest, payload)`` or error result for each name ``missed``), in the order asked."""
        route, req_id = fetch.waiters[0]
        if self._expired(route, req_id, cache):
            return
        batch, rest = p.BatchReply(), iter(missed)
        for hit in fetch.found:
            if isinstance(hit, Forbidden):
                batch.error(hit.code, str(hit))
                continue
            if hit is not None:
                manifest, frame = hit
                batch.manifest(manifest, p.unpack_data(frame) if frame is not None else None)
                continue
            got = fetched[next(rest)]
            if isinstance(got, dict):
                batch.error(str(got["error"]), str(got.get("message", "")))
            else:
                batch.manifest(*got)
        whole = sum(
            1
            for hit in fetch.found
            if isinstance(hit, tuple) and (hit[1] is not None or not hit[0]["count"])
        )
        self.link.reply(
            route,
            p.ok_reply(req_id, results=batch.results),
            batch.frame(),
            cache=cache,
            batch=(whole, len(missed)),
        )

    def _expired(self, route: dict[str, Any], req_id: int | str, cache: str) -> bool:
        """If the request's client stopped waiting (fms.worker stamps the deadline), send a short
        answer instead of the data, which the broker still needs to free the request."""
        if route.get("deadline", math.inf) >= time.monotonic():
            return False
        self.link.reply(
            route,
            p.error_reply(req_id, "unavailable", "the request's deadline passed; retry"),
            cache=cache,
        )
        return True

    def _close(self, fetch_id: int) -> Fetch | None:
        fetch = self._fetches.pop(fetch_id, None)
        if (
            fetch is not None
            and not isinstance(fetch.key, tuple)  # a get_many's is never open to join
            and self._open.get((fetch.kind, fetch.key)) == fetch_id
        ):
            del self._open[(fetch.kind, fetch.key)]
        return fetch

    def _answer(self, fetch: Fetch, header: dict[str, Any], data: zmq.Frame | None) -> None:
        buf = data.buffer if data is not None else None
        for route, req_id in fetch.waiters:
            if self._expired(route, req_id, "miss"):
                continue
            if fetch.kind == "get" and header.get("ok"):
                self._reply_get(route, req_id, header, header["manifest"], buf, "miss")
            else:
                self.link.reply(route, {**header, "id": req_id}, buf, cache="miss")

    def _fail(self, fetch: Fetch, code: str, message: str) -> None:
        for route, req_id in fetch.waiters:
            self.link.reply(route, p.error_reply(req_id, code, message), cache="miss")

    # --- control ---

    def on_invalidate(self, name: str, at: int | None = None) -> None:
        """``name`` changed (a name ending in ``/``: every name under that folder): drop its
        manifest, its popularity, and the chunks of the dead version that no other cached
        manifest lists (content-addressed chunks are never stale, but these would only take
        room).  ``at``: the broker's order of the change (for fills on commit)."""
        self.manifests.heard(name, at)
        if name.endswith("/"):  # a folder: every name under it (a folder was renamed)
            dropped = self.manifests.invalidate_folder(name)
        else:
            dropped = [self.manifests.invalidate(name)]
        for old in dropped:
            for digest in (old or {}).get("chunks") or ():
                if digest in self.chunks and not self.manifests.shared(digest):
                    self.chunks.drop(digest, forget=True)
                    self.dropped_chunks += 1

    def on_fill(self, name: str, at: int, since: int, manifest: bytes, frame: zmq.Frame) -> None:
        """A commit of ``name`` (its request key ``since``) made a small file whose content
        came with it: the broker hands the new manifest (encoded) and the request's data frame
        here with the commit's invalidation (``at``), so that a read after the write is a hit.
        Kept only if no later change of the name was heard (:meth:`ManifestCache.may_fill`),
        and checked as a fetched fill is: the manifest whole, the content against its digest."""
        self.filled_bytes += len(frame.buffer)  # taken off the broker's window, kept or not
        self._take_fill(name, at, since, manifest, _content(frame), frame.buffer)

    def on_fills(
        self,
        names: list[str],
        at: int,
        since: int,
        fills: list[tuple[str, int, bytes]],
        frame: zmq.Frame,
    ) -> None:
        """A ``commit_many`` (request key ``since``) changed ``names`` (its invalidation,
        ``at``), and made the small files of ``fills`` (``(name, offset, manifest)``: the
        content is at ``offset`` of the request's data, as long as the manifest says) from the
        content it carried: each is taken as :meth:`on_fill` takes one, the others dropped as
        :meth:`on_invalidate` drops them; the fills' disk writes go in one transaction."""
        self.filled_bytes += len(frame.buffer)  # taken off the broker's window, kept or not
        payload = _content(frame)
        offered = {name: (offset, manifest) for name, offset, manifest in fills}
        done = 0
        try:
            with self.chunks.batch():
                for name in names:
                    fill = offered.get(name)
                    if fill is None:
                        self.on_invalidate(name, at)
                    else:
                        offset, manifest = fill
                        content = payload[offset:] if payload is not None else None
                        self._take_fill(name, at, since, manifest, content)
                    done += 1
        finally:
            # A bug met keeping one fill must not leave the names after it cached.
            for name in names[done:]:
                self.on_invalidate(name, at)

    def _take_fill(
        self,
        name: str,
        at: int,
        since: int,
        manifest: bytes,
        content: memoryview | None,
        frame: memoryview | None = None,
    ) -> None:
        """Drop ``name`` (the commit's invalidation) and keep the version its commit made
        (``manifest``, encoded; its content the first ``size`` bytes of ``content``, None: the
        data frame was not msgpack bin) unless a later change was heard or it does not check.
        ``frame``: the data frame that holds the content alone, kept as it is (no copy)."""
        keep = self.manifests.may_fill(name, since)
        # A version a miss fetched before this ack came may be newer than the commit's (a
        # later commit landed, its ack not here yet): a reader given it must not be given
        # this older one next.
        held = self.manifests.peek(name)
        self.on_invalidate(name, at)
        if not keep:
            self.fills_refused += 1
            return
        try:
            fields = p.check_manifest(p.decode(manifest))
            if fields["name"] != name or not _inline(fields) or "chunks" not in fields:
                raise BadRequest("a fill's manifest is for another name, or not a small file")
            if content is None:
                raise BadRequest("a fill's data frame is not msgpack bin")
            size = fields["size"]
            payload = content[:size]
            digest = fields["chunks"][0]
            # Content the cache holds already (verified when it was filled) is not hashed again,
            # and these bytes are then never offered to the chunk cache: were the held copy
            # lost meanwhile (its disk write failed), they would be kept unverified.
            held_chunk = digest in self.chunks
            if (frame is not None and len(content) != size) or len(payload) != size:
                raise BadRequest("a fill's content is not as long as its manifest says")
            if not held_chunk and not p.inline_ok(fields, payload):
                raise BadRequest("a fill's content does not match its digest")
        except BadRequest as exc:
            self.fills_refused += 1
            self._bad_fill.warning("event=fill_dropped name=%r error=%r", name, str(exc))
            return
        if size > self.max_file:
            return
        if held is not None and held.get("version", 0) > fields["version"]:
            self.fills_refused += 1
            return
        if self.manifests.fill(name, fields, self.manifests.begin_fetch()):
            self.fills += 1
            if not held_chunk:
                self.chunks.put(digest, payload, counted=False, frame=frame)

    def on_register(self, at: int | None = None) -> None:
        # A broker we were cut off from may have acked writes we never heard of.
        self.manifests.welcomed(at)
        self.filled_bytes = 0  # the broker counts its window afresh for this registration

    def on_store(self, digest_fn: str) -> None:
        """The store's digest function (from the broker's ``welcome``): what storage's replies
        are checked with.  Chunks cached under another store's function stay: a digest of one
        function is never that of other bytes under the other."""
        self.hash = p.hasher(digest_fn)

    def tick(self, now: float) -> None:
        expired = [(fid, f) for fid, f in self._fetches.items() if now - f.started > FETCH_TIMEOUT]
        for fid, fetch in expired:
            self._close(fid)
            log.warning("event=fetch_timeout kind=%s waiters=%d", fetch.kind, len(fetch.waiters))
            self._fail(fetch, "unavailable", "storage did not answer the cache in time; retry")
        # Only here, never while a reply is being handled: a fill must be checked against the
        # invalidations that happened while it was in flight before they are forgotten.
        self.manifests.forget_before(min((f.token for f in self._fetches.values()), default=None))

    def stats(self) -> dict[str, int]:
        """This worker's figures.  ``hits`` / ``misses`` count manifest and chunk lookups alike;
        per-GET figures are the broker's (``get_hits`` ... in its status, see fms.metrics)."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "fetches": self.fetches,
            "bytes": self.chunks.bytes,
            "max_bytes": self.chunks.max_bytes,
            "memory_bytes": self.chunks.memory_bytes,
            "max_file": self.max_file,
            "entries": len(self.chunks),
            "evictions": self.chunks.evictions,
            "admissions_refused": self.chunks.refused,
            "dropped_chunks": self.dropped_chunks,
            "corrupt": self.chunks.corrupt,
            "manifests": len(self.manifests),
            "manifest_evictions": self.manifests.policy.evictions,
            "pending_fetches": len(self._fetches),
            "commit_fills": self.fills,
            "commit_fills_refused": self.fills_refused,
        }

    def beat(self) -> dict[str, int]:
        """What the heartbeat tells the broker (for its Prometheus counters)."""
        return {
            "evictions": self.chunks.evictions,
            "refused": self.chunks.refused,
            "filled": self.filled_bytes,
        }


def _content(frame: zmq.Frame) -> memoryview | None:
    """A fill's data frame's payload, or None if it is not msgpack bin: known only once its
    names are dropped (:meth:`CacheService._take_fill`), whatever is wrong with it."""
    try:
        return p.unpack_data(frame.buffer)
    except BadRequest:
        return None


def _inline(manifest: dict[str, Any]) -> bool:
    return p.travels_inline(manifest["size"], manifest["count"])
