"""``fms mount``: a store as a local folder over FUSE, driven by real programs and system calls
against a real cluster (the mount runs as root here; without /dev/fuse these tests are skipped,
saying why)."""

import errno
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import threading

import pytest
from conftest import ROOT, random_bytes, wait_for

from fms import wire as p

MiB = 1 << 20


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_files_and_folders_round_trip_and_show_in_the_store(cluster, make_mount):
    m = make_mount(cluster)
    data = random_bytes(3 * MiB + 5)
    os.makedirs(m.p("a", "b"))
    write(m.p("a", "b", "big"), data)
    write(m.p("small.txt"), b"hello\n")
    assert read(m.p("a", "b", "big")) == data
    assert sorted(os.listdir(m.path)) == ["a", "small.txt"]
    with cluster.client() as c:
        assert c.get_bytes("a/b/big") == data
        assert c.get_bytes("small.txt") == b"hello\n"
        os.mkdir(m.p("empty"))
        folders = [e["name"] for e in c.iter_folder("") if e.get("folder")]
        assert folders == ["a/", "empty/"]  # an empty folder persists: its marker
        assert c.stat("empty/")["size"] == 0
    os.rmdir(m.p("empty"))
    with pytest.raises(OSError) as raised:
        os.rmdir(m.p("a"))
    assert raised.value.errno == errno.ENOTEMPTY
    assert sorted(os.listdir(m.path)) == ["a", "small.txt"]


