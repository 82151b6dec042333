"""The storage engine, GC, fsck and migration as plain objects: no sockets."""

import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from conftest import wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from storage_helpers import (
    CHUNK,
    commit_fields,
    h,
    new_version,
    page_blobs,
    put_file,
    split,
    use_digest,
    write_format1,
)

from fms import wire as p
from fms.errors import (
    BadRequest,
    FmsError,
    IntegrityError,
    MissingChunks,
    NotFound,
    Unavailable,
)
from fms.storage import gc, groupwait
from fms.storage import service as storage_service
from fms.storage.engine import StoreError, open_local, open_store
from fms.storage.groupwait import GroupWait
from fms.storage.meta.base import RETAIN_SECONDS
from fms.storage.model import NewVersion, Removal
from fms.storage.reserve import RESERVE_BYTES, SpaceReserve
from fms.storage.service import StorageService

# Stores made before the digest function could be chosen: sha256 ones.
OLD_STORES = pytest.mark.parametrize("store_digest", [p.OLD_STORE_DIGEST])


@pytest.fixture(params=p.DIGEST_FUNCTIONS)
def store(request, tmp_path, monkeypatch):
    """A store of each digest function: every test that takes it runs against both (one
    suite); the builders (storage_helpers) hash with its function."""
    monkeypatch.setattr(p, "NEW_STORE_DIGEST", request.param)
    use_digest(request.param)
    s = open_local(str(tmp_path / "data"))
    yield s
    s.close()


def blob_bytes(store) -> int:
    return sum(size for _d, size, _m in store.chunks.list())


