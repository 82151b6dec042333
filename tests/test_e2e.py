"""End to end: broker, cache and storage workers as real processes on random loopback ports."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest
import zmq
from conftest import DIGESTS, ROOT, random_bytes, wait_for
from storage_helpers import digest_of, h

import fms
from fms import wire as p
from fms.client.api import GET_BATCH
from fms.errors import BadRequest, NotFound

MiB = p.MiB


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


# --- the basic promise ---


@DIGESTS
@pytest.mark.parametrize("size", [0, 1, 4096, p.INLINE_MAX + 1, 3 * MiB + 123])
def test_put_then_get_returns_the_same_bytes(shared_cluster, prefix, tmp_path, size):
    cluster = shared_cluster
    data = random_bytes(size, seed=size)
    src = write(tmp_path / "src.bin", data)
    os.utime(src, (1_600_000_000, 1_600_000_000))
    put = cluster.cli("put", src, f"{prefix}dir/file.bin")
    assert put.returncode == 0, put.stderr
    got = cluster.cli(
        "get",
        f"{prefix}dir/file.bin",
        str(tmp_path / "out.bin"),
        *(["--fsync"] if size % 2 else []),
    )  # both ways of writing it
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "out.bin").read_bytes() == data
    assert os.stat(tmp_path / "out.bin").st_mtime == 1_600_000_000  # mtime kept
    assert mode_of(tmp_path / "out.bin") == 0o666 & ~current_umask()  # an ordinary new file


def test_get_defaults_to_base_name_and_to_stdout_with_dash(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    data = random_bytes(2 * MiB + 5)
    cluster.cli("put", write(tmp_path / "a.bin", data), f"{prefix}x/y/z.bin")
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert cluster.cli("get", f"{prefix}x/y/z.bin", cwd=str(workdir)).returncode == 0
    assert (workdir / "z.bin").read_bytes() == data
    out = cluster.cli("get", f"{prefix}x/y/z.bin", "-")
    assert out.returncode == 0 and out.stdout == data


def test_ls_and_stat_as_text_and_json(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    data = random_bytes(5000)
    cluster.cli("put", write(tmp_path / "f", data), f"{prefix}docs/f")
    cluster.cli("put", write(tmp_path / "g", b"g"), f"{prefix}other/g")
    listing = json.loads(cluster.cli("ls", f"{prefix}docs/", "--json").stdout)
    assert [(e["name"], e["size"]) for e in listing] == [(f"{prefix}docs/f", 5000)]
    assert f"{prefix}docs/f" in cluster.cli("ls", "-r").stdout.decode().split()
    assert prefix in cluster.cli("ls").stdout.decode().split()  # one level: the folder
    assert f"{prefix}docs/" in cluster.cli("ls", prefix).stdout.decode().split()
    info = json.loads(cluster.cli("stat", f"{prefix}docs/f", "--json").stdout)
    assert info["name"] == f"{prefix}docs/f" and info["size"] == 5000
    assert info["digest"] == digest_of(data, p.DEFAULT_CHUNK_SIZE).hex()
    assert info["digest_kind"] == "tree" and isinstance(info["mtime"], float)
    assert "digest:" in cluster.cli("stat", f"{prefix}docs/f").stdout.decode()


@DIGESTS
def test_put_r_and_get_r_keep_the_tree(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    tree = {
        "a.txt": b"a" * 10,
        "sub/b.bin": random_bytes(3 * MiB, 1),
        "sub/deeper/c": b"",
        "sub/deeper/d": random_bytes(70_000, 2),
    }
    for rel, data in tree.items():
        write(tmp_path / "src" / rel, data)
    put = cluster.cli("put", "-r", str(tmp_path / "src"), f"{prefix}backup")
    assert put.returncode == 0, put.stderr
    got = cluster.cli("get", "-r", f"{prefix}backup", str(tmp_path / "restore"))
    assert got.returncode == 0, got.stderr
    for rel, data in tree.items():
        assert (tmp_path / "restore" / rel).read_bytes() == data
        assert mode_of(tmp_path / "restore" / rel) == 0o666 & ~current_umask()
    assert not [f for f in (tmp_path / "restore").rglob("*") if f.name.endswith(".fms-part")]


def test_rm_then_get_is_not_found(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    cluster.cli("put", write(tmp_path / "f", b"bye"), f"{prefix}f")
    assert cluster.cli("rm", f"{prefix}f").returncode == 0
    got = cluster.cli("get", f"{prefix}f", str(tmp_path / "out"))
    assert got.returncode != 0 and b"not found" in got.stderr
    again = cluster.cli("rm", f"{prefix}f")
    assert again.returncode != 0 and b"not found" in again.stderr


# --- the flows of DESIGN.md ---


@DIGESTS
def test_get_misses_to_storage_then_hits_in_the_cache_and_put_skips_the_cache(cluster):
    data = random_bytes(3 * MiB, 3)
    with cluster.client() as c:
        before = cluster.served()
        path = cluster.tmp / "big.src"
        path.write_bytes(data)
        c.put(str(path), "big")
        after_put = cluster.served()
        assert after_put["cache-1"] == before["cache-1"]  # PUT never touches the cache
        assert sum(after_put[w] for w in ("storage-a", "storage-b")) > sum(
            before[w] for w in ("storage-a", "storage-b")
        )

        cold = c.cache_stats()
        assert c.get_bytes("big") == data
        warm = c.cache_stats()
        assert warm["misses"] - cold["misses"] == 4  # manifest + 3 chunks
        assert warm["fetches"] - cold["fetches"] == 4  # each filled from storage
        storage_before = {w: n for w, n in cluster.served().items() if w.startswith("storage")}

        assert c.get_bytes("big") == data
        hot = c.cache_stats()
        assert hot["hits"] - warm["hits"] == 4  # all answered by the cache
        assert hot["fetches"] == warm["fetches"]
        storage_after = {w: n for w, n in cluster.served().items() if w.startswith("storage")}
        assert storage_after == storage_before  # storage saw nothing


@DIGESTS
def test_many_files_cost_one_message_and_one_storage_fetch_per_batch(
    cluster, tmp_path, monkeypatch
):
    files = {f"t/{i:03d}": random_bytes(100 + i, i) for i in range(300)}
    files["t/big"] = random_bytes(2 * MiB + 5, 7)  # fetched by its chunks
    with cluster.client() as c:
        sends = count_sends(c, monkeypatch)
        c.put_many([(write(tmp_path / "src" / n, d), n) for n, d in files.items()])
        names = sorted(files)
        batches = -(-len(names) // GET_BATCH)

        def get_all(label: str, fetches: int) -> None:
            before, sent = c.cache_stats(), len(sends)
            c.get_many([(n, str(tmp_path / label / n)) for n in names])
            after = c.cache_stats()
            assert after["fetches"] - before["fetches"] == fetches, label
            assert len(sends) - sent - 1 == batches + 3, label  # - the cache_stats
            assert all((tmp_path / label / n).read_bytes() == d for n, d in files.items())

        # The upload's commits handed the small files to the cache (fills on commit): only the
        # big file is fetched, its manifest (one batch) and its 3 chunks.
        get_all("after put", 1 + 3)
        get_all("warm", 0)
        cluster.proc("cache").stop()  # a cache that starts empty: each batch fetched once
        cluster.wait_workers(storage=2, cache=0)
        cluster.start_cache(directory=str(tmp_path / "empty-cache"))
        cluster.wait_workers(storage=2, cache=1)
        get_all("cold", batches + 3)
        with pytest.raises(fms.NotFound):
            c.get_many([("t/000", str(tmp_path / "x")), ("t/none", str(tmp_path / "y"))])


def count_sends(client, monkeypatch) -> list:
    """Every request ``client`` sends from now on (the test keeps the count: the client does
    not)."""
    sent = []
    send = client.session._send
    monkeypatch.setattr(client.session, "_send", lambda frames: (sent.append(frames), send(frames)))
    return sent


def test_small_file_costs_one_round_trip_each_way(shared_cluster, prefix, monkeypatch):
    with shared_cluster.client() as c:  # the count is of this client's requests
        sent = count_sends(c, monkeypatch)
        c.put_bytes(b"k" * 4096, f"{prefix}small")
        # Once per connection, before it hashes anything: the store's digest function.
        assert [p.decode(frames[0])["op"] for frames in sent] == ["hello", "commit"]
        c.put_bytes(b"j" * 4096, f"{prefix}small2")
        assert len(sent) == 3
        assert c.get_bytes(f"{prefix}small") == b"k" * 4096
        assert len(sent) == 4


def test_two_storage_workers_serve_one_store_and_share_the_load(cluster, tmp_path):
    files = {f"f{i}": random_bytes(2 * MiB, 10 + i) for i in range(4)}
    before = cluster.served()
    with cluster.client() as c:
        for name, data in files.items():
            c.put(write(tmp_path / name, data), name)
        for name, data in files.items():
            assert c.get_bytes(name) == data
    after = cluster.served()
    gained = {w: after[w] - before[w] for w in ("storage-a", "storage-b")}
    assert min(gained.values()) > 0, gained
    # a third worker on the same directory joins and serves the same files
    cluster.start_storage(wid="storage-c")
    cluster.wait_workers(storage=3, cache=1)


def test_a_put_rs_batches_go_to_one_storage_worker_of_an_sqlite_store(cluster, tmp_path):
    """Both storage workers write one SQLite file, one transaction at a time: a tree's
    ``commit_many`` batches all go to one of them (routing.packs), not one to each."""
    from fms.client.upload import BATCH_FILES

    folder = tmp_path / "tree"
    folder.mkdir()
    count = 3 * BATCH_FILES + 5
    items = [(write(folder / f"f{i}", random_bytes(100, i)), f"tree/f{i}") for i in range(count)]
    with cluster.client() as c:
        before = cluster.served()
        c.put_many(items)
        after = cluster.served()
        assert len(c.ls("tree/")) == count
    gained = sorted(after[w] - before[w] for w in ("storage-a", "storage-b"))
    assert gained == [0, 4], gained


def test_sequential_requests_take_turns_across_storage_workers(cluster):
    with cluster.client() as c:
        c.put_bytes(b"x", "x")
        before = cluster.served()
        for _ in range(20):
            c.stat("x")
    after = cluster.served()
    gained = [after[w] - before[w] for w in ("storage-a", "storage-b")]
    assert sum(gained) == 20 and min(gained) >= 8, gained


def test_storage_worker_on_another_store_is_refused_clearly(cluster, tmp_path):
    stray = cluster.start_storage(data=str(tmp_path / "elsewhere"), wid="stray")
    wait_for(lambda: "different store" in stray.log(), 15, "the stray worker to be refused")
    assert "--data" in stray.log()
    assert stray.alive()  # refused, not told to exit: it may be the real one (issue 17)
    assert len(cluster.workers("storage")) == 2
    broker = cluster.procs[0].log()  # started without --store: it says what that allows
    assert "event=store_not_pinned" in broker and "--store" in broker


# --- read-after-write ---


def test_a_store_keeps_the_digest_function_it_was_made_with_and_says_so_clearly(tmp_path):
    def storage(*args):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "storage_worker.py"), "--data", str(data), *args],
            capture_output=True,
            timeout=60,
        )

    data = tmp_path / "storage"
    data.mkdir()
    made = storage("--digest", "sha256", "--print-store-id")
    assert made.returncode == 0, made.stderr
    refused = storage("--digest", "blake3", "--print-store-id")
    assert refused.returncode != 0 and b"Traceback" not in refused.stderr
    assert b"digest function is sha256" in refused.stderr and b"--digest" in refused.stderr
    again = storage("--print-store-id")  # without saying: its own
    assert again.returncode == 0 and again.stdout == made.stdout


@pytest.mark.parametrize(
    "caches, repeat",
    [(1, 100), (2, 100), (3, 100), (2, 10_000)],
    ids=["1-cache-small", "2-caches-small", "3-caches-small", "2-caches-large"],
)
def test_read_after_write_under_concurrent_reads_and_misses(make_cluster, caches, repeat):
    """Once a put returns, no get that starts later may see an older version, with one cache
    worker or several sharing the names (the broker invalidates every one before the ack).

    Storage delays reads so that cache fills are in flight when writes land: a cache that kept
    or filled stale data would hand the old version to a reader that started after the ack.
    A small file's commit hands its content to the cache (a fill on commit); a large one's
    (``repeat`` 10,000: 150 kB, over what travels inline) makes the next read a miss.
    """
    cluster = make_cluster()
    cluster.start_broker()
    for i in range(1, caches + 1):
        cluster.start_cache(wid=f"cache-{i}")
    for wid in ("storage-a", "storage-b"):
        cluster.start_storage(wid=wid, delay=0.02)
    cluster.wait_workers(storage=2, cache=caches)
    writes = 25
    acked = [0]  # the highest version whose put has returned
    stop = threading.Event()
    violations, reads, errors = [], [0], []
    count = threading.Lock()

    def content(v: int) -> bytes:
        return f"version {v:06d} ".encode() * repeat

    def reader():
        with cluster.client() as c:
            while not stop.is_set():
                floor = acked[0]
                try:
                    data = c.get_bytes("hot")
                except NotFound:
                    continue
                except Exception as exc:
                    errors.append(repr(exc))
                    return
                seen = int(data[8:14])
                with count:
                    reads[0] += 1
                if seen < floor:
                    violations.append((floor, seen))

    with cluster.client() as writer:
        writer.put_bytes(content(1), "hot")
        acked[0] = 1
        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for v in range(2, writes + 1):
                writer.put_bytes(content(v), "hot")
                acked[0] = v
                # More completions than readers: at least one read started after this ack.
                done_at_ack = reads[0]
                wait_for(
                    lambda done=done_at_ack: reads[0] >= done + 8 or errors,
                    10,
                    "readers to make progress",
                )
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        stats = writer.status()["cache"]  # per GET, over every cache worker
    assert not errors, errors
    assert not violations, f"stale reads (acked version, version seen): {violations[:10]}"
    assert reads[0] >= 8 * (writes - 1)
    if repeat * 15 > p.INLINE_MAX:
        assert stats["get_misses"] >= writes  # every write forced at least one refill
    else:  # each commit filled the cache: reads after it hit
        assert stats["get_misses"] < writes
    assert stats["get_hits"] > 0  # and the cache really did serve in between


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("caches", [1, 2])
def test_racing_writes_of_a_small_name_leave_the_cache_with_what_storage_holds(
    make_cluster, caches, batched
):
    """Fills on commit, when acks overtake each other: two clients write (or one removes) the
    same small name at once through two storage workers, one of which sends its acks late, so
    a later change's ack often reaches the broker first.  Once both acks are in, a get returns
    what storage holds now (read around the cache), never the content of the older write,
    kept by a fill that came late.  ``batched``: one of them writes it among other files of a
    ``put_many`` (a ``commit_many``'s fills)."""
    cluster = make_cluster()
    side = cluster.tmp / "side"
    side.mkdir()

    def put(client, content: bytes, who: str, r: int) -> None:
        if not batched or who != "a":
            client.put_bytes(content, "x")
            return
        (side / f"x{r}").write_bytes(content)
        (side / f"y{r}").write_bytes(content[::-1])
        client.put_many([(str(side / f"y{r}"), f"y/{r}"), (str(side / f"x{r}"), "x")])

    cluster.start_broker()
    for i in range(1, caches + 1):
        cluster.start_cache(wid=f"cache-{i}")
    cluster.start_storage(wid="storage-a", reply_delay=0.05)  # its acks come late
    cluster.start_storage(wid="storage-b")
    cluster.wait_workers(storage=2, cache=caches)
    errors: list = []

    def write(client, r: int, who: str) -> None:
        try:
            if who == "b" and r % 4 == 3:
                try:
                    client.rm("x")
                except NotFound:
                    pass
            else:
                put(client, f"{who}{r:04d}".encode() * 50, who, r)
        except Exception as exc:
            errors.append(repr(exc))

    with (
        cluster.client() as a,
        cluster.client() as b,
        cluster.client() as reader,
        cluster.client(cache=False) as truth,
    ):
        for r in range(60):
            threads = [
                threading.Thread(target=write, args=(c, r, w)) for c, w in ((a, "a"), (b, "b"))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors, errors
            try:
                held = truth.get_bytes("x")
            except NotFound:
                held = None
            try:
                got = reader.get_bytes("x")
            except NotFound:
                got = None
            assert got == held, f"round {r}"
        # Racing commits keep no fill (each is refused once the other's ack is heard), but a
        # write nobody races fills the cache: the read after it is a hit.
        before = reader.status()["cache"]["get_hits"]
        put(a, b"alone" * 50, "a", 60)
        assert reader.get_bytes("x") == b"alone" * 50
        assert reader.status()["cache"]["get_hits"] == before + 1


# --- errors a user meets ---


def test_missing_name_fails_fast_with_not_found(untouched_cluster, tmp_path):
    # With 10 minutes a try, a retry of "not found" would outlast the harness's limit.
    got = untouched_cluster.cli("--timeout", "600", "get", "no/such/file", str(tmp_path / "x"))
    assert got.returncode == 1
    assert b"not found" in got.stderr
    assert not (tmp_path / "x").exists()


def test_unreachable_broker_fails_clearly_without_waiting_for_the_reply_budget(
    make_cluster, tmp_path
):
    cluster = make_cluster()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster.frontend = f"tcp://127.0.0.1:{port}"
    # The connection's own wait (3 s) decides, not the 10 minutes a try: the harness's 30 s
    # limit on the command would end a wait for a reply.
    got = cluster.cli("--timeout", "600", "ls", timeout=30)
    assert got.returncode == 1
    assert b"cannot reach the fms broker" in got.stderr
    assert b"no connection within 3 s" in got.stderr


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "", "a/../../b", "x" * 1025, "a//b"])
def test_bad_names_are_refused_and_nothing_is_written(untouched_cluster, tmp_path, name):
    cluster = untouched_cluster
    src = write(tmp_path / "f", b"payload")
    got = cluster.cli("put", src, name)
    assert got.returncode == 1
    assert b"name" in got.stderr
    assert json.loads(cluster.cli("ls", "--json").stdout) == []
    assert not (tmp_path.parent / "escape").exists()


