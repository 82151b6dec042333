"""Builders shared by the storage tests: files as commits, and a store in the format-1 layout."""

import hashlib
import os

import msgpack

from fms import wire as p
from fms.storage.model import NewVersion

CHUNK = p.MIN_CHUNK_SIZE


def split(content: bytes, chunk_size: int = CHUNK) -> list:
    return [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)]


def new_version(name, content, commit="c1", chunk_size=CHUNK, mtime=1700000000.0) -> NewVersion:
    return NewVersion(
        name,
        len(content),
        p.sha256(content),
        chunk_size,
        tuple(p.sha256(c) for c in split(content, chunk_size)),
        mtime,
        commit,
    )


def put_file(store, name, content, commit="c1", chunk_size=CHUNK):
    """Upload every chunk, then commit: what a client does."""
    for chunk in split(content, chunk_size):
        store.put_chunk(p.sha256(chunk), chunk)
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
