"""The command line as users of cp, mc, rclone and aws s3 expect it (issue 14): destinations
that are not regular files, errors that are one line with exit status 1, and the commands."""

import datetime
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, random_bytes
from storage_helpers import digest_of

from fms import wire as p
from fms.errors import NotFound


def one_line_error(got) -> str:
    """The stderr of a command that must fail cleanly: exit 1, one line, no traceback."""
    err = got.stderr.decode()
    assert got.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def stored(shared_cluster, prefix):
    """A small file (``small``, one message) and a 3-chunk file (``big``) in the store, under
    ``prefix``."""
    data = {"small": b"hello\n", "big": random_bytes(2 * 1024 * 1024 + 5, seed=3)}
    with shared_cluster.client() as c:
        for name, content in data.items():
            c.put_bytes(content, prefix + name)
    return data


# --- point 4: safety ---


@pytest.mark.parametrize("name", ["small", "big"])
def test_get_into_a_fifo_writes_into_it(shared_cluster, prefix, stored, tmp_path, name):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got_bytes = []
    reader = threading.Thread(target=lambda: got_bytes.append(fifo.read_bytes()))
    reader.start()
    got = shared_cluster.cli("get", prefix + name, str(fifo))
    reader.join(30)
    assert got.returncode == 0, got.stderr
    assert got_bytes == [stored[name]]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_get_into_dev_null_keeps_the_device(shared_cluster, prefix, stored):
    got = shared_cluster.cli("get", f"{prefix}big", "/dev/null")
    assert got.returncode == 0, got.stderr
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_get_into_dev_full_is_a_one_line_error_and_keeps_the_device(shared_cluster, prefix, stored):
    for name in ("small", "big"):
        err = one_line_error(shared_cluster.cli("get", prefix + name, "/dev/full"))
        assert "/dev/full" in err and "No space left" in err
        assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_get_through_a_symlink_writes_its_target_and_keeps_the_link(
    shared_cluster, prefix, stored, tmp_path
):
    target = tmp_path / "target.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    for name in ("small", "big"):
        got = shared_cluster.cli("get", prefix + name, str(link))
        assert got.returncode == 0, got.stderr
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert target.read_bytes() == stored[name]


@pytest.mark.parametrize("dest", ["missing/", "missing/out.bin"])
def test_get_into_a_missing_folder_is_a_one_line_error(
    shared_cluster, prefix, stored, tmp_path, dest
):
    err = one_line_error(shared_cluster.cli("get", f"{prefix}small", f"{tmp_path}/{dest}"))
    assert "mkdir -p" in err
    assert not (tmp_path / "missing").exists()


def test_get_r_with_a_name_that_is_also_a_folder_writes_nothing(shared_cluster, prefix, tmp_path):
    with shared_cluster.client() as c:
        for name in ("t/a.txt", "t/clash", "t/clash/inner.txt", "t/z.txt"):
            c.put_bytes(b"x", prefix + name)
    err = one_line_error(shared_cluster.cli("get", "-r", f"{prefix}t", str(tmp_path / "out")))
    assert f"'{prefix}t/clash'" in err and f"'{prefix}t/clash/inner.txt'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_get_r_onto_a_local_file_where_a_folder_goes_writes_nothing(
    shared_cluster, prefix, tmp_path
):
    with shared_cluster.client() as c:
        for name in ("t/a.txt", "t/sub/b.txt"):
            c.put_bytes(b"x", prefix + name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_bytes(b"mine")
    err = one_line_error(shared_cluster.cli("get", "-r", f"{prefix}t", str(out)))
    assert "sub" in err
    assert sorted(os.listdir(out)) == ["sub"] and (out / "sub").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--frontend", "47755"],
        ["up", "--backend", "tcp://127.0.0.1"],
        ["broker", "--frontend", "127.0.0.1:5555"],
        ["storage", "--broker", "5556"],
    ],
)
def test_a_bad_endpoint_is_a_one_line_error_before_anything_starts(tmp_path, argv):
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "fms",
            *argv,
            *(["--data", str(tmp_path / "d")] if argv[0] in ("up", "storage") else []),
        ],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    err = one_line_error(got)
    assert "is not an endpoint" in err and "tcp://127.0.0.1:5555" in err


# --- point 2: commands ---


def cli_json(cluster, *args):
    got = cluster.cli(*args, "--json")
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)


