"""The metadata engine through the cluster, and kill -9 at any instant of a commit or GC."""

import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import DIGESTS, random_bytes
from storage_helpers import h

from fms import wire as p
from fms.storage import gc
from fms.storage.engine import open_local

MiB = p.MiB


def chunk_files_bytes(data_dir) -> int:
    """What ``du -sb chunks/`` counts: the chunk files and the shard folders themselves."""
    total = 0
    for root, dirs, files in os.walk(os.path.join(data_dir, "chunks")):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files + dirs)
    return total


def test_overwrites_rm_and_gc_give_the_space_back(cluster, tmp_path):
    keep = tmp_path / "keep"
    keep.write_bytes(random_bytes(2 * MiB, 1))
    assert cluster.cli("put", str(keep), "keep").returncode == 0
    with cluster.client() as c:
        before = (c.usage()["chunk_bytes"], chunk_files_bytes(cluster.storage_dir))
        for i in range(20):
            c.put_bytes(random_bytes(3 * MiB, 100 + i), "big")
        c.rm("big")
        assert c.usage()["chunk_bytes"] >= before[0] + 60 * MiB
        dry = json.loads(cluster.cli("gc", "--grace", "0", "--dry-run", "--json").stdout)
        assert (dry["chunks"], dry["bytes"], dry["dry_run"]) == (60, 60 * MiB, True)
        out = cluster.cli("gc", "--grace", "0")
        assert out.returncode == 0, out.stderr
        assert b"freed 60 chunks, 60.0 MiB" in out.stdout
        assert (c.usage()["chunk_bytes"], chunk_files_bytes(cluster.storage_dir)) == before
        assert c.get_bytes("keep") == keep.read_bytes()
    assert cluster.cli("fsck").returncode == 0


@DIGESTS
def test_fsck_names_each_damaged_chunk_with_the_files_it_breaks(cluster, tmp_path):
    shared = random_bytes(MiB, 2)
    with cluster.client() as c:
        c.put_bytes(shared + random_bytes(MiB, 3), "a")
        c.put_bytes(shared, "b")
        c.put_bytes(b"small and fine", "c")
        ok = cluster.cli("fsck", "--json")
        assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    first = h(shared)
    path = os.path.join(cluster.storage_dir, "chunks", first.hex()[:2], first.hex())
    with open(path, "r+b") as f:
        f.write(b"\x00\x00\x00")
    out = cluster.cli("fsck")
    assert out.returncode == 1
    assert f"corrupt chunk {first.hex()}: breaks a, b".encode() in out.stdout
    assert b"1 damaged or missing" in out.stdout and b"upload them again" in out.stderr
    again = json.loads(cluster.cli("fsck", "--json").stdout)  # set aside: now missing
    assert again["ok"] is False
    assert [(d["problem"], d["names"]) for d in again["damaged"]] == [("missing", ["a", "b"])]
    with cluster.client() as c:
        c.put_bytes(shared, "b")  # uploading the content again repairs it
    assert cluster.cli("fsck").returncode == 0


def test_ls_prints_a_long_listing_page_by_page_in_name_order(shared_cluster, prefix, tmp_path):
    cluster, many = shared_cluster, f"{prefix}many/"
    names = [f"{many}{i:05d}" for i in range(2345)]
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"x")
    with cluster.client() as c:
        c.put_many([(str(src / "x"), n) for n in names])
        pages = c.iter_ls(many, page=1000)
        assert next(pages)["name"] == names[0]  # a generator: the first page is enough
        assert [e["name"] for e in c.iter_ls(many, page=500)] == names
    out = cluster.cli("ls", many)
    lines = out.stdout.decode().splitlines()
    assert out.returncode == 0 and [line.split()[-1] for line in lines] == names
    listed = json.loads(cluster.cli("ls", many, "--json").stdout)
    assert [e["name"] for e in listed] == names


def test_two_workers_commit_to_one_store_at_once_and_nothing_is_lost(cluster, tmp_path):
    errors, done = [], []

    def writer(k):
        try:
            with cluster.client(timeout=10.0) as c:
                for round_ in range(3):
                    for i in range(40):
                        c.put_bytes(b"%d-%d-%d" % (k, round_, i), f"shared/{i}")
                done.append(k)
        except Exception as exc:  # reported below with the logs
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and sorted(done) == [0, 1, 2, 3]
    with cluster.client() as c:
        assert sum(c.stat(f"shared/{i}")["version"] for i in range(40)) == 4 * 3 * 40
    assert "locked" not in cluster.logs()
    served = cluster.served()
    assert served["storage-a"] > 0 and served["storage-b"] > 0
    assert cluster.cli("fsck").returncode == 0


