"""Faults injected into real processes: what must survive them."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import zmq
from conftest import DIGESTS, ROOT, random_bytes, wait_for
from storage_helpers import h

import fms
from fms import wire as p
from fms.storage import reserve

MiB = p.MiB


def test_get_survives_a_storage_worker_killed_mid_transfer(make_cluster, tmp_path):
    """kill -9 of a storage worker in the middle of a cold get of a 40 MiB file: the broker
    hands that worker's outstanding requests to the other one and the get completes."""
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache(max_bytes="256M")
    victim = cluster.start_storage(wid="storage-a", delay=0.05)
    cluster.start_storage(wid="storage-b", delay=0.05)
    cluster.wait_workers(storage=2, cache=1)
    data = random_bytes(40 * MiB, 40)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    result = {}
    with cluster.client() as c:
        c.put(str(src), "big")
        start = c.cache_stats()["fetches"]

        def download():
            try:
                with cluster.client(timeout=5.0) as reader:
                    result["data"] = reader.get_bytes("big")
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=download)
        thread.start()
        wait_for(lambda: c.cache_stats()["fetches"] - start >= 10, 30, "the get to be under way")
        victim.kill()
        thread.join(60)
        assert not thread.is_alive(), "the get hung"
    assert "error" not in result, result.get("error")
    assert result["data"] == data
    assert [w["id"] for w in cluster.workers("storage")] == ["storage-b"]


def digest_of(path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.digest()


# --- 1. heartbeats ---


def test_broker_drops_a_frozen_worker_within_seconds_and_takes_it_back(cluster):
    """SIGSTOP keeps the TCP connection open, so only heartbeats can tell the worker is gone."""
    frozen = next(proc for proc in cluster.procs if proc.name == "storage-a")
    with cluster.client() as c:
        c.put_bytes(b"before", "x")
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            wait_for(  # fails unless it is gone within its liveness and a little more
                lambda: [w["id"] for w in cluster.workers("storage")] == ["storage-b"],
                p.HEARTBEAT_INTERVAL * (p.HEARTBEAT_LIVENESS + 3),
                "the frozen worker's removal",
            )
            for i in range(5):  # service goes on meanwhile
                c.put_bytes(b"during %d" % i, f"d{i}")
                assert c.get_bytes(f"d{i}") == b"during %d" % i
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        cluster.wait_workers(storage=2, cache=1)  # it re-registers by itself
        assert c.get_bytes("x") == b"before"


def test_a_worker_busy_with_long_work_keeps_heartbeating_and_its_request_is_not_redone(
    make_cluster,
):
    """A request that keeps a storage worker busy for longer than the broker's liveness window
    (3 heartbeats): the worker's link heartbeats from its own thread, so the broker never
    declares it dead and never hands the same request to the other worker."""
    cluster = make_cluster()
    broker = cluster.start_broker()
    busy = p.HEARTBEAT_INTERVAL * p.HEARTBEAT_LIVENESS * 1.5  # each request takes this long
    cluster.start_storage(wid="storage-a", delay=busy)
    cluster.start_storage(wid="storage-b", delay=busy)
    cluster.wait_workers(storage=2, cache=0)
    before = cluster.served()
    with cluster.client(timeout=busy * 3, retries=0) as c:
        with pytest.raises(fms.NotFound):
            c.stat("nothing-here")  # one request, busy seconds of work
    assert "event=worker_gone" not in broker.log(), broker.log()
    after = cluster.served()
    assert sum(after.values()) - sum(before.values()) == 1  # the stat, handled once
    assert sorted(after) == ["storage-a", "storage-b"]  # both registered throughout


# --- 3. the cache down, and back ---


def test_reads_go_to_storage_while_the_cache_is_down_and_use_it_again_when_back(cluster):
    data = random_bytes(3 * MiB, 3)
    with cluster.client() as c:
        c.put_bytes(data, "f")
        cache = next(proc for proc in cluster.procs if proc.name == "cache")
        cache.kill()
        for _ in range(3):
            assert c.get_bytes("f") == data  # straight to storage
        cluster.wait_workers(storage=2, cache=0)
        cluster.start_cache()
        cluster.wait_workers(storage=2, cache=1)
        c.put_bytes(data[:100], "g")
        assert c.get_bytes("g") == data[:100]
        assert c.get_bytes("g") == data[:100]
        assert c.cache_stats()["hits"] >= 1  # the new cache is in the read path


# --- 4. the broker restarts ---


def test_workers_and_clients_ride_through_a_broker_restart(cluster, tmp_path):
    big = random_bytes(8 * MiB, 4)
    src = tmp_path / "big"
    src.write_bytes(big)
    broker = cluster.procs[0]
    with cluster.client() as c:
        c.put(str(src), "big")
        results = {}

        def around_the_restart():
            try:
                results["get"] = c.get_bytes("big")
                c.put_bytes(b"after restart", "new")
                results["new"] = c.get_bytes("new")
            except Exception as exc:
                results["error"] = exc

        broker.kill()
        thread = threading.Thread(target=around_the_restart)
        thread.start()
        # The workers notice the silence themselves before the broker comes back.
        workers = [proc for proc in cluster.procs if proc.name != "broker"]
        wait_for(
            lambda: all("event=broker_silent" in w.log() for w in workers),
            10,
            "every worker to notice the broker is gone",
        )
        cluster.start_broker(frontend=cluster.frontend, backend=cluster.backend)
        thread.join(60)
    assert not thread.is_alive(), "the requests around the restart still waiting after 60 s"
    assert "error" not in results, results["error"]  # within the client's tries
    assert results["get"] == big and results["new"] == b"after restart"
    cluster.wait_workers(storage=2, cache=1)  # nobody needed a restart


# --- 5. kill -9 mid-overwrite ---


def test_kill_during_an_overwrite_leaves_the_old_or_the_new_content_whole(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache()
    victim = cluster.start_storage(wid="storage-a", delay=0.02)
    cluster.start_storage(wid="storage-b", delay=0.02)
    cluster.wait_workers(storage=2, cache=1)
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(random_bytes(40 * MiB, 50))
    new.write_bytes(random_bytes(40 * MiB, 51))
    assert cluster.cli("put", str(old), "f").returncode == 0
    chunks = os.path.join(cluster.storage_dir, "chunks")
    count = lambda: sum(len(files) for _, _, files in os.walk(chunks))  # noqa: E731
    before = count()
    upload = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "client.py"),
            "--broker",
            cluster.frontend,
            "put",
            str(new),
            "f",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: count() >= before + 10, 30, "the overwrite to be under way")
        victim.kill()
        upload.wait(60)
    finally:
        if upload.poll() is None:
            upload.kill()
    got = tmp_path / "got"
    assert cluster.cli("get", "f", str(got)).returncode == 0
    assert digest_of(got) in (digest_of(old), digest_of(new))
    if upload.returncode == 0:  # the put was acked: it must be the new one
        assert digest_of(got) == digest_of(new)
    restarted = cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=2, cache=1)
    assert os.listdir(os.path.join(cluster.storage_dir, "tmp")) == [], restarted.log()


