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
sha256 and every download against the whole-file sha256; downloads are written to a temp file
beside the destination and renamed into place only when complete and verified.

Every request is idempotent (commit and rm carry an id that makes a repeat a no-op), so one that
times out, or meets a moment with no worker, is sent again within its time budget.
"""

import contextlib
import hashlib
import io
import itertools
import os
import time

import zmq

from . import limits
from . import protocol as p
from .errors import (BadRequest, FmsError, IntegrityError, MissingChunks, Timeout, TransportError,
                     Unavailable, from_reply)
from .fileio import read_frame, read_full
from .transport import recv_frames, send_frames

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT = 5.0          # seconds a request may wait for its reply before a retry
CONNECT_TIMEOUT = 3.0          # seconds to wait for a connection to the broker
SEND_TIMEOUT = 1.0             # seconds a send may wait while the connection is down
MAINTENANCE_TIMEOUT = 600.0    # seconds a gc or fsck page may take before it is asked again
DEFAULT_RETRIES = 2            # a request may take (retries + 1) * timeout in all
RETRY_BACKOFF = 0.25           # seconds before resending after `unavailable`; doubles per try
RETRY_BACKOFF_MAX = 2.0
DEFAULT_WINDOW = 8             # requests in flight during a transfer (chunks of one file)
BATCH_WINDOW = 4               # commit_many messages in flight
MANY_WINDOW = 64               # requests in flight when fetching or storing many small files
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class _Outstanding:
    """A request in flight in :meth:`Client.pipeline`."""
    __slots__ = ("tag", "frames", "op", "first_sent", "deadline", "tries", "last_error")

    def __init__(self, tag, frames: list, op: str, first_sent: float, deadline: float):
        self.tag = tag
        self.frames = frames
        self.op = op
        self.first_sent = first_sent
        self.deadline = deadline     # when to send it again (after a timeout or a backoff)
        self.tries = 1
        self.last_error = None       # the `unavailable` that caused the pending resend


class Client:
    """A connection to an fms cluster.

    :param broker: the broker's frontend endpoint; default ``$FMS_BROKER`` or
        ``tcp://127.0.0.1:5555``.
    :param timeout: seconds a request waits for its reply before it is retried.
    :param retries: how many times a request that timed out is sent again.
    :param window: chunk requests kept in flight during one transfer.
    :param chunk_size: chunk size for uploads, in bytes.
    :param progress: optional ``callable(name, done_bytes, total_bytes)`` called as a file's
        chunks move (not for files that travel in one message).
    :param curve: a :class:`fms.security.CurveClient` (own keys + the broker's public key) to
        encrypt and authenticate, or None; see :func:`fms.security.client_keys`.
    :param fsync: make downloads durable (fsync) before they are renamed into place.
    """

    def __init__(self, broker: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, window: int = DEFAULT_WINDOW,
                 chunk_size: int = p.DEFAULT_CHUNK_SIZE, progress=None,
                 ctx: zmq.Context | None = None, curve=None, fsync: bool = False):
        if not p.MIN_CHUNK_SIZE <= chunk_size <= p.MAX_CHUNK_SIZE:
            raise BadRequest(f"chunk size must be between {p.MIN_CHUNK_SIZE} and "
                             f"{p.MAX_CHUNK_SIZE} bytes")
        self.broker = broker or os.environ.get("FMS_BROKER") or DEFAULT_BROKER
        self.timeout = timeout
        self.retries = retries
        self.window = max(1, window)
        self.chunk_size = chunk_size
        self.progress = progress
        self.curve = curve         # a fms.security.CurveClient, or None for plaintext
        self.fsync = fsync
        self.requests_sent = 0     # round trips made; tests use it to count them
        self._ctx = ctx or zmq.Context.instance()
        self._sock = None
        self._ids = itertools.count(1)

    # --- lifecycle ---

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.IMMEDIATE, 1)   # queue only on a live connection: see below
            sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_SIZE)
            # With IMMEDIATE and the broker gone, a send would block forever: bound it.
            sock.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT * 1000))
            if self.curve is not None:
                self.curve.apply(sock)
            try:
                self._connect(sock)
            except BaseException:
                sock.close(linger=0)
                raise
            self._sock = sock
        return self._sock

    def _connect(self, sock: zmq.Socket):
        """Connect and wait until the connection (and any CURVE handshake) is up.

        With IMMEDIATE, POLLOUT means "connected": an unreachable broker is reported now,
        clearly, instead of as a timeout on the first request; a socket monitor tells why a
        handshake failed (key not allowed, plaintext against CURVE, wrong server key).
        """
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        try:
            try:
                sock.connect(self.broker)
            except zmq.ZMQError as exc:
                raise TransportError(f"bad broker endpoint {self.broker!r}: {exc.strerror}; "
                                     f"use the form tcp://HOST:PORT") from None
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLOUT)
            poller.register(monitor, zmq.POLLIN)
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while (wait := deadline - time.monotonic()) > 0:
                ready = dict(poller.poll(int(wait * 1000) + 1))
                if sock in ready:
                    return
                if monitor in ready:
                    # Imported here: zmq.utils.monitor pulls in asyncio, a sixth of start-up.
                    from zmq.utils.monitor import recv_monitor_message
                    event = recv_monitor_message(monitor)["event"]
                    raise TransportError(self._handshake_advice(event))
            raise TransportError(
                f"cannot reach the fms broker at {self.broker} (no connection within "
                f"{CONNECT_TIMEOUT:.0f} s); is it running? start a local cluster with "
                f"'fms up', or point --broker / FMS_BROKER at the right address")
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    def _handshake_advice(self, event: int) -> str:
        where = f"the fms broker at {self.broker}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{where} refused this client's key: ask its operator to put this client's "
                    f"public .key file in the broker's allow directory")
        if self.curve is None:
            return (f"{where} requires encryption (CURVE): give --curve-secret (this client's "
                    f".key_secret) and --server-key (the broker's .key), or set "
                    f"FMS_CURVE_SECRET and FMS_SERVER_KEY")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (f"the secure handshake with {where} failed: the broker does not use CURVE; "
                    f"drop --curve-secret/--server-key, or start the broker with keys")
        return (f"the secure handshake with {where} failed: check that --server-key is the "
                f"broker's public key")

    # --- requests ---

    def _frames(self, op: str, fields: dict, data=None):
        req_id = next(self._ids)
        # ttl_ms: how long this try will be waited for; the broker drops it once that passes.
        frames = [p.encode({"v": p.PROTOCOL_VERSION, "op": op, "id": req_id,
                            "ttl_ms": int(self.timeout * 1000), **fields})]
        if data is not None:
            frames.append(data)
        return req_id, frames

    def _send(self, frames):
        """Send a request.  If the broker is unreachable right now the send is given up after
        SEND_TIMEOUT and counts as a try: the retry logic sends it again or times out."""
        try:
            send_frames(self._socket(), frames)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send to the broker at {self.broker}: "
                                 f"{exc.strerror}") from None
        self.requests_sent += 1

    def _recv(self, deadline: float):
        """One reply (header, data frame or None), or None if ``deadline`` passes first."""
        sock = self._socket()
        while True:
            wait = deadline - time.monotonic()
            if wait <= 0 or not sock.poll(int(wait * 1000) + 1, zmq.POLLIN):
                return None
            frames = recv_frames(sock)
            if len(frames) not in (1, 2):
                continue  # not a reply of ours; the broker never sends this
            try:
                header = p.decode(frames[0].buffer)
            except BadRequest:
                continue
            return header, (frames[1] if len(frames) == 2 else None)

    def pipeline(self, requests, window: int | None = None):
        """Send requests keeping at most ``window`` in flight; yield replies as they come.

        An idempotent request that gets no reply in ``timeout`` is sent again, and so is one
        answered ``unavailable`` (no worker right now, a worker died, a broker restart), after a
        backoff; each request gets ``timeout * (retries + 1)`` seconds in all.

        :param requests: iterable of ``(tag, op, fields, data)``; ``data`` is a data frame or None.
        :return: iterator of ``(tag, header, data_frame)`` in completion order.
        :raises RemoteError: the first error reply that is not retried (its subclass names the code).
        :raises Timeout: a request got no reply within its budget.
        """
        window = window or self.window
        source = iter(requests)
        inflight = {}
        exhausted = False
        # No later than the earliest deadline in flight (an earlier wake-up only costs a check),
        # kept up to date as requests go out rather than recomputed for every reply.
        wake = float("inf")
        while inflight or not exhausted:
            while not exhausted and len(inflight) < window:
                try:
                    tag, op, fields, data = next(source)
                except StopIteration:
                    exhausted = True
                    break
                req_id, frames = self._frames(op, fields, data)
                self._send(frames)
                now = time.monotonic()
                inflight[req_id] = _Outstanding(tag, frames, op, now, now + self.timeout)
                wake = min(wake, now + self.timeout)
            if not inflight:
                break
            reply = self._recv(wake)
            if reply is None:
                self._resend_due(inflight)
                wake = min(o.deadline for o in inflight.values())
                continue
            header, data = reply
            out = inflight.get(header.get("id"))
            if out is None:
                continue  # a late answer to a request already retried and answered
            if not header.get("ok"):
                error = from_reply(str(header.get("error")), str(header.get("message")), header)
                if isinstance(error, Unavailable) and self._may_retry(out):
                    backoff = min(RETRY_BACKOFF * 2 ** (out.tries - 1), RETRY_BACKOFF_MAX)
                    out.deadline = time.monotonic() + backoff
                    out.last_error = error
                    wake = min(wake, out.deadline)
                    continue
                raise error
            del inflight[header["id"]]
            yield out.tag, header, data

    def _budget(self) -> float:
        return self.timeout * (self.retries + 1)

    def _may_retry(self, out: _Outstanding) -> bool:
        return (out.op in p.IDEMPOTENT_OPS
                and time.monotonic() - out.first_sent < self._budget())

    def _resend_due(self, inflight: dict):
        now = time.monotonic()
        for out in inflight.values():
            if out.deadline > now:
                continue
            if not self._may_retry(out):
                if out.last_error is not None:
                    raise out.last_error      # it did answer: say what it said
                raise Timeout(f"no reply to {out.op} from the fms cluster at {self.broker} "
                              f"within {now - out.first_sent:.0f} s ({out.tries} tries); is the "
                              f"broker up and does it have workers? (check with: stats)")
            out.tries += 1
            out.deadline = now + self.timeout
            out.last_error = None
            self._send(out.frames)

    def call(self, op: str, data=None, **fields):
        """One request; returns ``(header, data_frame)``."""
        for _tag, header, frame in self.pipeline([(None, op, fields, data)], 1):
            return header, frame
        raise FmsError(f"no reply to {op}")  # unreachable: pipeline yields or raises

    # --- metadata ---

    def stat(self, name: str) -> dict:
        """Name, size, sha256 (hex), mtime, version, ... of a stored file.

        :raises NotFound: no such name.
        """
        header, _ = self.call("stat", name=p.check_name(name))
        return _public(header["stat"])

    def ls(self, prefix: str = "") -> list:
        """Every stored file whose name starts with ``prefix``, sorted by name."""
        return list(self.iter_ls(prefix))

    def iter_ls(self, prefix: str = "", page: int | None = None):
        """The stored files whose name starts with ``prefix``, in name order, fetched a page at a
        time (``page`` entries, default the server's), so a listing of any length takes the
        memory of one page."""
        p.check_prefix(prefix)
        after = ""
        fields = {} if page is None else {"limit": page}
        while True:
            header, _ = self.call("ls", prefix=prefix, after=after, **fields)
            for entry in header["entries"]:
                yield _public(entry)
            if not header.get("more") or not header["entries"]:
                return
            after = header["entries"][-1]["name"]

    def rm(self, name: str) -> dict:
        """Remove a name.  :raises NotFound: no such name."""
        header, _ = self.call("rm", name=p.check_name(name), commit=os.urandom(16).hex())
        return _public(header["stat"])

    def status(self) -> dict:
        """The broker's view: its endpoints and the live workers."""
        header, _ = self.call("status")
        return {k: v for k, v in header.items() if k not in ("v", "id", "ok")}

    def usage(self) -> dict:
        """The store's ``files``, ``bytes`` (their sizes) and ``chunk_bytes`` (on disk)."""
        header, _ = self.call("usage")
        return header["store"]

    def gc(self, grace: float | None = None, dry_run: bool = False) -> dict:
        """Collect garbage now: chunks unreferenced for longer than ``grace`` seconds (default:
        the storage workers' ``--gc-grace``).  ``grace=0`` also deletes chunks of uploads still
        in progress (they fail and must be retried): the caller's own risk.

        :return: ``chunks`` and ``bytes`` freed (would be, with ``dry_run``), ``orphans`` among
            them, ``pruned`` tombstones and old commit ids.
        """
        fields = {"dry_run": dry_run}
        if grace is not None:
            fields["grace"] = float(grace)
        with self._patience(MAINTENANCE_TIMEOUT):
            header, _ = self.call("gc", **fields)
        return header["gc"]

    def fsck(self):
        """Check every stored file's chunks, a page at a time.

        :return: yields one report per page: ``names``, ``chunks`` and ``bytes`` checked,
            ``damaged`` (``{chunk (hex), problem, names}``); the last page also has ``orphans``
            and ``refcount_errors``.
        """
        after = ""
        while True:
            with self._patience(MAINTENANCE_TIMEOUT):
                header, _ = self.call("fsck", after=after)
            page = header["fsck"]
            page["damaged"] = [{**d, "chunk": d["chunk"].hex()} for d in page["damaged"]]
            yield page
            if page.get("next") is None:
                return
            after = page["next"]

    @contextlib.contextmanager
    def _patience(self, timeout: float):
        """Wait up to ``timeout`` for each reply (a GC or fsck pass does real work)."""
        saved, self.timeout = self.timeout, max(self.timeout, timeout)
        try:
            yield
        finally:
            self.timeout = saved

    def cache_stats(self) -> dict:
        header, _ = self.call("cache_stats")
        return header["cache"]

    # --- upload ---

    def put(self, path: str, name: str | None = None) -> dict:
        """Upload a local file under ``name`` (default: its base name).  :return: its stat."""
        name = p.check_name(name if name is not None else os.path.basename(path))
        return self.put_many([(path, name)])[0]

    def put_bytes(self, data: bytes, name: str, mtime: float | None = None) -> dict:
        """Upload bytes held in memory (for small data; large files should use :meth:`put`)."""
        p.check_name(name)
        data = bytes(data)
        plan = _plan_bytes(data, self.chunk_size, mtime)
        return self._put_planned([(data, name, plan)])[0]

    def put_many(self, items) -> list:
        """Upload many ``(local path, name)`` pairs; small files are committed pipelined.

        :return: the stat of each, in order.
        """
        planned = []
        for path, name in items:
            p.check_name(name)
            planned.append((path, name, _plan_file(path, self.chunk_size)))
        return self._put_planned(planned)

    def _put_planned(self, planned) -> list:
        results = [None] * len(planned)
        small = [i for i, (_, _, plan) in enumerate(planned) if plan.inline is not None]
        # Small files: their content travels with their commit, many files to a message
        # (commit_many), a few messages in flight.
        batches = _batches(small, planned)
        requests = (_commit_many_request(batch, planned) if len(batch) > 1 else
                    (batch, "commit", _commit_fields(planned[batch[0]][1], planned[batch[0]][2]),
                     p.pack_data(planned[batch[0]][2].inline)) for batch in batches)
        for batch, header, _ in self.pipeline(requests, BATCH_WINDOW):
            if len(batch) == 1:
                results[batch[0]] = _public(header["stat"])
                continue
            for i, result in zip(batch, header["results"]):
                if result.get("ok"):
                    results[i] = _public(result["stat"])
                    continue
                error = from_reply(str(result.get("error")), str(result.get("message")), result)
                if not isinstance(error, Unavailable):
                    raise error
                _path, name, plan = planned[i]      # transient for this file: on its own
                header1, _ = self.call("commit", data=p.pack_data(plan.inline),
                                       **_commit_fields(name, plan))
                results[i] = _public(header1["stat"])
        for i, (path, name, plan) in enumerate(planned):
            if plan.inline is None:
                results[i] = self._put_chunked(path, name, plan)
        return results

    def _put_chunked(self, source, name: str, plan) -> dict:
        """Upload the chunks storage lacks and commit; if storage reports chunks missing at the
        commit (collected since `have`, or damaged on its disk), send those and commit again."""
        fields = _commit_fields(name, plan)
        self._upload_chunks(source, plan, name)
        # Storage reads the file back to check its sha256 before it answers: give it the time.
        with self._patience(commit_timeout(plan.size, self.timeout)):
            try:
                header, _ = self.call("commit", **fields)
            except MissingChunks as exc:
                self._upload_chunks(source, plan, name, only=set(exc.missing))
                header, _ = self.call("commit", **fields)
        return _public(header["stat"])

    def _upload_chunks(self, source, plan, name: str, only=None):
        """Send the chunks storage lacks (or exactly those in ``only``), pipelined.  ``source``
        is a local path or the bytes."""
        missing = set(only or ())
        for start in range(0, len(plan.chunks) if only is None else 0, p.MAX_HAVE_BATCH):
            header, _ = self.call("have", hashes=plan.chunks[start:start + p.MAX_HAVE_BATCH])
            missing.update(header["missing"])
        todo = [i for i, digest in enumerate(plan.chunks) if digest in missing]
        total = sum(plan.chunk_len(i) for i in todo)
        done = 0
        with _chunk_reader(source, plan) as read:
            def requests():
                sent = set()
                for i in todo:
                    if plan.chunks[i] in sent:
                        continue  # the same content twice in one file
                    sent.add(plan.chunks[i])
                    frame = read(i)
                    if p.sha256(memoryview(frame)[p.DATA_PREFIX_LEN:]) != plan.chunks[i]:
                        raise FmsError(f"{source} changed while it was being uploaded; "
                                       f"upload it again when it is no longer being written")
                    yield i, "put_chunk", {"hash": plan.chunks[i]}, frame
            for i, _header, _ in self.pipeline(requests(), self._data_window(plan.chunk_size)):
                done += plan.chunk_len(i)
                self._report(name, done, total)

    # --- download ---

    def get(self, name: str, dest: str) -> dict:
        """Download ``name`` to the file ``dest`` (replaced atomically when complete).

        :return: the file's stat.
        :raises NotFound: no such name.
        :raises IntegrityError: the content did not match its sha256 (nothing is written).
        """
        return self.get_many([(name, dest)])[0]

    def get_many(self, items) -> list:
        """Download many ``(name, dest path)`` pairs; manifests (and the content of small files)
        are fetched pipelined, then larger files one after another.

        :return: the stat of each, in order.
        """
        items = [(p.check_name(name), dest) for name, dest in items]
        results = [None] * len(items)
        large = []
        requests = ((i, "get", {"name": name}, None) for i, (name, _) in enumerate(items))
        for i, header, frame in self.pipeline(requests, MANY_WINDOW):
            manifest = p.check_manifest(header.get("manifest"))
            if frame is not None:
                manifest, data = self._whole(items[i][0], manifest, frame)
                with _atomic_file(items[i][1], manifest, self.fsync) as out:
                    out.write(data)
                results[i] = _public(manifest)
            else:
                large.append((i, manifest))
        for i, manifest in large:
            with _atomic_file(items[i][1], manifest, self.fsync) as out:
                self._download_chunks(manifest, out)
            results[i] = _public(manifest)
        return results

    def get_bytes(self, name: str) -> bytes:
        """The content of ``name`` in memory (for small files)."""
        header, frame = self.call("get", name=p.check_name(name))
        manifest = p.check_manifest(header.get("manifest"))
        if frame is not None:
            return bytes(self._whole(name, manifest, frame)[1])
        parts = []
        self._download_chunks(manifest, _Collect(parts))
        return b"".join(parts)

    def get_to(self, name: str, stream) -> dict:
        """Write the content of ``name`` to a binary stream (e.g. stdout), verified chunk by
        chunk; the whole-file sha256 is checked at the end (:raises IntegrityError:)."""
        header, frame = self.call("get", name=p.check_name(name))
        manifest = p.check_manifest(header.get("manifest"))
        if frame is not None:
            manifest, data = self._whole(name, manifest, frame)
            stream.write(data)
        else:
            self._download_chunks(manifest, stream)
        return _public(manifest)

    def _data_window(self, chunk_size: int) -> int:
        """Chunks in flight: ``window``, but never more data than the broker's per-client
        budget (fms.limits.CLIENT_BYTES) holds, so large chunks are not refused."""
        return max(1, min(self.window, limits.CLIENT_BYTES // (chunk_size + 64 * 1024)))

    def _call_aside(self, op: str, **fields):
        """One request on a connection of its own, so that it takes no reply of a pipeline
        under way on this one (rare: after a failed verification)."""
        with Client(self.broker, timeout=self.timeout, retries=self.retries, ctx=self._ctx,
                    curve=self.curve) as aside:
            return aside.call(op, **fields)

    def _whole(self, name: str, manifest: dict, frame):
        """The verified content of a small file that came with its manifest; if it does not
        match, asked once more from storage itself (``fresh``).  :return: (manifest, data)."""
        data = p.unpack_data(frame.buffer)
        if len(data) == manifest["size"] and p.sha256(data) == manifest["sha256"]:
            return manifest, data
        header, frame = self._call_aside("get", name=name, fresh=True)
        manifest = p.check_manifest(header.get("manifest"))
        if frame is None:
            raise IntegrityError(f"{name!r} came without its content from storage; try again")
        return manifest, _checked_whole(manifest, p.unpack_data(frame.buffer))

    def _download_chunks(self, manifest: dict, out):
        """Fetch every chunk pipelined, write them in order to ``out``, verify all of it."""
        whole = hashlib.sha256()
        done = 0
        for piece in self.iter_chunks(manifest):
            whole.update(piece)
            out.write(piece)
            done += len(piece)
            self._report(manifest["name"], done, manifest["size"])
        if whole.digest() != manifest["sha256"]:
            raise IntegrityError(f"{manifest['name']!r} does not match its sha256; "
                                 f"nothing was written, try again")

    def iter_chunks(self, manifest: dict, start: int = 0):
        """Yield the chunks of ``manifest`` from index ``start`` on, in order, each verified;
        ``window`` requests stay in flight and out-of-order arrivals wait (at most ``window``).

        :raises IntegrityError: a chunk does not match its sha256.
        """
        chunks, size, chunk_size = manifest["chunks"], manifest["size"], manifest["chunk_size"]
        held = {}
        next_index = start
        # `len` lets the broker reserve room for the reply (else it assumes the largest chunk).
        requests = ((i, "chunk", {"hash": chunks[i], "len": p.chunk_length(i, size, chunk_size)},
                     None) for i in range(start, len(chunks)))
        for i, _header, frame in self.pipeline(requests, self._data_window(chunk_size)):
            if frame is None:
                raise IntegrityError(f"chunk {i} of {manifest['name']!r} came without data")
            data = p.unpack_data(frame.buffer)
            expect = p.chunk_length(i, size, chunk_size)
            if len(data) != expect or p.sha256(data) != chunks[i]:
                # Once more, from storage itself (`fresh`: the broker bypasses the cache).
                _, frame = self._call_aside("chunk", hash=chunks[i], len=expect, fresh=True)
                data = p.unpack_data(frame.buffer) if frame is not None else b""
                if len(data) != expect or p.sha256(data) != chunks[i]:
                    raise IntegrityError(f"chunk {i} of {manifest['name']!r} does not match its "
                                         f"sha256, also from storage; nothing was written, try "
                                         f"again")
            held[i] = data
            while next_index in held:
                yield held.pop(next_index)
                next_index += 1

    def open(self, name: str) -> "RemoteFile":
        """A read-only, seekable, file-like stream of ``name``'s content.

        Chunks are fetched ahead (``window`` in flight) and verified one by one; a read from the
        start to the end also checks the whole-file sha256.  Memory: about ``window`` chunks.

        :raises NotFound: no such name.
        """
        header, frame = self.call("get", name=p.check_name(name))
        return RemoteFile(self, p.check_manifest(header.get("manifest")), frame)

    def _report(self, name: str, done: int, total: int):
        if self.progress is not None:
            self.progress(name, done, total)


class RemoteFile(io.RawIOBase):
    """What :meth:`Client.open` returns: read it like a local binary file."""

    def __init__(self, client: Client, manifest: dict, inline_frame=None):
        super().__init__()
        self._client = client
        self.manifest = manifest
        self.name = manifest["name"]
        self.size = manifest["size"]
        self._pos = 0
        self._buf = memoryview(b"")   # the current chunk, from offset _buf_start
        self._buf_start = 0
        self._stream = None
        self._whole = hashlib.sha256()
        self._hashed_to = 0           # bytes hashed so far, while reading in order from 0
        if inline_frame is not None:
            self._buf = _checked_whole(manifest, p.unpack_data(inline_frame.buffer))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` as far as the content goes (short only at the end of the file)."""
        if self.closed:
            raise ValueError("read from a closed file")
        out = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(out) and self._pos < self.size:
            if not self._buf_start <= self._pos < self._buf_start + len(self._buf):
                self._fetch_chunk_at(self._pos)
            start = self._pos - self._buf_start
            n = min(len(out) - filled, len(self._buf) - start)
            out[filled:filled + n] = self._buf[start:start + n]
            filled += n
            self._pos += n
        return filled

    def _fetch_chunk_at(self, pos: int):
        chunk_size = self.manifest["chunk_size"]
        index = pos // chunk_size
        expected_start = self._buf_start + len(self._buf)
        if self._stream is None or pos < self._buf_start or pos >= expected_start + chunk_size:
            # A jump: restart the prefetching stream at the chunk that holds pos.
            self._stream = self._client.iter_chunks(self.manifest, index)
            self._buf_start = index * chunk_size
        else:
            self._buf_start = expected_start
        self._buf = next(self._stream)
        self._hash_in_order()

    def _hash_in_order(self):
        if self._buf_start == self._hashed_to:
            self._whole.update(self._buf)
            self._hashed_to += len(self._buf)
            if self._hashed_to == self.size and self._whole.digest() != self.manifest["sha256"]:
                raise IntegrityError(f"{self.name!r} does not match its sha256")

    def close(self):
        self._stream = None
        super().close()


# --- upload planning ---

class _Plan:
    """What an upload will send: sizes, chunk digests, and the content of a small file."""
    __slots__ = ("size", "chunk_size", "chunks", "sha256", "mtime", "inline")

    def __init__(self, size: int, chunk_size: int, chunks: list, sha256: bytes, mtime: float,
                 inline: bytes | None):
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.sha256 = sha256
        self.mtime = mtime
        self.inline = inline       # the content, if it travels with the commit

    def chunk_len(self, i: int) -> int:
        return p.chunk_length(i, self.size, self.chunk_size)


def _plan_file(path: str, chunk_size: int) -> _Plan:
    """Hash a local file chunk by chunk (one read pass, memory of one chunk)."""
    try:
        f = open(path, "rb", buffering=0)
    except IsADirectoryError:
        raise BadRequest(f"{path} is a directory; upload a folder with: put -r {path}") from None
    except OSError as exc:
        raise FmsError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        st = os.fstat(f.fileno())
        whole = hashlib.sha256()
        chunks = []
        size = 0
        first = b""
        view = memoryview(bytearray(chunk_size))
        while True:
            n = read_full(f, view)
            if n == 0:
                break
            piece = view[:n]
            whole.update(piece)
            chunks.append(p.sha256(piece))
            if size == 0:
                first = bytes(piece)
            size += n
            if n < chunk_size:
                break
    inline = first if p.travels_inline(size, len(chunks)) else None
    return _Plan(size, chunk_size, chunks, whole.digest(), st.st_mtime, inline)


def _plan_bytes(data: bytes, chunk_size: int, mtime) -> _Plan:
    chunks = [p.sha256(data[i:i + chunk_size]) for i in range(0, len(data), chunk_size)]
    inline = data if p.travels_inline(len(data), len(chunks)) else None
    return _Plan(len(data), chunk_size, chunks, p.sha256(data),
                 mtime if mtime is not None else time.time(), inline)


BATCH_FILES = 128              # small files per commit_many this client sends (at most MAX_BATCH_FILES)
COMMIT_CHECK_RATE = 32 * p.MiB   # bytes/s a commit's read-back is assumed to run at, at worst


def commit_timeout(size: int, timeout: float) -> float:
    """How long to wait for a commit's reply: storage reads the whole file back to check it
    (at S3's pace, a few GiB take longer than the usual per-request timeout)."""
    return max(timeout, size / COMMIT_CHECK_RATE)


BATCH_HEADER_BYTES = 32 * 1024   # names in one commit_many (its header and route stay small)


def _batches(indices, planned) -> list:
    """Small files grouped for commit_many: at most BATCH_FILES files, MAX_BATCH_BYTES of
    content and BATCH_HEADER_BYTES of names each."""
    batches, current, size, names = [], [], 0, 0
    for i in indices:
        name, plan = planned[i][1], planned[i][2]
        n = len(name.encode("utf-8")) + 64
        if current and (len(current) == BATCH_FILES or size + plan.size > p.MAX_BATCH_BYTES
                        or names + n > BATCH_HEADER_BYTES):
            batches.append(current)
            current, size, names = [], 0, 0
        current.append(i)
        size += plan.size
        names += n
    if current:
        batches.append(current)
    return batches


def _commit_many_request(batch, planned):
    plans = [planned[i][2] for i in batch]
    fields = {"names": [planned[i][1] for i in batch], "sizes": [pl.size for pl in plans],
              "sha256s": [pl.sha256 for pl in plans], "mtimes": [pl.mtime for pl in plans],
              "commits": [os.urandom(16).hex() for _ in batch], "chunk_size": plans[0].chunk_size}
    return batch, "commit_many", fields, p.pack_data(b"".join(pl.inline for pl in plans))


def _commit_fields(name: str, plan: _Plan) -> dict:
    return {"name": name, "size": plan.size, "chunk_size": plan.chunk_size, "chunks": plan.chunks,
            "sha256": plan.sha256, "mtime": plan.mtime, "commit": os.urandom(16).hex()}


@contextlib.contextmanager
def _chunk_reader(source, plan: _Plan):
    """``read(i)`` -> chunk i as a data frame, from a local file (``source`` a path, read
    straight into the frame) or from bytes in memory."""
    if isinstance(source, bytes):
        yield lambda i: p.pack_data(source[i * plan.chunk_size:i * plan.chunk_size
                                           + plan.chunk_len(i)])
        return
    with open(source, "rb", buffering=0) as f:
        def read(i):
            frame, _view, got = read_frame(f, plan.chunk_len(i), i * plan.chunk_size)
            if got != plan.chunk_len(i):
                raise FmsError(f"{source} got shorter while it was being uploaded; upload it "
                               f"again when it is no longer being written")
            return frame
        yield read


# --- download helpers ---

def _checked_whole(manifest: dict, data) -> memoryview:
    if len(data) != manifest["size"] or p.sha256(data) != manifest["sha256"]:
        raise IntegrityError(f"{manifest['name']!r} does not match its sha256; "
                             f"nothing was written, try again")
    return data


@contextlib.contextmanager
def _atomic_file(dest: str, manifest: dict, fsync: bool = False):
    """A temp file beside ``dest``, renamed onto it only if the body succeeds (and the content
    was verified): whenever the client dies, ``dest`` holds the old file or the new one, whole.
    With ``fsync`` the data also reaches the disk before the rename (survives a power loss),
    at a price: cp, curl and rsync do not do it by default either."""
    folder = os.path.dirname(os.path.abspath(dest))
    # Created with the umask's permissions like any new file (0666 & ~umask), O_EXCL so a name
    # is never shared; pid and random part let `fms` tell its own leftovers.
    tmp = os.path.join(folder, f".{os.path.basename(dest)}.{os.getpid()}.{os.urandom(4).hex()}"
                               f".fms-part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, flags, 0o666)
    except OSError as exc:
        raise FmsError(f"cannot write to {folder}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as out:
            yield out
            out.flush()
            if fsync:
                os.fsync(fd)
            os.utime(fd, (time.time(), manifest["mtime"]))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Collect:
    def __init__(self, parts):
        self.parts = parts

    def write(self, data):
        self.parts.append(bytes(data))


def _public(entry: dict) -> dict:
    """A stat or manifest as the API returns it: hex digests, no chunk list."""
    out = {k: v for k, v in entry.items() if k not in ("chunks", "commit")}
    out["sha256"] = entry["sha256"].hex()
    out["chunks"] = len(entry["chunks"]) if isinstance(entry.get("chunks"), list) else entry.get("chunks")
    return out
