"""`fms up`: the README's one-command cluster, and that Ctrl-C leaves nothing running."""

import os
import signal
import socket
import subprocess
import sys

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

        up.send_signal(signal.SIGINT)
        up.wait(15)  # raises if it has not stopped by then
        assert up.returncode == 0
        assert not [pid for pid in kids if alive(pid)]
    finally:
        for pid in [up.pid, *kids]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        up.wait(5)
        log.close()


def test_up_with_s3_serves_the_gateway_with_the_first_admins_s3_key(tmp_path):
    """``fms up --s3`` gives the store's first admin (identity ``admin``) an S3 key, shown in
    DATA/s3-admin.json: the gateway finds it in the store, as any user's."""
    pytest.importorskip("aiohttp")
    boto3 = pytest.importorskip("boto3")
    import json

    port = free_port()
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "fms", "up", "--frontend", frontend, "--backend", backend]
        + ["--data", str(tmp_path / "data"), "--cache-bytes", "64M", "--s3", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    kids = []
    try:
        keys = tmp_path / "data" / "s3-admin.json"
        wait_for(lambda: keys.exists() and keys.stat().st_size, 20, "the S3 key file")
        assert keys.stat().st_mode & 0o777 == 0o600
        key = json.loads(keys.read_text())
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id=key["access_key"],
            aws_secret_access_key=key["secret_key"],
            region_name="us-east-1",
        )

        def serves():
            try:
                s3.create_bucket(Bucket="from-up")
            except Exception:
                return False
            return True

        wait_for(serves, 30, "the gateway of fms up --s3")
        s3.put_object(Bucket="from-up", Key="k", Body=b"via up")
        with fms.Client(frontend) as c:  # the same store as fms itself
            assert c.get_bytes("from-up/k") == b"via up"
            admin = next(i for i in c.id_ls() if i["name"] == "admin")
            assert {"kind": "s3", "key": key["access_key"]} in admin["keys"]
            assert c.s3_key(key["access_key"])["identity"] == "admin"
        assert key["access_key"] in (tmp_path / "up.log").read_text()
        kids = children_of(up.pid)
        up.send_signal(signal.SIGINT)
        up.wait(15)
        assert up.returncode == 0
        assert not [pid for pid in kids if alive(pid)]
    finally:
        for pid in [up.pid, *kids]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        up.wait(5)
        log.close()