def content(seed: int, size: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


# --- chunks ---


def test_chunk_round_trip_dedup_and_verification(store):
    big = os.urandom(100_000)  # over SMALL_CHUNK_MAX: a blob
    assert store.put_chunk(h(big), big) is True
    assert store.put_chunk(h(big), big) is False
    assert bytes(p.unpack_data(store.read_chunk(h(big)))) == big
    assert store.missing([h(big), h(b"other")]) == [h(b"other")]
    with pytest.raises(IntegrityError, match="does not match"):
        store.put_chunk(h(b"right"), b"wrong")


def test_flipped_bit_on_disk_is_never_returned_and_is_set_aside(store):
    data = os.urandom(100_000)
    digest = h(data)
    store.put_chunk(digest, data)
    path = os.path.join(store.chunks.root, digest.hex()[:2], digest.hex())
    with open(path, "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(IntegrityError, match="corrupt"):
        store.read_chunk(digest)
    assert not store.chunks.has(digest)  # moved to corrupt/...
    assert store.put_chunk(digest, data) is True  # ...so a new upload restores it
    assert bytes(p.unpack_data(store.read_chunk(digest))) == data


def test_blobs_are_synced_once_per_commit_group_and_a_blob_damaged_before_it_is_reuploaded(
    store, monkeypatch
):
    syncs = []
    monkeypatch.setattr(store.chunks, "sync", lambda: syncs.append(1))
    files = {f"f{i}": os.urandom(100_000) for i in range(3)}  # one blob each
    for content in files.values():
        store.put_chunk(h(content), content)
    damaged = h(files["f0"])
    with open(os.path.join(store.chunks.root, damaged.hex()[:2], damaged.hex()), "r+b") as f:
        f.truncate(50_000)  # what a power loss before the sync can leave
    results = store.apply(
        [(new_version(n, c, commit=n, chunk_size=p.MiB), None) for n, c in files.items()]
    )
    assert isinstance(results[0], MissingChunks) and results[0].missing == [damaged]
    assert [r.version for r in results[1:]] == [1, 1] and syncs == [1]
    assert store.put_chunk(damaged, files["f0"]) is True  # set aside: uploaded again
    assert store.commit(new_version("f0", files["f0"], "again", p.MiB)).version == 1


# --- commits ---


def test_commit_versions_and_remove(store):
    v1 = put_file(store, "a/b.txt", content(1, 9000), commit="c1")
    v2 = put_file(store, "a/b.txt", content(2, 9000), commit="c2")
    assert (v1.version, v2.version) == (1, 2)
    tomb = store.remove("a/b.txt", "r1")
    assert tomb.deleted and tomb.version == 3
    with pytest.raises(NotFound, match="not found"):
        store.version("a/b.txt")


def test_commit_checks_the_file_digest_against_its_chunk_list(store):
    data = content(3, 3 * CHUNK + 10)
    for chunk in split(data):
        store.put_chunk(h(chunk), chunk)
    from dataclasses import replace

    wrong = replace(new_version("n", data), digest=h(data))  # of the content: not it
    with pytest.raises(IntegrityError, match="not the one its chunk list gives"):
        store.commit(wrong)
    with pytest.raises(NotFound):
        store.version("n")
    made = store.commit(new_version("n", data))
    assert made.size == len(data) and made.digest_kind == p.DIGEST_TREE


def test_inline_content_with_pages_is_refused_alone_in_its_group(store):
    """A commit that sends a small file's content inline but lists pages instead of its chunk
    is a bad request of its own: the other commits applied with it in the group stand (it
    was a TypeError that failed the whole group as an internal error)."""
    from fms.storage.model import Version

    extents = ((CHUNK, 4),)
    blob = h(b"tiny")
    page_id = h(blob)
    paged = NewVersion(
        "paged",
        extents,
        p.tree_digest(extents, (page_id,), h),
        1700000000.0,
        "c1",
        pages=(page_id,),
    )
    good = new_version("good", b"fine", commit="c2")
    results = store.apply([(paged, b"tiny"), (good, b"fine")])
    assert isinstance(results[0], BadRequest) and "inline" in str(results[0])
    assert isinstance(results[1], Version)
    assert store.version("good").size == 4


def test_commit_refuses_bad_shapes(store):
    from dataclasses import replace

    data = content(4, 2 * CHUNK)
    for chunk in split(data):
        store.put_chunk(h(chunk), chunk)
    good = new_version("n", data)
    with pytest.raises(BadRequest, match="chunks"):
        store.commit(replace(good, chunks=good.chunks[:1]))
    short = ((CHUNK, 2 * CHUNK - 1),)  # the last chunk stored is a byte longer
    with pytest.raises(IntegrityError, match="needs"):
        store.commit(replace(good, extents=short, digest=p.inline_digest(short, good.chunks, h)))
    with pytest.raises(IntegrityError, match="file digest"):
        store.commit(replace(good, extents=(), chunks=(), digest=h(b"x")))
    with pytest.raises(BadRequest, match="chunk size"):
        store.commit(replace(good, extents=((100, 2 * CHUNK),)))
    with pytest.raises(BadRequest, match="either its chunks or its pages"):
        store.commit(replace(good, pages=()))
    one = new_version("one", b"tiny")
    with pytest.raises(IntegrityError, match="file digest"):
        store.commit(replace(one, digest=h(b"other")), inline=b"tiny")
    with pytest.raises(IntegrityError, match="inline content"):
        store.commit(one, inline=b"tinx")
    assert store.commit(new_version("empty", b"", commit="c2")).count == 0
    assert store.commit(one, inline=b"tiny").size == 4


def test_commit_naming_absent_chunks_lists_them(store):
    data = content(5, 3 * CHUNK)
    store.put_chunk(h(split(data)[0]), split(data)[0])
    with pytest.raises(MissingChunks) as caught:
        store.commit(new_version("n", data))
    assert set(caught.value.missing) == {h(c) for c in split(data)[1:]}


def test_every_absent_blob_of_a_commit_is_listed_at_once(store):
    data = os.urandom(4 * 70_000)
    chunks = split(data, 70_000)
    for chunk in chunks:
        store.put_chunk(h(chunk), chunk)
    for gone in (chunks[1], chunks[3]):  # rows claimed, blobs lost (disk full)
        store.chunks.delete(h(gone))
    with pytest.raises(MissingChunks) as caught:
        store.commit(new_version("n", data, chunk_size=70_000))
    assert caught.value.missing == [h(chunks[1]), h(chunks[3])]


def test_a_commit_reads_no_content_back(store, monkeypatch):
    """The file digest is derived from the chunk digests: a commit of any size reads no chunk
    from the store (a damaged one is found when it is read, set aside, and healed by upload)."""
    data = os.urandom(40 * 70_000)  # blobs, and a paged chunk list
    chunks = split(data, 70_000)
    for chunk in chunks:
        store.put_chunk(h(chunk), chunk)
    reads = []
    real = store.chunks.get
    monkeypatch.setattr(store.chunks, "get", lambda d: reads.append(d) or real(d))
    bad = h(chunks[1])
    with open(os.path.join(store.chunks.root, bad.hex()[:2], bad.hex()), "r+b") as f:
        f.write(b"\x00\x01")  # same size: only reading it can tell
    for page_id, blob in page_blobs(data, 70_000):
        store.put_page(page_id, blob)
    assert store.commit(new_version("n", data, chunk_size=70_000)).size == len(data)
    assert reads == []
    with pytest.raises(IntegrityError, match="corrupt"):
        store.read_chunk(bad)  # never delivered: set aside...
    assert store.put_chunk(bad, chunks[1]) is True  # ...and an upload restores it
    assert bytes(p.unpack_data(store.read_chunk(bad))) == chunks[1]


@pytest.mark.parametrize("store_digest", p.DIGEST_FUNCTIONS)
@pytest.mark.parametrize("where", ["localdir", "s3"])
def test_a_commit_of_a_1_gib_file_reads_nothing_back_from_disk_or_s3(
    tmp_path, request, monkeypatch, where
):
    """1,024 chunks of 1 MiB (16 distinct ones, so the test writes 16 MiB): storage checks the
    commit against the chunk list and the stored chunks' sizes, and reads no chunk, however
    large the file (before protocol 2 it read the whole GiB back, from S3 too)."""
    chunks = None
    if where == "s3":
        for key, value in request.getfixturevalue("s3").env().items():
            monkeypatch.setenv(key, value)
        chunks = f"s3://{request.getfixturevalue('s3_bucket')}"
    store = open_store(str(tmp_path / "data"), chunks=chunks)
    distinct = [os.urandom(p.MiB) for _ in range(16)]
    for chunk in distinct:
        store.put_chunk(h(chunk), chunk)
    extents = ((p.MiB, p.GiB),)
    digests = p.join_digests(h(distinct[i % 16]) for i in range(1024))
    pages = p.page_ids(extents, digests, h)
    store.put_page(pages[0], digests)
    read = []
    for owner, method in ((store.chunks, "get"), (store.meta, "chunk")):
        real = getattr(owner, method)
        monkeypatch.setattr(owner, method, lambda d, real=real: read.append(d) or real(d))
    change = NewVersion(
        "one-gib", extents, p.tree_digest(extents, pages, h), 1.7e9, "c1", pages=tuple(pages)
    )
    assert store.commit(change).size == p.GiB
    assert read == []  # not a chunk, not a byte of content
    store.close()


# --- long chunk lists: pages, bounded commits, copies by reference (issue 21) ---


def repeated_file(store, name: str, count: int, chunk: bytes, commit: str):
    """Commit a file of ``count`` times one chunk, as a client sends it: the chunk once, each
    distinct page once.  :return: the commit (NewVersion) made."""
    store.put_chunk(h(chunk), chunk)
    extents = ((len(chunk), count * len(chunk)),)
    ids = []
    for n in p.page_counts(extents):
        blob = h(chunk) * n
        ids.append(h(blob))
        if ids[-1] not in ids[:-1]:
            store.put_page(ids[-1], blob)
    change = NewVersion(
        name, extents, p.tree_digest(extents, ids, h), 1700000000.0, commit, pages=tuple(ids)
    )
    store.commit(change)
    return change


def test_a_million_times_one_chunk_commits_in_proportion_to_its_distinct_pages(store):
    """A sparse disk image: 1,000,000 x one chunk is 16 pages, two of them distinct.  The
    commit's work and memory follow those, never the repeats."""
    import tracemalloc

    chunk = b"\0" * CHUNK
    tracemalloc.start()
    change = repeated_file(store, "disk.img", 1_000_000, chunk, "c1")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24 * p.MiB, peak / p.MiB  # two pages of 2 MiB, and what SQLite is handed
    stat = store.version("disk.img")
    assert (stat.size, stat.count, stat.digest) == (1_000_000 * CHUNK, 1_000_000, change.digest)
    assert len(change.pages) == 16 and len(set(change.pages)) == 2
    assert store.meta.chunk(h(chunk)).refs == 2  # one per distinct page that lists it
    assert store.meta.refcount_errors() == []
    report = gc.fsck_page(store)
    assert (report["names"], report["chunks"], report["damaged"]) == (1, 1, [])
    assert sum(1 for _ in store.digests(stat)) == 1_000_000  # read back a page at a time


def test_a_commit_over_the_manifest_cap_is_refused_clearly(store):
    from fms.errors import TooLarge

    extents = ((p.MiB, (p.MAX_FILE_CHUNKS + 1) * p.MiB),)
    ids = [b"\1" * 32] * p.file_pages(extents)
    change = NewVersion(
        "huge", extents, p.tree_digest(extents, ids, h), 1700000000.0, "c1", pages=tuple(ids)
    )
    with pytest.raises(TooLarge, match=r"at most 5,242,880 chunks \(5 TiB in 1 MiB chunks"):
        store.commit(change)


def test_a_commit_lists_stored_pages_that_fit_its_extents(store):
    from dataclasses import replace

    data = b"".join(content(i, CHUNK) for i in range(40)) + b"tail"
    for chunk in split(data):
        store.put_chunk(h(chunk), chunk)
    change = new_version("n", data)
    [(page_id, blob)] = page_blobs(data)
    with pytest.raises(MissingChunks) as caught:  # the page was never sent
        store.commit(change)
    assert caught.value.missing == [page_id]
    with pytest.raises(IntegrityError, match="does not match its id"):
        store.put_page(page_id, blob[:-32] + h(b"other"))
    with pytest.raises(BadRequest, match="1 to 65536 digests"):
        store.put_page(h(b""), b"")
    unknown = blob + h(b"never uploaded")
    with pytest.raises(MissingChunks) as caught:
        store.put_page(h(unknown), unknown)
    assert caught.value.missing == [h(b"never uploaded")]
    assert store.put_page(page_id, blob) is True
    assert store.put_page(page_id, blob) is False  # content-addressed: once
    wrong = ((CHUNK, len(data) + 1),)  # the last chunk is a byte short for these extents
    with pytest.raises(IntegrityError, match="its place needs"):
        store.commit(replace(change, extents=wrong, digest=p.tree_digest(wrong, change.pages, h)))
    assert store.commit(change).count == 41
    assert store.read_list(page_id) == blob
    assert list(store.digests(store.version("n"))) == [h(c) for c in split(data)]


def db_bytes(store) -> int:
    store.meta._execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = store.meta.path
    return os.path.getsize(path) + (
        os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    )


def test_cp_mv_and_restore_write_a_chunk_list_once_by_reference(tmp_path):
    """A cp of a 65,536-chunk file wrote its chunk list twice (the row and the remembered
    result: 4.3 MB from a 98-byte request).  Now the list is stored once, whatever is copied."""
    store = open_local(str(tmp_path / "data"), keep_versions=1)
    repeated_file(store, "big", 65_536, b"x" * CHUNK, "c0")
    before = db_bytes(store)
    for i in range(100):
        store.copy("big", f"copy/{i}", f"cp-{i}")
    store.copy("copy/0", "moved", "mv-1", move=True)
    store.copy("big", "copy/1", "cp-again")  # retains the version it replaces
    store.restore("copy/1", None, "re-1")
    grown = db_bytes(store) - before
    assert grown < 104 * 4096, grown  # a row and a remembered stat each, a page of SQLite
    for (size,) in store.meta._all("SELECT length(result) FROM commits"):
        assert size < 512
    assert store.meta.refcount_errors() == []
    [(refs,)] = store.meta._all("SELECT refs FROM bodies")
    assert refs == 103  # big, 99 copies, moved, copy/1 and its retained version
    store.close()


def test_removing_long_files_gives_their_pages_and_chunks_back_in_one_collection(store):
    put_file(store, "keep", content(98, 10_000), commit="k")
    before = (store.totals().chunk_bytes, blob_bytes(store))
    data = os.urandom(40 * 70_000)
    put_file(store, "big", data, commit="c1", chunk_size=70_000)
    store.copy("big", "big2", "cp-1")
    store.remove("big", "r1")
    assert gc.collect(store, grace=0)["chunks"] == 0  # big2 still lists them
    store.remove("big2", "r2")
    assert gc.collect(store, grace=3600)["pages"] == 0  # within the grace period: kept
    freed = gc.collect(store, grace=0)
    assert (freed["pages"], freed["chunks"], freed["bytes"]) == (2, 40, len(data))
    assert (store.totals().chunk_bytes, blob_bytes(store)) == before
    assert store.meta._all("SELECT count(*) FROM pages") == [(0,)]
    assert store.meta.refcount_errors() == []


# --- garbage collection ---


def test_overwrites_and_rm_give_every_byte_back_after_gc(store):
    put_file(store, "keep", content(99, 10_000), commit="k")
    before = (store.totals().chunk_bytes, blob_bytes(store))
    for i in range(20):
        put_file(store, "big", os.urandom(3 * 70_000), commit=f"c{i}", chunk_size=70_000)
    store.remove("big", "r1")
    assert store.totals().chunk_bytes > before[0] + 20 * 200_000
    dry = gc.collect(store, grace=0, dry_run=True)
    assert dry["chunks"] == 60 and store.totals().chunk_bytes > before[0]
    freed = gc.collect(store, grace=0)
    assert freed["chunks"] == 60 and freed["bytes"] == 20 * 3 * 70_000
    assert (store.totals().chunk_bytes, blob_bytes(store)) == before
    assert store.meta.refcount_errors() == []
    assert bytes(p.unpack_data(store.read_chunk(store.version("keep").chunks[0])))


def test_grace_protects_uploaded_and_announced_chunks(store):
    data = os.urandom(100_000)
    store.put_chunk(h(data), data)
    assert gc.collect(store, grace=3600)["chunks"] == 0
    later = time.time() + 7200
    assert store.missing([h(data)]) == []  # a client was told not to upload it...
    store.meta.known([h(data)], later)  # ...two hours on
    assert gc.collect(store, grace=3600, now=later + 10)["chunks"] == 0
    assert gc.collect(store, grace=3600, now=later + 3700)["chunks"] == 1


def test_a_commit_whose_chunk_was_collected_is_refused_then_succeeds_after_upload(store):
    data = os.urandom(2 * 70_000)
    for chunk in split(data, 70_000):
        store.put_chunk(h(chunk), chunk)
    gc.collect(store, grace=0)  # the user's own risk: collects them
    with pytest.raises(MissingChunks) as caught:
        store.commit(new_version("n", data, chunk_size=70_000))
    assert len(caught.value.missing) == 2
    for chunk in split(data, 70_000):
        store.put_chunk(h(chunk), chunk)
    assert store.commit(new_version("n", data, chunk_size=70_000)).size == len(data)


def test_orphan_blobs_are_collected_after_the_grace_period(store):
    data = os.urandom(100_000)
    digest = h(data)
    store.chunks.put(digest, data)  # a blob no row knows (a writer died)
    assert gc.collect(store, grace=3600)["orphans"] == 0
    path = os.path.join(store.chunks.root, digest.hex()[:2], digest.hex())
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    freed = gc.collect(store, grace=3600)
    assert (freed["orphans"], freed["bytes"]) == (1, 100_000)
    assert not store.chunks.has(digest) and store.totals().chunk_bytes == 0


def test_one_collector_at_a_time_and_a_dead_ones_work_is_finished(store):
    assert store.meta.lease(gc.LEASE, "someone-else", time.time(), 60)
    with pytest.raises(Unavailable, match="another storage worker"):
        gc.collect(store, grace=0)
    store.meta.release(gc.LEASE, "someone-else")
    data = os.urandom(100_000)
    store.put_chunk(h(data), data)
    store.meta.doom(time.time() + 1, 10)  # a collector died after dooming
    assert store.chunks.has(h(data))
    assert gc.collect(store, grace=3600)["chunks"] == 1
    assert not store.chunks.has(h(data)) and store.meta.chunk(h(data)) is None


def test_tombstones_and_commit_ids_are_dropped_after_the_retention(store):
    put_file(store, "n", b"x", commit="c1")
    store.remove("n", "r1")
    assert gc.collect(store, grace=0)["pruned"] == 0
    assert gc.collect(store, grace=0, now=time.time() + RETAIN_SECONDS + 1)["pruned"] == 3


def test_the_maintenance_thread_prunes_every_expired_tombstone_however_many(tmp_path):
    """5,000 tombstones past the retention (more than one batch) go in one background pass of
    the maintenance thread, nobody asking."""
    data = str(tmp_path / "data")
    store = open_local(data)
    service = StorageService(store, Link(), maintenance_store=open_local(data))
    try:
        old = time.time() - RETAIN_SECONDS - 60
        store.meta.claim_chunk(h(b"t"), 1, old, b"t")
        made = [new_version(f"t/{i:05d}", b"t", f"c-{i}") for i in range(5000)]
        store.meta.apply(made, old, {})
        store.meta.apply([Removal(v.name, f"r-{v.name}") for v in made], old, {})
        put_file(store, "live", b"live", commit="c-live")

        def tombstones():
            return store.meta._one("SELECT COUNT(*) FROM names WHERE deleted = 1")[0]

        assert tombstones() == 5000 > gc.PRUNE_BATCH
        service.tick(time.monotonic() + storage_service.GC_INTERVAL + 1)
        wait_for(lambda: tombstones() == 0, 60, "the background pass to prune every tombstone")
        assert [v.name for v in store.list("", "", 10)] == ["live"]
    finally:
        service.close()


# --- fsck ---


def test_fsck_names_missing_and_corrupt_chunks_with_the_files_they_break(store):
    shared = os.urandom(70_000)
    put_file(store, "a", shared + os.urandom(70_000), chunk_size=70_000, commit="c1")
    put_file(store, "b", shared, chunk_size=70_000, commit="c2")
    put_file(store, "small", b"fine", commit="c3")
    clean = gc.fsck_page(store)
    assert (clean["names"], clean["chunks"], clean["damaged"]) == (3, 3, [])
    assert (clean["next"], clean["orphans"], clean["refcount_errors"]) == (None, 0, 0)
    second = store.version("a").chunks[1]
    os.unlink(os.path.join(store.chunks.root, second.hex()[:2], second.hex()))
    first = h(shared)
    with open(os.path.join(store.chunks.root, first.hex()[:2], first.hex()), "r+b") as f:
        f.write(b"\xff")
    store.chunks.put(h(b"orphan" * 20000), b"orphan" * 20000)
    report = gc.fsck_page(store)
    damaged = {(d["chunk"], d["problem"]): d["names"] for d in report["damaged"]}
    assert damaged == {(first, "corrupt"): ["a", "b"], (second, "missing"): ["a"]}
    assert report["orphans"] == 1


def test_fsck_pages_through_the_store(store):
    for i in range(5):
        put_file(store, f"f{i}", os.urandom(70_000), chunk_size=70_000, commit=f"c{i}")
    pages, after = [], ""
    while True:
        page = gc.fsck_page(store, after, page_bytes=100_000)
        pages.append(page)
        if page["next"] is None:
            break
        after = page["next"]
    assert len(pages) == 3 and sum(pg["names"] for pg in pages) == 5
    assert all(pg["damaged"] == [] for pg in pages)


# --- the data directory ---


def test_workers_on_one_directory_share_one_store_id(tmp_path):
    a, b, c = (open_local(str(tmp_path / d)) for d in ("d", "d", "other"))
    assert a.store_id == b.store_id != c.store_id


def test_a_store_records_its_digest_function_when_made_and_keeps_it(tmp_path):
    new = open_local(str(tmp_path / "new"), digest_fn=None)
    assert new.digest_fn == p.NEW_STORE_DIGEST == p.BLAKE3  # what the autouse fixture made
    chosen = open_local(str(tmp_path / "chosen"), digest_fn=p.SHA256)
    assert chosen.digest_fn == p.SHA256
    put_file(new, "f", b"x" * 10_000)
    new.close()
    # Reopened without saying: its own; saying the other one: refused, clearly.
    assert open_local(str(tmp_path / "new")).digest_fn == p.BLAKE3
    with pytest.raises(FmsError, match=r"digest function is blake3 .*cannot change.*--digest"):
        open_local(str(tmp_path / "new"), digest_fn=p.SHA256)
    chosen.close()
    with pytest.raises(FmsError, match="digest function is sha256"):
        open_local(str(tmp_path / "chosen"), digest_fn=p.BLAKE3)


def test_a_store_made_before_the_choice_keeps_sha256_and_reads_as_before(tmp_path):
    use_digest(p.SHA256)  # its chunks were stored by their sha256, as every store's were
    old = open_local(str(tmp_path / "old"), digest_fn=p.SHA256)
    data = os.urandom(3 * CHUNK + 5)
    put_file(old, "f", data, commit="c1")
    old.meta._execute("DELETE FROM settings WHERE key = 'digest'")  # as fms wrote it before
    old.close()
    again = open_local(str(tmp_path / "old"))
    assert again.digest_fn == p.SHA256 and again.meta.setting("digest") == p.SHA256
    version = again.version("f")
    assert b"".join(p.unpack_data(again.read_chunk(d)) for d in version.chunks) == data
    assert version.manifest(again.digest_fn)["digest_fn"] == p.SHA256


def test_unusable_directories_give_clear_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError, match="cannot use data directory"):
        open_local(str(blocker / "data"))
    with pytest.raises(StoreError, match="parent folder does not exist"):
        open_local(str(tmp_path / "no" / "such" / "data"))


def test_temp_files_of_dead_writers_are_cleaned_and_live_ones_kept(store):
    import socket

    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen(["true"])
    dead.wait()
    files = {
        "dead": f"chunk.{host}.{dead.pid}.aaaa",
        "live": f"chunk.{host}.{os.getpid()}.bbbb",
        "remote_old": "chunk.otherhost.1.cccc",
        "remote_new": "chunk.otherhost.1.dddd",
    }
    for name in files.values():
        with open(os.path.join(store.chunks.tmp, name), "wb") as f:
            f.write(b"partial")
    os.utime(os.path.join(store.chunks.tmp, files["remote_old"]), (0, 0))
    assert store.chunks.clean_tmp() == 2
    assert sorted(os.listdir(store.chunks.tmp)) == sorted([files["live"], files["remote_new"]])


# --- migration from the format-1 layout ---

FILES = {f"dir/{i:03d}": content(i, 100 + 3000 * (i % 4)) for i in range(60)}
FILES["big"] = os.urandom(5 * CHUNK + 7)
FILES["removed"] = b"was here"


@OLD_STORES
def test_a_format1_directory_is_migrated_in_place(tmp_path):
    path = str(tmp_path / "old")
    write_format1(path, FILES, removed={"removed"}, store_id="feedface")
    store = open_local(path)
    assert store.store_id == "feedface"
    assert not os.path.exists(os.path.join(path, "manifests"))
    listed = [v.name for v in store.list("", "", 1000)]
    assert listed == sorted(n for n in FILES if n != "removed")
    for name in listed:
        got = b"".join(p.unpack_data(store.read_chunk(d)) for d in store.version(name).chunks)
        assert got == FILES[name], name
    assert store.meta.refcount_errors() == [] and gc.fsck_page(store)["damaged"] == []
    assert store.totals().files == len(listed)
    tombstone = list(FILES).index("removed") + 2  # written as version i+1, removed as i+2
    assert put_file(store, "removed", b"again", commit="n1").version == tombstone + 1
    store.close()
    again = open_local(path)  # idempotent: nothing more to do
    assert [v.name for v in again.list("", "", 1000)] == sorted(FILES)


@OLD_STORES
def test_a_chunk_format1_lost_counts_as_referenced_until_the_file_is_uploaded_again(tmp_path):
    path = str(tmp_path / "old")
    data = content(21, 3 * CHUNK)
    write_format1(path, {"f": data, "g": b"fine"})
    lost = h(split(data)[1])
    os.unlink(os.path.join(path, "chunks", lost.hex()[:2], lost.hex()))
    store = open_local(path)
    assert store.meta.refcount_errors() == []
    report = gc.fsck_page(store)
    assert [(d["chunk"], d["problem"], d["names"]) for d in report["damaged"]] == [
        (lost, "missing", ["f"])
    ]
    with pytest.raises(MissingChunks) as caught:  # what the client meets on re-upload...
        store.commit(new_version("f", data, commit="again"))
    assert caught.value.missing == [lost]
    put_file(store, "f", data, commit="again")  # ...and what it then does
    gc.collect(store, grace=0)
    assert gc.fsck_page(store)["damaged"] == [] and store.meta.refcount_errors() == []


@OLD_STORES
def test_a_damaged_manifest_is_kept_aside_and_an_unreadable_one_stops_the_migration(tmp_path):
    path = str(tmp_path / "old")
    write_format1(path, {"a": b"a", "b": b"b"})
    shard = next(os.scandir(os.path.join(path, "manifests")))
    victim = next(e.path for e in os.scandir(shard.path))
    with open(victim, "wb") as f:
        f.write(b"\xc1 not msgpack")
    store = open_local(path)
    assert len(store.list("", "", 10)) == 1
    assert os.listdir(os.path.join(path, "corrupt", "manifests")) == [os.path.basename(victim)]
    store.close()
    other = str(tmp_path / "other")
    write_format1(other, {"a": b"a"})
    shard = next(os.scandir(os.path.join(other, "manifests")))
    unreadable = next(e.path for e in os.scandir(shard.path))
    os.chmod(unreadable, 0)
    os.rename(unreadable, unreadable + ".x")
    os.mkdir(unreadable)  # reading it fails: EISDIR
    with pytest.raises(Exception, match="nothing was changed"):
        open_local(other)
    assert os.path.isdir(os.path.join(other, "manifests"))


def test_a_damaged_small_chunk_is_healed_by_uploading_it_again(store):
    put_file(store, "s", b"small", commit="c1")
    digest = h(b"small")
    store.meta._execute("UPDATE chunks SET data = ? WHERE digest = ?", (b"smell", digest))
    with pytest.raises(IntegrityError):
        store.read_chunk(digest)
    store.put_chunk(digest, b"small")
    assert bytes(p.unpack_data(store.read_chunk(digest))) == b"small"


@OLD_STORES
def test_migration_repairs_mtimes_format1_let_in(tmp_path):
    path = str(tmp_path / "old")
    write_format1(
        path,
        {"nan": b"a", "inf": b"b", "ok": b"c"},
        mtimes={"nan": math.nan, "inf": math.inf, "ok": 1234.5},
    )
    store = open_local(path)
    assert store.version("ok").mtime == 1234.5
    for name in ("nan", "inf"):
        assert abs(store.version(name).mtime - time.time()) < 600


@OLD_STORES
def test_a_migration_killed_midway_is_finished_by_the_next_start(tmp_path):
    path = str(tmp_path / "old")
    write_format1(path, FILES, removed={"removed"})
    # The migration is slowed (0.2 s per manifest) by wrapping its reader, here in the test.
    script = (
        "import logging, sys, time; logging.basicConfig(stream=sys.stderr, level=logging.INFO);"
        "from fms.storage.meta import legacy; from fms.storage.meta.sqlite import SQLiteMeta;"
        "from fms.storage.chunks.localdir import LocalDirChunks;"
        "read = legacy.manifests;"
        "legacy.manifests = lambda *a: (m for m in read(*a) if time.sleep(0.2) is None);"
        f"legacy.migrate({path!r}, SQLiteMeta({path!r} + '/meta.db', digest_fn='sha256'), "
        f"LocalDirChunks({path!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "event=migrate_start" in line:
                break
        proc.kill()  # mid-transaction: 62 manifests take 12 s
    finally:
        proc.kill()
        proc.wait(10)
    assert os.path.isdir(os.path.join(path, "manifests"))
    store = open_local(path)
    assert [v.name for v in store.list("", "", 1000)] == sorted(n for n in FILES if n != "removed")
    assert store.meta.refcount_errors() == []


# --- the service: wire -> model ---


class Link:
    def __init__(self):
        self.replies = []
        self.frames = []
        self.fills = []
        self.many_fills = []  # a commit_many's: [name, offset, manifest] per file

    def reply(self, route, header, data=None, invalidate=None, cache=None, fill=None, fills=None):
        self.replies.append(header)
        self.frames.append(data)
        self.fills.append(fill)
        self.many_fills.append(fills)


def request(service, link, **header):
    service.handle_request(
        {}, {"v": p.PROTOCOL_VERSION, "id": len(link.replies) + 1, **header}, None
    )
    service.flush()
    return link.replies[-1]


@pytest.mark.parametrize("mtime", [math.nan, math.inf, -math.inf, 1e300, -1e12])
def test_commit_refuses_mtimes_that_are_not_times(store, mtime):
    service = StorageService(store, Link())
    with pytest.raises(BadRequest, match="mtime"):
        service.handle_request(
            {},
            {"v": p.PROTOCOL_VERSION, "id": 1, **commit_fields("n", b"", "c1", mtime=mtime)},
            None,
        )


@pytest.mark.parametrize("name", ["a\x85b", "x\x9f", "\x80", "ok\x7f"])
def test_names_with_control_characters_are_refused(store, name):
    with pytest.raises(BadRequest, match="control character"):
        StorageService(store, Link()).handle_request(
            {}, {"v": p.PROTOCOL_VERSION, "id": 1, "op": "stat", "name": name}, None
        )


def test_an_rm_id_reused_by_a_commit_is_refused_not_answered_with_the_rm(store):
    link = Link()
    service = StorageService(store, link)
    put_file(store, "n", b"data", commit="c1")
    assert request(service, link, op="rm", name="n", commit="shared-id")["ok"]
    reply = request(service, link, **commit_fields("n", b"data", "shared-id"))
    assert (reply["ok"], reply["error"]) == (False, "bad_request")
    assert "already used" in reply["message"]


def test_commits_that_arrive_together_are_one_transaction_each_answered(store):
    link = Link()
    service = StorageService(store, link)
    for i in range(10):
        fields = commit_fields(f"n{i}", b"%d" % i, f"c{i}")
        service.handle_request({}, {"v": p.PROTOCOL_VERSION, "id": i, **fields}, _frame(b"%d" % i))
    assert link.replies == []  # held for the group commit
    service.flush()
    assert sorted(r["id"] for r in link.replies) == list(range(10))
    assert all(r["ok"] for r in link.replies) and store.totals().files == 10


def test_only_a_commit_that_made_a_small_file_from_the_content_it_carried_offers_a_fill(store):
    """Storage tells the broker it may hand a commit's content to the cache (``fill``, the new
    version's manifest) only when the commit made that version now, from content it carried
    whole (only a one-chunk file of at most INLINE_MAX may carry it): not a retry answered from
    the log, not a commit of chunks uploaded before, not an rm."""
    link = Link()
    service = StorageService(store, link)

    def commit(name, data, commit_id, inline=True, chunk_size=CHUNK):
        fields = commit_fields(name, data, commit_id, chunk_size)
        header = {"v": p.PROTOCOL_VERSION, "id": commit_id, **fields}
        service.handle_request({}, header, _frame(data) if inline else None)
        service.flush()
        assert link.replies[-1]["ok"], link.replies[-1]["message"]
        return link.fills[-1]

    fill = commit("a", b"small", "c1")
    assert p.decode(fill) == store.version("a").manifest(store.digest_fn)
    assert commit("a", b"small", "c1") is None  # the same commit again: answered from the log
    put_file(store, "b", b"stored before", commit="c2")
    assert commit("b", b"stored before", "c3", inline=False) is None  # content not carried
    assert request(service, link, op="rm", name="a", commit="c6")["ok"]
    assert link.fills[-1] is None


def test_missing_chunks_reply_lists_them(store):
    link = Link()
    service = StorageService(store, link)
    fields = commit_fields("n", content(7, 2 * CHUNK))
    reply = request(service, link, **fields)
    assert reply["error"] == "missing_chunks" and set(reply["missing"]) == set(fields["chunks"])


def test_ls_pages_with_a_cursor(store):
    link = Link()
    service = StorageService(store, link)
    for i in range(12):
        put_file(store, f"d/{i:02d}", b"x%d" % i, commit=f"c{i}")
    put_file(store, "e", b"e", commit="e")
    names, after, pages = [], "", 0
    while True:
        page = request(service, link, op="ls", prefix="d/", after=after, limit=5)
        pages += 1
        names += [e["name"] for e in page["entries"]]
        if not page["more"]:
            break
        after = page["entries"][-1]["name"]
    assert names == [f"d/{i:02d}" for i in range(12)] and pages == 3


def test_a_folder_view_collapses_folders_and_pages_past_them(store):
    for name in ("f/a", "f/b/1", "f/b/2", "f/b/3", "f/c", "f/d/x/y", "f/e", "g"):
        put_file(store, name, b"x", commit=f"c-{name}")
    seen, after = [], ""
    while after is not None:
        entries, folders, after = store.list_folder("f/", after, 2)
        assert len(entries) + len(folders) <= 2
        seen += [v.name for v in entries] + folders
    assert sorted(seen) == ["f/a", "f/b/", "f/c", "f/d/", "f/e"]
    entries, folders, after = store.list_folder("", "", 100)
    assert ([v.name for v in entries], folders, after) == (["g"], ["f/"], None)


def test_rm_prefix_removes_a_page_whose_names_fit_the_invalidation(store):
    for i in range(5):
        put_file(store, f"p/{i}", b"x", commit=f"c{i}")
    put_file(store, "pq", b"y", commit="c-pq")
    removed, more = store.remove_prefix("p/", 3, 1024)
    assert [v.name for v in removed] == ["p/0", "p/1", "p/2"] and more
    assert all(v.deleted for v in removed)
    removed, more = store.remove_prefix("p/", 3, 7)  # "p/3" + "p/4" would be 6 bytes...
    assert [v.name for v in removed] == ["p/3", "p/4"] and not more
    removed, more = store.remove_prefix("p/", 3, 2)  # ... and one name always goes
    assert (removed, more) == ([], False)
    assert [v.name for v in store.list("", "", 10)] == ["pq"]


def test_usage_is_the_kept_totals(store):
    link = Link()
    put_file(store, "a", b"1" * 100, commit="c1")
    reply = request(StorageService(store, link), link, op="usage")
    assert reply["store"] == {"files": 1, "bytes": 100, "chunks": 1, "chunk_bytes": 100}


def _frame(data):
    class Frame:
        buffer = p.pack_data(data)

    return Frame()


# --- several processes on one SQLite store ---


def _retrying(call):
    """What the client does on `unavailable`: back off and send again."""
    for wait in (0.01, 0.05, 0.1, 0.2, 0.5, 1.0):
        try:
            return call()
        except Unavailable:
            time.sleep(wait)
    return call()


def _hammer(path, worker, rounds, meta, results):
    """Commits and removes of the same five names as the other processes; reports how many
    changes succeeded (each one is a version of its name)."""
    store = open_store(path, meta)
    use_digest(store.digest_fn)  # a process of its own: the builders hash as this store does
    changes = 0
    for i in range(rounds):
        name = f"shared/{i % 5}"
        if i % 9 == 4:
            try:
                rm_id = f"w{worker}-rm-{i}"
                _retrying(lambda name=name, rm_id=rm_id: store.remove(name, rm_id))
                changes += 1
            except NotFound:
                pass  # another process removed it first
            continue
        data = b"%d-%d" % (worker, i) * (1 + i % 3) * 30000  # blobs and small chunks
        for _ in range(5):  # what the client does on missing_chunks
            for chunk in split(data, 70_000):
                _retrying(lambda chunk=chunk: store.put_chunk(h(chunk), chunk))
            change = new_version(name, data, commit=f"w{worker}-{i}", chunk_size=70_000)
            try:
                _retrying(lambda change=change: store.commit(change))
                break
            except MissingChunks:  # collected by another process's gc
                continue
        changes += 1
        if i % 14 == 0:
            try:
                gc.collect(store, grace=0)
            except Unavailable:
                pass  # another process is collecting
    store.close()
    results.put(changes)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_workers_sharing_one_store_never_lose_an_update(tmp_path, request, engine):
    import multiprocessing

    path = str(tmp_path / "data")
    meta = request.getfixturevalue("pg_database_url") if engine == "postgresql" else None
    open_store(path, meta).close()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(path, w, 60, meta, results)) for w in range(3)]
    for proc in procs:
        proc.start()
    changes = sum(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    store = open_store(path, meta)
    versions = 0
    for k in range(5):
        row = store.meta._current(f"shared/{k}")
        versions += row.version if row else 0
    assert versions == changes  # no update lost
    assert store.meta.refcount_errors() == []  # no reference count drifted
    assert gc.fsck_page(store)["damaged"] == []


def _fsck_all(store) -> dict:
    """A whole fsck, page after page, as the client runs it."""
    totals, after = {"damaged": [], "refcount_errors": 0, "names": 0}, ""
    while True:
        page = gc.fsck_page(store, after)
        totals["damaged"] += page["damaged"]
        totals["names"] += page["names"]
        totals["refcount_errors"] += page.get("refcount_errors", 0)
        if page["next"] is None:
            return totals
        after = page["next"]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_file_overwritten_and_collected_while_fsck_reads_its_page_is_not_damage(
    tmp_path, request, engine
):
    """The race of the test below, made to happen every time: another worker overwrites a file
    and collects with no grace right after fsck's page listed it and before it read its chunk.
    The chunk is gone, but no stored file uses it any more: not damage."""
    path = str(tmp_path / "data")
    meta = request.getfixturevalue("pg_database_url") if engine == "postgresql" else None
    store, other = open_store(path, meta), open_store(path, meta)
    blob = 70_000  # a blob of the chunk store
    put_file(store, "w/a", content(1, blob), commit="a", chunk_size=blob)
    put_file(store, "w/b", content(2, blob), commit="b", chunk_size=blob)
    gone = h(content(2, blob))
    get = store.chunks.get

    def get_then_write(digest):
        if digest != gone and other.chunks.has(gone):  # while reading w/a: w/b changes
            put_file(other, "w/b", content(3, blob), commit="b2", chunk_size=blob)
            gc.collect(other, grace=0)
        return get(digest)

    store.chunks.get = get_then_write
    try:
        page = gc.fsck_page(store)
    finally:
        other.close()
    assert not store.chunks.has(gone)  # it did happen mid-page
    assert (page["names"], page["damaged"], page["refcount_errors"]) == (2, [], 0)
    store.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    ("names", "runs"),
    [
        (3000, 8),  # fails in seconds without the snapshot
        pytest.param(200_000, 10, marks=[pytest.mark.slow, pytest.mark.timeout(1800)]),
    ],
)
def test_fsck_reads_a_snapshot_so_concurrent_writes_never_look_like_damage(
    tmp_path, request, engine, names, runs
):
    """A healthy store of many names while another worker's connection overwrites 50 files and
    collects with no grace all along: every fsck run finds nothing wrong.  (Before, the last
    page read the names and the reference counts in two queries, and a chunk released and
    collected after the page listed it was reported missing: 10 of 10 runs at 200,000 names
    reported 14-20 refcount_errors.)"""
    path = str(tmp_path / "data")
    meta = request.getfixturevalue("pg_database_url") if engine == "postgresql" else None
    store, other = open_store(path, meta), open_store(path, meta)
    now = time.time()
    store.meta.claim_chunk(h(b"same"), 4, now, b"same")
    made = [new_version(f"n/{i:06d}", b"same", f"c-{i}") for i in range(names)]
    for start in range(0, names, 1000):
        store.meta.apply(made[start : start + 1000], now, {})
    blob = 70_000  # over SMALL_CHUNK_MAX: a blob of the chunk store, not a row's bytes
    for k in range(50):
        put_file(store, f"w/{k:02d}", content(k, blob), commit=f"w-{k}", chunk_size=blob)
    stop, errors = threading.Event(), []

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                put_file(other, f"w/{i % 50:02d}", content(1000 + i, blob), f"o-{i}", blob)
                if i % 2 == 0:
                    gc.collect(other, grace=0)
            except (MissingChunks, Unavailable):
                continue  # its own upload collected before the commit: the next one
            except Exception as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reports = [_fsck_all(store) for _ in range(runs)]
    finally:
        stop.set()
        thread.join(60)
        other.close()
    assert errors == []
    assert all(r["names"] == names + 50 for r in reports)
    assert [(r["damaged"], r["refcount_errors"]) for r in reports] == [([], 0)] * runs
    assert store.meta.refcount_errors() == []
    store.close()


