"""The command line never surprises (issue 26): no data lost by a typo in sync --delete or by a
clash found half way, no traceback for a user's mistake, output that says what happened."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, Cluster, random_bytes
from storage_helpers import digest_of
from terminal import run_on_a_pty
from test_cli_habits import one_line_error
from test_up import free_port


def tree_of(folder) -> dict:
    return {
        os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
        for root, _dirs, files in os.walk(folder)
        for f in files
    }


@pytest.fixture
def victim(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    for i in range(5):
        (folder / f"photo{i}.jpg").write_bytes(b"mine %d" % i)
    return folder


# --- sync --delete ---


def test_sync_delete_from_a_source_that_holds_nothing_is_refused(shared_cluster, prefix, victim):
    cluster = shared_cluster
    with cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}album/p1.jpg")
    before = tree_of(victim)
    typo = f"fms:{prefix}albun/"  # album/, mistyped
    err = one_line_error(cluster.cli("sync", typo, str(victim), "--delete"))
    assert f"{typo} holds nothing" in err and "--force" in err and "5 files" in err
    assert tree_of(victim) == before
    empty = victim.parent / "empty"
    empty.mkdir()
    with cluster.client() as c:  # the other way: an empty local folder against the store
        err = one_line_error(cluster.cli("sync", str(empty), f"fms:{prefix}album/", "--delete"))
        assert "holds nothing" in err
        assert [e["name"] for e in c.ls(f"{prefix}album/")] == [f"{prefix}album/p1.jpg"]
    got = cluster.cli("sync", typo, str(victim), "--delete", "--force")
    assert got.returncode == 0, got.stderr
    assert tree_of(victim) == {}


def test_sync_delete_asks_on_a_terminal_before_removing_more_than_a_few(
    shared_cluster, prefix, victim
):
    for i in range(5, 12):
        (victim / f"photo{i}.jpg").write_bytes(b"more")
    with shared_cluster.client() as c:
        c.put_bytes(b"kept", f"{prefix}album/photo0.jpg")
    before = tree_of(victim)
    argv = ["--broker", shared_cluster.frontend]
    argv += ["sync", f"fms:{prefix}album/", str(victim), "--delete"]
    code, drawn = run_on_a_pty(argv, "n\n", victim.parent)
    assert code == 1 and "delete 11 files from" in drawn and "[y/N]" in drawn, drawn
    assert tree_of(victim) == before  # nothing, not even the file to send
    code, drawn = run_on_a_pty(argv, "y\n", victim.parent)
    assert code == 0, drawn
    assert tree_of(victim) == {"photo0.jpg": b"kept"}


def test_every_download_checks_for_clashes_before_it_writes_anything(
    shared_cluster, prefix, tmp_path
):
    cluster = shared_cluster
    with cluster.client() as c:
        for name in ["album", "album/p1.jpg", *(f"b/{i:02d}" for i in range(25))]:
            c.put_bytes(b"x", prefix + name)
    out = tmp_path / "out" / "all"
    got = cluster.cli("sync", f"fms:{prefix}", str(out))
    err = one_line_error(got)
    album, photo = f"'{prefix}album'", f"'{prefix}album/p1.jpg'"
    assert album in err and photo in err and "nothing was changed" in err
    assert got.stdout == b""  # no `send` line for what was never sent
    assert not out.exists()
    err = one_line_error(cluster.cli("get", "-r", prefix, str(out)))
    assert album in err and not out.exists()


def test_a_stored_name_too_long_for_a_local_file_is_a_clear_error(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    long = "n" * 300  # a valid name (up to 1024 bytes), not a valid local file name (255)
    with cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}t/{long}")
        c.put_bytes(b"y", f"{prefix}t/short")
    err = one_line_error(cluster.cli("get", f"{prefix}t/{long}", cwd=str(tmp_path)))
    assert "File name too long" in err
    err = one_line_error(cluster.cli("get", "-r", f"{prefix}t", str(tmp_path / "out")))
    assert "300 bytes" in err and "get NAME DEST" in err
    assert not (tmp_path / "out").exists()
    assert cluster.cli("get", f"{prefix}t/{long}", str(tmp_path / "ok")).returncode == 0
    assert (tmp_path / "ok").read_bytes() == b"x"


def test_a_destination_name_of_255_bytes_is_written(shared_cluster, prefix, tmp_path):
    name = "é" * 127  # 254 bytes: its temp file's name must fit too
    with shared_cluster.client() as c:
        c.put_bytes(b"z" * 2_000_000, prefix + name)  # chunked: written through a temp file
    got = shared_cluster.cli("get", prefix + name, cwd=str(tmp_path))  # to its base name
    assert got.returncode == 0, got.stderr
    assert (tmp_path / name).stat().st_size == 2_000_000


# --- no traceback for a user's mistake ---


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """One cluster for the mistakes below (27 of them: a fresh one each cost about 1 s to start
    and stop): a mistake changes nothing stored, and each test puts what it reads itself."""
    shared = Cluster(tmp_path_factory.mktemp("mistakes"))
    try:
        shared.start_all(storage=2)
        yield shared
    finally:
        shared.stop()


def fifo_with(path, data: bytes):
    """A FIFO at ``path`` that a thread fills with ``data``, as ``<(...)`` does."""
    os.mkfifo(path)

    def feed():
        with open(path, "wb") as f:
            f.write(data)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "argv,says",
    [
        (["put", "{tmp}/nothere", "x"], "no such file: {tmp}/nothere"),
        (["put", "{tmp}/dangling", "x"], "broken symbolic link"),
        (["put", "{tmp}/dir", "x"], "is a folder; upload it with: put -r"),
        (["put", "{tmp}/sock", "x"], "is a socket"),
        (["put", "/proc/self/mem", "x"], "cannot read /proc/self/mem: Input/output error"),
        (["put", "-"], "put - needs the NAME"),
        (["put", "-r", "{tmp}/dir", "x", "--include", "*.nothing"], "filters let through"),
        (["put", "{tmp}/file", "x", "--exclude", "*.jpg"], "put -r"),
        (["get", "f", "{tmp}/nothere/f"], "mkdir -p"),
        (["get", "f", "/proc/version"], "cannot write to /proc"),
        (["get", "f", "/dev/full"], "No space left"),
        (["get", "-r", "t", "{tmp}/file"], "is a file"),
        (["get", "-r", "t", "-"], "destination folder"),
        (["sync", "fms:t/", "{tmp}/file"], "is not a folder"),
        (["sync", "{tmp}/nothere", "fms:t/"], "is not a folder"),
        (["cat", "t"], "is a folder"),
        (["keygen", "/proc/nothere", "k"], "/proc/nothere"),
        (["ls", "nothere/"], "nothing is stored under 'nothere/'"),
        (["stat", "t"], "is a folder"),
        (["get", "t"], "get -r t DESTDIR"),
        (["get", "t/", "{tmp}/x"], "get -r t DESTDIR"),
        (["rm", "t"], "rm -r t/"),
    ],
)
def test_no_user_mistake_prints_a_traceback(mistakes, tmp_path, argv, says):
    with mistakes.client() as c:
        c.put_bytes(b"f", "f")
        c.put_bytes(b"in t", "t/a")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.jpg").write_bytes(b"a")
    (tmp_path / "file").write_bytes(b"file")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        argv = [a.format(tmp=tmp_path) for a in argv]
        err = one_line_error(mistakes.cli(*argv, cwd=str(tmp_path)))
    finally:
        sock.close()
    assert says.format(tmp=tmp_path) in err


def test_put_reads_stdin_a_pipe_and_a_device_to_their_end(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    data = random_bytes(3 * 1024 * 1024 + 17, seed=26)  # several chunks, the last one short
    got = cluster.cli("put", "-", f"{prefix}from-stdin", stdin=data)
    assert got.returncode == 0, got.stderr
    fifo_with(tmp_path / "pipe", data[:5000])
    assert cluster.cli("put", str(tmp_path / "pipe"), f"{prefix}from-pipe").returncode == 0
    assert cluster.cli("put", "/dev/null", f"{prefix}empty").returncode == 0
    assert cluster.cli("put", "-", f"{prefix}small", stdin=b"tiny").returncode == 0
    stored = json.loads(cluster.cli("put", "-", f"{prefix}again", "--json", stdin=data).stdout)
    assert stored[0]["digest"] == digest_of(data, 1024 * 1024).hex()  # derived as from a file
    with cluster.client() as c:
        assert c.get_bytes(f"{prefix}from-stdin") == data
        assert c.get_bytes(f"{prefix}from-pipe") == data[:5000]
        assert c.get_bytes(f"{prefix}empty") == b"" and c.get_bytes(f"{prefix}small") == b"tiny"


# --- what it says ---


def test_ls_of_a_prefix_that_holds_nothing_is_an_error_and_of_an_empty_store_is_not(
    untouched_cluster,
):
    cluster = untouched_cluster
    got = cluster.cli("ls")
    assert got.returncode == 0 and got.stdout == b""
    assert cluster.cli("ls", "--json").stdout.strip() == b"[]"
    for argv in (["ls", "nothere/"], ["ls", "-r", "nothere"], ["ls", "nothere/", "--json"]):
        one_line_error(cluster.cli(*argv))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(mistakes, value):
    got = mistakes.cli("--timeout", value, "ls")
    assert got.returncode == 2 and b"is not a timeout" in got.stderr
    got = mistakes.cli("ls", "--timeout", value)
    assert got.returncode == 2 and b"usage: client.py ls" in got.stderr


def test_the_broker_may_be_given_as_host_port(untouched_cluster):
    cluster = untouched_cluster
    host_port = cluster.frontend[len("tcp://") :]
    got = cluster.cli("--broker", host_port, "stats", broker=False)
    assert got.returncode == 0, got.stderr
    env = {**os.environ, "FMS_BROKER": host_port}
    got = subprocess.run(
        [sys.executable, os.path.join(ROOT, "client.py"), "ls"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr


def test_du_h_means_human_sizes_as_in_ls_and_find_needs_no_prefix(cluster):
    with cluster.client() as c:
        c.put_bytes(b"x" * 1536, "a/b.jpg")
    assert b"1.5 KiB" in cluster.cli("du", "-h").stdout
    assert b"1,536" in cluster.cli("du").stdout
    assert cluster.cli("du", "--help").returncode == 0
    assert cluster.cli("find", "--name", "*.jpg").stdout.split() == [b"a/b.jpg"]


def test_a_second_fms_up_on_the_same_ports_is_refused_before_anything_starts(
    untouched_cluster, tmp_path
):
    cluster = untouched_cluster
    got = subprocess.run(
        [sys.executable, "-m", "fms", "up", "--frontend", cluster.frontend]
        + ["--backend", f"tcp://127.0.0.1:{free_port()}", "--data", str(tmp_path / "d")],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    err = one_line_error(got)
    assert f"--frontend {cluster.frontend} is in use" in err and "nothing was started" in err
    assert not (tmp_path / "d" / "storage").exists()  # no worker ever started
    assert [w["id"] for w in cluster.workers("cache")] == ["cache-1"]  # none joined this one


def test_fms_up_says_how_to_run_the_client_as_it_was_installed(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "fms")
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    up = subprocess.Popen(
        [script, "up", "--frontend", frontend, "--backend", backend, "--data", str(tmp_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        line = b""
        deadline = time.monotonic() + 60
        while b"in another terminal" not in line and time.monotonic() < deadline:
            line = up.stderr.readline()
        assert f"try `{script} --broker {frontend} put FILE`".encode() in line, line
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(30)