def test_storage_refuses_bad_names_even_from_a_client_that_skips_the_check(untouched_cluster):
    with untouched_cluster.client() as c:
        with pytest.raises(BadRequest, match=r"'\.\.'"):
            c.call("stat", name="../../etc/passwd")
        with pytest.raises(BadRequest, match="NUL"):
            c.call("get", name="a\x00b")


@DIGESTS
def test_corrupt_chunk_on_storage_fails_the_download_and_leaves_no_partial_file(cluster, tmp_path):
    data = random_bytes(3 * MiB, 9)
    cluster.cli("put", write(tmp_path / "f", data), "f")
    victim = h(data[MiB : 2 * MiB]).hex()
    path = os.path.join(cluster.storage_dir, "chunks", victim[:2], victim)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    dest = tmp_path / "out" / "f"
    dest.parent.mkdir()
    dest.write_bytes(b"previous content")
    got = cluster.cli("get", "f", str(dest))
    assert got.returncode == 1
    assert b"corrupt" in got.stderr or b"digest" in got.stderr
    assert dest.read_bytes() == b"previous content"  # untouched
    assert os.listdir(dest.parent) == ["f"]  # no temp file left behind


def test_no_storage_worker_is_a_clear_unavailable_error_after_retries(make_cluster):
    cluster = make_cluster()
    cluster.start_broker()
    with cluster.client(timeout=0.5, retries=1) as c:
        with pytest.raises(fms.Unavailable, match="no storage worker"):
            c.ls()


