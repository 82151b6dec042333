"""The store as a plain object: no sockets."""

import os

import pytest

from fms import protocol as p
from fms.errors import BadRequest, IntegrityError, NotFound
from fms.store import Store, StoreError

CHUNK = p.MIN_CHUNK_SIZE


def commit_fields(name, content, chunk_size=CHUNK, commit="c1"):
    chunks = [content[i:i + chunk_size] for i in range(0, len(content), chunk_size)]
    return {"name": name, "size": len(content), "chunk_size": chunk_size,
            "chunks": [p.sha256(c) for c in chunks], "sha256": p.sha256(content),
            "commit": commit, "mtime": 1700000000.0}, chunks


def put_file(store, name, content, commit="c1"):
    fields, chunks = commit_fields(name, content, commit=commit)
    for chunk in chunks:
        store.put_chunk(p.sha256(chunk), chunk)
    return store.commit(fields)


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "data"))


def test_chunk_round_trip_and_dedup(store):
    data = b"x" * 1000
    digest = p.sha256(data)
    assert store.put_chunk(digest, data) is True
    assert store.put_chunk(digest, data) is False      # content-addressed: stored once
    assert bytes(p.unpack_data(store.read_chunk(digest))) == data
    assert store.missing([digest, p.sha256(b"other")]) == [p.sha256(b"other")]


def test_chunk_that_does_not_match_its_hash_is_refused(store):
    with pytest.raises(IntegrityError):
        store.put_chunk(p.sha256(b"right"), b"wrong")
    assert not store.has_chunk(p.sha256(b"right"))


def test_flipped_bit_on_disk_is_never_returned_and_is_set_aside(store, tmp_path):
    data = os.urandom(5000)
    digest = p.sha256(data)
    store.put_chunk(digest, data)
    path = store._chunk_path(digest)
    with open(path, "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(IntegrityError, match="corrupt"):
        store.read_chunk(digest)
    assert not store.has_chunk(digest)                  # moved to corrupt/...
    assert store.put_chunk(digest, data) is True        # ...so a new upload restores it
    assert bytes(p.unpack_data(store.read_chunk(digest))) == data


def test_commit_get_versions_and_rm(store):
    m1 = put_file(store, "a/b.txt", b"one" * 3000, commit="c1")
    m2 = put_file(store, "a/b.txt", b"two" * 3000, commit="c2")
    assert (m1["version"], m2["version"]) == (1, 2)
    assert store.get_manifest("a/b.txt")["sha256"] == p.sha256(b"two" * 3000)
    removed = store.remove("a/b.txt")
    assert removed["version"] == 3 and removed["deleted"]    # a tombstone, one version on
    with pytest.raises(NotFound, match="not found"):
        store.get_manifest("a/b.txt")
    with pytest.raises(NotFound):
        store.remove("a/b.txt")


def test_rm_is_idempotent_by_its_id_and_versions_keep_counting(store):
    put_file(store, "n", b"data" * 2000, commit="c1")
    first = store.remove("n", "rm-1")
    assert store.remove("n", "rm-1") == first           # a retry: same answer
    with pytest.raises(NotFound):
        store.remove("n", "rm-2")                       # another rm: it is gone
    assert store.list() == []
    assert put_file(store, "n", b"back", commit="c2")["version"] == first["version"] + 1


def test_commit_is_idempotent_by_commit_id(store):
    first = put_file(store, "n", b"data" * 2000, commit="same")
    again = put_file(store, "n", b"data" * 2000, commit="same")
    assert again["version"] == first["version"] == 1


def test_commit_refuses_missing_chunks_and_wrong_counts(store):
    fields, _ = commit_fields("n", b"z" * 10000)
    with pytest.raises(IntegrityError, match="never uploaded"):
        store.commit(fields)
    fields["chunks"] = fields["chunks"][:1]
    with pytest.raises(BadRequest, match="chunks"):
        store.commit(fields)
    with pytest.raises(NotFound):
        store.get_manifest("n")                         # nothing became visible


def test_commit_with_inline_content_and_empty_file(store):
    fields, chunks = commit_fields("small", b"tiny")
    assert store.commit(fields, inline=b"tiny")["size"] == 4
    fields, _ = commit_fields("empty", b"")
    assert store.commit(fields)["chunks"] == []


def test_list_by_prefix_sorted(store):
    for name in ["b/2", "a/1", "b/1", "c"]:
        put_file(store, name, name.encode() * 10, commit=name)
    assert [m["name"] for m in store.list("b/")] == ["b/1", "b/2"]
    assert [m["name"] for m in store.list()] == ["a/1", "b/1", "b/2", "c"]


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../x", "x\x00y"])
def test_names_never_reach_outside_the_data_directory(store, tmp_path, name):
    fields, chunks = commit_fields("ok", b"content")
    fields["name"] = name
    store.put_chunk(p.sha256(chunks[0]), chunks[0])
    with pytest.raises(BadRequest):
        store.commit(fields)
    with pytest.raises(BadRequest):
        store.get_manifest(name)
    outside = {str(p_) for p_ in tmp_path.iterdir()} - {str(tmp_path / "data")}
    assert outside == set()


def test_every_name_maps_inside_the_manifests_folder(store):
    path = store._manifest_path("../../../../etc/passwd")
    assert os.path.commonpath([path, store.path]) == store.path


def test_workers_on_one_directory_share_one_store_id(tmp_path):
    a = Store(str(tmp_path / "d"))
    b = Store(str(tmp_path / "d"))
    c = Store(str(tmp_path / "other"))
    assert a.store_id == b.store_id != c.store_id


def test_unusable_directory_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError, match="cannot use data directory"):
        Store(str(blocker / "data"))


