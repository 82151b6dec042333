"""The command line as a new user meets it (issue 26, an audit of its items): downloads to
/dev/stdout and pipes, --range past the end, --version numbering, sync into a folder that is not
there yet, "1 file", keygen's advice and --json, and a file asked for as a folder."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, random_bytes
from harness import CLI_TIMEOUT


def one_line_error(got, status: int = 1) -> str:
    """The stderr of a command that must fail cleanly: ``status``, no traceback, and (exit 1)
    one line."""
    err = got.stderr.decode()
    assert got.returncode == status, err
    assert "Traceback" not in err, err
    if status == 1:
        assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def stored(shared_cluster, prefix):
    """A small file (one message) and a 3-chunk file under ``prefix``."""
    data = {"small": b"hello\n", "big": random_bytes(2 * 1024 * 1024 + 5, seed=26)}
    with shared_cluster.client() as c:
        for name, content in data.items():
            c.put_bytes(content, prefix + name)
    return data


def fms_argv(cluster, *args) -> list:
    return [sys.executable, os.path.join(ROOT, "client.py"), "--broker", cluster.frontend, *args]


# --- get to /dev/stdout, /dev/fd/N and pipes: written into, never replaced ---


@pytest.mark.parametrize("name", ["small", "big"])
@pytest.mark.parametrize("dest", ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"])
def test_get_to_dev_stdout_when_stdout_is_a_pipe(shared_cluster, prefix, stored, name, dest):
    got = shared_cluster.cli("get", prefix + name, dest)  # stdout: a pipe to this test
    assert got.returncode == 0, got.stderr
    assert "Traceback" not in got.stderr.decode()
    assert got.stdout == stored[name]


def test_get_to_dev_stdout_piped_into_cat(shared_cluster, prefix, stored):
    fms = subprocess.Popen(
        fms_argv(shared_cluster, "get", f"{prefix}big", "/dev/stdout"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(shared_cluster.tmp),
    )
    cat = subprocess.Popen(["cat"], stdin=fms.stdout, stdout=subprocess.PIPE)
    fms.stdout.close()  # cat holds the pipe now
    try:
        out, _ = cat.communicate(timeout=CLI_TIMEOUT)
        err = fms.stderr.read()
        assert fms.wait(timeout=CLI_TIMEOUT) == 0, err
    finally:
        fms.kill()
        cat.kill()
    assert out == stored["big"] and b"Traceback" not in err


def test_get_to_dev_stdout_appends_to_a_file_the_shell_opened_for_appending(
    shared_cluster, prefix, stored, tmp_path
):
    """`fms get NAME /dev/stdout >> log` writes where the shell's `>>` points, as cat would:
    the file is neither truncated nor replaced under the shell."""
    log = tmp_path / "log"
    log.write_bytes(b"before\n")
    inode = log.stat().st_ino
    with open(log, "ab") as out:
        got = subprocess.run(
            fms_argv(shared_cluster, "get", f"{prefix}small", "/dev/stdout"),
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=CLI_TIMEOUT,
        )
    assert got.returncode == 0, got.stderr
    assert log.read_bytes() == b"before\n" + stored["small"]
    assert log.stat().st_ino == inode


def test_get_to_a_descriptor_that_is_not_open_is_a_one_line_error(shared_cluster, prefix, stored):
    err = one_line_error(shared_cluster.cli("get", f"{prefix}small", "/dev/fd/9"))
    assert "/dev/fd/9" in err


def test_a_ranged_get_to_dev_stdout_streams_the_range(shared_cluster, prefix, stored):
    got = shared_cluster.cli("get", f"{prefix}big", "/dev/stdout", "--range", "1048570-1048590")
    assert got.returncode == 0, got.stderr
    assert got.stdout == stored["big"][1048570:1048591]


# --- --range past the end: an error, as HTTP's 416 ---


@pytest.mark.parametrize("dest", ["out.bin", "-"])
@pytest.mark.parametrize("start", [6, 7, 10**12])
def test_a_range_that_starts_past_the_end_is_an_error_and_writes_nothing(
    shared_cluster, prefix, stored, dest, start
):
    got = shared_cluster.cli("get", f"{prefix}small", dest, "--range", f"{start}-")
    err = one_line_error(got)
    assert "past the end" in err and "6 bytes" in err
    assert got.stdout == b""
    assert not (shared_cluster.tmp / "out.bin").exists()


def test_a_range_that_starts_on_the_last_byte_is_that_byte(shared_cluster, prefix, stored):
    got = shared_cluster.cli("cat", f"{prefix}small", "--range", "5-100")
    assert got.returncode == 0 and got.stdout == b"\n", got.stderr


# --- --version V: versions are numbered from 1 ---


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
@pytest.mark.parametrize(
    "argv", [["get", "n", "out"], ["cat", "n"], ["restore", "n"], ["purge", "n"]]
)
def test_version_must_be_1_or_more_a_usage_error(value, argv, tmp_path):
    got = subprocess.run(
        [sys.executable, os.path.join(ROOT, "client.py"), *argv, f"--version={value}"],
        capture_output=True,
        timeout=CLI_TIMEOUT,
        cwd=tmp_path,
    )
    err = one_line_error(got, status=2)
    assert "versions are numbered from 1" in err, err
    assert "out of range" not in err  # said by the parser, not by the server's field check


# --- sync into a folder that is not there yet ---


def test_sync_into_a_folder_that_does_not_exist_makes_it_and_says_1_file(
    shared_cluster, prefix, tmp_path
):
    with shared_cluster.client() as c:
        c.put_bytes(b"one", f"{prefix}s/a.txt")
    dest = tmp_path / "new" / "deeper"
    got = shared_cluster.cli("sync", f"fms:{prefix}s/", str(dest))
    assert got.returncode == 0, got.stderr
    out, err = got.stdout.decode(), got.stderr.decode()
    assert f"send  {prefix}s/a.txt -> {dest / 'a.txt'}" in out
    assert "sync: sent 1 file (3 B), 0 unchanged" in err and "1 files" not in err
    assert (dest / "a.txt").read_bytes() == b"one"
    again = shared_cluster.cli("sync", f"fms:{prefix}s/", str(dest))
    assert "sent 0 files (0 B), 1 unchanged" in again.stderr.decode()


def test_sync_of_an_empty_source_still_makes_the_destination_folder(
    shared_cluster, prefix, tmp_path
):
    dest = tmp_path / "mirror"
    got = shared_cluster.cli("sync", f"fms:{prefix}nothing/", str(dest))
    assert got.returncode == 0, got.stderr
    assert dest.is_dir() and not any(dest.iterdir())


def test_a_dry_run_sync_makes_no_folder(shared_cluster, prefix, tmp_path):
    with shared_cluster.client() as c:
        c.put_bytes(b"one", f"{prefix}s/a.txt")
    dest = tmp_path / "new"
    got = shared_cluster.cli("sync", f"fms:{prefix}s/", str(dest), "--dry-run")
    assert got.returncode == 0 and b"would send" in got.stdout, got.stderr
    assert not dest.exists()


def test_sync_into_a_path_under_a_file_is_a_one_line_error(shared_cluster, prefix, tmp_path):
    with shared_cluster.client() as c:
        c.put_bytes(b"one", f"{prefix}s/a.txt")
    (tmp_path / "file").write_bytes(b"mine")
    err = one_line_error(shared_cluster.cli("sync", f"fms:{prefix}s/", str(tmp_path / "file/x")))
    assert "nothing was changed" in err
    assert (tmp_path / "file").read_bytes() == b"mine"


# --- "1 file", not "1 files" ---


def test_counts_of_one_are_singular(shared_cluster, prefix, tmp_path):
    with shared_cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}one/a")
    said = []
    for argv in (
        ["get", "-r", f"{prefix}one", str(tmp_path / "got")],
        ["du", f"{prefix}one"],
        ["rm", "-r", f"{prefix}one/", "--dry-run"],
        ["sync", str(tmp_path / "got"), f"fms:{prefix}two/"],
        ["cp", "-r", f"{prefix}one/", f"{prefix}three/"],
    ):
        got = shared_cluster.cli(*argv)
        assert got.returncode == 0, (argv, got.stderr)
        said.append(got.stdout.decode() + got.stderr.decode())
    text = "\n".join(said)
    assert "1 files" not in text, text
    assert text.count("1 file") >= 5, text
    # the question --delete asks when the source holds nothing names the one file
    err = one_line_error(
        shared_cluster.cli("sync", f"fms:{prefix}none/", str(tmp_path / "got"), "--delete")
    )
    assert "would remove the 1 file from" in err, err


def test_fsck_and_gc_count_one_in_the_singular(cluster):
    with cluster.client() as c:
        c.put_bytes(b"x" * 100_000, "only")
    fsck = cluster.cli("fsck")
    assert fsck.returncode == 0, fsck.stderr
    assert b"fsck: 1 file, 1 chunk " in fsck.stdout and b"0 orphan chunks" in fsck.stdout
    assert b"0 reference counts wrong" in fsck.stdout
    with cluster.client() as c:
        c.rm("only")
    gc = cluster.cli("gc", "--grace", "0")
    assert gc.returncode == 0 and b"gc: freed 1 chunk, " in gc.stdout, gc
    assert b"(1 orphan)" in gc.stdout or b"(0 orphans)" in gc.stdout, gc


def test_count_helper():
    from fms.cli.commands import count, files

    assert [files(0), files(1), files(2048)] == ["0 files", "1 file", "2,048 files"]
    assert count(1, "try", "tries") == "1 try" and count(3, "try", "tries") == "3 tries"


# --- keygen: advice that names the folders as the docs do, and --json ---


def run_keygen(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "fms", "keygen", str(tmp_path / "keys"), *args],
        capture_output=True,
        timeout=CLI_TIMEOUT,
        cwd=ROOT,
    )


def test_keygen_says_where_a_worker_key_goes_and_never_into_allow(tmp_path):
    got = run_keygen(tmp_path, "storage-a")
    assert got.returncode == 0, got.stderr
    out = got.stdout.decode()
    (worker,) = [line for line in out.splitlines() if line.strip().startswith("a worker's")]
    assert "--allow-workers folder (allow-workers/)" in worker and "--allow " not in worker, out
    for line in out.splitlines():  # the clients' folder, named only to keep workers out of it
        if "--allow " in line and "worker" in line:
            assert "a worker's key never goes there" in line, line
    assert "fms id add storage-a --key storage-a.key" in out
    # the clients' folder, where it is named, by the name the docs give it
    assert "--allow folder (allow-clients/)" in out and "allow/" not in out


def test_keygen_json(tmp_path):
    got = run_keygen(tmp_path, "alice", "--json")
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert out == {
        "public": str(tmp_path / "keys" / "alice.key"),
        "secret": str(tmp_path / "keys" / "alice.key_secret"),
    }
    assert os.path.exists(out["public"]) and oct(os.stat(out["secret"]).st_mode & 0o777) == "0o600"


def test_fms_up_names_the_clients_folder_as_the_docs_do(tmp_path):
    """cluster_keys (fms up --curve) keeps its clients' keys in allow-clients/, and renames the
    `allow` folder an older fms made."""
    from fms.security import cluster_keys

    keys = tmp_path / "keys"
    (keys / "allow").mkdir(parents=True)
    server, _workers, _client = cluster_keys(str(keys), client=True)
    assert sorted(os.listdir(keys / "allow-clients")) == ["client.key"]
    assert not (keys / "allow").exists()
    assert server[server.index("--allow") + 1] == str(keys / "allow-clients")


# --- a file asked for as a folder ---


@pytest.mark.parametrize(
    "argv, advice",
    [
        (["get", "{p}small/"], "get {p}small"),
        (["get", "{p}small/", "out"], "get {p}small"),
        (["get", "-r", "{p}small/", "out"], "get {p}small"),
        (["cat", "{p}small/"], "cat {p}small"),
        (["stat", "{p}small/"], "stat {p}small"),
        (["ls", "{p}small/"], "ls {p}small"),
        (["ls", "-r", "{p}small/"], "ls {p}small"),
    ],
)
def test_a_file_asked_for_as_a_folder_gets_a_hint(shared_cluster, prefix, stored, argv, advice):
    err = one_line_error(shared_cluster.cli(*(a.format(p=prefix) for a in argv)))
    assert f"'{prefix}small' is a file, not a folder; drop the trailing slash" in err, err
    assert err.rstrip().endswith(advice.format(p=prefix)), err


def test_get_r_of_a_file_says_to_drop_r(shared_cluster, prefix, stored):
    err = one_line_error(shared_cluster.cli("get", "-r", f"{prefix}small", "out"))
    assert f"'{prefix}small' is a file, not a folder; get it without -r" in err, err


def test_a_missing_folder_is_still_not_found(shared_cluster, prefix, stored):
    err = one_line_error(shared_cluster.cli("get", f"{prefix}nothere/"))
    assert "no files under" in err and "is a file" not in err


def test_sync_from_a_stored_file_says_it_is_a_file(shared_cluster, prefix, tmp_path):
    with shared_cluster.client() as c:
        c.put_bytes(b"one", f"{prefix}f.txt")
    dest = tmp_path / "out"
    err = one_line_error(shared_cluster.cli("sync", f"fms:{prefix}f.txt/", str(dest)))
    assert f"'{prefix}f.txt' is a file, not a folder" in err, err
    assert f"get {prefix}f.txt {dest / 'f.txt'}" in err and "nothing was changed" in err, err
    assert not dest.exists()
    err = one_line_error(shared_cluster.cli("sync", f"fms:{prefix}f.txt", f"fms:{prefix}b/"))
    assert f"cp {prefix}f.txt {prefix}b/f.txt" in err, err