def test_reads_go_to_storage_when_no_cache_is_connected(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=1, cache=0)
    data = random_bytes(2 * MiB + 1)
    assert cluster.cli("put", write(tmp_path / "f", data), "f").returncode == 0
    assert cluster.cli("get", "f", "-").stdout == data


# --- the cache's bound and persistence ---


def test_cache_stays_within_max_bytes_and_keeps_chunks_across_restart(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_broker()
    cache = cluster.start_cache_with(["--max-file", "1M"], max_bytes="3M")
    cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=1, cache=1)
    files = {f"f{i}": random_bytes(MiB, 20 + i) for i in range(6)}
    with cluster.client() as c:
        for name, data in files.items():
            c.put(write(tmp_path / name, data), name)
        for name, data in files.items():
            assert c.get_bytes(name) == data
        stats = c.cache_stats()
    # Each read once: two fit in the main part (99 % of 3 MiB), the others were not admitted
    # in their place (nor written).
    assert stats["entries"] == 2 and stats["bytes"] <= 3 * MiB, stats
    assert stats["admissions_refused"] == 4, stats

    cache.stop()
    cluster.wait_workers(storage=1, cache=0)
    cluster.start_cache_with(["--max-file", "1M"], max_bytes="3M")
    cluster.wait_workers(storage=1, cache=1)
    with cluster.client() as c:
        reloaded = c.cache_stats()
        assert reloaded["entries"] == stats["entries"] and reloaded["bytes"] == stats["bytes"]
        for name, data in files.items():
            assert c.get_bytes(name) == data  # manifests miss, kept chunks hit on disk
        after = c.cache_stats()
    assert after["hits"] == 2 and after["misses"] == 6 + 4, after


