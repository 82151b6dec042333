"""The shape of a stored file: extents, chunks, pages, the body, and the file digest derived
from them.  Storage, the cache and the client all use this module, so the rules have one home.

- A file is one or more **extents**, each ``(chunk_size, size)``: ``size`` bytes (at least 1)
  in chunks of ``chunk_size`` bytes, the last chunk of each extent the rest.  An ordinary upload
  is one extent; a file put together from parts (an S3 multipart upload, a mount rewriting part
  of a file) has one per part, each part kept as it was sent.  An empty file has no extent.
- Its **chunks** are listed in file order.  A list of at most :data:`INLINE_CHUNKS` digests
  travels and is stored *inline*, with the version; a longer one is cut into **pages**: each
  extent's digests, from its start, :data:`PAGE_CHUNKS` to a page (the last page of an extent
  holds the rest).  A page is stored once, under its **page id**, the digest of its bytes (its
  digests back to back), however many files list it: a file of 1,000,000 times one chunk has
  16 pages, two of them different.
- The **body** lists, per extent, its ``(chunk_size, size)`` as two 8-byte big-endian ints and
  then the ids of its pages.  Its digest is the **file digest** (kind ``tree``): derived from
  the chunk digests, so neither the client nor storage reads the content a second time to get
  it, and a commit is checked in proportion to its pages.  Files stored before this format
  keep the digest of their content (kind ``content``).

Every digest here is made with the store's digest function (:mod:`.digests`), which a manifest
names (``digest_fn``): the functions take it as ``hash_fn``.
"""

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from ..errors import BadRequest, TooLarge
from .digests import DIGEST_FUNCTIONS, Hasher, hasher
from .fields import (
    HASH_LEN,
    MTIME_MAX,
    MTIME_MIN,
    Digest,
    check_mtime,
    check_name,
    need,
    need_hash,
    need_hashes,
    need_int,
)
from .messages import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, KiB, MiB, TiB

if TYPE_CHECKING:
    from ..limits import BytesLike  # not imported at run time: it loads msgpack

__all__ = [
    "DIGEST_CONTENT",
    "DIGEST_KINDS",
    "DIGEST_TREE",
    "EXTENT_LEN",
    "INLINE_CHUNKS",
    "MANIFEST_MAX",
    "MAX_EXTENTS",
    "MAX_FILE_CHUNKS",
    "MAX_META_BYTES",
    "MAX_PAGES",
    "PAGE_CHUNKS",
    "PAGE_REPLY_MAX",
    "Extent",
    "check_extents",
    "check_manifest",
    "check_meta",
    "extent_pages",
    "file_pages",
    "inline_digest",
    "join_digests",
    "manifest_hasher",
    "one_chunk_digest",
    "pack_body",
    "pack_extents",
    "page_counts",
    "page_ids",
    "pages_of",
    "split_digests",
    "tree_digest",
    "unpack_body",
    "unpack_extents",
]

PAGE_CHUNKS = 65536  # digests per page (2 MiB of them)
INLINE_CHUNKS = 32  # a chunk list this short is stored and sent with its version
MAX_EXTENTS = 10_000  # extents per file (S3's parts per multipart upload)
MAX_FILE_CHUNKS = 5 * MiB  # chunks per file: 5 TiB in 1 MiB chunks, 80 TiB in 16 MiB ones
MAX_PAGES = MAX_EXTENTS + MAX_FILE_CHUNKS // PAGE_CHUNKS  # pages a file can need at most
EXTENT_LEN = 16  # bytes of one extent in a body or an `extents` field
MAX_META_BYTES = 2048  # a version's metadata map: its keys and values in UTF-8, in all
MAX_META_KEY = 128  # bytes of one metadata key
DIGEST_CONTENT = "content"  # the digest of the content itself (files stored before version 2)
DIGEST_TREE = "tree"  # the digest of the body, derived from the chunk digests
DIGEST_KINDS = (DIGEST_CONTENT, DIGEST_TREE)
# Reply sizes, known before the reply is built (the broker reserves room for them): a manifest
# is its stat (a name of at most 1 KiB, metadata of at most 2 KiB) and a chunk list of at most
# INLINE_CHUNKS digests or a body of at most 1 KiB (else only the body's id), so a `get` reply
# is at most INLINE_MAX + MANIFEST_MAX + 4 KiB, and a `get_many` reply of n names at most
# MAX_BATCH_BYTES + n * MANIFEST_MAX + 4 KiB; a `page` reply is a page or a body.
MANIFEST_MAX = 6 * KiB
PAGE_REPLY_MAX = PAGE_CHUNKS * HASH_LEN + 4 * KiB