# --- a property: references always equal a recount, no referenced chunk is ever freed ---

NAMES = st.sampled_from(["a", "b", "c/d"])
PUT = {
    "name": NAMES,
    "seed": st.integers(0, 6),
    "blocks": st.integers(0, 3),
    "small": st.booleans(),
}
COPY = {"src": NAMES, "dst": st.sampled_from(["a", "b", "c/d", "c/e"]), "move": st.booleans()}
RM_PREFIX = {"prefix": st.sampled_from(["c/", "a", "b"]), "limit": st.integers(1, 3)}


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="fms-prop-")
        self.store = open_local(self.dir + "/data")
        self.model = {}
        self.ids = 0

    def _id(self):
        self.ids += 1
        return f"id{self.ids}"

    @rule(**PUT)
    def put(self, name, seed, blocks, small):
        size = blocks * (4096 if small else 70_000) + seed
        data = content(seed, size)
        put_file(self.store, name, data, commit=self._id(), chunk_size=4096 if small else 70_000)
        self.model[name] = data

    @rule(name=NAMES, seed=st.integers(0, 3), repeats=st.integers(33, 40))
    def put_long(self, name, seed, repeats):
        """A chunk list too long to keep inline: pages, some shared between files."""
        data = content(seed, 4096) * repeats + content(seed + 10, seed + 1)
        put_file(self.store, name, data, commit=self._id(), chunk_size=4096)
        self.model[name] = data

    @rule(name=NAMES)
    def rm(self, name):
        if name in self.model:
            self.store.remove(name, self._id())
            del self.model[name]
        else:
            with pytest.raises(NotFound):
                self.store.remove(name, self._id())

    @rule(**COPY)
    def copy(self, src, dst, move):
        if src in self.model and src != dst:
            self.store.copy(src, dst, self._id(), move)
            self.model[dst] = self.model.pop(src) if move else self.model[src]
        else:
            with pytest.raises((NotFound, BadRequest)):
                self.store.copy(src, dst, self._id(), move)

    @rule(**RM_PREFIX)
    def rm_prefix(self, prefix, limit):
        removed, more = self.store.remove_prefix(prefix, limit, 1024)
        gone = sorted(n for n in self.model if n.startswith(prefix))
        assert [v.name for v in removed] == gone[:limit] and more == (len(gone) > limit)
        for version in removed:
            del self.model[version.name]

    @rule(grace=st.sampled_from([0, 3600]))
    def collect(self, grace):
        gc.collect(self.store, grace=grace)

    @rule()
    def restart(self):
        self.store.close()
        self.store = open_local(self.dir + "/data")

    @invariant()
    def references_match_a_recount_and_resolve(self):
        assert self.store.meta.refcount_errors() == []
        assert [v.name for v in self.store.list("", "", 100)] == sorted(self.model)
        for name, data in self.model.items():
            version = self.store.version(name)
            digests = self.store.digests(version)
            got = b"".join(p.unpack_data(self.store.read_chunk(d)) for d in digests)
            assert got == data
        totals = self.store.totals()
        assert (totals.files, totals.bytes) == (len(self.model), sum(map(len, self.model.values())))

    def teardown(self):
        import shutil

        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreProperties = StoreMachine.TestCase
