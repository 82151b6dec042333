"""Uploads: a file is hashed chunk by chunk (one read pass; its digest is derived from the chunk
digests, :mod:`fms.wire.manifest`), storage is asked which chunks it lacks, those are sent
pipelined, then the pages of a long chunk list, and the manifest is committed; small files
travel with their commit, many to a message (``commit_many``)."""

import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

from .. import wire as p
from ..errors import BadRequest, FmsError, IntegrityError, MissingChunks, Unavailable, from_reply
from ..wire.frames import RawFile, RawReader, read_frame, read_full
from .session import Progress, Session

if TYPE_CHECKING:
    from concurrent.futures import Future  # imported at run time only for large files

BATCH_WINDOW = 4  # commit_many messages in flight


class Plan:
    """What an upload will send: the shape, the chunk digests (back to back, 32 bytes each,
    made with the store's digest function ``hash_fn``), the pages of a long list, the file
    digest derived from them, and a small file's content.  Memory: 32 bytes per chunk (160 MiB
    for the largest file storage takes)."""

    __slots__ = (
        "chunk_size",
        "digest",
        "digests",
        "extents",
        "inline",
        "meta",
        "mtime",
        "page_ids",
        "size",
    )

    def __init__(
        self,
        size: int,
        chunk_size: int,
        digests: p.BytesLike,
        mtime: float,
        inline: bytes | None,
        hash_fn: p.Hasher,
    ) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.digests = bytes(digests)
        self.mtime = mtime
        self.inline = inline  # the content, if it travels with the commit
        self.meta: dict[str, str] | None = None  # the version's metadata map, if any
        self.extents = ((chunk_size, size),) if size else ()
        p.check_extents(self.extents)  # a file over the cap is refused before it is sent
        page_ids = p.page_ids(self.extents, self.digests, hash_fn)
        self.digest = p.tree_digest(self.extents, page_ids, hash_fn)
        self.page_ids = page_ids if self.count > p.INLINE_CHUNKS else None

    @property
    def count(self) -> int:
        return len(self.digests) // p.HASH_LEN

    def chunk(self, i: int) -> bytes:
        return self.digests[i * p.HASH_LEN : (i + 1) * p.HASH_LEN]

    def chunks(self, start: int = 0, end: int | None = None) -> list[p.Digest]:
        """The digests of chunks ``start`` to ``end`` as a list."""
        end = self.count if end is None else min(end, self.count)
        return [self.chunk(i) for i in range(start, end)]

    def page(self, k: int) -> bytes:
        """Page ``k``'s blob (one extent: pages of PAGE_CHUNKS digests, the last the rest)."""
        step = p.PAGE_CHUNKS * p.HASH_LEN
        return self.digests[k * step : (k + 1) * step]

    def chunk_len(self, i: int) -> int:
        return p.chunk_length(i, self.size, self.chunk_size)

    def content(self) -> bytes:
        """The content of a small file, which travels with its commit."""
        assert self.inline is not None, "only a small file travels with its commit"
        return self.inline


# What an upload reads a file from: a local path, or the bytes themselves.
Source: TypeAlias = str | bytes
# A file to upload: where from, its name in the store, and its plan.
Planned: TypeAlias = tuple[Source, str, Plan]
# done(index, stat): a file of a batch is committed.
Done: TypeAlias = Callable[[int, dict[str, Any]], None]
# resend(digests): upload again the chunks storage says it lacks.
Resend: TypeAlias = Callable[[set[p.Digest]], None]

HASH_AHEAD = 4  # chunks read ahead of their digests when hashing a large file
HASH_THREADS = 2  # chunks hashed side by side (hashlib and blake3 release the GIL)


