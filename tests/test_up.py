"""`fms up`: the README's one-command cluster, and that Ctrl-C leaves nothing running."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, wait_for

import fms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("caches", [1, 2])
def test_up_serves_and_ctrl_c_stops_every_process(tmp_path, caches):
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    log = open(tmp_path / "up.log", "wb")
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
            "--caches",
            str(caches),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    kids = []
    try:

        def ready():
            try:
                with fms.Client(frontend, timeout=2.0) as c:
                    workers = c.status()["workers"]
            except fms.FmsError:
                return False
            return sorted(w["service"] for w in workers) == ["cache"] * caches + ["storage"] * 2

        wait_for(ready, 20, f"fms up to start broker, {caches} cache and two storage workers")
        kids = children_of(up.pid)
        assert len(kids) == 3 + caches
        with fms.Client(frontend) as c:
            c.put_bytes(b"hello from up", "greeting")
            assert c.get_bytes("greeting") == b"hello from up"
        assert os.path.isdir(tmp_path / "data" / "storage" / "chunks")

        start = time.monotonic()
        up.send_signal(signal.SIGINT)
        up.wait(15)
        assert time.monotonic() - start < 10
        assert up.returncode == 0
        assert not [pid for pid in kids if alive(pid)]
    finally:
        for pid in [up.pid, *kids]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        up.wait(5)
        log.close()