def test_mv_is_atomic_metadata_only_and_no_cache_serves_either_old_name(cluster):
    with cluster.client() as c:
        c.put_bytes(b"old destination", "dst")
        c.put_bytes(b"moving content", "src")
        assert c.get_bytes("dst") == b"old destination"  # both now in the cache
        assert c.get_bytes("src") == b"moving content"
        before = c.usage()
    stat = cli_json(cluster, "mv", "src", "dst")
    assert stat["name"] == "dst" and stat["version"] == 2
    with cluster.client() as c:
        assert c.get_bytes("dst") == b"moving content"
        with pytest.raises(NotFound):
            c.get_bytes("src")
        assert c.usage()["chunk_bytes"] == before["chunk_bytes"]  # no chunk written
    assert cluster.cli("mv", "dst", "folder/").returncode == 0  # into a folder
    assert [e["name"] for e in cli_json(cluster, "ls", "-r")] == ["folder/dst"]


def test_cp_shares_the_chunks_moves_no_data_and_replaces_a_cached_destination(cluster, tmp_path):
    big = random_bytes(8 * 1024 * 1024 + 3, seed=5)
    with cluster.client() as c:
        c.put_bytes(big, "big")
        c.put_bytes(b"stale", "copy")
        assert c.get_bytes("copy") == b"stale"  # cached
        before = c.usage()
    stat = cli_json(cluster, "cp", "big", "copy")
    assert stat["size"] == len(big) and stat["digest"] == digest_of(big, p.DEFAULT_CHUNK_SIZE).hex()
    with cluster.client() as c:
        after = c.usage()
        assert c.get_bytes("copy") == big and c.get_bytes("big") == big
    assert after["files"] == before["files"] and after["bytes"] == 2 * len(big)
    assert after["chunk_bytes"] == before["chunk_bytes"]  # 8 MiB copied, 0 bytes stored
    got = cluster.cli("fsck", "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["refcount_errors"] == 0


def storage_served(cluster) -> int:
    return sum(w["served"] for w in cluster.workers("storage"))


def test_rm_r_costs_one_request_per_page_and_no_cache_serves_a_removed_name(cluster):
    with cluster.client() as c:
        c.put_many([(__file__, f"tree/{i:05d}") for i in range(2500)])
        c.put_bytes(b"keep", "tree2/k")
        assert c.get_bytes("tree/00007") == open(__file__, "rb").read()  # cached
        served = storage_served(cluster)
        pages = list(c.rm_prefix("tree/"))
        assert storage_served(cluster) - served == len(pages) == 3
        # 2,500 invalidations reached the cache in a few messages, not one each (which would
        # overflow its pipe and have the broker drop it).
        assert [w["id"] for w in cluster.workers("cache")] == ["cache-1"]
        assert sum(map(len, pages)) == 2500
        with pytest.raises(NotFound):
            c.get_bytes("tree/00007")
        assert [e["name"] for e in c.ls()] == ["tree2/k"]
    assert cli_json(cluster, "rm", "-r", "tree2") == {"prefix": "tree2/", "removed": 1}
    err = one_line_error(cluster.cli("rm", "-r", "tree2"))
    assert "no files under 'tree2/'" in err


def test_du_counts_files_and_bytes_under_a_prefix(cluster):
    with cluster.client() as c:
        for name, size in (("a/1", 10), ("a/b/2", 20), ("ab", 40)):
            c.put_bytes(b"z" * size, name)
    assert cli_json(cluster, "du", "a/") == {"prefix": "a/", "files": 2, "bytes": 30}
    assert cli_json(cluster, "du") == {"prefix": "", "files": 3, "bytes": 70}
    assert b"2 files" in cluster.cli("du", "a/").stdout


def test_find_matches_the_last_part_and_the_mtime(cluster):
    now = time.time()
    with cluster.client() as c:
        c.put_bytes(b"1", "p/new.jpg", mtime=now)
        c.put_bytes(b"2", "p/old.jpg", mtime=now - 10 * 86400)
        c.put_bytes(b"3", "p/x.txt", mtime=now)
        c.put_bytes(b"4", "q/y.jpg", mtime=now)
    assert cluster.cli("find", "p/", "--name", "*.jpg").stdout.decode().split() == [
        "p/new.jpg",
        "p/old.jpg",
    ]
    found = cli_json(cluster, "find", "", "--name", "*.jpg", "--newer", "2d")
    assert [e["name"] for e in found] == ["p/new.jpg", "q/y.jpg"]
    day = datetime.date.fromtimestamp(now - 5 * 86400).isoformat()
    assert [e["name"] for e in cli_json(cluster, "find", "p/", "--newer", day)] == [
        "p/new.jpg",
        "p/x.txt",
    ]
    got = cluster.cli("find", "p/", "--newer", "yesterday")
    assert got.returncode == 2 and b"neither a date" in got.stderr


def test_ls_shows_one_level_with_folders_collapsed_and_long_human_sizes(cluster):
    with cluster.client() as c:
        for name in ("top.txt", "d/a", "d/sub/b", "d/sub/deeper/c", "d/z"):
            c.put_bytes(b"x" * 1536, name)
    assert cli_json(cluster, "ls") == [
        {"name": "d/", "folder": True},
        {**cli_json(cluster, "stat", "top.txt")},
    ]
    lines = cluster.cli("ls", "d/", "-l", "-h").stdout.decode().splitlines()
    assert [line.split()[-1] for line in lines] == ["d/a", "d/sub/", "d/z"]
    assert "1.5 KiB" in lines[0] and "v1" in lines[0] and "PRE" in lines[1]
    assert [e["name"] for e in cli_json(cluster, "ls", "-r", "d/")] == [
        "d/a",
        "d/sub/b",
        "d/sub/deeper/c",
        "d/z",
    ]


def test_put_several_files_or_one_into_a_folder_as_cp_does(cluster, tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(name.encode())
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    assert cluster.cli("put", a, "notes/").returncode == 0
    assert cluster.cli("put", a, b, "more").returncode == 0  # several: a folder
    stored = cli_json(cluster, "put", a, "renamed.txt")
    assert [e["name"] for e in stored] == ["renamed.txt"]
    assert [e["name"] for e in cli_json(cluster, "ls", "-r")] == [
        "more/a.txt",
        "more/b.txt",
        "notes/a.txt",
        "renamed.txt",
    ]
    err = one_line_error(cluster.cli("put", a, str(tmp_path / "nope"), "x/"))
    assert "no such file" in err
    assert len(cli_json(cluster, "ls", "-r")) == 4  # nothing of it stored


def test_sync_up_and_down_sends_only_what_differs_and_mirrors_with_delete(
    shared_cluster, prefix, tmp_path
):
    cluster = shared_cluster
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"a" * 100)
    (src / "sub" / "b.jpg").write_bytes(random_bytes(3 * 1024 * 1024, seed=9))
    first = cli_json(cluster, "sync", str(src), f"fms:{prefix}photos/")
    assert len(first["send"]) == 2 and first["unchanged"] == 0
    again = cli_json(cluster, "sync", str(src), f"fms:{prefix}photos")
    assert again["send"] == [] and again["unchanged"] == 2
    (src / "a.jpg").write_bytes(b"b" * 100)  # same size, other content
    with cluster.client() as c:
        c.put_bytes(b"only remote", f"{prefix}photos/extra")
    planned = cli_json(cluster, "sync", str(src), f"fms:{prefix}photos/", "--delete", "--dry-run")
    assert [s["to"] for s in planned["send"]] == [f"{prefix}photos/a.jpg"]
    assert planned["delete"] == [f"{prefix}photos/extra"]
    with cluster.client() as c:
        assert c.get_bytes(f"{prefix}photos/a.jpg") == b"a" * 100  # a dry run changed nothing
        assert c.stat(f"{prefix}photos/extra")
    assert cluster.cli("sync", str(src), f"fms:{prefix}photos/", "--delete").returncode == 0
    with cluster.client() as c:
        assert [e["name"] for e in c.ls(f"{prefix}photos/")] == [
            f"{prefix}photos/a.jpg",
            f"{prefix}photos/sub/b.jpg",
        ]
        assert c.get_bytes(f"{prefix}photos/a.jpg") == b"b" * 100
    restore = tmp_path / "restore"
    down = cli_json(cluster, "sync", f"fms:{prefix}photos/", str(restore))
    assert len(down["send"]) == 2
    assert (restore / "sub" / "b.jpg").read_bytes() == (src / "sub" / "b.jpg").read_bytes()
    (restore / "stray").write_bytes(b"s")
    mtime = os.stat(restore / "a.jpg").st_mtime_ns
    down = cli_json(cluster, "sync", f"fms:{prefix}photos/", str(restore), "--delete")
    assert down["send"] == [] and down["unchanged"] == 2
    assert not (restore / "stray").exists()
    assert os.stat(restore / "a.jpg").st_mtime_ns == mtime  # not written again
    err = one_line_error(cluster.cli("sync", str(src), str(restore)))
    assert "fms:PREFIX" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["mv", "missing", "x"],
        ["cp", "missing", "x"],
        ["rm", "missing"],
        ["get", "-r", "missing", "out"],
    ],
)
def test_a_failed_command_exits_1_with_one_line_also_with_json(untouched_cluster, argv):
    for extra in ([], ["--json"]):
        err = one_line_error(untouched_cluster.cli(*argv, *extra))
        assert "not found" in err