# --- 6. no silent drops ---


def test_a_reply_that_cannot_be_delivered_is_logged(make_cluster):
    cluster = make_cluster()
    broker = cluster.start_broker()
    storage = cluster.start_storage(wid="storage-a", delay=0.5, extra=["--log-level", "DEBUG"])
    cluster.wait_workers(storage=1, cache=0)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(cluster.frontend)
    sock.send_multipart([p.encode({"v": p.PROTOCOL_VERSION, "op": "ls", "id": 1})])
    wait_for(lambda: "event=request op=ls" in storage.log(), 5, "storage to get the request")
    sock.close()  # gone before the reply comes back
    wait_for(
        lambda: "event=undeliverable socket=frontend" in broker.log(),
        10,
        "the undeliverable reply to be logged",
    )


@pytest.mark.timeout(60)  # a client that ignored its budget (2 x 1 s) would run into it
def test_every_request_times_out_clearly_when_the_broker_stops_answering(make_cluster):
    cluster = make_cluster()
    broker = cluster.start_broker()
    cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=1, cache=0)
    with cluster.client(timeout=1.0, retries=1) as c:
        c.ls()
        os.kill(broker.pid, signal.SIGSTOP)  # connected, but silent
        try:
            with pytest.raises(fms.Timeout, match="no reply to ls"):
                c.ls()
        finally:
            os.kill(broker.pid, signal.SIGCONT)


# --- 7. hostile input ---