TestStoreProperties.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class VersionedStoreMachine(StoreMachine):
    """The same, with two replaced versions kept per name: what an overwrite, rm, cp, mv or
    restore replaces is retained, a restore brings one back, and a collection (grace 0 too)
    never frees a chunk a retained version names."""

    KEEP = 2

    def __init__(self):
        super().__init__()
        self.store.close()
        self.store = open_local(self.dir + "/data", keep_versions=self.KEEP)
        self.kept = {}  # name -> retained contents, newest first

    def _replaced(self, name):
        if name in self.model:
            self.kept[name] = [self.model[name], *self.kept.get(name, [])][: self.KEEP]

    @rule(**PUT)
    def put(self, name, seed, blocks, small):
        self._replaced(name)
        super().put(name, seed, blocks, small)

    @rule(name=NAMES, seed=st.integers(0, 3), repeats=st.integers(33, 40))
    def put_long(self, name, seed, repeats):
        self._replaced(name)
        super().put_long(name, seed, repeats)

    @rule(name=NAMES)
    def rm(self, name):
        self._replaced(name)
        super().rm(name)

    @rule(**COPY)
    def copy(self, src, dst, move):
        if src in self.model and src != dst:
            self._replaced(dst)
            if move:
                self._replaced(src)
        super().copy(src, dst, move)

    @rule(**RM_PREFIX)
    def rm_prefix(self, prefix, limit):
        gone = sorted(n for n in self.model if n.startswith(prefix))[:limit]
        for name in gone:
            self._replaced(name)
        super().rm_prefix(prefix, limit)

    @rule(name=NAMES)
    def restore(self, name):
        if not self.kept.get(name):
            with pytest.raises(NotFound):
                self.store.restore(name, None, self._id())
            return
        content = self.kept[name][0]
        self.store.restore(name, None, self._id())
        self._replaced(name)
        self.model[name] = content

    @rule()
    def restart(self):
        self.store.close()
        self.store = open_local(self.dir + "/data", keep_versions=self.KEEP)

    @invariant()
    def retained_versions_read_back_whole(self):
        for name in ("a", "b", "c/d", "c/e"):
            got = [
                b"".join(p.unpack_data(self.store.read_chunk(d)) for d in self.store.digests(v))
                for v in self.store.meta.retained(name)
            ]
            assert got == self.kept.get(name, [])