def test_no_temp_files_left_after_writes(store):
    put_file(store, "x", os.urandom(20000))
    assert os.listdir(os.path.join(store.path, "tmp")) == []


def test_temp_files_of_dead_writers_are_cleaned_and_live_ones_kept(store):
    import socket
    import subprocess
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = os.path.join(store.path, "tmp")
    files = {
        "dead": f"chunk.{host}.{dead.pid}.aaaa",             # this host, process gone
        "live": f"chunk.{host}.{os.getpid()}.bbbb",          # this host, process alive
        "remote_old": "chunk.otherhost.1.cccc",              # another host, old
        "remote_new": "chunk.otherhost.1.dddd",              # another host, recent
    }
    for name in files.values():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(b"partial")
    os.utime(os.path.join(tmp, files["remote_old"]), (0, 0))
    assert store.clean_tmp() == 2
    assert sorted(os.listdir(tmp)) == sorted([files["live"], files["remote_new"]])


def test_data_directory_with_a_missing_parent_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="parent folder does not exist"):
        Store(str(tmp_path / "no" / "such" / "data"))


def test_ls_pages_through_a_large_listing(store, monkeypatch):
    from fms import storage
    for i in range(12):
        put_file(store, f"d/{i:02d}", b"x%d" % i, commit=f"c{i}")

    class Link:
        def __init__(self):
            self.replies = []

        def reply(self, route, header, data=None, invalidate=None, cache=None):
            self.replies.append(header)

    link = Link()
    service = storage.StorageService(store, link)
    monkeypatch.setattr(storage, "LS_PAGE_MAX", 5)
    names, after = [], ""
    for _ in range(10):
        service.handle_request({}, {"v": 1, "op": "ls", "id": 1, "prefix": "d/", "after": after},
                               None)
        page = link.replies[-1]
        names += [e["name"] for e in page["entries"]]
        if not page["more"]:
            break
        after = page["entries"][-1]["name"]
    assert names == [f"d/{i:02d}" for i in range(12)]
    assert len(link.replies) == 3                      # 5 + 5 + 2