def test_oversize_frames_and_bad_fields_are_refused_and_nobody_dies(cluster):
    ctx = zmq.Context.instance()
    huge = bytes(64 * MiB)
    for endpoint in (cluster.frontend, cluster.backend):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        sock.send_multipart([p.encode({"v": p.PROTOCOL_VERSION, "op": "ls", "id": 1}), huge])
        sock.close()
    bad = [
        {"op": "commit", "name": 5},
        {"op": "commit", "name": "n", "size": -1},
        {
            "op": "commit",
            "name": "n",
            "size": 2**63 - 1,
            "chunk_size": 4096,
            "chunks": [],
            "sha256": b"x" * 32,
            "commit": "c",
        },
        {"op": "put_chunk", "hash": b"h" * 32},
        {"op": "chunk", "hash": "not bytes"},
        {"op": "have", "hashes": [b"short"]},
        {"op": "ls", "limit": 10**9},
        {"op": "get", "name": ["a"]},
    ]
    with cluster.client() as c:
        for fields in bad:
            op = fields.pop("op")
            with pytest.raises((fms.BadRequest, fms.IntegrityError)):
                c.call(op, **fields)
        c.put_bytes(b"alive", "alive")
        assert c.get_bytes("alive") == b"alive"
    assert all(proc.alive() for proc in cluster.procs)


# --- 8. corruption in the cache ---


@DIGESTS
def test_corrupt_cache_entry_is_dropped_and_refetched(cluster):
    data = random_bytes(2 * MiB + 9, 8)
    with cluster.client() as c:
        c.put_bytes(data, "f")
        assert c.get_bytes("f") == data  # fills the cache
        victim = h(data[:MiB]).hex()
        folder = os.path.join(cluster.cache_dir, "chunks", victim[:2])
        # Written behind the reply; named <sha256>.<crc32 recorded at fill>.
        wait_for(
            lambda: os.path.isdir(folder) and any(n.startswith(victim) for n in os.listdir(folder)),
            10,
            "the cache's disk write",
        )
        (name,) = (n for n in os.listdir(folder) if n.startswith(victim))
        with open(os.path.join(folder, name), "r+b") as f:
            f.write(b"\x00" * 16)
        assert c.get_bytes("f") == data  # read from disk (not yet in memory): bad CRC
        assert c.cache_stats()["corrupt"] == 1


# --- 9. disk full ---


@pytest.fixture
def small_disk(tmp_path):
    """Mounts a tmpfs of a given size (``small_disk("12m")``), for running out of space for
    real; the test is skipped where mounting is not allowed."""
    mounts = []

    def mount(size: str):
        folder = tmp_path / f"disk-{len(mounts)}"
        folder.mkdir()
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
        )
        if made.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); "
                f"the disk-full test needs root"
            )
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def tiny_disk(small_disk):
    """A 12 MiB tmpfs."""
    return small_disk("12m")