# --- hostile input keeps everyone alive ---


def test_junk_at_the_broker_gets_errors_and_service_goes_on(cluster):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(cluster.frontend)
    try:
        junk = [
            [b"\xc1"],
            [p.encode([1, 2])],
            [p.encode({"v": p.PROTOCOL_VERSION, "op": "nope", "id": 1})],
            [b"a", b"b", b"c", b"d"],
            [p.encode({"v": 99, "op": "ls", "id": 2})],
        ]
        for frames in junk:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to {frames!r}"
            header = p.decode(sock.recv_multipart()[0])
            assert header["ok"] is False and header["error"] in ("bad_request", "version")
    finally:
        sock.close()
    worker = ctx.socket(zmq.DEALER)  # a "worker" that speaks nonsense
    worker.linger = 0
    worker.connect(cluster.backend)
    try:
        worker.send_multipart([b"\xff\xfe"])
        worker.send_multipart(
            [
                p.encode(
                    {
                        "t": "ready",
                        "v": p.PROTOCOL_VERSION,
                        "svc": "storage",
                        "store": "not-this-store",
                        "digest_fn": "blake3",
                    }
                )
            ]
        )
        assert worker.poll(5000)
        assert p.decode(worker.recv_multipart()[0])["t"] == "refused"
    finally:
        worker.close()
    with cluster.client() as c:
        c.put_bytes(b"still fine", "ok")
        assert c.get_bytes("ok") == b"still fine"
    assert all(proc.alive() for proc in cluster.procs)
