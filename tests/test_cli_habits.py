"""The command line as users of cp, mc, rclone and aws s3 expect it (issue 14): destinations
that are not regular files, errors that are one line with exit status 1, and the commands."""

import os
import stat
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, random_bytes


def one_line_error(got) -> str:
    """The stderr of a command that must fail cleanly: exit 1, one line, no traceback."""
    err = got.stderr.decode()
    assert got.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def stored(cluster, tmp_path):
    """A small file (``small``, one message) and a 3-chunk file (``big``) in the store."""
    data = {"small": b"hello\n", "big": random_bytes(2 * 1024 * 1024 + 5, seed=3)}
    with cluster.client() as c:
        for name, content in data.items():
            c.put_bytes(content, name)
    return data


# --- point 4: safety ---

@pytest.mark.parametrize("name", ["small", "big"])
def test_get_into_a_fifo_writes_into_it(cluster, stored, tmp_path, name):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got_bytes = []
    reader = threading.Thread(target=lambda: got_bytes.append(fifo.read_bytes()))
    reader.start()
    got = cluster.cli("get", name, str(fifo))
    reader.join(30)
    assert got.returncode == 0, got.stderr
    assert got_bytes == [stored[name]]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_get_into_dev_null_keeps_the_device(cluster, stored):
    got = cluster.cli("get", "big", "/dev/null")
    assert got.returncode == 0, got.stderr
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_get_into_dev_full_is_a_one_line_error_and_keeps_the_device(cluster, stored):
    for name in ("small", "big"):
        err = one_line_error(cluster.cli("get", name, "/dev/full"))
        assert "/dev/full" in err and "No space left" in err
        assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_get_through_a_symlink_writes_its_target_and_keeps_the_link(cluster, stored, tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    for name in ("small", "big"):
        got = cluster.cli("get", name, str(link))
        assert got.returncode == 0, got.stderr
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert target.read_bytes() == stored[name]


@pytest.mark.parametrize("dest", ["missing/", "missing/out.bin"])
def test_get_into_a_missing_folder_is_a_one_line_error(cluster, stored, tmp_path, dest):
    err = one_line_error(cluster.cli("get", "small", f"{tmp_path}/{dest}"))
    assert "mkdir -p" in err
    assert not (tmp_path / "missing").exists()


def test_get_r_with_a_name_that_is_also_a_folder_writes_nothing(cluster, tmp_path):
    with cluster.client() as c:
        for name in ("t/a.txt", "t/clash", "t/clash/inner.txt", "t/z.txt"):
            c.put_bytes(b"x", name)
    err = one_line_error(cluster.cli("get", "-r", "t", str(tmp_path / "out")))
    assert "'t/clash'" in err and "'t/clash/inner.txt'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_get_r_onto_a_local_file_where_a_folder_goes_writes_nothing(cluster, tmp_path):
    with cluster.client() as c:
        for name in ("t/a.txt", "t/sub/b.txt"):
            c.put_bytes(b"x", name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_bytes(b"mine")
    err = one_line_error(cluster.cli("get", "-r", "t", str(out)))
    assert "sub" in err
    assert sorted(os.listdir(out)) == ["sub"] and (out / "sub").read_bytes() == b"mine"


@pytest.mark.parametrize("argv", [["up", "--frontend", "47755"],
                                  ["up", "--backend", "tcp://127.0.0.1"],
                                  ["broker", "--frontend", "127.0.0.1:5555"],
                                  ["storage", "--broker", "5556"]])
def test_a_bad_endpoint_is_a_one_line_error_before_anything_starts(tmp_path, argv):
    got = subprocess.run([sys.executable, "-m", "fms", *argv, *(
        ["--data", str(tmp_path / "d")] if argv[0] in ("up", "storage") else [])],
        capture_output=True, timeout=60, cwd=ROOT)
    err = one_line_error(got)
    assert "is not an endpoint" in err and "tcp://127.0.0.1:5555" in err