# --- point 3: versions ---


@pytest.fixture
def versioned(make_cluster):
    """A cluster whose storage keeps 2 replaced versions per name."""
    c = make_cluster()
    c.start_broker()
    c.start_cache()
    c.start_storage(wid="storage-a", extra=["--keep-versions", "2"])
    c.wait_workers(storage=1, cache=1)
    return c


def test_versions_get_version_and_restore_also_after_rm_and_gc(versioned, tmp_path):
    contents = [random_bytes(2 * 1024 * 1024 + i, seed=i) for i in range(4)]
    with versioned.client() as c:
        for content in contents:
            c.put_bytes(content, "doc")
        assert c.get_bytes("doc") == contents[3]  # cached
    listed = cli_json(versioned, "versions", "doc")
    assert [(v["version"], v["current"]) for v in listed] == [(4, True), (3, False), (2, False)]
    assert listed[1]["digest"] == digest_of(contents[2], p.DEFAULT_CHUNK_SIZE).hex()
    assert versioned.cli("versions", "doc").stdout.decode().split()[5::6] == [
        "current",
        "retained",
        "retained",
    ]
    assert versioned.cli("gc", "--grace", "0").returncode == 0  # frees version 1 only
    out = tmp_path / "v2"
    assert versioned.cli("get", "doc", str(out), "--version", "2").returncode == 0
    assert out.read_bytes() == contents[1]
    err = one_line_error(versioned.cli("get", "doc", str(tmp_path / "v1"), "--version", "1"))
    assert "no version 1" in err
    assert versioned.cli("rm", "doc").returncode == 0
    stat = cli_json(versioned, "restore", "doc")  # the newest retained: v4
    assert stat["version"] == 6
    with versioned.client() as c:
        assert c.get_bytes("doc") == contents[3]
    assert cli_json(versioned, "restore", "doc", "--version", "3")["version"] == 7
    with versioned.client() as c:
        assert c.get_bytes("doc") == contents[2]  # not the cached v4
    got = versioned.cli("fsck", "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["refcount_errors"] == 0


def test_without_keep_versions_nothing_is_retained(shared_cluster, prefix):
    with shared_cluster.client() as c:
        c.put_bytes(b"1", f"{prefix}x")
        c.put_bytes(b"2", f"{prefix}x")
    assert [v["version"] for v in cli_json(shared_cluster, "versions", f"{prefix}x")] == [2]
    err = one_line_error(shared_cluster.cli("restore", f"{prefix}x"))
    assert "--keep-versions" in err


# --- point 5: patience ---


def test_stats_with_no_workers_answers_at_once_with_what_the_broker_knows(make_cluster):
    cluster = make_cluster()
    cluster.start_broker()
    # A patient client (10 minutes a try): waiting for a worker would outlast the harness's
    # 60 s limit on the command, so an answer at all is an answer at once.
    got = cluster.cli("--timeout", "600", "stats")
    assert got.returncode == 0, got.stderr
    out = got.stdout.decode()
    assert "broker  frontend=" in out and "worker  none connected" in out
    assert "store   no storage worker connected" in out


def test_fms_up_starts_a_dead_worker_again_and_says_so(tmp_path):
    import signal

    from conftest import wait_for
    from test_up import alive, children_of, free_port

    import fms

    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fms",
                "up",
                "--frontend",
                frontend,
                "--backend",
                backend,
                "--data",
                str(tmp_path / "data"),
                "--cache-bytes",
                "64M",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    kids = []

    def storage_workers():
        try:
            with fms.Client(frontend, timeout=2.0) as c:
                return sorted(w["id"] for w in c.status()["workers"] if w["service"] == "storage")
        except fms.FmsError:
            return []

    try:
        wait_for(lambda: storage_workers() == ["storage-1", "storage-2"], 30, "fms up to start")
        kids = children_of(up.pid)
        victim = next(
            pid for pid in kids if b"storage-1" in open(f"/proc/{pid}/cmdline", "rb").read()
        )
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: b"starting storage-1 again (restart 1)" in log_path.read_bytes(),
            30,
            "fms up to start storage-1 again",
        )
        assert b"storage-1 exited with code -9; starting it again in 1 s" in log_path.read_bytes()
        wait_for(
            lambda: storage_workers() == ["storage-1", "storage-2"],
            30,
            "storage-1 to register again",
        )
        assert up.poll() is None  # the cluster never stopped
        with fms.Client(frontend) as c:
            c.put_bytes(b"still here", "after")
            assert c.get_bytes("after") == b"still here"
        up.send_signal(signal.SIGINT)
        assert up.wait(15) == 0
    finally:
        for pid in [up.pid, *kids, *children_of(up.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        up.wait(5)


# --- point 6: resumable upload ---


def test_an_interrupted_put_run_again_sends_only_what_the_store_lacks(make_cluster, tmp_path):
    from conftest import wait_for

    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_storage(wid="slow", delay=0.1)  # 0.1 s per request: time to kill
    cluster.wait_workers(storage=1, cache=0)
    data = random_bytes(24 * 1024 * 1024, seed=21)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    first = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "client.py"),
            "--broker",
            cluster.frontend,
            "--timeout",
            "30",
            "put",
            str(path),
            "big",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with cluster.client(timeout=30.0) as c:
            wait_for(
                lambda: c.usage()["chunk_bytes"] >= 8 * 1024 * 1024,
                60,
                "a third of the file to reach storage",
            )
    finally:
        first.kill()
        first.wait()
    with cluster.client(timeout=30.0) as c:
        held = c.usage()["chunk_bytes"]
        assert held < len(data)  # killed midway
        with pytest.raises(NotFound):
            c.stat("big")  # nothing committed
    sent = []
    client = cluster.client(timeout=30.0)
    pipeline = client.session.pipeline

    def counting(requests, window=None):  # what the retry puts on the wire
        def tap():
            for tag, op, fields, frame in requests:
                if op == "put_chunk":
                    sent.append(len(frame) - 5)  # the chunk, without its bin32 prefix
                yield tag, op, fields, frame

        return pipeline(tap(), window)

    client.session.pipeline = counting
    client.put(str(path), "big")
    print(f"resume: file {len(data)}, held before the retry {held}, retry sent {sum(sent)}")
    assert 0 < sum(sent) <= len(data) - held  # only what storage lacked
    assert client.get_bytes("big") == data


# --- point 5: progress ---


def test_recursive_transfers_draw_files_and_bytes_and_hashing_is_on_the_bar(
    shared_cluster, prefix, tmp_path
):
    from terminal import run_on_a_terminal

    broker = ["--broker", shared_cluster.frontend]
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(300):
        (tree / f"f{i:03d}").write_bytes(b"x" * 1000)
    (tree / "big").write_bytes(random_bytes(3 * 1024 * 1024, seed=31))
    drawn = run_on_a_terminal([*broker, "put", "-r", str(tree), f"{prefix}t"], tmp_path)
    assert "files 301/301" in drawn and "put: 100%" in drawn
    drawn = run_on_a_terminal(
        [*broker, "get", "-r", f"{prefix}t", str(tmp_path / "back")], tmp_path
    )
    assert "files 301/301" in drawn and "get: 100%" in drawn
    single = tmp_path / "single.bin"
    single.write_bytes(random_bytes(6 * 1024 * 1024, seed=32))
    drawn = run_on_a_terminal([*broker, "put", str(single), f"{prefix}s"], tmp_path)
    assert f"{prefix}s (hashing): 100%" in drawn  # the hashing before the upload...
    assert f"\r{prefix}s: 100%" in drawn  # ... then the upload, on the same line
