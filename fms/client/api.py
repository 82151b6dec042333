"""``fms.Client``: the Python API, and what the CLI is built on.

::

    with fms.Client("tcp://127.0.0.1:5555") as c:
        c.put("report.pdf", "docs/report.pdf")
        c.get("docs/report.pdf", "/tmp/report.pdf")
        data = c.get_bytes("docs/report.pdf")
        for entry in c.ls("docs/"):
            print(entry["name"], entry["size"])

Transfers are pipelined with credit-based flow control: at most ``window`` requests are in
flight, never more (zguide "file transfer", model 3).  Every chunk is verified against its
digest, and the chunk list against the file digest (:mod:`fms.client.download`); downloads are
written to a temp file beside the destination and renamed into place only when complete and
verified.

The connection, pipeline and retries are :class:`fms.client.session.Session`'s; uploads and
downloads are :mod:`fms.client.upload` and :mod:`fms.client.download`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Self

import zmq

from .. import wire as p
from ..errors import BadRequest, FmsError, from_reply
from ..wire.frames import RawReader
from .session import DEFAULT_RETRIES, DEFAULT_TIMEOUT, DEFAULT_WINDOW, Progress, Reply, Session

if TYPE_CHECKING:
    from ..security import CurveClient  # not imported at run time: `ls` needs no CURVE
    from . import download, upload  # imported by the methods that transfer: `ls` needs neither
    from .download import RemoteFile

MAINTENANCE_TIMEOUT = 600.0  # seconds a gc or fsck page may take before it is asked again
GET_BATCH = 128  # names per get_many message when fetching many files
BATCH_WINDOW = 4  # get_many messages in flight


class Client:
    """A connection to an fms cluster.

    :param broker: the broker's frontend endpoint; default ``$FMS_BROKER`` or
        ``tcp://127.0.0.1:5555``.
    :param timeout: seconds a request waits for its reply before it is retried.
    :param retries: how many times a request that timed out is sent again.
    :param window: chunk requests kept in flight during one transfer.
    :param chunk_size: chunk size for uploads, in bytes.
    :param progress: optional ``callable(name, done_bytes, total_bytes)`` called as a file's
        chunks move (not for files that travel in one message); if it has a method
        ``hashing(name, done_bytes, total_bytes)``, that is called as a file is hashed before
        its upload.
    :param curve: a :class:`fms.security.CurveClient` (own keys + the broker's public key) to
        encrypt and authenticate, or None; see :func:`fms.security.client_keys`.
    :param fsync: make downloads durable (fsync) before they are renamed into place.
    :param cache: read through the cache tier; False reads from storage (a one-time read the
        cache need not hold).
    :param acting_as: the identity every request acts for: what an S3 gateway (an identity
        made with ``gateway``) sends for the user it authenticated; anyone else is refused.
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = p.DEFAULT_CHUNK_SIZE,
        progress: Progress | None = None,
        ctx: zmq.Context | None = None,
        curve: CurveClient | None = None,
        fsync: bool = False,
        cache: bool = True,
        acting_as: str | None = None,
    ) -> None:
        if not p.MIN_CHUNK_SIZE <= chunk_size <= p.MAX_CHUNK_SIZE:
            raise BadRequest(
                f"chunk size must be between {p.MIN_CHUNK_SIZE} and {p.MAX_CHUNK_SIZE} bytes"
            )
        self.session = Session(
            broker,
            timeout=timeout,
            retries=retries,
            window=window,
            ctx=ctx,
            curve=curve,
            acting_as=acting_as,
        )
        self.chunk_size = chunk_size
        self.progress = progress
        self.fsync = fsync
        self.cache = cache

    @property
    def broker(self) -> str:
        """The broker's frontend endpoint this client talks to."""
        return self.session.broker

    # --- lifecycle ---

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def call(self, op: str, data: p.Sendable | None = None, **fields: Any) -> Reply:
        """One request of any op, as docs/PROTOCOL.md describes it; returns ``(header, data
        frame or None)``.  :raises RemoteError: an error reply (its subclass names the code)."""
        return self.session.call(op, data, **fields)

    # --- metadata ---

    def stat(self, name: str) -> dict[str, Any]:
        """Name, size, digest (hex) and its kind, mtime, version, metadata, ... of a stored
        file, or of a folder's marker (``NAME/``: see :meth:`mkdir`).

        :raises NotFound: no such name.
        """
        header, _ = self.call("stat", name=p.check_entry_name(name))
        return _public(header["stat"])

    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every stored file whose name starts with ``prefix``, sorted by name."""
        return list(self.iter_ls(prefix))

    def iter_ls(
        self, prefix: str = "", page: int | None = None, markers: bool = False
    ) -> Iterator[dict[str, Any]]:
        """The stored files whose name starts with ``prefix``, in name order, fetched a page at a
        time (``page`` entries, default the server's), so a listing of any length takes the
        memory of one page.  ``markers``: also the folders' markers (``NAME/``, see
        :meth:`mkdir`), which hold no content."""
        p.check_prefix(prefix)
        after = ""
        fields: dict[str, Any] = {} if page is None else {"limit": page}
        while True:
            header, _ = self.call("ls", prefix=prefix, after=after, **fields)
            for entry in header["entries"]:
                if markers or not p.is_folder_name(entry["name"]):
                    yield _public(entry)
            if not header.get("more") or not header["entries"]:
                return
            after = header["entries"][-1]["name"]

    def iter_folder(self, prefix: str = "", page: int | None = None) -> Iterator[dict[str, Any]]:
        """One level under ``prefix`` (``aws s3 ls`` without ``--recursive``): yields the
        stats of the files directly in it and ``{"name": FOLDER/, "folder": True}`` for each
        sub-folder, in name order, a page at a time."""
        p.check_prefix(prefix)
        after = ""
        fields: dict[str, Any] = {} if page is None else {"limit": page}
        while True:
            header, _ = self.call("ls", prefix=prefix, after=after, folders=True, **fields)
            items = [_public(e) for e in header["entries"]]
            items += [{"name": f, "folder": True} for f in header["folders"]]
            yield from sorted(items, key=lambda item: item["name"])
            if header.get("next") is None:
                return
            after = header["next"]

    def rm(self, name: str) -> dict[str, Any]:
        """Remove a name.  :raises NotFound: no such name."""
        header, _ = self.call("rm", name=p.check_name(name), commit=os.urandom(16).hex())
        return _public(header["stat"])

    def rm_prefix(self, prefix: str) -> Iterator[list[str]]:
        """Remove every name under ``prefix`` (non-empty), a page per request (one transaction
        each).  :return: yields the names removed, page by page (lists)."""
        while True:
            header, _ = self.call("rm_prefix", prefix=p.check_prefix(prefix))
            yield header["removed"]
            if not header.get("more"):
                return

    def mv_folder(self, src: str, dst: str) -> int:
        """Rename the folder ``src`` to ``dst`` (with or without a trailing ``/``): every name
        under it, and its marker, moves in one transaction, metadata only.

        :return: how many names moved.
        :raises NotFound: nothing under ``src``.
        :raises Conflict: ``dst`` holds files.
        :raises TooLarge: ``src`` holds more names than one transaction moves (10,000).
        """
        header, _ = self.call(
            "mv_prefix",
            prefix=p.check_folder_name(src.rstrip("/") + "/"),
            dest=p.check_folder_name(dst.rstrip("/") + "/"),
            commit=os.urandom(16).hex(),
        )
        return header["moved"]

    def mkdir(
        self, folder: str, meta: dict[str, Any] | None = None, mtime: float | None = None
    ) -> dict[str, Any]:
        """Make the folder ``folder`` exist while it is empty: a marker named ``folder/`` (no
        content; ``meta`` kept with it), shown by ``ls`` and fsspec as a folder.  :return: the
        marker's stat."""
        name = p.check_folder_name(folder.rstrip("/") + "/")
        fields: dict[str, Any] = {"meta": p.check_meta(meta)} if meta else {}
        header, _ = self.call(
            "commit",
            name=name,
            extents=b"",
            chunks=[],
            digest=p.inline_digest((), [], self.session.hasher()),
            mtime=time.time() if mtime is None else mtime,
            commit=os.urandom(16).hex(),
            **fields,
        )
        return _public(header["stat"])

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The current version of ``name`` (if any) and the retained ones (storage workers
        started with ``--keep-versions N``), newest first: stats with ``current`` (bool).

        :raises NotFound: no such name and no retained version.
        """
        header, _ = self.call("versions", name=p.check_name(name))
        return [_public(v) for v in header["versions"]]

    def restore(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Make a retained version of ``name`` (default the newest) current again, as a new
        version; also after ``rm``.  :return: the new stat.  :raises NotFound: no such
        retained version."""
        fields: dict[str, Any] = {} if version is None else {"version": version}
        header, _ = self.call(
            "restore", name=p.check_name(name), commit=os.urandom(16).hex(), **fields
        )
        return _public(header["stat"])

    def mv(self, src: str, dst: str) -> dict[str, Any]:
        """Rename ``src`` to ``dst`` (replacing it) in one transaction, moving no data.

        :return: ``dst``'s stat.  :raises NotFound: no ``src``.
        """
        return self._copy("mv", src, dst)

    def cp(self, src: str, dst: str) -> dict[str, Any]:
        """Copy ``src`` to ``dst`` on the server: metadata only, the chunks are shared.

        :return: ``dst``'s stat.  :raises NotFound: no ``src``.
        """
        return self._copy("cp", src, dst)

    def compose(
        self, name: str, parts: list[str], meta: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Make ``name`` the stored files ``parts`` back to back, by reference: each part's
        extents become the new file's (their chunks and pages are not copied, nor read; a short
        list is sent as a page of its own), so joining parts of any size and chunk size costs a
        few small requests (how an S3 multipart upload completes).  ``meta``: the new version's
        metadata (default none).  :return: its stat.  :raises NotFound: a part is not stored.
        """
        from . import download

        name = p.check_name(name)
        hash_fn = self.session.hasher()
        extents: list[p.Extent] = []
        pages: list[p.Digest] = []
        for part in parts:
            manifest, _frame, via = self._manifest(p.check_name(part))
            with download.chunk_list(self.session, manifest, via) as listing:
                extents += listing.extents
                if listing.page_ids is not None:
                    pages += listing.page_ids
                    continue
                digests = [d for _i, _o, _n, d, _z in listing.items()]
            for page in p.pages_of(listing.extents, digests):
                blob = p.join_digests(page)
                pages.append(hash_fn(blob))
                self.call("put_page", data=p.pack_data(blob), hash=pages[-1])
        fields: dict[str, Any] = {"meta": p.check_meta(meta)} if meta else {}
        header, _ = self.call(
            "commit",
            name=name,
            extents=p.pack_extents(extents),
            pages=pages,
            digest=p.tree_digest(extents, pages, hash_fn),
            mtime=time.time(),
            commit=os.urandom(16).hex(),
            **fields,
        )
        return _public(header["stat"])

    def _copy(self, op: str, src: str, dst: str) -> dict[str, Any]:
        header, _ = self.call(
            op, src=p.check_name(src), name=p.check_name(dst), commit=os.urandom(16).hex()
        )
        return _public(header["stat"])

    def du(self, prefix: str = "") -> dict[str, int]:
        """``files`` and ``bytes`` (the sum of their sizes) under ``prefix``, counted by the
        store's index."""
        header, _ = self.call("du", prefix=p.check_prefix(prefix))
        return header["du"]

    def status(self) -> dict[str, Any]:
        """The broker's view: its endpoints and the live workers."""
        header, _ = self.call("status")
        return {k: v for k, v in header.items() if k not in ("v", "id", "ok")}

    def usage(self) -> dict[str, int]:
        """The store's ``files``, ``bytes`` (their sizes) and ``chunk_bytes`` (on disk)."""
        header, _ = self.call("usage")
        return header["store"]

    def gc(self, grace: float | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Collect garbage now: chunks unreferenced for longer than ``grace`` seconds (default:
        the storage workers' ``--gc-grace``).  ``grace=0`` also deletes chunks of uploads still
        in progress (they fail and must be retried): the caller's own risk.

        :return: ``chunks`` and ``bytes`` freed (would be, with ``dry_run``), ``orphans`` among
            them, ``pruned`` tombstones and old commit ids.
        """
        fields: dict[str, Any] = {"dry_run": dry_run}
        if grace is not None:
            fields["grace"] = float(grace)
        with self.session.patience(MAINTENANCE_TIMEOUT):
            header, _ = self.call("gc", **fields)
        return header["gc"]

    def fsck(self) -> Iterator[dict[str, Any]]:
        """Check every stored file's chunks, a page at a time.

        :return: yields one report per page: ``names``, ``chunks`` and ``bytes`` checked,
            ``damaged`` (``{chunk (hex), problem, names}``); the last page also has ``orphans``
            and ``refcount_errors``.
        """
        after = ""
        while True:
            with self.session.patience(MAINTENANCE_TIMEOUT):
                header, _ = self.call("fsck", after=after)
            page = header["fsck"]
            page["damaged"] = [{**d, "chunk": d["chunk"].hex()} for d in page["damaged"]]
            yield page
            if page.get("next") is None:
                return
            after = page["next"]

    # --- identities, grants, purge, audit (fms.policy) ---

    def whoami(self) -> dict[str, Any]:
        """The identity this client's key is, as the store sees it: ``identity``, ``grants``
        (maps of ``role``, ``prefix``), ``gateway``."""
        header, _ = self.call("whoami")
        return {k: header[k] for k in ("identity", "grants", "gateway")}

    def id_ls(self) -> list[dict[str, Any]]:
        """Every identity: ``name``, ``created``, ``gateway``, ``keys`` (``kind``, ``key``;
        never an S3 secret), ``grants``.  A store admin's."""
        header, _ = self.call("id_ls")
        return header["identities"]

    def id_add(
        self,
        name: str,
        keys: Iterable[str | bytes] = (),
        s3: bool = False,
        gateway: bool = False,
    ) -> dict[str, Any]:
        """Create identity ``name`` with CURVE public ``keys`` (z85 str or bytes), with
        ``s3`` an S3 access key, with ``gateway`` the right to act for other identities.

        :return: ``{identity: {...}}``, and ``s3: {access_key, secret}`` (the secret is shown
            here once; the gateway can look it up).
        """
        header, _ = self.call(
            "id_add",
            name=name,
            keys=[k.decode() if isinstance(k, bytes) else k for k in keys],
            s3=s3,
            gateway=gateway,
            commit=os.urandom(16).hex(),
        )
        return _fields(header, "identity", "s3")

    def id_rm(self, name: str) -> None:
        """Remove an identity: its keys, grants and uploads' dedup (not its files)."""
        self.call("id_rm", name=name, commit=os.urandom(16).hex())

    def id_key(
        self,
        name: str,
        curve: str | bytes | None = None,
        s3: bool = False,
        remove: str | None = None,
    ) -> dict[str, Any]:
        """Add a CURVE public key (``curve``), make an S3 access key (``s3``) or remove a key
        (``remove``: a CURVE key or an access key id).  :return: as :meth:`id_add`."""
        fields: dict[str, Any] = {"curve": curve.decode() if isinstance(curve, bytes) else curve}
        fields.update(s3=s3, remove=remove)
        header, _ = self.call(
            "id_key",
            name=name,
            commit=os.urandom(16).hex(),
            **{k: v for k, v in fields.items() if v not in (None, False)},
        )
        return _fields(header, "identity", "s3")

    def grant(self, name: str, role: str, prefix: str) -> dict[str, Any]:
        """Give ``name`` ``role`` (read, write, admin) on ``prefix`` (a folder; ``""``: the
        whole store), replacing its role there.  :return: the identity."""
        header, _ = self.call(
            "grant", name=name, role=role, prefix=prefix, commit=os.urandom(16).hex()
        )
        return header["identity"]

    def revoke(self, name: str, prefix: str) -> dict[str, Any]:
        """Take ``name``'s grant on ``prefix`` away.  :return: the identity."""
        header, _ = self.call("revoke", name=name, prefix=prefix, commit=os.urandom(16).hex())
        return header["identity"]

    def purge(self, name: str, version: int | None = None, all_versions: bool = False) -> list[int]:
        """Remove version ``version`` (current or retained) of ``name``, or every version, for
        good, held or not (an admin's); gc then frees its chunks.  :return: the versions."""
        fields: dict[str, Any] = {"all": True} if all_versions else {"version": version}
        header, _ = self.call(
            "purge", name=p.check_name(name), commit=os.urandom(16).hex(), **fields
        )
        return header["purged"]

    def audit(self, since: float = 0.0) -> Iterator[dict[str, Any]]:
        """The audit log from ``since`` (seconds since the epoch), oldest first, a page at a
        time: yields entries (maps: ``seq``, ``time``, ``identity``, ``op``, ``names`` or
        ``prefix``, ``versions``, ``result``, ...).  A store admin's."""
        after = 0
        while True:
            header, _ = self.call("audit", since=float(since), seq=after)
            yield from header["entries"]
            if header.get("next") is None:
                return
            after = header["next"]

    def s3_key(self, access_key: str) -> dict[str, Any] | None:
        """For an S3 gateway: an access key id's ``identity``, ``secret`` and ``grants``, or
        None.  The gateway checks the request's SigV4 signature with the secret, then sends
        the user's requests with ``as=identity`` (``Client(..., acting_as=identity)``)."""
        header, _ = self.call("s3_key", access_key=access_key)
        if header.get("identity") is None:
            return None
        return _fields(header, "identity", "secret", "grants")

    def cache_stats(self) -> dict | None:
        """The cache worker's counters (hits, misses, bytes, ...), or None when no cache worker
        is connected (storage answers for it)."""
        header, _ = self.call("cache_stats")
        return header["cache"]

    # --- upload ---

    def put(
        self, path: str, name: str | None = None, meta: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Upload a local file under ``name`` (default: its base name); ``meta``: a map of
        str to str (at most 2 KiB in all) kept with the version.  :return: its stat."""
        from . import upload

        name = p.check_name(name if name is not None else os.path.basename(path))
        if meta is None:
            return self.put_many([(path, name)])[0]
        p.check_meta(meta)
        plan = upload.plan_file(path, self.chunk_size, self.session.hasher(), self._hashing(name))
        plan.meta = meta
        return self._put_planned([(path, name, plan)])[0]

    def put_bytes(
        self,
        data: bytes,
        name: str,
        mtime: float | None = None,
        meta: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Upload bytes held in memory (for small data; large files should use :meth:`put`)."""
        from . import upload

        name = p.check_name(name)  # in NFC, as storage keeps it
        data = bytes(data)
        plan = upload.plan_bytes(data, self.chunk_size, mtime, self.session.hasher())
        plan.meta = p.check_meta(meta) if meta else None
        return self._put_planned([(data, name, plan)])[0]

    def put_many(
        self, items: Iterable[tuple[str, str]], done: upload.Done | None = None
    ) -> list[dict[str, Any]]:
        """Upload many ``(local path, name)`` pairs; small files are committed pipelined.
        ``done(index, stat)`` is called as each file is committed.

        :return: the stat of each, in order.
        """
        from . import upload

        checked = [(path, p.check_name(name)) for path, name in items]  # every name, first
        if not checked:
            return []
        # Asked now: the plans are made while the upload's pipeline runs.
        hash_fn = self.session.hasher()
        return self._put_planned(
            (
                (path, name, upload.plan_file(path, self.chunk_size, hash_fn, self._hashing(name)))
                for path, name in checked
            ),
            done,
        )

    def put_stream(self, stream: RawReader, name: str) -> dict[str, Any]:
        """Upload what the unbuffered binary ``stream`` (stdin, a pipe) holds until its end,
        under ``name``, sent as it is read; nothing is visible under the name unless the stream
        was read whole.  :return: the stat of the new version."""
        from . import upload

        stat = upload.put_stream(
            self.session, stream, p.check_name(name), self.chunk_size, self._report
        )
        return _public(stat)

    def _put_planned(
        self, planned: Iterable[upload.Planned], done: upload.Done | None = None
    ) -> list[dict[str, Any]]:
        from . import upload

        tell = None if done is None else lambda i, stat: done(i, _public(stat))
        stats = upload.put_planned(self.session, planned, self._report, tell)
        return [_public(stat) for stat in stats]

    def rm_many(self, names: Iterable[str]) -> list[dict[str, Any] | FmsError]:
        """Remove many names, pipelined (one transaction each).

        :return: per name, in order, the tombstone's stat, or the error that name met
            (a :class:`fms.FmsError`, such as :class:`fms.NotFound`), which does not stop
            the others.
        """
        checked = [p.check_name(n) for n in names]
        return self._each(("rm", {"name": n, "commit": os.urandom(16).hex()}) for n in checked)

    def copy_many(
        self, op: str, pairs: Iterable[tuple[str, str]]
    ) -> list[dict[str, Any] | FmsError]:
        """``cp`` or ``mv`` (``op``) many ``(src, dst)`` pairs on the server, pipelined (one
        transaction each).  :return: per pair, in order, ``dst``'s stat or the error met."""
        if op not in ("cp", "mv"):
            raise BadRequest(f"copy_many does cp or mv, not {op!r}")
        checked = [(p.check_name(src), p.check_name(dst)) for src, dst in pairs]
        return self._each(
            (op, {"src": src, "name": dst, "commit": os.urandom(16).hex()}) for src, dst in checked
        )

    def _each(
        self, requests: Iterable[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any] | FmsError]:
        """Send ``(op, fields)`` requests pipelined; per request, its reply's stat or error."""
        out: dict[int, dict[str, Any] | FmsError] = {}
        numbered = ((i, op, fields, None) for i, (op, fields) in enumerate(requests))
        for i, header, _ in self.session.pipeline(numbered, errors=True):
            if header.get("ok"):
                out[i] = _public(header["stat"])
            else:
                out[i] = from_reply(str(header.get("error")), str(header.get("message")), header)
        return [out[i] for i in range(len(out))]

    # --- download ---

    def get(self, name: str, dest: str, version: int | None = None) -> dict[str, Any]:
        """Download ``name`` to the file ``dest`` (replaced atomically when complete), or as
        ``cp`` would into a device or a FIFO, or through a symlink to its target.

        :return: the file's stat.
        :raises NotFound: no such name.
        :param version: a version number (current or retained: :meth:`versions`); default the
            current one.
        :raises IntegrityError: the content did not match its digest (nothing is written).
        """
        return self._get_one(p.check_name(name), dest, version=version)

    def get_many(
        self,
        items: Iterable[tuple[str, str]],
        done: upload.Done | None = None,
        before: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Download many ``(name, dest path)`` pairs: manifests and the content of small files
        in batches (``get_many``, :data:`GET_BATCH` names a message, pipelined), then the other
        files one after another.

        ``done(index, stat)`` is called as each file is written; ``before()`` once before
        anything is written, while the first batches are on their way (what it raises ends the
        download with nothing written: the destination's checks).

        :return: the stat of each, in order.
        :raises NotFound: a name is not stored (files before it in the batch may be written).
        """
        from . import download

        pairs = [(p.check_name(name), dest) for name, dest in items]
        results: dict[int, dict[str, Any]] = {}  # index -> stat
        later: list[tuple[int, dict[str, Any]]] = []  # (index, manifest) of the large files
        batches = [
            range(k, min(k + GET_BATCH, len(pairs))) for k in range(0, len(pairs), GET_BATCH)
        ]
        requests = (
            (batch, "get_many", {"names": [pairs[i][0] for i in batch], **self._get_fields()}, None)
            for batch in batches
        )

        def written(i: int, manifest: dict[str, Any]) -> None:
            results[i] = _public(manifest)
            if done is not None:
                done(i, results[i])

        for batch, header, frame in self.session.pipeline(requests, BATCH_WINDOW, sent=before):
            replies = p.read_batch(
                header, frame.buffer if frame is not None else None, [pairs[i][0] for i in batch]
            )
            for i, (result, data) in zip(batch, replies, strict=False):
                if "error" in result:
                    raise from_reply(str(result["error"]), str(result.get("message")), result)
                if data is None:
                    later.append((i, result["manifest"]))
                    continue
                manifest = download.write_small(
                    self.session, pairs[i][1], result["manifest"], data, self.fsync
                )
                written(i, manifest)
        for i, manifest in later:
            results[i] = self._get_one(*pairs[i], manifest)
            if done is not None:
                done(i, results[i])
        return [results[i] for i in range(len(pairs))]

    def _get_one(
        self,
        name: str,
        dest: str,
        manifest: dict[str, Any] | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Download one file; ``manifest``: already known (only a small file's content, which
        comes with a ``get``, is then asked for).  A destination that is not a regular file is
        written into, never replaced (:func:`download.destination`)."""
        from . import download

        dest, in_place = download.destination(dest)
        if in_place:
            with download.in_place(dest) as out:
                return self.get_to(name, out, version)
        frame: zmq.Frame | None = None
        via = self._get_fields()  # a batch's large file: untagged
        if manifest is None or p.travels_inline(manifest["size"], manifest["count"]):
            manifest, frame, via = self._manifest(name, version)
        if frame is not None:
            manifest, data = download.fetch_whole(
                self.session, name, manifest, p.unpack_data(frame.buffer)
            )
            download.write_whole(dest, manifest, data, self.fsync)
        else:
            with download.atomic_file(dest, manifest, self.fsync) as out:
                download.download_to_file(self.session, manifest, out, self._report, via)
        return _public(manifest)

    def _get_fields(self) -> dict[str, Any]:
        """Fields of a read: ``fresh`` sends it to storage when the cache is not wanted."""
        return {} if self.cache else {"fresh": True}

    def _chunk_fields(self, header: dict[str, Any]) -> dict[str, Any]:
        """Fields of the chunk requests of the file a ``get`` reply describes: through the
        cache, tagged with the GET (``of``: the broker counts a GET whose every piece came from
        the cache as a hit); else from storage (``fresh``), when this client reads without the
        cache or the cache said it will not hold the file (``cache: false``)."""
        if not self.cache or header.get("cache") is False:
            return {"fresh": True}
        return {"of": header["id"]}

    def _manifest(
        self, name: str, version: int | None = None
    ) -> tuple[dict[str, Any], zmq.Frame | None, dict[str, Any]]:
        """``get`` a manifest (``version``: that version's, from storage).  :return: (manifest,
        inline content frame or None, the fields of its chunk requests)."""
        if version is not None:
            header, frame = self.call("get_version", name=p.check_name(name), version=version)
            return p.check_manifest(header.get("manifest")), frame, {"fresh": True}
        header, frame = self.call("get", name=p.check_name(name), **self._get_fields())
        return p.check_manifest(header.get("manifest")), frame, self._chunk_fields(header)

    def get_bytes(self, name: str) -> bytes:
        """The content of ``name`` in memory (for small files)."""
        from . import download

        manifest, frame, via = self._manifest(name)
        if frame is not None:
            return bytes(
                download.fetch_whole(self.session, name, manifest, p.unpack_data(frame.buffer))[1]
            )
        parts: list[bytes] = []
        download.download_chunks(self.session, manifest, download.Collect(parts), self._report, via)
        return b"".join(parts)

    def get_to(
        self, name: str, stream: download.Sink, version: int | None = None
    ) -> dict[str, Any]:
        """Write the content of ``name`` (``version``: that one) to a binary stream (e.g.
        stdout), verified chunk by chunk before it is written (:raises IntegrityError:)."""
        from . import download

        manifest, frame, via = self._manifest(name, version)
        if frame is not None:
            manifest, data = download.fetch_whole(
                self.session, name, manifest, p.unpack_data(frame.buffer)
            )
            stream.write(data)
        else:
            download.download_chunks(self.session, manifest, stream, self._report, via)
        return _public(manifest)

    def open(self, name: str) -> RemoteFile:
        """A read-only, seekable, file-like stream of ``name``'s content.

        Chunks are fetched ahead (``window`` in flight) and verified one by one, against a chunk
        list checked against the file digest.  Memory: about ``window`` chunks and two pages of
        the list.

        :raises NotFound: no such name.
        """
        from .download import RemoteFile

        manifest, frame, via = self._manifest(name)
        return RemoteFile(self.session, manifest, frame, via)

    def _hashing(self, name: str) -> Callable[[int, int], None] | None:
        """``report(done, total)`` while ``name``'s file is hashed before its upload: the
        progress callback's ``hashing(name, done, total)`` method, if it has one."""
        hook = getattr(self.progress, "hashing", None)
        return None if hook is None else lambda done, total: hook(name, done, total)

    def _report(self, name: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(name, done, total)


_NOT_PUBLIC = ("chunks", "commit", "count", "extents", "pages", "body")


def _fields(header: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: header[k] for k in keys if k in header}


def _public(entry: dict) -> dict:
    """A stat or manifest as the API returns it: a hex digest, the number of chunks (``chunks``),
    no chunk list."""
    out = dict(entry)
    for key in _NOT_PUBLIC:
        out.pop(key, None)
    out["digest"] = entry["digest"].hex()
    out["chunks"] = entry["count"]
    return out
