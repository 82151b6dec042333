"""A stored file's chunk list as the client reads it: checked against the file digest before a
byte is fetched, and read a page at a time (:mod:`fms.wire.manifest`).

A manifest carries its chunk list whole when it is short (``chunks``), else the ids of its pages
(``pages``, with its ``extents``) or only its ``body``'s id; a page or a body is fetched by id
(``page``) and checked against it.  Every digest is checked with the digest function the
manifest names (``digest_fn``: the store's).  For a file digest of kind ``tree`` the list itself is
checked against the digest (it is derived from it), so every byte that is then checked against
its chunk's digest is the content the digest names: a download needs no second pass over the
content.  Kind ``content`` (files stored before protocol version 2) was checked by storage
against the stored content when it was committed.
"""

import bisect
from collections.abc import Callable, Iterator
from typing import Any, Self

from .. import wire as p
from ..errors import IntegrityError

PAGES_KEPT = 2  # pages of digests held at once (a read that goes back one page finds it)


class ChunkList:
    """The chunks of ``manifest``, as ``(index, offset, length, digest)``.

    :param fetch: ``fetch(id, fresh) -> bytes``: a page or body by its id (checked here);
        ``fresh``: from storage itself, not the cache.
    :raises IntegrityError: the list does not give the file digest, or a page or body fetched
        does not match its id.
    """

    def __init__(
        self, manifest: dict[str, Any], fetch: Callable[[p.Digest, bool], bytes] | None
    ) -> None:
        self.manifest = manifest
        self.name = manifest["name"]
        self.size = manifest["size"]
        self.count = manifest["count"]
        self._fetch = fetch
        self._pages: dict[int, list[p.Digest]] = {}  # page number -> digests, at most PAGES_KEPT
        self.extents: tuple[p.Extent, ...]
        self._inline: list[p.Digest] | None
        self.page_ids: list[p.Digest] | None
        self.hash = hash_fn = p.manifest_hasher(manifest)
        tree = manifest["digest_kind"] == p.DIGEST_TREE
        if "chunks" in manifest:
            self.extents = p.unpack_extents(manifest["extents"])
            self._inline = list(manifest["chunks"])
            self.page_ids = None
            if tree and p.inline_digest(self.extents, self._inline, hash_fn) != manifest["digest"]:
                raise self._bad("its chunk list does not give its digest")
        else:
            self._inline = None
            body = manifest["body"]
            if "pages" in manifest:
                self.extents = p.unpack_extents(manifest["extents"])
                self.page_ids = list(manifest["pages"])
                if hash_fn(p.pack_body(self.extents, self.page_ids)) != body:
                    raise self._bad("its pages do not give its body")
            else:
                extents, pages = p.unpack_body(self._fetched(body, "its body"))
                self.extents, self.page_ids = extents, list(pages)
            if tree and body != manifest["digest"]:
                raise self._bad("its body does not give its digest")
        # Where each extent starts (chunk index, byte offset) and each page (chunk index).
        self._extent_chunk: list[int] = []
        self._extent_offset: list[int] = []
        self._page_chunk: list[int] = []
        self._page_extent: list[int] = []
        index = offset = 0
        for e, (chunk_size, size) in enumerate(self.extents):
            self._extent_chunk.append(index)
            self._extent_offset.append(offset)
            n = -(-size // chunk_size)
            for first in range(0, n, p.PAGE_CHUNKS):
                self._page_chunk.append(index + first)
                self._page_extent.append(e)
            index += n
            offset += size
        if index != self.count or offset != self.size:
            raise self._bad("its extents do not add up to its size")
        self.on_close: Callable[[], None] | None = None

    def close(self) -> None:
        """Close what fetches the pages (a connection of its own)."""
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def largest_chunk(self) -> int:
        return max((cs for cs, _size in self.extents), default=p.MIN_CHUNK_SIZE)

    def _fetched(self, ident: bytes, what: str) -> bytes:
        """A page or body by its id, checked against it; one that does not match is asked for
        once more from storage itself (``fresh``: the cache may hold a damaged copy)."""
        if self._fetch is None:  # a manifest checked on its own (its list is in it)
            raise self._bad(f"{what} is not in it")
        for fresh in (False, True):
            blob = self._fetch(ident, fresh)
            if self.hash(blob) == ident:
                return blob
        raise self._bad(f"{what} does not match its id, also from storage")

    def _bad(self, why: str) -> IntegrityError:
        return IntegrityError(f"the manifest of {self.name!r} is damaged: {why}; try again")

    def chunk(self, i: int) -> tuple[int, int, p.Digest, bool]:
        """``(offset, length, digest, zeros)`` of chunk ``i`` (see :meth:`items`)."""
        e = bisect.bisect_right(self._extent_chunk, i) - 1
        chunk_size, size = self.extents[e]
        j = i - self._extent_chunk[e]
        digest = self._digest(i)
        offset = self._extent_offset[e] + j * chunk_size
        return (
            offset,
            min(chunk_size, size - j * chunk_size),
            digest,
            digest == zero_digest(chunk_size, self.hash),
        )

    def where(self, i: int) -> dict[str, Any]:
        """The fields a request for chunk ``i`` names its place by: the file, and for a long
        list the page that lists it and its index there, through which an identity that may
        not read the whole store reads it (fms.policy)."""
        if self.page_ids is None:  # a short list, in the manifest itself
            return {"name": self.name}
        k = bisect.bisect_right(self._page_chunk, i) - 1
        return {"name": self.name, "page": self.page_ids[k], "at": i - self._page_chunk[k]}

    def index_at(self, offset: int) -> int:
        """The chunk that holds byte ``offset`` (0 <= offset < size)."""
        e = bisect.bisect_right(self._extent_offset, offset) - 1
        chunk_size = self.extents[e][0]
        return self._extent_chunk[e] + (offset - self._extent_offset[e]) // chunk_size

    def items(self, start: int = 0) -> Iterator[tuple[int, int, int, p.Digest, bool]]:
        """Yield ``(index, offset, length, digest, zeros)`` from chunk ``start`` on, in order;
        ``zeros``: the chunk is all zero bytes (a hole of a sparse file, known from its digest:
        write it as a hole, never fetch it)."""
        if start >= self.count:
            return
        i = start
        for e in range(bisect.bisect_right(self._extent_chunk, start) - 1, len(self.extents)):
            chunk_size, size = self.extents[e]
            zero = zero_digest(chunk_size, self.hash)
            first, base = self._extent_chunk[e], self._extent_offset[e]
            for j in range(i - first, -(-size // chunk_size)):
                digest = self._digest(first + j)
                length = min(chunk_size, size - j * chunk_size)
                yield first + j, base + j * chunk_size, length, digest, digest == zero
            i = first + -(-size // chunk_size)

    def _digest(self, i: int) -> bytes:
        if self._inline is not None:
            return self._inline[i]
        k = bisect.bisect_right(self._page_chunk, i) - 1
        digests = self._pages.get(k)
        if digests is None:
            assert self.page_ids is not None  # no inline list: a long one, in pages
            digests = p.split_digests(self._fetched(self.page_ids[k], f"page {k}"))
            first = self._page_chunk[k]
            end = self._page_chunk[k + 1] if k + 1 < len(self._page_chunk) else self.count
            if len(digests) != end - first:
                raise self._bad(f"page {k} lists {len(digests)} chunks, its place {end - first}")
            if len(self._pages) >= PAGES_KEPT:
                self._pages.pop(next(iter(self._pages)))
            self._pages[k] = digests
        return digests[i - self._page_chunk[k]]


# (digest function, chunk size) -> the digest of that many zero bytes
_ZEROS: dict[tuple[p.Hasher, int], p.Digest] = {}


def zero_digest(chunk_size: int, hash_fn: p.Hasher) -> bytes:
    """The digest of ``chunk_size`` zero bytes under ``hash_fn`` (computed once per chunk size:
    a short last chunk of zeros is fetched as any chunk)."""
    zero = _ZEROS.get((hash_fn, chunk_size))
    if zero is None:
        if len(_ZEROS) >= 8:
            _ZEROS.pop(next(iter(_ZEROS)))
        zero = _ZEROS[(hash_fn, chunk_size)] = hash_fn(bytes(chunk_size))
    return zero