def test_a_data_directory_in_the_old_layout_is_upgraded_on_start(make_cluster, tmp_path):
    from storage_helpers import write_format1

    files = {f"old/{i}": random_bytes(1000 + i * 5000, i) for i in range(30)}
    data = str(tmp_path / "old-store")
    write_format1(data, files, removed={"old/3"})
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache()
    cluster.start_storage(data=data, wid="storage-a")
    cluster.start_storage(data=data, wid="storage-b")  # both start on it at once
    cluster.wait_workers(storage=2, cache=1)
    with cluster.client() as c:
        assert [e["name"] for e in c.ls("old/")] == sorted(n for n in files if n != "old/3")
        for name, content in files.items():
            if name != "old/3":
                assert c.get_bytes(name) == content
    assert "event=migrate_done" in cluster.logs()
    assert cluster.cli("fsck").returncode == 0


# --- kill -9 at any instant: every name old or new, whole; no referenced chunk missing ---

CHURN = """
import sys
from fms import wire as p
from fms.storage import gc
from fms.storage.engine import open_local
from storage_helpers import new_version, split, use_digest
store = open_local(sys.argv[1])
use_digest(store.digest_fn)
mode = sys.argv[2]
if mode == "gc":
    real = store.chunks.delete
    def slow_delete(digest):
        print("deleting", flush=True)
        real(digest)
        import time; time.sleep(0.02)
    store.chunks.delete = slow_delete
    gc.collect(store, grace=0)
else:
    for i in range(10**6):
        for name in ("x", "y"):
            data = (b"%d-%s" % (i, name.encode())) * 30000
            for chunk in split(data, 70_000):
                store.put_chunk(store.hash(chunk), chunk)
            store.commit(new_version(name, data, commit=f"{name}{i}", chunk_size=70_000))
            print("committed", name, i, flush=True)
"""


def _run_until(data, mode, lines, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
        ),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", CHURN, data, mode], stdout=subprocess.PIPE, text=True, env=env
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.split())
            if len(seen) >= lines:
                break
        proc.kill()
    finally:
        proc.kill()
        proc.wait(10)
    return seen


def _check_whole(store):
    assert store.meta.refcount_errors() == []
    for stat in store.list("", "", 100):
        version = store.version(stat.name)
        digests = list(store.digests(version))
        data = b"".join(p.unpack_data(store.read_chunk(d)) for d in digests)  # each verified
        extents = store.listing(version)[0]
        pages = p.page_ids(extents, p.join_digests(digests), store.hash)
        assert len(data) == version.size and version.digest == p.tree_digest(
            extents, pages, store.hash
        )
    assert gc.fsck_page(store)["damaged"] == []


@pytest.mark.parametrize("after", [3, 17, 40])
def test_kill_during_commits_leaves_every_name_whole(tmp_path, after):
    data = str(tmp_path / "data")
    open_local(data).close()
    seen = _run_until(data, "commit", after, tmp_path)
    store = open_local(data)
    _check_whole(store)
    last = {name: int(i) for _c, name, i in seen}
    for name, i in last.items():  # every acked commit is there (or a later one)
        assert store.version(name).version >= i + 1


def test_kill_during_gc_leaves_no_reference_dangling_and_the_next_gc_finishes(tmp_path):
    data = str(tmp_path / "data")
    store = open_local(data)
    from storage_helpers import put_file

    for i in range(30):
        put_file(store, f"n{i % 3}", random_bytes(140_000, i), commit=f"c{i}", chunk_size=70_000)
    garbage = store.totals().chunks - 6
    store.close()
    _run_until(data, "gc", 10, tmp_path)  # killed after 10 of 54 blobs
    store = open_local(data)
    _check_whole(store)
    assert store.meta.doomed(100)  # left for the next collector
    freed = gc.collect(store, grace=0)
    assert freed["chunks"] + 10 >= garbage and store.meta.doomed(100) == []
    assert store.totals().chunks == 6
    assert len(list(store.chunks.list())) == 6
    _check_whole(store)


def test_small_files_committed_many_to_a_message_are_read_after_write(cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [f"batch/{i:03d}" for i in range(300)]  # two commit_many messages
    with cluster.client() as c:
        for round_ in range(2):
            for i in range(len(names)):
                (src / f"{i}").write_bytes(b"round %d file %d" % (round_, i))
            c.put_many([(str(src / f"{i}"), name) for i, name in enumerate(names)])
            for i in (0, 150, 299):  # cached in round 0...
                assert c.get_bytes(names[i]) == b"round %d file %d" % (round_, i)
        assert c.stat(names[150])["version"] == 2  # ...and never stale in round 1
    served = cluster.served()
    assert served["storage-a"] + served["storage-b"] < 300  # not one request per file