def fill_up(path):
    """Write ``path`` until its disk has not a block left."""
    with open(path, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(bytes(4096))


def test_disk_full_is_a_clear_error_changes_nothing_and_service_resumes(
    make_cluster, tmp_path, tiny_disk
):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache(directory=str(tiny_disk / "cache"))
    cluster.start_storage(data=str(tiny_disk / "storage"), wid="storage-a")
    cluster.wait_workers(storage=1, cache=1)
    first = tmp_path / "first"
    first.write_bytes(random_bytes(2 * MiB, 90))
    assert cluster.cli("put", str(first), "first").returncode == 0
    filler = tiny_disk / "filler"
    filler.write_bytes(bytes(6 * MiB))
    second = tmp_path / "second"
    second.write_bytes(random_bytes(5 * MiB, 91))
    full = cluster.cli("put", str(second), "second")
    assert full.returncode == 1
    assert b"disk is full" in full.stderr
    assert [e["name"] for e in json.loads(cluster.cli("ls", "--json").stdout)] == ["first"]
    assert os.listdir(tiny_disk / "storage" / "tmp") == []
    rest = tiny_disk / "rest"  # now truly nothing left, for the cache too
    with open(rest, "wb") as f, pytest.raises(OSError):
        while True:
            f.write(bytes(64 * 1024))
            f.flush()
    out = cluster.cli("get", "first", "-")
    assert out.returncode == 0 and out.stdout == first.read_bytes()  # reads still work
    small = tmp_path / "small"  # goes into the metadata database itself
    small.write_bytes(random_bytes(60_000, 92))
    for i in range(50):  # until the database needs a block it cannot get
        put = cluster.cli("put", str(small), f"fill-{i}")
        if put.returncode:
            break
    assert put.returncode == 1 and b"disk is full" in put.stderr, put.stderr
    overwrite = cluster.cli("put", str(small), "first")
    assert overwrite.returncode == 1 and b"disk is full" in overwrite.stderr
    assert cluster.cli("get", "first", "-").stdout == first.read_bytes()  # the old version, whole
    cache = next(proc for proc in cluster.procs if proc.name == "cache")
    assert "event=cache_write_failed" in cache.log()  # the cache could not fill
    filler.unlink()
    rest.unlink()
    assert cluster.cli("put", str(second), "second").returncode == 0
    assert cluster.cli("get", "second", "-").stdout == second.read_bytes()


def test_with_the_disk_full_rm_rm_r_and_gc_still_work_and_give_the_space_back(
    make_cluster, tmp_path, small_disk
):
    """Storage's disk filled to the last block: removing files and collecting still work, since
    that is how space comes back (before, each failed with no_space: SQLite had no room for the
    write-ahead log a delete needs). They run in the room of the data directory's reserve,
    which is allocated again once the space is back."""
    disk = small_disk("64m")
    data = disk / "storage"
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_storage(data=str(data), wid="storage-a")
    cluster.wait_workers(storage=1, cache=0)
    whole = 64 * MiB // 8  # 1/8 of this small filesystem (16 MiB on a large one)
    wait_for(lambda: reserve.held(str(data)) == whole, 10, "the reserve")
    big = tmp_path / "big"
    big.write_bytes(random_bytes(6 * MiB, 93))
    assert cluster.cli("put", str(big), "big").returncode == 0
    with cluster.client() as c:  # one client, not a CLI run each (that took 15 s)
        for i in range(40):  # kept in the database itself
            c.put_bytes(random_bytes(30_000, 100 + i), f"dir/s{i}")
    small = tmp_path / "small"
    small.write_bytes(random_bytes(30_000, 99))
    fill_up(disk / "rest")  # now nothing is left
    full = cluster.cli("put", str(small), "one-more")
    assert full.returncode == 1 and b"disk is full" in full.stderr, full.stderr
    removed = cluster.cli("rm", "big")
    assert removed.returncode == 0, removed.stderr
    removed = cluster.cli("rm", "-r", "dir/")
    assert removed.returncode == 0, removed.stderr
    collected = cluster.cli("gc", "--grace", "0", "--json")
    assert collected.returncode == 0, collected.stderr
    assert json.loads(collected.stdout)["bytes"] >= 6 * MiB + 40 * 30_000
    assert json.loads(cluster.cli("ls", "-r", "--json").stdout) == []
    assert reserve.held(str(data)) == whole  # back for the next time
    room = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    assert room >= 3 * MiB  # and the space beside it (SQLite keeps its log's file for reuse)
    again = tmp_path / "again"
    again.write_bytes(random_bytes(3 * MiB, 94))
    assert cluster.cli("put", str(again), "again").returncode == 0
    assert cluster.cli("get", "again", "-").stdout == again.read_bytes()


def test_missing_or_unusable_data_directory_is_a_clear_error_at_start(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_broker()
    (tmp_path / "a-file").write_bytes(b"")
    for data, words in (
        (tmp_path / "no" / "such" / "dir", "parent folder does not exist"),
        (tmp_path / "a-file" / "data", "cannot use data directory"),
    ):
        proc = cluster.start_storage(data=str(data), wid="bad")
        wait_for(lambda proc=proc: not proc.alive(), 10, "the worker to refuse to start")
        assert proc.popen.returncode == 1 and words in proc.log()


# --- 10. a stalled client ---


def test_a_client_that_stops_reading_does_not_stall_the_others(cluster):
    data = random_bytes(MiB, 10)
    with cluster.client(timeout=2.0, retries=0) as c:  # any stall of 2 s fails the test
        c.put_bytes(data, "one")
        manifest_chunk = h(data)
        stalled = zmq.Context.instance().socket(zmq.DEALER)
        stalled.linger = 0
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.connect(cluster.frontend)
        try:
            for i in range(400):  # never reads a reply
                stalled.send_multipart(
                    [
                        p.encode(
                            {
                                "v": p.PROTOCOL_VERSION,
                                "op": "chunk",
                                "id": i,
                                "hash": manifest_chunk,
                            }
                        )
                    ]
                )
            for _ in range(20):
                assert c.get_bytes("one") == data
            assert c.stat("one")["size"] == MiB
            broker = c.status()["broker"]
        finally:
            stalled.close()
    # The stalled client was told to back off once its unread replies filled its budget.
    assert broker["backed_off"] > 0
    held = broker["held_bytes"]
    assert held["replies"] + held["replies_reserved"] <= broker["budgets"]["client_bytes"]
    assert all(proc.alive() for proc in cluster.procs)