def plan_file(
    path: str,
    chunk_size: int,
    hash_fn: p.Hasher,
    report: Callable[[int, int], None] | None = None,
) -> Plan:
    """Hash a local file chunk by chunk with ``hash_fn`` (the store's digest function) in one
    read pass, :data:`HASH_THREADS` chunks side by side (the file digest is derived from the
    chunk digests: no second pass); memory of :data:`HASH_AHEAD` chunks.  ``report(done,
    total)``: called as the bytes are hashed."""
    try:
        f = open(path, "rb", buffering=0)
    except IsADirectoryError:
        raise BadRequest(f"{path} is a directory; upload a folder with: put -r {path}") from None
    except OSError as exc:
        raise FmsError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        try:
            st = os.fstat(f.fileno())
            p.check_extents(((chunk_size, st.st_size),) if st.st_size else ())  # before reading
            # A file of less than a chunk is read into a buffer of its size and a byte (which
            # finds that it grew): a zeroed chunk for each cost a put -r of 4 KiB files 8 µs
            # a file in the client, a quarter of its work.
            view = memoryview(bytearray(min(chunk_size, st.st_size + 1)))
            n = read_full(f, view)
            if n == len(view) < chunk_size:  # it grew since: the rest of its first chunk
                grown = memoryview(bytearray(chunk_size))
                grown[:n] = view
                view, n = grown, n + read_full(f, grown[n:])
            if n < chunk_size:  # one chunk at most: no thread
                piece = bytes(view[:n])
                digests = hash_fn(piece) if n else b""
                inline = piece if p.travels_inline(n, 1 if n else 0) else None
                return Plan(n, chunk_size, digests, st.st_mtime, inline, hash_fn)
            return _plan_large(
                f,
                view,
                chunk_size,
                st.st_mtime,
                hash_fn,
                (lambda done: report(done, st.st_size)) if report else None,
            )
        except OSError as exc:  # a read error (EIO), or a file that cannot seek
            raise FmsError(f"cannot read {path}: {exc.strerror or exc}") from None