TestVersionedStoreProperties = VersionedStoreMachine.TestCase
TestVersionedStoreProperties.settings = TestStoreProperties.settings


def test_a_commit_is_applied_before_the_next_other_op_not_after_the_whole_drain(store):
    link = Link()
    service = StorageService(store, link)
    service.handle_request(
        {}, {"v": p.PROTOCOL_VERSION, "id": 1, **commit_fields("n", b"x", "c1")}, _frame(b"x")
    )
    service.handle_request({}, {"v": p.PROTOCOL_VERSION, "id": 2, "op": "stat", "name": "n"}, None)
    assert [r["id"] for r in link.replies] == [1, 2] and link.replies[1]["stat"]["version"] == 1


def test_a_request_whose_deadline_passed_is_answered_short_not_done(store):
    link = Link()
    service = StorageService(store, link)
    with pytest.raises(Unavailable, match="deadline passed"):
        service.handle_request(
            {"deadline": time.monotonic() - 1},
            {"v": p.PROTOCOL_VERSION, "id": 1, "op": "ls", "prefix": ""},
            None,
        )


def test_a_group_commit_that_crashes_still_answers_every_commit(store, monkeypatch):
    link = Link()
    service = StorageService(store, link)
    monkeypatch.setattr(store.meta, "apply", lambda *a: 1 / 0)
    for i in range(3):
        fields = commit_fields(f"n{i}", b"x", f"c{i}")
        service.handle_request({}, {"v": p.PROTOCOL_VERSION, "id": i, **fields}, _frame(b"x"))
    service.flush()
    assert sorted(r["id"] for r in link.replies) == [0, 1, 2]
    assert {r["error"] for r in link.replies} == {"internal"}


