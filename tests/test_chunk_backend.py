"""The chunk backend's contract, one suite run against every backend (``backend`` fixture)."""

import os

import pytest

from fms import protocol as p
from fms.errors import NotFound
from fms.storage.chunks.localdir import LocalDirChunks


def localdir(tmp_path):
    return LocalDirChunks(str(tmp_path / "data"))


BACKENDS = {"localdir": localdir}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    return BACKENDS[request.param](tmp_path)


def test_put_get_has_delete(backend):
    data = os.urandom(5000)
    digest = p.sha256(data)
    assert not backend.has(digest)
    assert backend.put(digest, data) is True
    assert backend.put(digest, data) is False           # put-if-absent
    assert backend.has(digest)
    assert bytes(p.unpack_data(backend.get(digest))) == data
    backend.delete(digest)
    backend.delete(digest)                               # deleting a missing blob is fine
    assert not backend.has(digest)
    with pytest.raises(NotFound):
        backend.get(digest)


def test_list_names_every_blob_with_its_size(backend):
    blobs = {p.sha256(b"%d" % i * (i + 1)): b"%d" % i * (i + 1) for i in range(20)}
    for digest, data in blobs.items():
        backend.put(digest, data)
    listed = {digest: size for digest, size, _mtime in backend.list()}
    assert listed == {d: len(b) for d, b in blobs.items()}


def test_quarantine_takes_a_blob_out_of_the_store(backend):
    backend.put(p.sha256(b"bad"), b"bad")
    backend.quarantine(p.sha256(b"bad"))
    assert not backend.has(p.sha256(b"bad"))
    assert backend.put(p.sha256(b"bad"), b"bad") is True  # a new upload restores it


def test_localdir_leaves_no_temp_files(tmp_path):
    chunks = LocalDirChunks(str(tmp_path / "data"))
    for i in range(5):
        chunks.put(p.sha256(b"%d" % i), b"%d" % i)
    assert os.listdir(chunks.tmp) == []
