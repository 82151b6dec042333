"""What the storage engine stores, as plain objects: no wire headers, no SQL.

A *version* is what a name points at: its size, file digest (and its kind), extents, chunk
list (a short one kept with it, a longer one in pages listed by a stored body: see
:mod:`fms.wire.manifest`), metadata map, mtime, version number and the id of the commit that made
it.  A *change* asks the metadata engine to make a new version (:class:`NewVersion`), remove a
name (:class:`Removal`), give a name another name's content (:class:`Copy`: metadata only, what
it lists gains one reference; with ``move``, the source is removed in the same transaction), or
make a retained version current again (:class:`Restore`).  Every change has ``names``: the
names it changes, and ``actor``: the identity that asked for it (:mod:`fms.policy`), which the
audit log records with it.

With versions kept (``--keep-versions N``), a version that an overwrite or a removal replaces is
*retained*: it keeps its chunks' references, and ``N`` of them per name are kept, the newest.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .. import wire as p
from ..errors import IntegrityError


@dataclass(frozen=True, slots=True)
class Version:
    """A version of a name.  Its content is described by ``extents`` and either ``chunks`` (a
    short chunk list, kept with the version) or ``body`` (the id of the stored body, which lists
    the pages); ``pages`` is the body's page list when it is kept with the version too (a small
    body).  A listing (``ls``) loads none of these: they are None there."""

    name: str
    size: int
    digest: p.Digest
    digest_kind: str  # p.DIGEST_TREE, or p.DIGEST_CONTENT for versions stored before it
    chunk_size: int  # of its first extent (the file's, when it has one); 0 if empty
    count: int  # chunks, in all extents
    mtime: float
    version: int
    commit: str  # id of the commit (or rm) that made this version
    committed: float  # when, in seconds since the epoch
    meta: dict[str, str] = field(default_factory=dict)  # at most p.MAX_META_BYTES
    deleted: bool = False  # a tombstone: the name was removed
    extents: tuple[p.Extent, ...] | None = None
    chunks: tuple[p.Digest, ...] | None = None  # the digests, when kept with the version
    pages: tuple[p.Digest, ...] | None = None  # the page ids, when kept with the version
    body: p.Digest | None = None  # the id of the stored body (a paged chunk list)

    def summary(self) -> dict[str, Any]:
        """What stat and ls return (a *stat*): the manifest without its chunk list."""
        out: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "digest": self.digest,
            "digest_kind": self.digest_kind,
            "mtime": self.mtime,
            "version": self.version,
            "chunk_size": self.chunk_size,
            "count": self.count,
            "committed": self.committed,
            "meta": self.meta,
        }
        if self.deleted:
            out["deleted"] = True
        return out

    def manifest(self, digest_fn: str) -> dict[str, Any]:
        """The wire form of a manifest: the stat, the store's digest function (``digest_fn``:
        every digest in it is made with it), and the chunk list (short), or its body's id with
        its extents and pages if they are small (docs/PROTOCOL.md), at most
        ``p.MANIFEST_MAX`` bytes."""
        out = {**self.summary(), "commit": self.commit, "digest_fn": digest_fn}
        if self.body is None:
            out["extents"] = p.pack_extents(self.extents or ())
            out["chunks"] = list(self.chunks or ())
            return out
        out["body"] = self.body
        if self.pages is not None:
            out["extents"] = p.pack_extents(self.extents or ())
            out["pages"] = list(self.pages)
        return out

    def stat(self) -> "Version":
        """This version without its chunk list (what a remembered commit keeps)."""
        return self.numbered(self.version, lists=False)

    def numbered(self, number: int, lists: bool = True) -> "Version":
        """This version as number ``number`` (``lists``: with what it lists).  Built directly:
        ``dataclasses.replace`` cost a group commit of small files a tenth of its time."""
        return Version(
            self.name,
            self.size,
            self.digest,
            self.digest_kind,
            self.chunk_size,
            self.count,
            self.mtime,
            number,
            self.commit,
            self.committed,
            self.meta,
            self.deleted,
            *((self.extents, self.chunks, self.pages, self.body) if lists else ()),
        )


@dataclass(frozen=True, slots=True)
class NewVersion:
    """A commit: make ``name`` point at this content.  Checked by the engine before it is asked.

    The content is ``extents`` and either ``chunks`` (every digest, at most
    ``p.INLINE_CHUNKS``) or ``pages`` (the ids of stored pages, as the extents page them).
    """

    name: str
    extents: tuple[p.Extent, ...]
    digest: p.Digest
    mtime: float
    commit: str
    chunks: tuple[p.Digest, ...] | None = None
    pages: tuple[p.Digest, ...] | None = None
    digest_kind: str = p.DIGEST_TREE
    meta: dict = field(default_factory=dict)
    actor: str = "local"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def size(self) -> int:
        return sum(size for _cs, size in self.extents)

    @property
    def chunk_size(self) -> int:
        return self.extents[0][0] if self.extents else 0

    @property
    def count(self) -> int:
        return sum(-(-size // cs) for cs, size in self.extents)


@dataclass(frozen=True, slots=True)
class Removal:
    """An rm: remove ``name``; ``prefix``: one of the names an ``rm -r`` of it removes."""

    name: str
    commit: str
    actor: str = "local"
    prefix: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Copy:
    """A cp (or with ``move`` an mv): make ``name`` point at the live content of ``src``."""

    src: str
    name: str
    commit: str
    move: bool = False
    actor: str = "local"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.src, self.name) if self.move else (self.name,)


@dataclass(frozen=True, slots=True)
class Restore:
    """Make retained version ``version`` of ``name`` (None: the newest retained one) current
    again, as a new version; also after the name was removed."""

    name: str
    version: int | None
    commit: str
    actor: str = "local"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Totals:
    files: int = 0  # live names
    bytes: int = 0  # the sum of their sizes
    chunks: int = 0  # chunks held, referenced or awaiting collection
    chunk_bytes: int = 0  # their bytes (after dedup)

    def as_dict(self) -> dict[str, int]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
        }


# What the metadata engine is asked to apply (:meth:`~.meta.base.MetaEngine.apply`).
Change: TypeAlias = NewVersion | Removal | Copy | Restore


def check_chunks(
    name: str,
    extents: Sequence[p.Extent],
    chunks: Sequence[p.Digest],
    sizes: Mapping[p.Digest, int],
) -> None:
    """That each chunk of a short list has the size its place needs (``sizes``: digest ->
    stored size).  :raises IntegrityError:"""
    at = 0
    for chunk_size, size in extents:
        count = -(-size // chunk_size)
        for i in range(count):
            want = p.chunk_length(i, size, chunk_size)
            got = sizes[chunks[at + i]]
            if got != want:
                raise IntegrityError(
                    f"chunk {at + i} of {name!r} is {got} bytes, the file's shape needs {want}"
                )
        at += count
    if at != len(chunks):
        raise IntegrityError(f"{name!r} lists {len(chunks)} chunks, its extents have {at}")


def check_pages(
    name: str,
    extents: Sequence[p.Extent],
    pages: Sequence[p.Digest],
    rows: Mapping[p.Digest, tuple[int, int, int]],
) -> None:
    """That each page of a paged list has the chunk count and sizes its place needs
    (``rows``: page id -> (chunks, size of all but the last, size of the last)), in proportion
    to the pages: what each page holds was found when it was stored.  :raises IntegrityError:"""
    at = 0
    for e, (chunk_size, size) in enumerate(extents):
        count = -(-size // chunk_size)
        n = p.extent_pages(count)
        for j in range(n):
            if at + j >= len(pages):
                raise IntegrityError(f"{name!r} lists {len(pages)} pages, its extents need more")
            got, head, tail = rows[pages[at + j]]
            want = p.PAGE_CHUNKS if j < n - 1 else count - p.PAGE_CHUNKS * (n - 1)
            want_tail = chunk_size if j < n - 1 else size - (count - 1) * chunk_size
            if got != want or (got > 1 and head != chunk_size) or tail != want_tail:
                raise IntegrityError(
                    f"page {j} of extent {e} of {name!r} lists {got} chunks (of "
                    f"{'mixed sizes' if head < 0 else f'{head} bytes'}, the last {tail}); "
                    f"its place needs {want} of {chunk_size} bytes, the last {want_tail}"
                )
        at += n
    if at != len(pages):
        raise IntegrityError(f"{name!r} lists {len(pages)} pages, its extents have {at}")