def test_a_lone_commit_waits_for_company_only_while_cpus_are_scarce(store):
    """The worker loop asks ``linger()`` after each drain: a lone pending commit waits (up to
    groupwait.WAIT) while CPUs are scarce, not otherwise, and never with nothing pending; the
    flush then applies and answers it (tests/test_groupwait.py has the rules)."""
    link = Link()
    service = StorageService(store, link)
    scarce = [False]
    service.group_wait = GroupWait(scarce=lambda now: scarce[0])
    assert service.linger() == 0
    fields = commit_fields("a", b"x", "c1")
    service.handle_request({}, {"v": p.PROTOCOL_VERSION, "id": 1, **fields}, _frame(b"x"))
    assert service.linger() == 0  # CPUs to spare: no wait
    scarce[0] = True
    assert 0 < service.linger() <= groupwait.WAIT
    service.flush()
    assert [r["ok"] for r in link.replies] == [True] and store.version("a").name == "a"
    assert service.linger() == 0


class RouteLink:
    """A link that keeps each reply with the route it answers (and its fill), and may run a
    check at each reply (``on_reply``)."""

    def __init__(self, on_reply=None):
        self.sent = []  # (route, header, fill)
        self.on_reply = on_reply

    def reply(self, route, header, data=None, invalidate=None, cache=None, fill=None):
        if self.on_reply is not None:
            self.on_reply(route, header)
        self.sent.append((route, header, fill))


def _commit_in_group(service, key, name, data, commit_id, inline=None):
    """Hand a commit of ``data`` to the service (held for the group), as route ``key``;
    ``inline``: the content sent with it (``data`` unless given)."""
    header = {"v": p.PROTOCOL_VERSION, "id": key, **commit_fields(name, data, commit_id)}
    service.handle_request({"k": key}, header, _frame(data if inline is None else inline))


def test_a_group_where_one_commit_fails_answers_each_on_its_own_route_with_its_own_fill(store):
    """Three commits applied in one transaction, the middle one refused (its inline content
    does not match its digest): the other two are made, and each of the three is answered on
    its own route, a made one with the fill of its own version, the refused one with its
    error and no fill."""
    link = RouteLink()
    service = StorageService(store, link)
    _commit_in_group(service, "ka", "a", b"alpha", "c1")
    _commit_in_group(service, "kb", "b", b"beta", "c2", inline=b"damaged")
    _commit_in_group(service, "kc", "c", b"gamma", "c3")
    assert link.sent == []  # one group, applied at the flush
    service.flush()
    by_route = {route["k"]: (header, fill) for route, header, fill in link.sent}
    assert sorted(by_route) == ["ka", "kb", "kc"]
    for key, name in (("ka", "a"), ("kc", "c")):
        header, fill = by_route[key]
        assert header["ok"] and header["id"] == key and header["stat"]["name"] == name
        assert p.decode(fill) == store.version(name).manifest(store.digest_fn)
    header, fill = by_route["kb"]
    assert (header["ok"], header["error"], header["id"], fill) == (False, "integrity", "kb", None)
    assert [v.name for v in store.list("", "", 10)] == ["a", "c"]


def test_a_group_is_answered_only_once_committed_and_a_crash_before_a_reply_loses_nothing(
    store, tmp_path
):
    """Every reply of a group leaves only once the transaction that made its version is
    committed (another connection to the store sees it at that moment).  A worker that dies
    between the commit and its replies (here: at the second reply) has lost nothing: what it
    acknowledged stands, and the commits it did not answer are made once, answered from the
    log when their clients send them again."""
    other = open_local(str(tmp_path / "data"))  # its own connection: sees only what committed
    seen = []

    def committed_before_reply(route, header):
        seen.append(other.version(header["stat"]["name"]).version)
        if len(seen) == 2:
            raise SystemExit("the worker dies here")

    link = RouteLink(committed_before_reply)
    service = StorageService(store, link)
    for i in range(3):
        _commit_in_group(service, f"k{i}", f"n{i}", b"%d" % i, f"c{i}")
    with pytest.raises(SystemExit):
        service.flush()
    assert seen == [1, 1] and [r["k"] for r, _h, _f in link.sent] == ["k0"]
    service.close()
    other.close()
    reopened = open_local(str(tmp_path / "data"))  # the worker's restart
    try:
        assert [reopened.version(f"n{i}").version for i in range(3)] == [1, 1, 1]
        again = RouteLink()
        retry = StorageService(reopened, again)
        for i in (1, 2):  # the unanswered clients send the same commits again
            _commit_in_group(retry, f"k{i}", f"n{i}", b"%d" % i, f"c{i}")
        retry.flush()
        assert [(r["k"], h["ok"], h["stat"]["version"]) for r, h, _f in again.sent] == [
            ("k1", True, 1),
            ("k2", True, 1),
        ]
        assert reopened.totals().files == 3
    finally:
        reopened.close()


def test_chunks_of_one_store_cannot_be_used_by_another_stores_metadata(tmp_path, request):
    path = str(tmp_path / "data")
    open_local(path).close()  # chunks/ now belong to this SQLite store
    url = request.getfixturevalue("pg_database_url")
    with pytest.raises(StoreError, match="belong to store"):
        open_store(path, url)  # PostgreSQL's store with these chunks: no
    assert open_local(path).store_id  # the rightful owner still opens it


def test_commit_many_commits_each_file_with_its_own_result_in_one_message(store):
    link = Link()
    service = StorageService(store, link)
    put_file(store, "taken", b"old", commit="used-id")
    files = [("a", b"alpha"), ("b/c", b"beta" * 100), ("taken", b"new")]
    ids = ["i1", "i2", "used-id"]  # the last id belongs to another request
    header = {
        "v": p.PROTOCOL_VERSION,
        "id": 7,
        "op": "commit_many",
        "names": [n for n, _ in files],
        "sizes": [len(d) for _, d in files],
        "hashes": [h(d) for _, d in files],
        "mtimes": [1.0, 2.0, 3.0],
        "commits": ids,
        "chunk_size": CHUNK,
    }
    service.handle_request({}, header, _frame(b"".join(d for _, d in files)))
    [reply] = link.replies
    assert [r["ok"] for r in reply["results"]] == [True, True, False]
    assert reply["results"][2]["error"] == "bad_request"
    assert bytes(p.unpack_data(store.read_chunk(store.version("b/c").chunks[0]))) == b"beta" * 100
    with pytest.raises(BadRequest, match="add up"):
        service.handle_request({}, {**header, "id": 8}, _frame(b"short"))


def test_commit_many_keeps_its_metadata_with_every_file(store):
    link = Link()
    service = StorageService(store, link)
    header = {
        "v": p.PROTOCOL_VERSION,
        "id": 1,
        "op": "commit_many",
        "names": ["m1", "m2"],
        "sizes": [2, 0],
        "hashes": [h(b"m1"), h(b"")],
        "mtimes": [1.0, 2.0],
        "commits": ["k1", "k2"],
        "chunk_size": CHUNK,
        "meta": {"fs.mode": "600", "fs.uid": "5"},
    }
    service.handle_request({}, header, _frame(b"m1"))
    service.handle_request(
        {},
        {
            **header,
            "id": 2,
            "names": ["m3"],
            "sizes": [0],
            "hashes": [h(b"")],
            "mtimes": [3.0],
            "commits": ["k3"],
            "meta": None,
        },
        _frame(b""),
    )
    first, second = link.replies
    assert [r["ok"] for r in first["results"] + second["results"]] == [True, True, True]
    assert first["results"][0]["stat"]["meta"] == {"fs.mode": "600", "fs.uid": "5"}
    assert store.version("m2").meta == {"fs.mode": "600", "fs.uid": "5"}
    assert store.version("m3").meta == {}  # none sent: none kept


