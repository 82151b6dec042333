"""Uploads: a file is hashed chunk by chunk (one read pass), storage is asked which chunks it
lacks, those are sent pipelined and the manifest is committed; small files travel with their
commit, many to a message (``commit_many``)."""

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
    """What an upload will send: sizes, chunk digests, and the content of a small file."""

    __slots__ = ("chunk_size", "chunks", "inline", "mtime", "sha256", "size")

    def __init__(
        self,
        size: int,
        chunk_size: int,
        chunks: list[p.Digest],
        sha256: p.Digest,
        mtime: float,
        inline: bytes | None,
    ) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.sha256 = sha256
        self.mtime = mtime
        self.inline = inline  # the content, if it travels with the commit

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

HASH_AHEAD = 4  # chunks read ahead of their digests when hashing a large file


def plan_file(path: str, chunk_size: int, report: Callable[[int, int], None] | None = None) -> Plan:
    """Hash a local file chunk by chunk in one read pass: the whole-file sha256 on this thread,
    each chunk's on another (hashlib releases the GIL, so the two run on two cores); memory of
    :data:`HASH_AHEAD` chunks.  ``report(done, total)``: called as the bytes are hashed."""
    try:
        f = open(path, "rb", buffering=0)
    except IsADirectoryError:
        raise BadRequest(f"{path} is a directory; upload a folder with: put -r {path}") from None
    except OSError as exc:
        raise FmsError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        try:
            st = os.fstat(f.fileno())
            view = memoryview(bytearray(chunk_size))
            n = read_full(f, view)
            if n < chunk_size:  # one chunk at most: no thread
                piece = bytes(view[:n])
                chunks = [p.sha256(piece)] if n else []
                inline = piece if p.travels_inline(n, len(chunks)) else None
                return Plan(
                    n, chunk_size, chunks, chunks[0] if n else p.sha256(b""), st.st_mtime, inline
                )
            return _plan_large(
                f,
                view,
                chunk_size,
                st.st_mtime,
                (lambda done: report(done, st.st_size)) if report else None,
            )
        except OSError as exc:  # a read error (EIO), or a file that cannot seek
            raise FmsError(f"cannot read {path}: {exc.strerror or exc}") from None


def _plan_large(
    f: RawFile,
    first: memoryview,
    chunk_size: int,
    mtime: float,
    report: Callable[[int], None] | None = None,
) -> Plan:
    import hashlib  # here: OpenSSL is loaded only by commands that move content
    from concurrent.futures import ThreadPoolExecutor  # only for files of several chunks

    whole, size = hashlib.sha256(), 0
    chunks: list[p.Digest] = []
    ahead: collections.deque[Future[p.Digest]] = collections.deque()
    with ThreadPoolExecutor(1, thread_name_prefix="fms-hash") as pool:
        piece = first
        while piece:
            ahead.append(pool.submit(p.sha256, piece))
            whole.update(piece)
            size += len(piece)
            if report is not None:
                report(size)
            if len(ahead) >= HASH_AHEAD:
                chunks.append(ahead.popleft().result())
            if len(piece) < chunk_size:
                break
            view = memoryview(bytearray(chunk_size))  # the last ones are still being hashed
            piece = view[: read_full(f, view)]
        chunks.extend(future.result() for future in ahead)
    inline = bytes(first) if p.travels_inline(size, len(chunks)) else None
    return Plan(size, chunk_size, chunks, whole.digest(), mtime, inline)


def plan_bytes(data: bytes, chunk_size: int, mtime: float | None) -> Plan:
    chunks = [p.sha256(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)]
    inline = data if p.travels_inline(len(data), len(chunks)) else None
    return Plan(
        len(data),
        chunk_size,
        chunks,
        p.sha256(data),
        mtime if mtime is not None else time.time(),
        inline,
    )


BATCH_FILES = 128  # small files per commit_many this client sends (at most MAX_BATCH_FILES)
COMMIT_CHECK_RATE = 32 * p.MiB  # bytes/s a commit's read-back is assumed to run at, at worst