_EXTENT = struct.Struct(">QQ")

Extent: TypeAlias = tuple[int, int]  # (chunk_size, size)


def _count(chunk_size: int, size: int) -> int:
    return -(-size // chunk_size)


def extent_pages(count: int) -> int:
    """How many pages an extent of ``count`` chunks has."""
    return -(-count // PAGE_CHUNKS)


def page_counts(extents: Iterable[Extent]) -> list[int]:
    """The number of digests on each page of a file, in order."""
    out: list[int] = []
    for chunk_size, size in extents:
        count = _count(chunk_size, size)
        full, rest = divmod(count, PAGE_CHUNKS)
        out += [PAGE_CHUNKS] * full + ([rest] if rest else [])
    return out


def file_pages(extents: Iterable[Extent]) -> int:
    return sum(extent_pages(_count(cs, size)) for cs, size in extents)


def check_extents(extents: Sequence[Extent], what: str = "file") -> int:
    """That ``extents`` (pairs of ints) describe a storable file.  :return: its chunk count.

    :raises BadRequest: an extent is malformed; :raises TooLarge: over the caps.
    """
    if len(extents) > MAX_EXTENTS:
        raise TooLarge(f"a {what} has at most {MAX_EXTENTS} extents, this one {len(extents)}")
    count = 0
    for chunk_size, size in extents:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise BadRequest(
                f"an extent's chunk size must be {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes, "
                f"got {chunk_size}"
            )
        if size < 1:
            raise BadRequest("an extent holds at least one byte (an empty file has no extent)")
        count += _count(chunk_size, size)
    if count > MAX_FILE_CHUNKS:
        raise TooLarge(
            f"a {what} holds at most {MAX_FILE_CHUNKS:,} chunks ({MAX_FILE_CHUNKS * MiB // TiB} "
            f"TiB in 1 MiB chunks, {MAX_FILE_CHUNKS * MAX_CHUNK_SIZE // TiB} TiB in "
            f"{MAX_CHUNK_SIZE // MiB} MiB ones); this one would have {count:,}: upload it with "
            f"larger chunks (--chunk-size)"
        )
    return count


def pack_extents(extents: Iterable[Extent]) -> bytes:
    return b"".join(_EXTENT.pack(cs, size) for cs, size in extents)


def unpack_extents(blob: "BytesLike") -> tuple[Extent, ...]:
    """Extents from their wire form (16 bytes each).  :raises BadRequest: not a whole number."""
    blob = bytes(blob)
    if len(blob) % EXTENT_LEN:
        raise BadRequest(f"extents are {EXTENT_LEN} bytes each, got {len(blob)} bytes")
    if len(blob) > MAX_EXTENTS * EXTENT_LEN:
        raise TooLarge(f"a file has at most {MAX_EXTENTS} extents")
    return tuple(_EXTENT.iter_unpack(blob))


def join_digests(digests: Iterable[Digest]) -> bytes:
    return b"".join(digests)


def split_digests(blob: "BytesLike") -> list[Digest]:
    """Digests back to back, as a list of bytes.  :raises BadRequest: not whole digests."""
    blob = bytes(blob)
    if len(blob) % HASH_LEN:
        raise BadRequest(f"a list of digests is {HASH_LEN} bytes each, got {len(blob)} bytes")
    return [blob[i : i + HASH_LEN] for i in range(0, len(blob), HASH_LEN)]


def pack_body(extents: Iterable[Extent], page_ids: Sequence[Digest]) -> bytes:
    """The body of a file: per extent, ``(chunk_size, size)`` and then its pages' ids."""
    out: list[bytes] = []
    at = 0
    for chunk_size, size in extents:
        n = extent_pages(_count(chunk_size, size))
        out.append(_EXTENT.pack(chunk_size, size))
        out.extend(page_ids[at : at + n])
        at += n
    if at != len(page_ids):
        raise BadRequest(f"the extents have {at} pages, {len(page_ids)} page ids were given")
    return b"".join(out)


def unpack_body(blob: "BytesLike") -> tuple[tuple[Extent, ...], tuple[Digest, ...]]:
    """``(extents, page ids)`` of a body.  :raises BadRequest: it does not parse whole."""
    view = memoryview(bytes(blob))
    extents: list[Extent] = []
    pages: list[Digest] = []
    at = 0
    while at < len(view):
        if at + EXTENT_LEN > len(view) or len(extents) >= MAX_EXTENTS:
            raise BadRequest("a body's extents do not parse")
        chunk_size, size = _EXTENT.unpack_from(view, at)
        at += EXTENT_LEN
        if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and size >= 1):
            raise BadRequest("a body holds an extent that cannot be")
        n = extent_pages(_count(chunk_size, size))
        if n > MAX_PAGES or at + n * HASH_LEN > len(view):
            raise BadRequest("a body is shorter than its extents say")
        pages += [bytes(view[at + i * HASH_LEN : at + (i + 1) * HASH_LEN]) for i in range(n)]
        extents.append((chunk_size, size))
        at += n * HASH_LEN
    check_extents(extents)
    return tuple(extents), tuple(pages)


def tree_digest(extents: Iterable[Extent], page_ids: Sequence[Digest], hash_fn: Hasher) -> Digest:
    """The file digest of kind ``tree``: the digest of the body."""
    return hash_fn(pack_body(extents, page_ids))


def pages_of(extents: Iterable[Extent], digests: Sequence[Digest]) -> list[Sequence[Digest]]:
    """The pages (each a list of digests) of a file whose whole chunk list is ``digests``."""
    out: list[Sequence[Digest]] = []
    at = 0
    for count in page_counts(extents):
        out.append(digests[at : at + count])
        at += count
    if at != len(digests):
        raise BadRequest(f"the extents have {at} chunks, {len(digests)} digests were given")
    return out


def inline_digest(extents: Sequence[Extent], digests: Iterable[Digest], hash_fn: Hasher) -> Digest:
    """The ``tree`` digest of a file whose chunk list is known whole (a short one)."""
    return tree_digest(extents, page_ids(extents, join_digests(digests), hash_fn), hash_fn)


def one_chunk_digest(extents: "BytesLike", digest: Digest, hash_fn: Hasher) -> Digest:
    """:func:`inline_digest` of a file of one chunk, from its ``extents`` as they travel (one
    extent, packed): its body is that extent and its one page's id, the digest of ``digest``.
    A download of many small files checks one per file, without unpacking anything."""
    return hash_fn(bytes(extents) + hash_fn(digest))


def page_ids(extents: Iterable[Extent], digests: bytes, hash_fn: Hasher) -> list[Digest]:
    """The page ids of a file whose chunk digests are ``digests`` (back to back, bytes)."""
    out: list[Digest] = []
    at = 0
    step = HASH_LEN
    for count in page_counts(extents):
        out.append(hash_fn(digests[at * step : (at + count) * step]))
        at += count
    if at * step != len(digests):
        raise BadRequest(f"the extents have {at} chunks, {len(digests) // step} digests were given")
    return out


_INT_MAX = 2**63 - 1  # need_int's default bound


def check_manifest(manifest: object, name: str | None = None) -> dict[str, Any]:
    """Check that a manifest from the wire has every field with the right type and a shape
    that adds up (its size, count, extents and list agree), so nothing downstream trips over it;
    whether its list gives its digest is checked where it is read (fms.client.listing).

    ``name``: a name already checked (:func:`~fms.wire.fields.check_name`) that the caller
    expects the manifest to have; a manifest whose name is that one is not checked again
    (whether it is that one is the caller's check).

    A manifest as every reply carries it (plain msgpack types, a short chunk list in one extent)
    is checked in one pass (:func:`_plain_manifest_ok`); any other, or one that fails it, is
    checked field by field, which says what is wrong.

    :raises BadRequest: it does not.
    """
    if type(manifest) is dict and _plain_manifest_ok(manifest, name):
        return manifest
    if not isinstance(manifest, dict):
        raise BadRequest("manifest must be a map")
    if name is None or manifest.get("name") != name:
        check_name(need(manifest, "name", str))
    size = need_int(manifest, "size")
    count = need_int(manifest, "count", hi=MAX_FILE_CHUNKS)
    need_int(manifest, "chunk_size", hi=MAX_CHUNK_SIZE)
    need_hash(manifest, "digest")
    if need(manifest, "digest_fn", str) not in DIGEST_FUNCTIONS:
        raise BadRequest(f"a manifest's digest_fn is one of {', '.join(DIGEST_FUNCTIONS)}")
    if need(manifest, "digest_kind", str) not in DIGEST_KINDS:
        raise BadRequest(f"a manifest's digest_kind is one of {', '.join(DIGEST_KINDS)}")
    check_mtime(need(manifest, "mtime", (int, float)))
    need_int(manifest, "version", lo=1)
    check_meta(need(manifest, "meta", dict, optional=True, default={}))
    if "chunks" in manifest or "pages" in manifest:
        extents = unpack_extents(need(manifest, "extents", bytes))
        if check_extents(extents) != count or sum(s for _cs, s in extents) != size:
            raise BadRequest("a manifest's extents do not add up to its size and count")
        if "chunks" in manifest:
            if len(need_hashes(manifest, "chunks", INLINE_CHUNKS)) != count:
                raise BadRequest("a manifest's chunk count does not fit its extents")
        elif len(need_hashes(manifest, "pages", MAX_PAGES)) != file_pages(extents):
            raise BadRequest("a manifest's page count does not fit its extents")
    if "chunks" not in manifest:
        need_hash(manifest, "body")
    return manifest


def _plain_manifest_ok(m: dict[str, Any], name: str | None) -> bool:
    """Whether ``m`` passes every check of :func:`check_manifest`, checked in one pass for the
    common shape: every field of its exact msgpack type, a chunk list in it (``chunks``) and at
    most one extent.  False for anything else, which :func:`check_manifest` then checks field by
    field (so this accepts nothing that does not pass there; it may raise what that raises).
    """
    get = m.get
    n = get("name")
    size = get("size")
    count = get("count")
    chunk_size = get("chunk_size")
    digest = get("digest")
    mtime = get("mtime")
    version = get("version")
    chunks = get("chunks")
    extents = get("extents")
    if not (
        type(n) is str
        and type(size) is int
        and type(count) is int
        and type(chunk_size) is int
        and type(version) is int
        and type(digest) is bytes
        and type(chunks) is list
        and type(extents) is bytes
        and (type(mtime) is float or type(mtime) is int)
        and len(digest) == HASH_LEN
        and 0 <= size <= _INT_MAX
        and 0 <= count <= INLINE_CHUNKS
        and len(chunks) == count
        and 0 <= chunk_size <= MAX_CHUNK_SIZE
        and 1 <= version <= _INT_MAX
        and MTIME_MIN <= mtime <= MTIME_MAX
        and get("digest_fn") in DIGEST_FUNCTIONS
        and get("digest_kind") in DIGEST_KINDS
    ):
        return False
    for chunk in chunks:
        if type(chunk) is not bytes or len(chunk) != HASH_LEN:
            return False
    if len(extents) == EXTENT_LEN:
        extent_chunk_size, extent_size = _EXTENT.unpack(extents)
        if not (
            MIN_CHUNK_SIZE <= extent_chunk_size <= MAX_CHUNK_SIZE
            and extent_size == size
            and size >= 1
            and _count(extent_chunk_size, size) == count
        ):
            return False
    elif extents or size or count:  # several extents: checked field by field
        return False
    if n != name or name is None:
        check_name(n)  # the first field checked: what it raises, check_manifest raises
    meta = get("meta")
    if meta is not None:
        if type(meta) is not dict:
            return False
        if meta:
            check_meta(meta)  # every field before it passed: what it raises, so would that
    return True


def manifest_hasher(manifest: Mapping[str, Any]) -> Hasher:
    """The helper of the digest function a (checked) manifest names: every digest in it, and
    every chunk it lists, is checked with it."""
    return hasher(manifest["digest_fn"])


def check_meta(meta: object) -> dict[str, str]:
    """A version's metadata map: str keys (1 to 128 bytes, no control characters) to str
    values, at most 2 KiB in all.  :raises BadRequest:"""
    if not isinstance(meta, dict):
        raise BadRequest(f"field 'meta' must be a map, got {type(meta).__name__}")
    total = 0
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadRequest("field 'meta' maps strings to strings")
        try:
            klen, vlen = len(key.encode()), len(value.encode())
        except UnicodeEncodeError:
            raise BadRequest("field 'meta' holds a string that is not valid UTF-8") from None
        if not 1 <= klen <= MAX_META_KEY or (
            # printable ASCII holds none (the usual key, checked without a loop)
            not (key.isascii() and key.isprintable())
            and any(ord(c) < 32 or ord(c) == 127 for c in key)
        ):
            raise BadRequest(
                f"a metadata key is 1 to {MAX_META_KEY} bytes without control characters"
            )
        total += klen + vlen
    if total > MAX_META_BYTES:
        raise TooLarge(
            f"metadata of {total} bytes; a version holds at most {MAX_META_BYTES} bytes of "
            f"keys and values"
        )
    return meta
