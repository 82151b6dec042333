"""Small files of a download written whole or not at all, and fast: an unnamed file linked
into place (``O_TMPFILE`` and ``linkat``), a temp file renamed where that cannot be done, each
checked against its digest without building its chunk list (fms/client/download.py; issue 26,
point 4)."""

import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, random_bytes
from storage_helpers import digest_name, h
from test_e2e import current_umask, mode_of, write

import fms
from fms import wire as p
from fms.client import download
from fms.client.listing import ChunkList

WAYS = ("unnamed", "renamed")  # O_TMPFILE + linkat, or a temp file renamed onto the name


@pytest.fixture(params=WAYS)
def way(request, monkeypatch):
    if request.param == "renamed":
        monkeypatch.setitem(download._unnamed, "works", False)
    elif not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE here")
    return request.param


def manifest_of(data: bytes, mtime: float = 1_000_000_000.0) -> dict:
    return {"name": "f", "size": len(data), "mtime": mtime}


def test_a_small_file_is_written_new_or_over_what_was_there_with_its_mtime(way, tmp_path):
    dest = tmp_path / "new" / "f"  # its folder is made too
    download.write_whole(str(dest), manifest_of(b"first"), b"first")
    assert dest.read_bytes() == b"first" and dest.stat().st_mtime == 1_000_000_000.0
    assert mode_of(dest) == 0o666 & ~current_umask()
    download.write_whole(str(dest), manifest_of(b"second", 2e9), b"second")
    assert dest.read_bytes() == b"second" and dest.stat().st_mtime == 2e9
    assert os.listdir(dest.parent) == ["f"]  # no temp file left


def test_a_small_file_cannot_go_where_a_folder_is_and_nothing_is_left(way, tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(fms.FmsError, match="cannot write to"):
        download.write_whole(str(tmp_path / "f"), manifest_of(b"x"), b"x")
    assert os.listdir(tmp_path) == ["f"] and not os.listdir(tmp_path / "f")


@pytest.mark.parametrize("there", [None, b"old content"])
def test_a_client_killed_while_writing_leaves_no_partial_file_and_no_temp_file(
    way, tmp_path, there
):
    """The client is killed (SIGKILL: nothing runs after it) between writing the content and
    naming the file: the destination holds what it held before, whole; an unnamed file leaves
    nothing else behind (a temp file does: `fms` tells its own by their names)."""
    dest = tmp_path / "f"
    if there is not None:
        dest.write_bytes(there)
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from fms.client import download
        if {way!r} == "renamed":
            download._unnamed["works"] = False
        download._finish = lambda fd, manifest, fsync: os.kill(os.getpid(), signal.SIGKILL)
        download.write_whole({str(dest)!r}, {{"mtime": 1.0}}, b"new content" * 100)
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert run.returncode == -9, run.stderr
    left = sorted(os.listdir(tmp_path))
    temps = [n for n in left if n.startswith(".f.") and n.endswith(".fms-part")]
    assert left == sorted((["f"] if there else []) + temps)
    assert len(temps) == (0 if way == "unnamed" else 1)
    if there:
        assert dest.read_bytes() == there


def test_get_many_writes_every_file_and_fetches_a_bad_copy_again_from_storage(
    shared_cluster, prefix, tmp_path, monkeypatch
):
    files = {f"{prefix}t/{i:03d}": random_bytes(100 + i, i) for i in range(300)}
    bad = f"{prefix}t/150"
    with shared_cluster.client() as c:
        c.put_many([(write(tmp_path / "src" / n, d), n) for n, d in files.items()])
        read_batch = p.read_batch

        def one_bad(header, buffer, names):
            replies = read_batch(header, buffer, names)
            if bad in names:  # as if the cache had handed out a bad copy
                k = names.index(bad)
                result, data = replies[k]
                replies[k] = (result, b"X" + bytes(data[1:]))
            return replies

        monkeypatch.setattr(p, "read_batch", one_bad)
        done = []
        got = c.get_many(
            [(n, str(tmp_path / "out" / n)) for n in sorted(files)],
            done=lambda i, stat: done.append(i),
        )
    assert sorted(done) == list(range(300)) and [g["name"] for g in got] == sorted(files)
    assert all((tmp_path / "out" / n).read_bytes() == d for n, d in files.items())
    assert not [f for f in (tmp_path / "out").rglob("*") if f.name.startswith(".")]


def test_a_file_that_cannot_be_written_stops_get_many_with_a_clear_error(
    shared_cluster, prefix, tmp_path
):
    with shared_cluster.client() as c:
        c.put_many([(write(tmp_path / "src" / f"{i}", b"x"), f"{prefix}t/{i}") for i in range(5)])
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "file").write_bytes(b"")  # a file where a folder should be
        items = [(f"{prefix}t/{i}", str(tmp_path / "out" / "file" / f"{i}")) for i in range(5)]
        with pytest.raises(fms.FmsError, match="cannot write to"):
            c.get_many(items)