def commit_timeout(size: int, timeout: float) -> float:
    """How long to wait for a commit's reply: storage reads the whole file back to check it
    (at S3's pace, a few GiB take longer than the usual per-request timeout)."""
    return max(timeout, size / COMMIT_CHECK_RATE)


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
        "sha256s": [pl.sha256 for pl in plans],
        "mtimes": [pl.mtime for pl in plans],
        "commits": [os.urandom(16).hex() for _ in batch],
        "chunk_size": plans[0].chunk_size,
    }
    return batch, "commit_many", fields, p.pack_data(b"".join(pl.content() for pl in plans))


def _commit_fields(name: str, plan: Plan) -> dict[str, Any]:
    return {
        "name": name,
        "size": plan.size,
        "chunk_size": plan.chunk_size,
        "chunks": plan.chunks,
        "sha256": plan.sha256,
        "mtime": plan.mtime,
        "commit": os.urandom(16).hex(),
    }


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
    end, under ``name``: each chunk is hashed and sent as it is read, the whole file's sha256
    computed on the way, and the manifest committed at the end, so nothing is visible under the
    name unless the stream was read whole.  A stream cannot be asked about before it is read,
    so every chunk is sent (storage keeps one copy of each).  Memory: ``window`` chunks.
    ``report(name, done, None)`` as chunks are sent.  :return: the stat (as the wire has it)."""
    import hashlib

    whole, size = hashlib.sha256(), 0
    chunks: list[p.Digest] = []

    def read() -> tuple[bytearray, int]:
        frame = p.data_buffer(chunk_size)
        try:
            got = read_full(stream, memoryview(frame)[p.DATA_PREFIX_LEN :])
        except OSError as exc:
            raise FmsError(f"cannot read {name!r}'s input: {exc.strerror or exc}") from None
        if got < chunk_size:
            frame = p.pack_data(memoryview(frame)[p.DATA_PREFIX_LEN : p.DATA_PREFIX_LEN + got])
        return frame, got

    first, got = read()
    if got < chunk_size:  # the whole stream in one read: as any file of that size
        data = bytes(p.unpack_data(first))
        return put_planned(session, [(data, name, plan_bytes(data, chunk_size, None))], report)[0]

    def requests() -> Iterator[tuple[int, str, dict[str, Any], bytearray]]:
        nonlocal size
        frame, n = first, got
        while n:
            piece = p.unpack_data(frame)
            digest = p.sha256(piece)
            whole.update(piece)
            chunks.append(digest)
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
    plan = Plan(size, chunk_size, chunks, whole.digest(), time.time(), None)
    with session.patience(commit_timeout(size, session.timeout)):
        header, _ = session.call("commit", **_commit_fields(name, plan))
    return header["stat"]


def put_chunked(
    session: Session, source: Source, name: str, plan: Plan, report: Progress | None
) -> dict[str, Any]:
    """Upload the chunks storage lacks and commit; if storage reports chunks missing at the
    commit (collected since `have`, or damaged on its disk), send those and commit again."""
    fields = _commit_fields(name, plan)
    upload_chunks(session, source, plan, name, report)
    # Storage reads the file back to check its sha256 before it answers: give it the time.
    with session.patience(commit_timeout(plan.size, session.timeout)):
        try:
            header, _ = session.call("commit", **fields)
        except MissingChunks as exc:
            upload_chunks(session, source, plan, name, report, only=set(exc.missing))
            header, _ = session.call("commit", **fields)
    return header["stat"]


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
    for start in range(0, len(plan.chunks) if only is None else 0, p.MAX_HAVE_BATCH):
        header, _ = session.call("have", hashes=plan.chunks[start : start + p.MAX_HAVE_BATCH])
        missing.update(header["missing"])
    todo = [i for i, digest in enumerate(plan.chunks) if digest in missing]
    total = sum(plan.chunk_len(i) for i in todo)
    done = 0
    with _chunk_reader(source, plan) as read:

        def requests() -> Iterator[tuple[int, str, dict[str, Any], bytearray]]:
            sent = set()
            for i in todo:
                if plan.chunks[i] in sent:
                    continue  # the same content twice in one file
                sent.add(plan.chunks[i])
                # Not hashed again here: storage checks every chunk against its digest and
                # refuses one that changed since the plan (below).
                yield i, "put_chunk", {"hash": plan.chunks[i]}, read(i)

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
