"""Mounts for the tests: ``fms mount`` run as a user runs it (``client.py mount``), on a folder
of the test's, always unmounted at the end.  Skips with the reason where this machine cannot
mount (no /dev/fuse, no libfuse 3 or mfusepy)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
from harness import ROOT, wait_for

MOUNT_TIMEOUT = 15.0  # seconds for a mount to come up or go away


def fuse_missing() -> str | None:
    """Why this machine cannot mount, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine: FUSE mounts cannot be tested here"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing: install Debian's fuse3 (.ci/run does)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy cannot load libfuse 3 ({exc}): pip install -e '.[mount]'"
    return None


class Mount:
    """A running ``client.py mount`` of ``cluster``'s store on ``path`` (the code of the
    checkout ``root``: benchmarks/mount.py compares another)."""

    def __init__(
        self,
        cluster,
        path: str,
        *args: str,
        timeout: float = 5.0,
        client_args: tuple = (),
        root: str = ROOT,
    ):
        self.cluster = cluster
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.log_path = f"{path}.log"
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, os.path.join(root, "client.py"), "--broker", cluster.frontend]
        cmd += [*client_args, "--timeout", str(timeout), "mount", path]
        cmd += ["--spool", f"{path}.spool", *args]
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(
            lambda: os.path.ismount(path) or self.proc.poll() is not None,
            MOUNT_TIMEOUT,
            f"the mount on {path}",
        )
        assert os.path.ismount(path), f"the mount did not come up:\n{self.log()}"

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def unmount(self, how: str = "fusermount") -> int:
        """Unmount (``fusermount -u``, or ``sigint`` as Ctrl-C does) and wait for the process:
        its exit status."""
        if self.proc.poll() is None:
            if how == "sigint":
                self.proc.send_signal(signal.SIGINT)
            else:
                subprocess.run(["fusermount3", "-u", self.path], capture_output=True)
            try:
                self.proc.wait(MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-uz", self.path], capture_output=True)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def make_mount(tmp_path, request):
    """A factory of mounts ``make_mount(cluster, *options)``; every one is unmounted at the end,
    even on failure (its log printed then)."""
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    mounts = []

    def make(cluster, *args, name=None, timeout=5.0, client_args=()):
        path = str(tmp_path / (name or f"mnt{len(mounts)}"))
        mount = Mount(cluster, path, *args, timeout=timeout, client_args=client_args)
        mounts.append(mount)
        return mount

    yield make
    failed = getattr(request.node, "rep_call", None)
    for mount in mounts:
        mount.unmount()
        if failed is not None and failed.failed:
            print(f"--- mount {mount.path} ---\n{mount.log()[-4000:]}")