def _plan_large(
    f: RawFile,
    first: memoryview,
    chunk_size: int,
    mtime: float,
    hash_fn: p.Hasher,
    report: Callable[[int], None] | None = None,
) -> Plan:
    from concurrent.futures import ThreadPoolExecutor  # only for files of several chunks

    digests, size = bytearray(), 0
    ahead: collections.deque[Future[p.Digest]] = collections.deque()
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="fms-hash") as pool:
        piece = first
        while piece:
            ahead.append(pool.submit(hash_fn, piece))
            size += len(piece)
            if report is not None:
                report(size)
            if len(ahead) >= HASH_AHEAD:
                digests += ahead.popleft().result()
            if len(piece) < chunk_size:
                break
            view = memoryview(bytearray(chunk_size))  # the last ones are still being hashed
            piece = view[: read_full(f, view)]
        for future in ahead:
            digests += future.result()
    inline = bytes(first) if p.travels_inline(size, len(digests) // p.HASH_LEN) else None
    return Plan(size, chunk_size, digests, mtime, inline, hash_fn)


def plan_bytes(data: bytes, chunk_size: int, mtime: float | None, hash_fn: p.Hasher) -> Plan:
    digests = b"".join(hash_fn(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size))
    inline = data if p.travels_inline(len(data), len(digests) // p.HASH_LEN) else None
    when = mtime if mtime is not None else time.time()
    return Plan(len(data), chunk_size, digests, when, inline, hash_fn)


BATCH_FILES = 128  # small files per commit_many this client sends (at most MAX_BATCH_FILES)
PAGE_WINDOW = 4  # put_page requests in flight (2 MiB each at most)
COMMIT_TRIES = 3  # commits of a file whose chunks or pages storage finds missing, in all

BATCH_HEADER_BYTES = 32 * 1024  # names in one commit_many (its header and route stay small)


def _batches(
    planned: Iterable[Planned], items: list[Planned], large: list[int]
) -> Iterator[list[int]]:
    """Yield the small files of ``planned`` grouped for commit_many (their indices): at most
    BATCH_FILES files, MAX_BATCH_BYTES of content and BATCH_HEADER_BYTES of names each.
    ``planned`` is consumed as batches are asked for, so reading and hashing the next files
    overlaps storage committing the last batch; each triple is appended to ``items``, and the
    index of each file that is not small to ``large``."""
    current: list[int] = []
    size = names = 0
    for triple in planned:
        i = len(items)
        items.append(triple)
        _source, name, plan = triple
        if plan.inline is None:
            large.append(i)
            continue
        if plan.meta:  # commit_many's metadata is every file's: a commit of its own
            yield [i]
            continue
        n = len(name.encode("utf-8")) + 64
        if current and (
            len(current) == BATCH_FILES
            or size + plan.size > p.MAX_BATCH_BYTES
            or names + n > BATCH_HEADER_BYTES
        ):
            yield current
            current, size, names = [], 0, 0
        current.append(i)
        size += plan.size
        names += n
    if current:
        yield current


def _commit_many_request(
    batch: list[int], planned: list[Planned]
) -> tuple[list[int], str, dict[str, Any], bytearray]:
    plans = [planned[i][2] for i in batch]
    fields = {
        "names": [planned[i][1] for i in batch],
        "sizes": [pl.size for pl in plans],
        "hashes": [pl.digests for pl in plans],
        "mtimes": [pl.mtime for pl in plans],
        "commits": [os.urandom(16).hex() for _ in batch],
        "chunk_size": plans[0].chunk_size,
    }
    return batch, "commit_many", fields, p.pack_data(b"".join(pl.content() for pl in plans))


def _commit_fields(name: str, plan: Plan) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": name,
        "extents": p.pack_extents(plan.extents),
        "digest": plan.digest,
        "mtime": plan.mtime,
        "commit": os.urandom(16).hex(),
    }
    if plan.page_ids is None:
        fields["chunks"] = plan.chunks()
    else:
        fields["pages"] = plan.page_ids
    if plan.meta:
        fields["meta"] = plan.meta
    return fields


@contextlib.contextmanager
def _chunk_reader(source: Source, plan: Plan) -> Iterator[Callable[[int], bytearray]]:
    """``read(i)`` -> chunk i as a data frame, from a local file (``source`` a path, read
    straight into the frame) or from bytes in memory."""
    if isinstance(source, bytes):
        yield lambda i: p.pack_data(
            source[i * plan.chunk_size : i * plan.chunk_size + plan.chunk_len(i)]
        )
        return
    try:
        f = open(source, "rb", buffering=0)
    except OSError as exc:
        raise FmsError(f"cannot read {source}: {exc.strerror or exc}") from None
    with f:

        def read(i: int) -> bytearray:
            try:
                frame, _view, got = read_frame(f, plan.chunk_len(i), i * plan.chunk_size)
            except OSError as exc:
                raise FmsError(f"cannot read {source}: {exc.strerror or exc}") from None
            if got != plan.chunk_len(i):
                raise FmsError(
                    f"{source} got shorter while it was being uploaded; upload it "
                    f"again when it is no longer being written"
                )
            return frame

        yield read


def put_planned(
    session: Session,
    planned: Iterable[Planned],
    report: Progress | None,
    done: Done | None = None,
) -> list[dict[str, Any]]:
    """Upload ``(source, name, Plan)`` triples (``source`` a local path or bytes; an iterable,
    consumed as the upload goes); ``done(index, stat)`` as each is committed.  :return: the
    stat of each (as the wire has it), in order."""
    items: list[Planned] = []
    large: list[int] = []  # indices of the files sent in chunks
    results = _Results(done)
    # Small files: their content travels with their commit, many files to a message
    # (commit_many), a few messages in flight.
    requests = (
        _commit_many_request(batch, items)
        if len(batch) > 1
        else (
            batch,
            "commit",
            _commit_fields(items[batch[0]][1], items[batch[0]][2]),
            p.pack_data(items[batch[0]][2].content()),
        )
        for batch in _batches(planned, items, large)
    )
    for batch, header, _ in session.pipeline(requests, BATCH_WINDOW):
        if len(batch) == 1:
            results[batch[0]] = header["stat"]
            continue
        for i, result in zip(batch, header["results"], strict=False):
            if result.get("ok"):
                results[i] = result["stat"]
                continue
            error = from_reply(str(result.get("error")), str(result.get("message")), result)
            if not isinstance(error, Unavailable):
                raise error
            _path, name, plan = items[i]  # transient for this file: on its own
            header1, _ = session.call(
                "commit", data=p.pack_data(plan.content()), **_commit_fields(name, plan)
            )
            results[i] = header1["stat"]
    for i in large:
        results[i] = put_chunked(session, *items[i], report)
    return [results[i] for i in range(len(items))]


class _Results(dict[int, dict[str, Any]]):
    """index -> stat, telling ``done(index, stat)`` (if given) as each is set."""

    def __init__(self, done: Done | None = None) -> None:
        super().__init__()
        self.done = done

    def __setitem__(self, i: int, stat: dict[str, Any]) -> None:
        super().__setitem__(i, stat)
        if self.done is not None:
            self.done(i, stat)


def put_stream(
    session: Session,
    stream: RawReader,
    name: str,
    chunk_size: int,
    report: Progress | None = None,
) -> dict[str, Any]:
    """Upload what an unbuffered binary ``stream`` holds (stdin, a pipe, a device) until its
    end, under ``name``: each chunk is hashed and sent as it is read, and the manifest committed
    at the end (its digest derived from the chunks'), so nothing is visible under the name
    unless the stream was read whole.  A stream cannot be asked about before it is read, so
    every chunk is sent (storage keeps one copy of each).  Memory: ``window`` chunks, and 32
    bytes per chunk sent.  ``report(name, done, None)`` as chunks are sent.  :return: the stat
    (as the wire has it)."""
    digests, size = bytearray(), 0

    def read() -> tuple[bytearray, int]:
        frame = p.data_buffer(chunk_size)
        try:
            got = read_full(stream, memoryview(frame)[p.DATA_PREFIX_LEN :])
        except OSError as exc:
            raise FmsError(f"cannot read {name!r}'s input: {exc.strerror or exc}") from None
        if got < chunk_size:
            frame = p.pack_data(memoryview(frame)[p.DATA_PREFIX_LEN : p.DATA_PREFIX_LEN + got])
        return frame, got

    hash_fn = session.hasher()
    first, got = read()
    if got < chunk_size:  # the whole stream in one read: as any file of that size
        data = bytes(p.unpack_data(first))
        plan = plan_bytes(data, chunk_size, None, hash_fn)
        return put_planned(session, [(data, name, plan)], report)[0]

    def requests() -> Iterator[tuple[int, str, dict[str, Any], bytearray]]:
        nonlocal size
        frame, n = first, got
        while n:
            digest = hash_fn(p.unpack_data(frame))
            digests.extend(digest)
            size += n
            yield n, "put_chunk", {"hash": digest}, frame
            if n < chunk_size:
                return
            frame, n = read()

    sent = 0
    for n, _header, _ in session.pipeline(requests(), session.data_window(chunk_size)):
        sent += n
        if report is not None:
            report(name, sent, None)
    return commit_plan(session, name, Plan(size, chunk_size, digests, time.time(), None, hash_fn))


def put_chunked(
    session: Session, source: Source, name: str, plan: Plan, report: Progress | None
) -> dict[str, Any]:
    """Upload the chunks storage lacks, then the pages of a long chunk list, and commit; if
    storage reports chunks or pages missing at the commit (collected since `have`, or found
    damaged), send those and commit again."""
    upload_chunks(session, source, plan, name, report)
    return commit_plan(
        session,
        name,
        plan,
        resend=lambda d: upload_chunks(session, source, plan, name, report, only=d),
    )


def commit_plan(
    session: Session, name: str, plan: Plan, resend: Resend | None = None
) -> dict[str, Any]:
    """Send the pages of ``plan`` (if its list is long) and commit it, its chunks stored.
    ``resend(digests)`` uploads chunks storage says it lacks (None: they cannot be sent again,
    which is an error)."""
    fields = _commit_fields(name, plan)
    pages = list(range(len(plan.page_ids or ())))
    for attempt in range(COMMIT_TRIES):
        try:
            _put_pages(session, plan, pages, resend)
            header, _ = session.call("commit", **fields)
            return header["stat"]
        except MissingChunks as exc:
            if attempt == COMMIT_TRIES - 1:
                raise
            missing = set(exc.missing)
            pages = [k for k, page in enumerate(plan.page_ids or ()) if page in missing]
            chunks = missing - set(plan.page_ids or ())
            if chunks:
                _resend(resend, chunks, name)
    raise FmsError("unreachable")


def _put_pages(session: Session, plan: Plan, pages: list[int], resend: Resend | None) -> None:
    """Send pages ``pages`` of ``plan`` (each distinct one once), pipelined."""
    page_ids = plan.page_ids or []
    todo = list({page_ids[k]: k for k in pages}.values())
    for _attempt in range(COMMIT_TRIES):
        requests = ((k, "put_page", {"hash": page_ids[k]}, p.pack_data(plan.page(k))) for k in todo)
        done: set[int] = set()
        try:
            for k, _header, _ in session.pipeline(requests, PAGE_WINDOW):
                done.add(k)
            return
        except MissingChunks as exc:  # collected since `have`: send them, then the rest
            _resend(resend, set(exc.missing), "a page")
            todo = [k for k in todo if k not in done]
    raise MissingChunks(
        "storage kept finding chunks of a page missing; upload the file again", missing=()
    )


def _resend(resend: Resend | None, digests: set[p.Digest], name: str) -> None:
    if resend is None:
        raise MissingChunks(
            f"{len(digests)} chunk(s) of {name!r} are no longer in the store and this upload "
            f"cannot send them again; upload the file again",
            missing=list(digests),
        )
    resend(digests)


def upload_chunks(
    session: Session,
    source: Source,
    plan: Plan,
    name: str,
    report: Progress | None,
    only: set[p.Digest] | None = None,
) -> None:
    """Send the chunks storage lacks (or exactly those in ``only``), pipelined.  ``source``
    is a local path or the bytes."""
    missing = set(only or ())
    for start in range(0, plan.count if only is None else 0, p.MAX_HAVE_BATCH):
        header, _ = session.call("have", hashes=plan.chunks(start, start + p.MAX_HAVE_BATCH))
        missing.update(header["missing"])
    todo = [i for i in range(plan.count) if plan.chunk(i) in missing]
    total = sum(plan.chunk_len(i) for i in todo)
    done = 0
    with _chunk_reader(source, plan) as read:

        def requests() -> Iterator[tuple[int, str, dict[str, Any], bytearray]]:
            sent = set()
            for i in todo:
                if plan.chunk(i) in sent:
                    continue  # the same content twice in one file
                sent.add(plan.chunk(i))
                # Not hashed again here: storage checks every chunk against its digest and
                # refuses one that changed since the plan (below).
                yield i, "put_chunk", {"hash": plan.chunk(i)}, read(i)

        try:
            for i, _header, _ in session.pipeline(requests(), session.data_window(plan.chunk_size)):
                done += plan.chunk_len(i)
                if report is not None:
                    report(name, done, total)
        except IntegrityError:
            if isinstance(source, str) and _changed(source, plan):
                raise FmsError(
                    f"{source} changed while it was being uploaded; upload it again "
                    f"when it is no longer being written"
                ) from None
            raise


def _changed(path: str, plan: Plan) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return True
    return (st.st_size, st.st_mtime) != (plan.size, plan.mtime)