def test_get_many_answers_every_name_in_order_small_contents_inline_errors_per_name(store):
    link = Link()
    service = StorageService(store, link)
    put_file(store, "small", b"tiny")
    put_file(store, "big", content(3, 2 * CHUNK), commit="c2")
    names = ["big", "gone", "small"]
    reply = request(service, link, op="get_many", names=names)
    results = p.read_batch(reply, link.frames[-1], names)
    assert [r.get("error") for r, _ in results] == [None, "not_found", None]
    assert [r.get("inline") for r, _ in results] == [False, None, True]
    assert bytes(results[2][1]) == b"tiny" and results[0][0]["manifest"]["size"] == 2 * CHUNK


def test_get_many_reads_its_batch_in_one_snapshot_with_a_query_for_names_and_one_for_chunks(
    store, monkeypatch
):
    """The batch's versions and small chunks are read in one snapshot, not per name; a blob
    (inline content over 64 KiB), a damaged small chunk and a lost blob are each that name's
    answer alone, the damaged chunk marked lost after the snapshot (a write)."""
    link = Link()
    service = StorageService(store, link)
    put_file(store, "small", b"tiny", commit="c1")
    put_file(store, "smell", b"smelly", commit="c2")
    medium = content(4, 100_000)  # one chunk over SMALL_CHUNK_MAX: a blob, still inline
    put_file(store, "medium", medium, chunk_size=100_000, commit="c3")
    lost = content(5, 90_000)
    put_file(store, "lost", lost, chunk_size=90_000, commit="c4")
    put_file(store, "big", content(3, 2 * CHUNK), commit="c5")
    store.meta._execute("UPDATE chunks SET data = ? WHERE digest = ?", (b"smelly!", h(b"smelly")))
    os.unlink(os.path.join(store.chunks.root, h(lost).hex()[:2], h(lost).hex()))
    snapshots, queries = [], []
    real_snapshot, real_execute = store.meta.snapshot, store.meta._execute
    monkeypatch.setattr(store.meta, "snapshot", lambda: snapshots.append(1) or real_snapshot())
    monkeypatch.setattr(
        store.meta, "_execute", lambda sql, *a: queries.append(sql) or real_execute(sql, *a)
    )
    names = ["big", "gone", "small", "medium", "smell", "lost", "small"]
    reply = request(service, link, op="get_many", names=names)
    results = p.read_batch(reply, link.frames[-1], names)
    errors = [r.get("error") for r, _ in results]
    assert errors == [None, "not_found", None, None, "integrity", "not_found", None]
    assert [r.get("inline") for r, _ in results if "error" not in r] == [False, True, True, True]
    assert bytes(results[2][1]) == b"tiny" == bytes(results[6][1])
    assert bytes(results[3][1]) == medium
    assert snapshots == [1]
    reads = [q for q in queries if q.lstrip().upper().startswith("SELECT")]
    # the names, the small chunks; then read_chunk's row for each of the three read apart
    assert len(reads) == 2 + 3, reads
    assert store.meta.chunk(h(b"smelly")).lost and store.meta.chunk(h(lost)).lost
    assert not store.meta.in_transaction


@pytest.mark.parametrize("store_digest", p.DIGEST_FUNCTIONS)
def test_chunk_reads_from_s3_in_one_drain_go_side_by_side_and_none_unverified(
    tmp_path, request, monkeypatch
):
    """A reader's pipeline of chunk requests costs one round trip to an object store far away,
    not one each: storage fetches the blobs of one drain side by side.  A blob damaged in the
    store is still never sent."""
    import threading

    server = request.getfixturevalue("s3")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    bucket = request.getfixturevalue("s3_bucket")
    store = open_store(str(tmp_path / "data"), chunks=f"s3://{bucket}")
    blobs = [os.urandom(100_000 + i) for i in range(6)]
    for blob in blobs:
        store.put_chunk(h(blob), blob)
    server.client().put_object(Bucket=bucket, Key=store.chunks._key(h(blobs[5])), Body=b"x" * 5)
    together = threading.Barrier(5, timeout=20)  # passed only if 5 reads wait at once
    real = store.chunks.get
    monkeypatch.setattr(store.chunks, "get", lambda d: (together.wait(), real(d))[1])
    link = Link()
    service = StorageService(store, link)
    for i, blob in enumerate(blobs[:5]):
        header = {"v": p.PROTOCOL_VERSION, "id": i, "op": "chunk", "hash": h(blob), "len": 100_000}
        service.handle_request({}, header, None)
    assert link.replies == []  # gathered until the drain ends
    service.flush()
    assert [r["id"] for r in link.replies] == [0, 1, 2, 3, 4]
    assert [bytes(p.unpack_data(f)) for f in link.frames] == blobs[:5]
    monkeypatch.setattr(store.chunks, "get", real)
    bad = {"v": p.PROTOCOL_VERSION, "id": 9, "op": "chunk", "hash": h(blobs[5]), "len": 100_005}
    service.handle_request({}, bad, None)
    service.flush()
    assert link.replies[-1]["error"] == "integrity" and link.frames[-1] is None
    service.close()


def test_a_maintenance_job_whose_client_stopped_waiting_is_not_run(tmp_path):
    """fsck and gc queue on one thread: a request whose deadline passed while it waited behind
    a long one is answered unavailable without being done, so retries never pile up."""
    spare = open_local(str(tmp_path / "data"))
    maintenance = storage_service._Maintenance(spare)
    release, ran = threading.Event(), []
    try:
        maintenance.submit({}, {"id": 1}, lambda store: release.wait(10) and {"long": True})
        late = {"deadline": time.monotonic() + 0.1}
        maintenance.submit(late, {"id": 2}, lambda store: ran.append(2) or {})
        wait_for(lambda: time.monotonic() > late["deadline"], 5, "the deadline to pass")
        release.set()
        done = []
        wait_for(lambda: done.extend(maintenance.finished()) or len(done) == 2, 10, "both jobs")
    finally:
        maintenance.stop()
        maintenance.join()
        spare.close()
    assert done[0][2] == {"long": True}
    assert isinstance(done[1][2], Unavailable) and ran == []


def test_the_reserve_gives_its_room_to_a_release_and_takes_it_back_after(tmp_path):
    """Two workers on one data directory: while one's release is under way, the other's refill
    does not take the room back."""
    one, two = SpaceReserve(str(tmp_path)), SpaceReserve(str(tmp_path))
    vfs = os.statvfs(tmp_path)
    assert one.size == min(RESERVE_BYTES, vfs.f_blocks * vfs.f_frsize // 8) > 0
    assert one.held() == one.size
    with one.released():
        assert one.held() == 0
        assert two.refill() is False and two.held() == 0
    assert one.held() == one.size


def test_a_versions_reply_stays_within_its_bound_whatever_is_kept(tmp_path):
    """Stats carry up to 2 KiB of metadata now: `versions` lists the newest 256, so its reply
    stays under the 1 MiB the broker reserves for it however many versions are kept."""
    from dataclasses import replace

    from fms.storage.service import VERSIONS_MAX

    store = open_local(str(tmp_path / "data"), keep_versions=300)
    link = Link()
    service = StorageService(store, link)
    meta = {f"k{i:02d}": "v" * 60 for i in range(30)}  # about 2 KiB
    name = "n" * 1000
    store.put_chunk(h(b"x"), b"x")
    for i in range(300):
        store.commit(replace(new_version(name, b"x", commit=f"c{i}"), meta=meta))
    reply = request(service, link, op="versions", name=name)
    assert len(reply["versions"]) == VERSIONS_MAX and reply["versions"][0]["version"] == 300
    assert len(p.encode(reply)) < p.MiB
    store.close()


# --- a small commit's path, made cheaper: what it must still do ---


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", 7),
        ("name", "a//b"),
        ("name", "ab\u202e"),
        ("digest", b"short"),
        ("digest_kind", "content"),
        ("extents", b"\x00" * 15),
        ("chunks", [b"x" * 31]),
        ("chunks", "not a list"),
        ("mtime", True),
        ("mtime", math.nan),
        ("commit", ""),
        ("commit", "c" * (p.MAX_COMMIT_ID + 1)),
        ("meta", {"k": 1}),
        ("meta", {"": "v"}),
        ("meta", ["k", "v"]),
    ],
)
def test_a_commit_with_a_field_the_table_refuses_is_refused_before_anything(store, field, value):
    """A commit reads its fields as they come, because the service checks each against the
    request table first (fms.wire.check_request): one that the table refuses is a bad_request,
    and nothing is pending or stored."""
    service = StorageService(store, Link())
    header = {"v": p.PROTOCOL_VERSION, "id": 1, **commit_fields("n", b"data")}
    header[field] = value
    with pytest.raises(FmsError) as refused:
        service.handle_request({}, header, _frame(b"data"))
    assert refused.value.code in ("bad_request", "too_large")
    service.flush()
    assert store.totals().files == 0


def test_a_commit_keeps_its_name_in_nfc_its_mtime_as_a_float_and_storage_clock_without_one(
    store,
):
    link = Link()
    service = StorageService(store, link)

    def commit(fields, data):
        header = {"v": p.PROTOCOL_VERSION, "id": len(link.replies) + 1, **fields}
        service.handle_request({}, header, _frame(data) if data else None)
        service.flush()
        return link.replies[-1]

    nfd, nfc = "cafe\u0301/menu.txt", "caf\u00e9/menu.txt"
    fields = commit_fields(nfd, b"soup", "c1", mtime=1700000000)
    assert isinstance(fields["mtime"], int)
    reply = commit(fields, b"soup")
    assert reply["ok"] and reply["stat"]["name"] == nfc
    made = store.version(nfc)
    assert made.mtime == 1700000000.0 and isinstance(made.mtime, float)
    fields = commit_fields("plain", b"x", "c2")
    del fields["mtime"]
    before = time.time()
    assert commit(fields, b"x")["ok"]
    assert before <= store.version("plain").mtime <= time.time()
    assert commit(commit_fields("folder/", b"", "c3"), b"")["ok"]
    assert store.version("folder/").size == 0
    with pytest.raises(BadRequest, match="folder's marker"):
        commit(commit_fields("folder2/", b"x", "c4"), b"x")


