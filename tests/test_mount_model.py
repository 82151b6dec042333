"""The mount against a local folder: a Hypothesis state machine does the same random operations
on both (create, write at offsets, truncate, rename files and folders, unlink while open, mkdir,
rmdir, read ranges, close and reopen) and compares what they answer, their trees and their
bytes.  Files are cut in 4 KiB chunks here, so a few KiB cross many chunk boundaries."""

import errno
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

CHUNK = 4096
NAMES = st.sampled_from(["a", "b", "c", "d.txt"])
FOLDERS = st.sampled_from(["", "x", "y", "x/z"])
DATA = st.binary(max_size=3 * CHUNK + 100)
OFFSETS = st.integers(0, 4 * CHUNK)


def outcome(do, *args):
    """What an operation gives: its result, or the errno it failed with."""
    try:
        return ("ok", do(*args))
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno, exc.errno))


def tree(root: str) -> dict:
    out = {}
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for d in dirs:
            out[os.path.normpath(os.path.join(rel, d))] = "dir"
        for f in files:
            out[os.path.normpath(os.path.join(rel, f))] = os.path.getsize(os.path.join(folder, f))
    return out


def pwrite(path, offset, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def pread(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def whole(path):
    with open(path, "rb") as f:
        return f.read()


def put(path, data):
    with open(path, "wb") as f:
        f.write(data)


def machine(mount_root: str, local_root: str):
    counter = [0]

    class MountVersusLocal(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            counter[0] += 1
            self.roots = [os.path.join(r, f"ex{counter[0]}") for r in (mount_root, local_root)]
            for root in self.roots:
                os.mkdir(root)
            self.held = []  # (name, fd in the mount, fd in the local folder)

        def both(self, do, *names, args=()):
            """``do(path..., *args)`` on both sides; both must give the same outcome."""
            results = [
                outcome(do, *[os.path.join(root, n) for n in names], *args) for root in self.roots
            ]
            assert results[0] == results[1], f"{do.__name__}{names}{args}: {results}"
            return results[0]

        @rule(folder=FOLDERS, name=NAMES, data=DATA)
        def create(self, folder, name, data):
            self.both(put, os.path.join(folder, name), args=(data,))

        @rule(folder=FOLDERS, name=NAMES, offset=OFFSETS, data=DATA)
        def write_at(self, folder, name, offset, data):
            self.both(pwrite, os.path.join(folder, name), args=(offset, data))

        @rule(folder=FOLDERS, name=NAMES, size=OFFSETS)
        def truncate(self, folder, name, size):
            self.both(os.truncate, os.path.join(folder, name), args=(size,))

        @rule(folder=FOLDERS, name=NAMES, offset=OFFSETS, n=st.integers(0, 2 * CHUNK))
        def read_range(self, folder, name, offset, n):
            self.both(pread, os.path.join(folder, name), args=(offset, n))

        @rule(src=FOLDERS, name=NAMES, dst=FOLDERS, new=NAMES)
        def rename_file(self, src, name, dst, new):
            self.both(os.rename, os.path.join(src, name), os.path.join(dst, new))

        @rule(src=FOLDERS, dst=st.sampled_from(["x", "y", "w", "x/z", "y/v"]))
        def rename_folder(self, src, dst):
            if src:
                self.both(os.rename, src, dst)

        @rule(folder=FOLDERS)
        def mkdir(self, folder):
            if folder:
                self.both(os.mkdir, folder)

        @rule(folder=FOLDERS)
        def rmdir(self, folder):
            if folder:
                self.both(os.rmdir, folder)

        @rule(folder=FOLDERS, name=NAMES)
        def hold_open(self, folder, name):
            """Open a file and keep it open across the next steps (closed and reopened)."""
            name = os.path.join(folder, name)
            fds = [outcome(os.open, os.path.join(r, name), os.O_RDWR) for r in self.roots]
            assert [f[0] for f in fds] == [fds[1][0]] * 2, fds
            if fds[0][0] == "ok":
                self.held.append((name, fds[0][1], fds[1][1]))

        @rule(offset=OFFSETS, data=DATA)
        def write_held(self, offset, data):
            for _name, *fds in self.held[-1:]:
                assert [os.pwrite(fd, data, offset) for fd in fds] == [len(data)] * 2

        @rule(offset=OFFSETS, n=st.integers(0, 2 * CHUNK))
        def read_held(self, offset, n):
            for _name, *fds in self.held[-1:]:
                got = [os.pread(fd, n, offset) for fd in fds]
                assert got[0] == got[1]

        @rule()
        def unlink_held(self):
            """Unlink a file while it is open: it reads and writes on, and is gone."""
            for name, *_fds in self.held[-1:]:
                self.both(os.unlink, name)

        @rule()
        def close_held(self):
            if self.held:
                _name, *fds = self.held.pop(0)
                for fd in fds:
                    os.close(fd)

        @invariant()
        def same_tree(self):
            assert tree(self.roots[0]) == tree(self.roots[1])

        def teardown(self):
            for _name, *fds in self.held:
                for fd in fds:
                    os.close(fd)
            mounted, local = tree(self.roots[0]), tree(self.roots[1])
            assert mounted == local
            for path, kind in local.items():
                if kind != "dir":
                    assert whole(os.path.join(self.roots[0], path)) == whole(
                        os.path.join(self.roots[1], path)
                    ), path

    return MountVersusLocal


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [(), ("--writeback",)], ids=["close-commits", "writeback"])
def test_the_mount_does_what_a_local_folder_does(cluster, make_mount, tmp_path, mode):
    m = make_mount(cluster, "--chunk-size", str(CHUNK), *mode)
    local = tmp_path / "local"
    local.mkdir()
    run_state_machine_as_test(
        machine(m.path, str(local)),
        settings=settings(
            max_examples=int(os.environ.get("FMS_MOUNT_EXAMPLES", "10")),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
