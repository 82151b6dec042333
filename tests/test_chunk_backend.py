"""The chunk backend's contract, one suite run against every backend (``backend`` fixture)."""

import os

import pytest
from storage_helpers import h

from fms import wire as p
from fms.errors import NotFound
from fms.storage.chunks.localdir import LocalDirChunks


def localdir(request, tmp_path):
    return LocalDirChunks(str(tmp_path / "data"))


def s3(request, tmp_path):
    from fms.storage.chunks.s3 import S3Chunks

    server = request.getfixturevalue("s3")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return S3Chunks(f"s3://{request.getfixturevalue('s3_bucket')}/some/prefix")


BACKENDS = {"localdir": localdir, "s3": s3}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    return BACKENDS[request.param](request, tmp_path)


def test_put_get_has_delete(backend):
    data = os.urandom(5000)
    digest = h(data)
    assert not backend.has(digest)
    assert backend.put(digest, data) is True
    backend.put(digest, data)  # again: harmless, content is the same
    assert backend.has(digest)
    assert bytes(p.unpack_data(backend.get(digest))) == data
    backend.delete(digest)
    backend.delete(digest)  # deleting a missing blob is fine
    assert not backend.has(digest)
    with pytest.raises(NotFound):
        backend.get(digest)


def test_list_names_every_blob_with_its_size(backend):
    blobs = {h(b"%d" % i * (i + 1)): b"%d" % i * (i + 1) for i in range(20)}
    for digest, data in blobs.items():
        backend.put(digest, data)
    listed = {digest: size for digest, size, _mtime in backend.list()}
    assert listed == {d: len(b) for d, b in blobs.items()}


def test_quarantine_takes_a_blob_out_of_the_store(backend):
    backend.put(h(b"bad"), b"bad")
    backend.quarantine(h(b"bad"))
    assert not backend.has(h(b"bad"))
    assert backend.put(h(b"bad"), b"bad") is True  # a new upload restores it


def test_localdir_leaves_no_temp_files(tmp_path):
    chunks = LocalDirChunks(str(tmp_path / "data"))
    for i in range(5):
        chunks.put(h(b"%d" % i), b"%d" % i)
    assert os.listdir(chunks.tmp) == []


def test_localdir_delete_removes_an_emptied_shard_and_put_recreates_it(tmp_path):
    chunks = LocalDirChunks(str(tmp_path / "data"))
    digest = h(b"only one")
    chunks.put(digest, b"only one")
    chunks.delete(digest)
    assert os.listdir(chunks.root) == []  # du of chunks/ is back where it started
    assert chunks.put(digest, b"only one") and chunks.has(digest)


def test_the_store_marker_is_written_once_and_read_back(backend):
    assert backend.store_marker() is None
    backend.mark_store("store-a")
    assert backend.store_marker() == "store-a"
    assert list(backend.list()) == []  # the marker is not a chunk