def test_a_commit_of_one_chunk_checks_its_file_digest_as_any_other(store):
    """A one-chunk commit's file digest is checked by the short form (its one extent and the
    digest of its one page): the same digest as the general one, and a wrong one is refused."""
    for size in (1, CHUNK - 1, CHUNK):
        data = content(size, size)
        change = new_version(f"f{size}", data, f"c{size}")
        assert change.chunks is not None and len(change.chunks) == 1
        want = p.inline_digest(change.extents, change.chunks, h)
        assert store.commit(change, data).digest == want
    data = b"payload"
    wrong = replace(new_version("w", data, "cw"), digest=h(b"another"))
    with pytest.raises(IntegrityError, match="file digest"):
        store.commit(wrong, data)


def test_a_write_transaction_is_undone_whole_and_never_leaves_the_connection_relaxed(store):
    """The engine's write transaction (SQLMeta._write): a clean body commits; a body that
    fails is rolled back whole, a driver's error raised as the wire's, any other as it is;
    one that may commit without waiting for the disk (durable=False) runs relaxed and leaves
    the connection durable (synchronous=FULL) however it ends, a failed BEGIN too."""
    meta = store.meta

    def synchronous() -> int:
        return meta.db.execute("PRAGMA synchronous").fetchone()[0]

    def idle() -> bool:
        return not meta.in_transaction and not meta.db.in_transaction

    full, normal = 2, 1
    assert synchronous() == full
    with meta._write(durable=False):
        assert synchronous() == normal and meta.in_transaction
        meta._execute("INSERT INTO settings VALUES ('probe', 'kept')")
    assert meta.setting("probe") == "kept" and synchronous() == full and idle()
    for durable in (True, False):
        with pytest.raises(RuntimeError, match="boom"):
            with meta._write(durable=durable):
                meta._execute("UPDATE settings SET value = 'lost' WHERE key = 'probe'")
                raise RuntimeError("boom")
        assert meta.setting("probe") == "kept" and synchronous() == full and idle()
        with pytest.raises(FmsError, match="metadata database error") as driver:
            with meta._write(durable=durable):
                meta._execute("UPDATE settings SET value = 'lost' WHERE key = 'probe'")
                meta._execute("INSERT INTO no_such_table VALUES (1)")
        assert type(driver.value) is FmsError and driver.value.__suppress_context__
        assert meta.setting("probe") == "kept" and synchronous() == full and idle()
    meta.begin_write = "BEGIN NOT A STATEMENT"  # a BEGIN that fails
    with pytest.raises(FmsError, match="metadata database error"):
        with meta._write(durable=False):
            pytest.fail("the body must not run")
    assert synchronous() == full and idle()


def test_a_commits_audit_entry_is_the_one_audit_entry_makes(store):
    """A commit's audit entry is built directly (the usual change): the same entry, keys in
    the same order, as the general form gives."""
    from fms.storage.meta.access import _to_json, audit_entry, change_entry

    made = put_file(store, "n", b"data", commit="c1")
    change = replace(new_version("n", b"data", "c1"), actor="alice")
    entry = change_entry(change, made, 1234.5)
    general = audit_entry(1234.5, "alice", "put", names=["n"], versions=[made.version], size=4)
    assert _to_json(entry) == _to_json(general)
    (logged,) = [e for e in store.meta.audit_read(0, 0, 10) if e["op"] == "put"]
    assert {k: v for k, v in logged.items() if k not in ("seq", "time")} == {
        k: v for k, v in general.items() if k != "time"
    } | {"identity": "local"}


def commit_many_header(req_id, files, commits, **fields):
    """A ``commit_many`` request header of ``files`` ((name, content) pairs)."""
    return {
        "v": p.PROTOCOL_VERSION,
        "id": req_id,
        "op": "commit_many",
        "names": [n for n, _ in files],
        "sizes": [len(d) for _, d in files],
        "hashes": [h(d) for _, d in files],
        "mtimes": [1.0] * len(files),
        "commits": commits,
        "chunk_size": CHUNK,
        **fields,
    }


def test_commit_many_offers_a_fill_for_each_file_it_made_from_its_content(store):
    """A ``commit_many`` tells the broker which of its files it may hand to the cache
    (``fills``: name, the offset of its content in the request's data, the new version's
    manifest): each file made now from the content it carried, not one refused, not an empty
    one (no content), not a retry answered from the log."""
    link = Link()
    service = StorageService(store, link)
    put_file(store, "taken", b"old", commit="used-id")
    files = [("a", b"alpha"), ("empty", b""), ("b/c", b"beta" * 100), ("taken", b"new")]

    def commit_many(req_id, ids):
        header = commit_many_header(req_id, files, ids)
        service.handle_request({}, header, _frame(b"".join(d for _, d in files)))
        return link.replies[-1], link.many_fills[-1]

    reply, fills = commit_many(1, ["i1", "i2", "i3", "used-id"])
    assert [r["ok"] for r in reply["results"]] == [True, True, True, False]
    # one entry per changed name (the inv): a, empty, b/c
    assert [fill and fill[0] for fill in fills] == [0, None, 5]
    for name, fill in (("a", fills[0]), ("b/c", fills[2])):
        assert p.decode(fill[1]) == store.version(name).manifest(store.digest_fn)
    reply, fills = commit_many(2, ["i1", "i2", "i3", "used-id"])  # the same ids again
    assert [r["ok"] for r in reply["results"]] == [True, True, True, False]
    assert fills is None  # answered from the log: nothing made now


def test_a_commit_manys_fills_fit_beside_its_names_in_one_route_frame(store, monkeypatch):
    from fms import limits

    link = Link()
    service = StorageService(store, link)
    files = [(f"n{i}", b"%d" % i) for i in range(4)]
    names_bytes = sum(len(n) for n, _ in files)
    manifest = len(p.encode(store_manifest_of(store, service, link)))  # one's size
    monkeypatch.setattr(limits, "FILL_ROUTE_BYTES", names_bytes + 2 * manifest + 10)
    header = commit_many_header(9, files, [f"k{i}" for i in range(4)])
    service.handle_request({}, header, _frame(b"".join(d for _, d in files)))
    fills = link.many_fills[-1]
    assert [fill is not None for fill in fills] == [True, True, False, False]


def store_manifest_of(store, service, link):
    """The manifest of a one-byte file named like the test's (made here, then measured)."""
    service.handle_request({}, commit_many_header(1, [("n9", b"9")], ["probe"]), _frame(b"9"))
    return store.version("n9").manifest(store.digest_fn)


@pytest.mark.parametrize(
    "name_len, meta_len, hostile",
    [
        (8, 0, False),
        (100, 0, False),
        (120, 1900, False),
        (250, 1000, False),
        # a request header up to its limit (MAX_HEADER), which fms's client never sends: names
        # beyond one inv, or no room left for a fill
        (40, 0, True),
        (170, 0, True),
        (170, 2000, True),
        (1000, 0, True),
    ],
)
def test_a_commit_manys_reply_route_with_its_fills_stays_within_a_route_frame(
    store, name_len, meta_len, hostile
):
    """The largest ``commit_many`` a client may send (256 files, their names under its
    header's limit, metadata up to its limit), and one a hostile client may (its header up to
    MAX_HEADER, its content far into the data, so each offset takes 5 bytes): storage's reply
    route, fills and all, and the ``inv`` the broker makes of it for a cache, decode as route
    frames, and the fills reach the cache when the names fit one ``inv``."""
    from fms import limits, worker
    from fms.broker import Core
    from fms.broker.dispatch import Fill
    from fms.client.upload import BATCH_HEADER_BYTES

    link = Link()
    service = StorageService(store, link)
    budget = limits.MAX_HEADER if hostile else BATCH_HEADER_BYTES
    count = min(p.MAX_BATCH_FILES, budget // (name_len + 64))
    names = [f"{i:05d}".ljust(name_len, "n") for i in range(count)]
    meta = {"k": "v" * meta_len} if meta_len else {}
    size = CHUNK if hostile else 1
    contents = [b"%d" % (i % 10) * size for i in range(count)]
    header = commit_many_header(
        1, list(zip(names, contents, strict=True)), [f"c{i}" for i in range(count)], meta=meta
    )
    assert len(p.encode(header)) <= limits.MAX_HEADER  # a request the broker lets through
    data = b"".join(contents)
    service.handle_request({}, header, _frame(data))
    assert all(r["ok"] for r in link.replies[-1]["results"])
    fills = link.many_fills[-1]
    frames = worker.reply_frames({"k": 2**62}, link.replies[-1], invalidate=names, fills=fills)
    route = p.decode(bytes(frames[0]), "route")  # within MAX_HEADER and MAX_CONTAINERS
    if sum(len(n) for n in names) >= limits.FILL_ROUTE_BYTES:
        assert fills is None  # no room for one
        return
    assert fills is not None and any(fills)
    fill = Fill.of_reply(route, names, p.pack_data(data), 2**62)
    assert fill is not None and len(fill.entries) == sum(f is not None for f in fills)

    class Sent:
        def __init__(self):
            self.sent = []

        def to_worker(self, ident, frames):
            self.sent.append(frames)
            return True

        def __getattr__(self, name):
            return lambda *a, **k: True

    core = Core(Sent(), store="s1")
    ready = {"t": "ready", "v": p.PROTOCOL_VERSION, "svc": p.CACHE, "wid": "c1", "store": "s1"}
    core.worker_message(b"c1", [p.encode(ready)])
    core.transport.sent.clear()
    core.dispatcher.invalidate(names, fill)
    invs = [p.decode(f[0], "route") for f in core.transport.sent]  # the cache reads each
    assert [n for inv in invs for n in inv["names"]] == names
    one_inv = sum(len(n) for n in names) <= limits.INV_NAME_BYTES
    assert [bool(inv.get("fills")) for inv in invs] == [one_inv] * len(invs)