def small_files_of(tmp_path, n: int) -> list:
    """``n`` (dest, manifest, data) of small files: one-chunk manifests as storage makes them."""
    out = []
    for i in range(n):
        data = random_bytes(1000 + i, i)
        digest = h(data)
        manifest = {
            "name": f"t/{i}",
            "size": len(data),
            "mtime": 1e9,
            "count": 1,
            "digest_kind": p.DIGEST_TREE,
            "extents": p.pack_extents([(p.DEFAULT_CHUNK_SIZE, len(data))]),
            "chunks": [digest],
            "digest_fn": digest_name(),
        }
        extents = p.unpack_extents(manifest["extents"])
        manifest["digest"] = p.inline_digest(extents, [digest], h)
        out.append((str(tmp_path / "out" / f"{i:03d}"), manifest, data))
    return out


def test_a_small_file_is_checked_against_its_digest_without_building_its_chunk_list(tmp_path):
    """small_ok: the one-chunk shortcut agrees with the chunk list (ChunkList) on every file,
    and tells a wrong content (asked again from storage) from a damaged manifest (an error)."""
    for _dest, manifest, data in small_files_of(tmp_path, 50):
        assert download.small_ok(manifest, data)
        ChunkList(manifest, None)  # the chunk list agrees: it gives the digest
        extents, chunk = p.unpack_extents(manifest["extents"]), manifest["chunks"][0]
        assert p.one_chunk_digest(manifest["extents"], chunk, h) == (
            p.inline_digest(extents, [chunk], h)
        )
        assert not download.small_ok(manifest, b"X" + data[1:])
        assert not download.small_ok(manifest, data[:-1])
        damaged = {**manifest, "digest": h(b"another file")}
        with pytest.raises(fms.IntegrityError, match="chunk list does not give its digest"):
            download.small_ok(damaged, data)
        with pytest.raises(fms.IntegrityError):
            ChunkList(damaged, None)


def test_an_interrupted_get_many_leaves_whole_files_and_counts_each_one_written(cluster, tmp_path):
    """A Ctrl-C in the middle of get_many (here: raised as the 100th file is reported done):
    every file reported was written, whole, and no other file is there, whole or not."""
    files = {f"t/{i:03d}": random_bytes(100 + i, i) for i in range(300)}
    done: list[int] = []

    def interrupt_at_100(i: int, _stat: dict) -> None:
        done.append(i)
        if len(done) == 100:
            raise KeyboardInterrupt

    names = sorted(files)
    with cluster.client() as c:
        c.put_many([(write(tmp_path / "src" / n, d), n) for n, d in files.items()])
        with pytest.raises(KeyboardInterrupt):
            c.get_many([(n, str(tmp_path / "out" / n)) for n in names], done=interrupt_at_100)
    left = sorted(f.name for f in (tmp_path / "out" / "t").iterdir())
    assert left == sorted(names[i].split("/")[1] for i in done) and len(left) == 100
    assert all((tmp_path / "out" / names[i]).read_bytes() == files[names[i]] for i in done)


def test_a_small_file_the_disk_will_not_take_is_a_one_line_error_and_leaves_nothing(
    shared_cluster, prefix, tmp_path
):
    """A write that fails (here: a file size limit, as a full disk or a quota would) names
    the destination, and nothing is left: neither the file nor a temp file."""
    with shared_cluster.client() as c:
        c.put_bytes(random_bytes(4096, 1), f"{prefix}f")

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG

    dest = tmp_path / "out" / "f"
    dest.parent.mkdir()
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "client.py"), "--broker", shared_cluster.frontend]
        + ["get", f"{prefix}f", str(dest)],
        capture_output=True,
        timeout=60,
        preexec_fn=small_files_only,
    )
    err = run.stderr.decode()
    assert run.returncode == 1 and f"cannot write to {dest}: File too large" in err, err
    assert "Traceback" not in err and not os.listdir(dest.parent)
