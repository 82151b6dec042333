"""Builders shared by the storage tests: files as commits, and a store in the format-1 layout."""

import hashlib
import os

import msgpack

from fms import wire as p
from fms.storage.model import NewVersion, Version

CHUNK = p.MIN_CHUNK_SIZE
_DIGEST = [p.NEW_STORE_DIGEST]  # the digest function of the stores under test (conftest sets it)


def use_digest(name: str):
    """Build for stores of digest function ``name`` from now on."""
    _DIGEST[0] = name


def digest_name() -> str:
    """The digest function of the stores under test."""
    return _DIGEST[0]


def h(data) -> bytes:
    """``data``'s digest under the stores' digest function: every digest the tests make."""
    return p.hasher(_DIGEST[0])(data)


def split(content: bytes, chunk_size: int = CHUNK) -> list:
    return [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)]


def extents_of(content: bytes, chunk_size: int = CHUNK) -> tuple:
    return ((chunk_size, len(content)),) if content else ()


def page_blobs(content: bytes, chunk_size: int = CHUNK) -> list:
    """``(page id, blob)`` of each page of ``content``'s chunk list (none if it is short)."""
    digests = [h(c) for c in split(content, chunk_size)]
    if len(digests) <= p.INLINE_CHUNKS:
        return []
    blobs = [p.join_digests(page) for page in p.pages_of(extents_of(content, chunk_size), digests)]
    return [(h(blob), blob) for blob in blobs]


def new_version(name, content, commit="c1", chunk_size=CHUNK, mtime=1700000000.0) -> NewVersion:
    """A commit of ``content`` as a client makes it: its digest derived from its chunks', a
    short chunk list inline, a longer one as pages (:func:`page_blobs`, stored first)."""
    extents = extents_of(content, chunk_size)
    digests = tuple(h(c) for c in split(content, chunk_size))
    pages = page_blobs(content, chunk_size)
    if not pages:
        return NewVersion(
            name, extents, p.inline_digest(extents, digests, h), mtime, commit, chunks=digests
        )
    ids = tuple(pid for pid, _blob in pages)
    return NewVersion(name, extents, p.tree_digest(extents, ids, h), mtime, commit, pages=ids)


def commit_fields(name, content, commit="c1", chunk_size=CHUNK, mtime=1700000000.0) -> dict:
    """The fields of a ``commit`` request of ``content`` (its chunks and pages stored), as a
    client sends them."""
    change = new_version(name, content, commit, chunk_size, mtime)
    fields = {
        "op": "commit",
        "name": name,
        "extents": p.pack_extents(change.extents),
        "digest": change.digest,
        "mtime": mtime,
        "commit": commit,
    }
    if change.chunks is not None:
        fields["chunks"] = list(change.chunks)
    else:
        fields["pages"] = list(change.pages)
    return fields


def digest_of(content: bytes, chunk_size: int = CHUNK) -> bytes:
    """The file digest of ``content`` in ``chunk_size`` chunks."""
    return new_version("x", content, chunk_size=chunk_size).digest


def put_file(store, name, content, commit="c1", chunk_size=CHUNK):
    """Upload every chunk and page, then commit: what a client does."""
    for chunk in split(content, chunk_size):
        store.put_chunk(h(chunk), chunk)
    for page_id, blob in page_blobs(content, chunk_size):
        store.put_page(page_id, blob)
    return store.commit(new_version(name, content, commit, chunk_size))


def write_format1(path, files: dict, removed=(), store_id="0123456789abcdef", mtimes=None):
    """A data directory as fms wrote it before the metadata engine: STORE, chunks/, manifests/.

    :param files: name -> content (chunked at CHUNK); :param removed: names left as tombstones.
    """
    os.makedirs(os.path.join(path, "manifests"))
    with open(os.path.join(path, "STORE"), "wb") as f:
        f.write(msgpack.packb({"format": 1, "store_id": store_id}))
    for version, (name, content) in enumerate(files.items(), start=1):
        chunks = split(content)
        for chunk in chunks:
            digest = hashlib.sha256(chunk).hexdigest()
            os.makedirs(os.path.join(path, "chunks", digest[:2]), exist_ok=True)
            with open(os.path.join(path, "chunks", digest[:2], digest), "wb") as f:
                f.write(chunk)
        manifest = {
            "name": name,
            "size": len(content),
            "sha256": p.sha256(content),
            "chunk_size": CHUNK,
            "chunks": [p.sha256(c) for c in chunks],
            "mtime": 1600000000.0 + version,
            "commit": f"old-{version}",
            "version": version,
            "committed": 1600000000.0,
        }
        if mtimes and name in mtimes:
            manifest["mtime"] = mtimes[name]
        if name in removed:
            manifest.update(chunks=[], deleted=True, version=version + 1)
        key = hashlib.sha256(name.encode()).hexdigest()
        os.makedirs(os.path.join(path, "manifests", key[:2]), exist_ok=True)
        with open(os.path.join(path, "manifests", key[:2], key), "wb") as f:
            f.write(msgpack.packb(manifest, use_bin_type=True))


def manifest_of(name, content=None, version=1, chunk_size=CHUNK, *, size=None, digests=None):
    """The wire manifest storage sends for ``content`` (or for a file of ``size`` bytes whose
    chunks are ``digests``), as version ``version``."""
    if content is not None:
        size, digests = len(content), [h(c) for c in split(content, chunk_size)]
    extents = ((chunk_size, size),) if size else ()
    lists = {"extents": extents, "chunks": tuple(digests)}
    digest = p.inline_digest(extents, digests, h)
    if len(digests) > p.INLINE_CHUNKS:
        ids = p.page_ids(extents, p.join_digests(digests), h)
        lists = {"extents": extents, "pages": tuple(ids), "body": digest}
    count = len(digests)
    return Version(
        name,
        size,
        digest,
        p.DIGEST_TREE,
        chunk_size if size else 0,
        count,
        0.0,
        version,
        "c",
        0.0,
        **lists,
    ).manifest(digest_name())