def test_a_random_write_uploads_only_the_chunk_it_touched(cluster, make_mount):
    m = make_mount(cluster)
    data = bytearray(random_bytes(8 * MiB))
    write(m.p("f"), data)
    with cluster.client() as c:
        before = c.usage()["chunk_bytes"]
        with open(m.p("f"), "r+b") as f:
            f.seek(3 * MiB + MiB // 2)
            f.write(b"0123456789")
        data[3 * MiB + MiB // 2 : 3 * MiB + MiB // 2 + 10] = b"0123456789"
        assert c.usage()["chunk_bytes"] - before == MiB  # the one chunk, rewritten whole
        assert c.get_bytes("f") == bytes(data)
        header, _ = c.call("get", name="f")
        assert p.unpack_extents(header["manifest"]["extents"]) == ((MiB, 8 * MiB),)
    assert read(m.p("f")) == bytes(data)


def test_reads_go_through_the_cache_ranged_when_random_streaming_ahead_in_order(
    cluster, make_mount
):
    data = random_bytes(16 * MiB, seed=16)
    with cluster.client() as c:
        c.put_bytes(data, "big")  # 1 MiB chunks; a put never fills the cache
        assert c.cache_stats()["bytes"] == 0
    m = make_mount(cluster)

    def cached() -> int:
        with cluster.client() as c:
            return c.cache_stats()["bytes"]

    fd = os.open(m.p("big"), os.O_RDONLY)
    try:
        at = 12 * MiB + MiB // 2
        assert os.pread(fd, 10, at) == data[at : at + 10]
        assert cached() == MiB  # a random read: the one chunk that holds it, nothing more
        for at in range(0, 3 * MiB + 1, 128 << 10):  # reading on in order, as cp does
            assert os.pread(fd, 128 << 10, at) == data[at : at + (128 << 10)]
        # from the third chunk in a row the following chunks stream ahead of the reads
        wait_for(lambda: cached() >= 8 * MiB, 30, "chunks read ahead into the cache")
    finally:
        os.close(fd)
    assert read(m.p("big")) == data
    served = {w: n for w, n in cluster.served().items() if w.startswith("storage")}
    with cluster.client() as c:
        assert c.get_bytes("big") == data  # every chunk now answered by the cache
    assert {w: n for w, n in cluster.served().items() if w.startswith("storage")} == served


def test_writes_are_committed_on_close_and_fsync_never_half_visible(cluster, make_mount):
    m = make_mount(cluster)
    write(m.p("doc"), b"old")
    with cluster.client() as c, open(m.p("doc"), "r+b") as f:
        f.write(b"new content, " * 100_000)
        f.flush()  # written to the mount, not closed: not a version yet
        assert c.get_bytes("doc") == b"old"
        os.fsync(f.fileno())  # fsync commits
        assert c.get_bytes("doc") == b"new content, " * 100_000
        f.seek(0)
        f.write(b"more")
        assert c.get_bytes("doc")[:4] == b"new "
    with cluster.client() as c:
        assert c.stat("doc")["size"] == 1_300_000
        assert c.get_bytes("doc")[:4] == b"more"


def spooled_bytes(m) -> int:
    """Bytes the mount process's spool files hold on disk (they are unlinked: found by its
    open descriptors)."""
    fds = f"/proc/{m.proc.pid}/fd"
    held = 0
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}").startswith(f"{m.path}.spool/"):
                held += os.stat(f"{fds}/{fd}").st_blocks * 512
        except FileNotFoundError:
            pass  # closed meanwhile
    return held


def test_the_spool_keeps_to_its_size_whole_chunks_going_to_the_store_early(cluster, make_mount):
    m = make_mount(cluster, "--spool-size", "3M")
    data = random_bytes(16 * MiB, seed=3)
    with open(m.p("big"), "wb") as f:
        for at in range(0, len(data), MiB // 2):
            f.write(data[at : at + MiB // 2])
            f.flush()
            assert spooled_bytes(m) <= 3 * MiB + MiB  # the limit, and the chunk being written
        with cluster.client() as c:
            assert c.ls("") == []  # uploaded early, not committed: no version yet
    assert read(m.p("big")) == data
    with cluster.client() as c:
        assert c.get_bytes("big") == data


def test_truncate_extends_with_zeros_and_cuts(cluster, make_mount):
    m = make_mount(cluster)
    data = random_bytes(2 * MiB + 100)
    write(m.p("t"), data)
    os.truncate(m.p("t"), MiB + 7)  # a closed file: committed at once
    assert read(m.p("t")) == data[: MiB + 7]
    with open(m.p("t"), "r+b") as f:
        f.truncate(3 * MiB)
        f.seek(3 * MiB - 2)
        f.write(b"ZZ")
    expected = data[: MiB + 7] + bytes(2 * MiB - 9) + b"ZZ"
    assert read(m.p("t")) == expected
    with cluster.client() as c:
        assert c.get_bytes("t") == expected


def test_a_file_written_to_reads_its_stored_chunks_while_it_is_open(cluster, make_mount):
    """A file with unsaved changes reads the chunks it did not change from storage through its
    chunk table (a manifest of its own, which must name the store's digest function)."""
    m = make_mount(cluster)
    data = random_bytes(2 * MiB + 100)
    write(m.p("t"), data)
    with open(m.p("t"), "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"ZZ")
        f.flush()
        assert os.pread(f.fileno(), 100, 0) == data[:100]  # stored, not changed
        assert os.pread(f.fileno(), 4, 2 * MiB - 2) == data[2 * MiB - 2 : 2 * MiB] + b"ZZ"
    assert read(m.p("t")) == data[: 2 * MiB] + b"ZZ" + data[2 * MiB + 2 :]


def test_rename_of_files_and_of_whole_folders_is_metadata_only(cluster, make_mount):
    m = make_mount(cluster)
    os.makedirs(m.p("src", "deep"))
    os.mkdir(m.p("src", "hollow"))
    big = random_bytes(5 * MiB)
    write(m.p("src", "deep", "big"), big)
    write(m.p("src", "x"), b"x")
    with cluster.client() as c:
        before = c.usage()["chunk_bytes"]
        os.rename(m.p("src"), m.p("dst"))
        assert c.usage()["chunk_bytes"] == before  # no byte moved
        assert sorted(e["name"] for e in c.iter_ls("", markers=True)) == [
            "dst/",
            "dst/deep/",
            "dst/deep/big",
            "dst/hollow/",
            "dst/x",
        ]
    assert sorted(os.listdir(m.path)) == ["dst"]
    assert sorted(os.listdir(m.p("dst"))) == ["deep", "hollow", "x"]
    assert read(m.p("dst", "deep", "big")) == big
    os.rename(m.p("dst", "x"), m.p("dst", "deep", "y"))
    assert read(m.p("dst", "deep", "y")) == b"x" and not os.path.exists(m.p("dst", "x"))
    write(m.p("other"), b"o")
    with pytest.raises(OSError) as raised:
        os.rename(m.p("other"), m.p("dst"))
    assert raised.value.errno == errno.EISDIR
    with pytest.raises(OSError) as raised:
        os.rename(m.p("dst"), m.p("dst", "deep", "inside"))
    assert raised.value.errno == errno.EINVAL
    os.mkdir(m.p("full"))
    write(m.p("full", "f"), b"f")
    with pytest.raises(OSError) as raised:
        os.rename(m.p("dst"), m.p("full"))
    assert raised.value.errno == errno.ENOTEMPTY


def test_an_unlinked_open_file_reads_and_writes_on_and_is_never_stored(cluster, make_mount):
    m = make_mount(cluster)
    data = random_bytes(2 * MiB)
    write(m.p("gone"), data)
    with open(m.p("gone"), "r+b") as f:
        os.unlink(m.p("gone"))
        assert not os.path.exists(m.p("gone"))
        assert f.read() == data
        f.seek(0)
        f.write(b"still here")
        f.seek(0)
        assert f.read(10) == b"still here"
    with cluster.client() as c:
        assert c.ls("") == []
    assert os.listdir(m.path) == []


def test_attributes_are_kept_in_the_versions_metadata(cluster, make_mount):
    m = make_mount(cluster)
    write(m.p("f"), b"data")
    os.chmod(m.p("f"), 0o640)
    os.chown(m.p("f"), 1234, 5678)
    os.utime(m.p("f"), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.mkdir(m.p("d"), 0o700)
    os.utime(m.p("d"), (1_500_000_000, 1_500_000_000))
    st = os.stat(m.p("f"))
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    with cluster.client() as c:
        meta = c.stat("f")["meta"]
        assert (meta["fs.mode"], meta["fs.uid"], meta["fs.gid"]) == ("640", "1234", "5678")
        assert c.stat("f")["mtime"] == pytest.approx(1_600_000_000.123456789)
        assert c.stat("d/")["meta"]["fs.mode"] == "700"
    st = os.stat(m.p("d"))
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_mtime == 1_500_000_000
    os.symlink("f", m.p("link"))
    assert os.readlink(m.p("link")) == "f" and read(m.p("link")) == b"data"
    usage = os.statvfs(m.path)
    assert (usage.f_blocks - usage.f_bfree) * usage.f_frsize >= 4  # the store's bytes


@pytest.mark.parametrize("writeback", [False, True])
def test_a_chown_that_finds_the_file_open_after_its_release_committed_is_kept(
    cluster, tmp_path, monkeypatch, writeback
):
    """FUSE's release comes after close has returned, so a chown can find the file still open
    after release has committed it and taken its metadata.  The mount's operations in this
    process, the chown made at that very point: it is stored (before: chown said yes, and the
    change was lost with the file's handle; a full suite's mount test met it once)."""
    from types import SimpleNamespace

    from fms.mount.files import Spool
    from fms.mount.fs import FmsMount
    from fms.mount.pool import ClientPool

    pool = ClientPool(lambda: cluster.client())
    spool = Spool(str(tmp_path / "spool"), 64 * MiB)
    mount = FmsMount(pool, "", spool, 4 * MiB, writeback=writeback)
    try:
        fi = SimpleNamespace(fh=0, flags=os.O_WRONLY)
        mount.create("/f", 0o644, fi)
        mount.write("/f", b"data", 0, fi)
        mount.flush("/f", fi)  # close(2): committed (handed to the committer, with writeback)
        commit, chowned = mount._commit, []

        def commit_then_chown(file, background=False):
            commit(file, background)
            if not chowned:  # release's commit is made: the chown comes now, once
                chowned.append(mount.chown("/f", 1234, 5678))

        monkeypatch.setattr(mount, "_commit", commit_then_chown)
        mount.release("/f", fi)
        assert chowned == [0]
        mount._drain()  # with writeback: what waits for its commit is committed
        with cluster.client() as c:
            meta = c.stat("f")["meta"]
        assert (meta["fs.uid"], meta["fs.gid"]) == ("1234", "5678")
    finally:
        mount.destroy(None)


def fallocate(path: str) -> None:
    """fallocate(2) itself: glibc's posix_fallocate writes zeros where it is refused."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(1 << 20)):
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


def test_what_is_not_supported_is_refused_clearly(cluster, make_mount):
    m = make_mount(cluster)
    write(m.p("f"), b"data")
    for what, attempt in (
        ("hard link", lambda: os.link(m.p("f"), m.p("hard"))),
        ("fifo", lambda: os.mkfifo(m.p("fifo"))),
        ("device", lambda: os.mknod(m.p("dev"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))),
        ("setxattr", lambda: os.setxattr(m.p("f"), "user.tag", b"v")),
        ("getxattr", lambda: os.getxattr(m.p("f"), "user.tag")),
        ("fallocate", lambda: fallocate(m.p("f"))),
    ):
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno in (errno.EOPNOTSUPP, errno.ENOSYS), what
    assert read(m.p("f")) == b"data" and os.listdir(m.path) == ["f"]


def test_a_read_only_mount_refuses_changes(cluster, make_mount):
    with cluster.client() as c:
        c.put_bytes(b"kept", "f")
    m = make_mount(cluster, "--read-only")
    assert read(m.p("f")) == b"kept"
    for attempt in (
        lambda: write(m.p("new"), b"x"),
        lambda: open(m.p("f"), "r+b"),
        lambda: os.mkdir(m.p("d")),
        lambda: os.unlink(m.p("f")),
        lambda: os.rename(m.p("f"), m.p("g")),
    ):
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS
    with cluster.client() as c:
        assert [e["name"] for e in c.ls("")] == ["f"]


def identity_key(cluster, name: str, *grants) -> list:
    """Make identity ``name`` with a key of its own and ``grants`` ((role, prefix) pairs);
    :return: the command line options that use its key."""
    from fms.security import keygen, load_public

    public, secret = keygen(str(cluster.tmp / "user-keys"), name)
    with cluster.client() as admin:
        admin.id_add(name, keys=[load_public(public)])
        for role, prefix in grants:
            admin.grant(name, role, prefix)
    return ["--curve-secret", secret, "--server-key", str(cluster.tmp / "keys" / "broker.key")]


def test_a_read_only_grant_gives_a_read_only_mount(tmp_path, make_mount):
    from harness import Cluster

    cluster = Cluster(tmp_path / "c", curve=True)
    try:
        cluster.start_all()
        with cluster.client() as c:
            c.put_bytes(b"shared", "team/doc")
            c.put_bytes(b"theirs", "other/x")
        reader = identity_key(cluster, "reader", ("read", "team"))
        writer = identity_key(cluster, "writer", ("write", "team"))
        nobody = identity_key(cluster, "nobody", ("write", "elsewhere"))
        m = make_mount(cluster, client_args=reader)
        assert "'reader' may only read here (read on 'team'): mounted read-only" in m.log()
        assert os.statvfs(m.path).f_flag & os.ST_RDONLY
        assert os.listdir(m.path) == ["team"]  # what it may read, only
        assert read(m.p("team", "doc")) == b"shared"
        for attempt in (
            lambda: write(m.p("team", "new"), b"x"),
            lambda: os.mkdir(m.p("team", "d")),
            lambda: os.unlink(m.p("team", "doc")),
        ):
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EROFS
        w = make_mount(cluster, client_args=writer)
        assert not os.statvfs(w.path).f_flag & os.ST_RDONLY
        write(w.p("team", "new"), b"written")
        with pytest.raises(OSError) as raised:
            os.mkdir(w.p("other"))  # a grant on 'team' only: refused by the store, EACCES
        assert raised.value.errno == errno.EACCES
        with cluster.client() as c:
            assert c.get_bytes("team/new") == b"written"
            assert sorted(e["name"] for e in c.ls("")) == ["other/x", "team/doc", "team/new"]
        (tmp_path / "nowhere").mkdir()
        refused = cluster.cli(*nobody, "mount", str(tmp_path / "nowhere"), "--prefix", "team")
        assert refused.returncode == 1
        assert b"'nobody' may read nothing under 'team'" in refused.stderr
        assert not os.path.ismount(tmp_path / "nowhere")
    finally:
        cluster.stop()


def test_allow_other_lets_other_users_in_as_the_mode_bits_say(cluster):
    from mounts import Mount, fuse_missing

    if fuse_missing():
        pytest.skip(fuse_missing())
    if os.geteuid() != 0:
        pytest.skip("another user is needed: the test runs as root to become nobody")
    top = tempfile.mkdtemp(prefix="fms-allow-other-")  # a folder other users may go through
    os.chmod(top, 0o755)
    mounts = []

    def as_nobody(*cmd):
        def drop():
            os.setgid(65534)
            os.setuid(65534)

        return subprocess.run(cmd, capture_output=True, preexec_fn=drop, timeout=30)

    try:
        mounts.append(Mount(cluster, os.path.join(top, "own")))
        mounts.append(Mount(cluster, os.path.join(top, "shared"), "--allow-other"))
        own, shared = mounts
        write(own.p("f"), b"for all")
        assert as_nobody("cat", own.p("f")).returncode != 0  # only the user who mounted
        assert as_nobody("cat", shared.p("f")).stdout == b"for all"
        os.chmod(shared.p("f"), 0o600)
        assert as_nobody("cat", shared.p("f")).returncode != 0  # the mode bits still apply
        assert read(own.p("f")) == b"for all"
    finally:
        for m in mounts:
            m.unmount()
        shutil.rmtree(top, ignore_errors=True)


def test_a_prefix_shows_one_folder_of_the_store(cluster, make_mount):
    with cluster.client() as c:
        c.put_bytes(b"in", "photos/cat.jpg")
        c.put_bytes(b"out", "notes.txt")
    m = make_mount(cluster, "--prefix", "photos")
    assert os.listdir(m.path) == ["cat.jpg"]
    write(m.p("dog.jpg"), b"woof")
    with cluster.client() as c:
        assert c.get_bytes("photos/dog.jpg") == b"woof"


def test_two_mounts_see_each_others_closed_writes(cluster, make_mount):
    a, b = make_mount(cluster), make_mount(cluster)
    write(a.p("shared"), b"first")
    assert read(b.p("shared")) == b"first"
    assert os.stat(b.p("shared")).st_size == 5  # b's kernel now holds the size of 5
    write(a.p("shared"), b"second, and longer")
    assert read(b.p("shared")) == b"second, and longer"  # open sees the latest version
    os.mkdir(b.p("from-b"))
    write(b.p("from-b", "x"), random_bytes(MiB + 1))
    assert read(a.p("from-b", "x")) == random_bytes(MiB + 1)


def test_unmounting_with_fusermount_or_ctrl_c_loses_nothing_closed(cluster, make_mount):
    for how in ("fusermount", "sigint"):
        m = make_mount(cluster, name=f"m-{how}")
        data = random_bytes(2 * MiB, seed=len(how))
        write(m.p(how), data)
        assert m.unmount(how) == 0
        assert not os.path.ismount(m.path)
        with cluster.client() as c:
            assert c.get_bytes(how) == data


def test_writeback_commits_small_files_after_close_and_loses_none_at_unmount(cluster, make_mount):
    m = make_mount(cluster, "--writeback")
    files = {f"d{i % 5}/f{i}": random_bytes(100 + i, seed=i) for i in range(300)}
    for folder in range(5):
        os.mkdir(m.p(f"d{folder}"))
    for name, data in files.items():
        write(m.p(name), data)
    assert read(m.p("d3/f8")) == files["d3/f8"]  # waits for its commit, then reads it stored
    with open(m.p("d0/f0"), "r+b") as f:
        f.write(b"changed")
        f.flush()
        os.fsync(f.fileno())  # waits for every commit handed over, and commits this file
    files["d0/f0"] = b"changed" + files["d0/f0"][7:]
    with cluster.client() as c:
        assert c.get_bytes("d0/f0") == files["d0/f0"]
    write(m.p("last"), b"closed just before the unmount")
    assert m.unmount() == 0
    with cluster.client() as c:
        assert c.get_bytes("last") == b"closed just before the unmount"
        for name, data in files.items():
            assert c.get_bytes(name) == data, name
        assert c.stat("d4/f9")["meta"]["fs.mode"] == "644"


def test_writeback_folds_attribute_changes_into_the_version_still_waiting(cluster, make_mount):
    # Entries are kept a minute, so nothing below but the commits needs the store.
    m = make_mount(cluster, "--writeback", "--cache-time", "60")
    NS = 1_600_000_000_123_456_789  # to the nanosecond: kept in the metadata
    write(m.p("warm"), b"the connections and the digest function are known")
    os.mkdir(m.p("d"))
    storage = [cluster.proc(name) for name in ("storage-a", "storage-b")]
    for proc in storage:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        write(m.p("d/a"), b"first")

        def in_flight() -> int:
            with cluster.client() as c:
                workers = c.call("status")[0]["workers"]
            return sum(w["inflight"] for w in workers if w["service"] == "storage")

        wait_for(lambda: in_flight() >= 1, 10, "d/a's commit at a storage worker")
        write(m.p("d/b"), b"second")  # waits behind d/a's commit: the committer is busy

        def change() -> None:
            os.chmod(m.p("d/b"), 0o600)
            os.utime(m.p("d/b"), ns=(7, NS))
            os.mkdir(m.p("d/e"), 0o750)  # its marker waits too, and takes the changes
            os.chmod(m.p("d/e"), 0o700)
            os.utime(m.p("d/e"), (1_500_000_000, 1_500_000_000))

        changed = threading.Thread(target=change)
        changed.start()
        changed.join(30)  # made to the waiting versions: no commit of their own, no wait
        waited = changed.is_alive()
        st, folder = os.stat(m.p("d/b")), os.stat(m.p("d/e"))
        listed = sorted(os.listdir(m.p("d")))
    finally:
        for proc in storage:
            os.kill(proc.pid, signal.SIGCONT)
    changed.join(60)
    assert not waited, "changes of a file or folder waiting for its commit waited for the store"
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == NS
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_mtime == 1_500_000_000
    assert stat.S_ISDIR(folder.st_mode) and listed == ["a", "b", "e"]
    assert m.unmount() == 0
    with cluster.client() as c:
        made = c.stat("d/b")
        assert made["version"] == 1  # one commit: the content with its attributes
        assert made["meta"]["fs.mode"] == "600" and made["meta"]["fs.mtime_ns"] == str(NS)
        assert c.get_bytes("d/b") == b"second" and c.get_bytes("d/a") == b"first"
        marker = c.stat("d/e/")
        assert marker["version"] == 1 and marker["meta"]["fs.mode"] == "700"
        assert marker["mtime"] == 1_500_000_000


def test_daemon_mode_returns_once_mounted(cluster, tmp_path):
    from mounts import fuse_missing

    if fuse_missing():
        pytest.skip(fuse_missing())
    path = str(tmp_path / "mnt")
    os.mkdir(path)
    done = cluster.cli("mount", path, "--daemon", "--spool", str(tmp_path / "spool"))
    try:
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(path)
        write(os.path.join(path, "f"), b"daemon")
    finally:
        subprocess.run(["fusermount3", "-u", path], capture_output=True)
    wait_for(lambda: not os.path.ismount(path), 10, "the unmount")
    with cluster.client() as c:
        assert c.get_bytes("f") == b"daemon"
    bad = cluster.cli("mount", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and b"not a folder" in bad.stderr


def test_folders_made_in_the_mount_show_in_fsspec(cluster, make_mount):
    fsspec = pytest.importorskip("fsspec")
    m = make_mount(cluster)
    os.makedirs(m.p("top", "empty"))
    fs = fsspec.filesystem("fms", broker=cluster.frontend, skip_instance_cache=True)
    assert fs.ls("top", detail=False) == ["top/empty"]
    assert fs.info("top/empty")["type"] == "directory"
    assert fs.isdir("top/empty") and not fs.isfile("top/empty")
    assert fs.find("", withdirs=True) == ["top", "top/empty"]
    assert fs.find("") == []  # no files


# --- real programs ---


def run(*cmd, cwd=None, **kw):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, **kw)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_real_programs_git_cp_tar_rsync_sqlite(cluster, make_mount, tmp_path):
    m = make_mount(cluster)
    # fms's sources: without __pycache__, whose files depend on who ran Python in the checkout
    source = str(tmp_path / "fms")
    shutil.copytree(os.path.join(ROOT, "fms"), source, ignore=shutil.ignore_patterns("__pycache__"))
    # cp -a and diff -r of a source tree
    run("cp", "-a", source, m.p("copy"))
    run("diff", "-r", source, m.p("copy"))
    # tar both ways
    run("tar", "-cf", m.p("tree.tar"), "-C", source, ".")
    out = tmp_path / "untarred"
    out.mkdir()
    run("tar", "-xf", m.p("tree.tar"), "-C", str(out))
    run("diff", "-r", source, str(out))
    os.mkdir(m.p("untarred"))
    run("tar", "-xf", m.p("tree.tar"), "-C", m.p("untarred"))
    run("diff", "-r", source, m.p("untarred"))
    # rsync -a twice: the second run changes nothing
    run("rsync", "-a", source + "/", m.p("synced"))
    assert run("rsync", "-ai", source + "/", m.p("synced")) == ""
    run("diff", "-r", source, m.p("synced"))
    # git init with commits
    repo = m.p("repo")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}  # fmt: skip
    run("git", "init", "-q", repo, env=env)
    write(os.path.join(repo, "a.txt"), b"one\n")
    run("git", "add", "a.txt", cwd=repo, env=env)
    run("git", "commit", "-qm", "first", cwd=repo, env=env)
    write(os.path.join(repo, "a.txt"), b"two\n")
    run("git", "commit", "-qam", "second", cwd=repo, env=env)
    assert run("git", "log", "--format=%s", cwd=repo, env=env).split() == ["second", "first"]
    run("git", "fsck", "--strict", cwd=repo, env=env)
    # sqlite3 read-only on a database file
    db = str(tmp_path / "local.db")
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    shutil.copy(db, m.p("data.db"))
    assert run("sqlite3", "-readonly", m.p("data.db"), "SELECT sum(x) FROM t").strip() == str(
        sum(range(1000))
    )


# --- faults ---


def test_a_storage_worker_killed_during_writes_loses_nothing_closed(cluster, make_mount):
    m = make_mount(cluster)
    closed, failed = {}, []

    def writer():
        for i in range(12):
            data = random_bytes(2 * MiB, seed=i)
            try:
                write(m.p(f"f{i}"), data)
                closed[i] = data
            except OSError as exc:
                failed.append((i, exc))

    thread = threading.Thread(target=writer)
    thread.start()
    wait_for(lambda: len(closed) >= 3 or not thread.is_alive(), 60, "three files written")
    cluster.proc("storage-a").kill()
    thread.join(120)
    assert len(closed) + len(failed) == 12 and len(closed) >= 3
    with cluster.client() as c:
        for i, data in closed.items():
            assert c.get_bytes(f"f{i}") == data, f"f{i} was closed and is not whole"
        for i, _exc in failed:  # never half: the old (nothing) or the whole new content
            names = {e["name"] for e in c.ls("")}
            assert f"f{i}" not in names or c.get_bytes(f"f{i}") == random_bytes(2 * MiB, seed=i)


def test_a_storage_worker_killed_while_writeback_commits_loses_nothing_closed(cluster, make_mount):
    m = make_mount(cluster, "--writeback")
    os.mkdir(m.p("d"))
    files = {f"d/f{i}": random_bytes(1000 + i, seed=i) for i in range(600)}
    for i, (name, data) in enumerate(files.items()):
        write(m.p(name), data)
        if i == 200:  # the committer holds some, has sent some
            cluster.proc("storage-a").kill()
    assert m.unmount() == 0  # waits for the committer
    assert "writeback_failed" not in m.log()
    with cluster.client() as c:
        for name, data in files.items():
            assert c.get_bytes(name) == data, f"{name} was closed and is not stored whole"
        assert c.stat("d/")["meta"]["fs.mode"] == "755"


@pytest.mark.timeout(60)  # a hang runs into it; each call gives up after 3 tries of 1 s
def test_the_broker_gone_is_eio_not_a_hang(cluster, make_mount):
    m = make_mount(cluster, timeout=1.0)
    write(m.p("f"), b"data")
    cluster.proc("broker").kill()
    for attempt in (lambda: read(m.p("f")), lambda: os.statvfs(m.path)):
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EIO
