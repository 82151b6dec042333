"""CURVE encryption and the allowlist, with real processes."""

import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest
from conftest import ROOT, wait_for
from test_up import free_port

import fms
from fms.security import (
    ALLOW_RELOAD,
    AllowList,
    SecurityError,
    exposure,
    is_loopback,
    keygen,
    load_secret,
)

# --- key files ---


def test_keygen_writes_a_private_secret_and_a_public_key(tmp_path):
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "client.py"), "keygen", str(tmp_path), "alice"],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    secret = tmp_path / "alice.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    public, secret_key = load_secret(str(secret))
    assert len(public) == 40 and len(secret_key) == 40  # z85 of 32-byte keys
    assert b"secret" not in (tmp_path / "alice.key").read_bytes().lower().split(b"#")[-1]
    again = subprocess.run(
        [sys.executable, os.path.join(ROOT, "client.py"), "keygen", str(tmp_path), "alice"],
        capture_output=True,
        timeout=30,
    )
    assert again.returncode == 1 and b"exists already" in again.stderr  # never overwritten


def test_a_secret_key_readable_by_others_is_refused_as_ssh_does(tmp_path):
    _, secret = keygen(str(tmp_path), "k")
    os.chmod(secret, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_secret(secret)


def test_allowlist_follows_its_folder(tmp_path):
    public, _ = keygen(str(tmp_path / "keys"), "a")
    allow = tmp_path / "allow"
    allow.mkdir()
    keys = AllowList(str(allow))
    key = fms.security.load_public(public)
    assert key not in keys
    shutil.copy(public, allow / "a.key")
    wait_for(lambda: key in keys, ALLOW_RELOAD * 3, "the new key to be seen")
    (allow / "a.key").unlink()
    wait_for(lambda: key not in keys, ALLOW_RELOAD * 3, "the removed key to be gone")


@pytest.mark.parametrize(
    "endpoint,local",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://localhost:1", True),
        ("tcp://[::1]:5555", True),
        ("tcp://::1:5555", True),
        ("ipc:///tmp/fms.sock", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.5:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://[::]:5555", False),
    ],
)
def test_which_endpoints_count_as_loopback(endpoint, local):
    assert is_loopback(endpoint) is local


def fake_resolver(table: dict):
    """A getaddrinfo that knows only ``table`` (host -> addresses) and fails for the rest."""

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (a, 0),
            )
            for a in table[host]
        ]

    return getaddrinfo


@pytest.mark.parametrize("host", ["localhost.example.com", "127.x.net"])
def test_a_name_counts_as_loopback_by_where_it_resolves_not_how_it_is_spelt(host, monkeypatch):
    endpoint = f"tcp://{host}:5555"
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({}))
    assert not is_loopback(endpoint)
    assert f"{host!r} that does not resolve" in exposure(endpoint)
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({host: ["203.0.113.7"]}))
    assert not is_loopback(endpoint) and "203.0.113.7" in exposure(endpoint)
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({host: ["127.0.0.1", "10.1.2.3"]}))
    assert not is_loopback(endpoint)  # every address must be loopback
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver({host: ["127.0.0.1", "::1"]}))
    assert is_loopback(endpoint)  # the same name, pointing home


@pytest.mark.parametrize("host", ["localhost.example.com", "127.x.net"])
def test_broker_refuses_a_name_that_only_looks_local_and_says_why(host):
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "broker.py"),
            "--frontend",
            f"tcp://{host}:{free_port()}",
            "--backend",
            "tcp://127.0.0.1:*",
        ],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 1, run.stderr
    assert f"refusing to bind tcp://{host}".encode() in run.stderr
    assert b"Traceback" not in run.stderr


def test_broker_refuses_a_public_bind_without_curve_and_says_why(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "broker.py"),
            "--frontend",
            f"tcp://0.0.0.0:{free_port()}",
            "--backend",
            "tcp://127.0.0.1:*",
        ],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 1
    assert b"refusing to bind tcp://0.0.0.0" in run.stderr and b"--curve-secret" in run.stderr


# --- a CURVE cluster ---


@pytest.fixture
def secure(make_cluster, tmp_path):
    """A cluster that requires CURVE; alice may connect, mallory may not."""
    keys, allow, allow_workers = tmp_path / "keys", tmp_path / "allow", tmp_path / "allow-w"
    allow.mkdir()
    allow_workers.mkdir()
    for name in ("broker", "worker", "alice", "mallory"):
        keygen(str(keys), name)
    shutil.copy(keys / "worker.key", allow_workers / "worker.key")
    shutil.copy(keys / "alice.key", allow / "alice.key")
    cluster = make_cluster()
    cluster.start_broker(
        extra=[
            "--curve-secret",
            str(keys / "broker.key_secret"),
            "--allow",
            str(allow),
            "--allow-workers",
            str(allow_workers),
        ]
    )
    worker_keys = [
        "--curve-secret",
        str(keys / "worker.key_secret"),
        "--server-key",
        str(keys / "broker.key"),
    ]
    cache = cluster.start_cache_with(worker_keys)
    storage = cluster.start_storage(wid="storage-a", extra=worker_keys)
    cluster.keys, cluster.allow, cluster.worker_keys = keys, allow, worker_keys
    cluster.allow_workers = allow_workers
    cluster.as_user = lambda name: [
        "--curve-secret",
        str(keys / f"{name}.key_secret"),
        "--server-key",
        str(keys / "broker.key"),
    ]
    cluster.user = lambda name, **kw: fms.Client(
        cluster.frontend,
        curve=fms.security.CurveClient(str(keys / f"{name}.key_secret"), str(keys / "broker.key")),
        **kw,
    )
    wait_for(lambda: _workers(cluster) == ["cache", "storage"], 15, "the workers to register")
    assert cache.alive() and storage.alive()
    return cluster


def _workers(cluster) -> list:
    with cluster.user("alice", timeout=2.0) as c:
        return sorted(w["service"] for w in c.status()["workers"])


def test_an_allowed_client_works_over_curve(secure, tmp_path):
    (tmp_path / "f").write_bytes(b"secret plans")
    assert secure.cli(*secure.as_user("alice"), "put", str(tmp_path / "f"), "f").returncode == 0
    got = secure.cli(*secure.as_user("alice"), "get", "f", "-")
    assert got.returncode == 0 and got.stdout == b"secret plans"


def test_unlisted_and_plaintext_clients_get_a_clear_error_not_a_hang(secure):
    for args, words in (
        (secure.as_user("mallory"), b"refused this client's key"),
        ((), b"requires encryption"),
    ):
        # 10 minutes a try: a hang would outlast the harness's 30 s limit on the command.
        run = secure.cli(*args, "--timeout", "600", "ls", timeout=30)
        assert run.returncode == 1 and words in run.stderr, run.stderr


def test_an_unlisted_worker_never_gets_a_request(secure):
    stray = secure.start_storage(
        wid="stray",
        extra=[
            "--curve-secret",
            str(secure.keys / "mallory.key_secret"),
            "--server-key",
            str(secure.keys / "broker.key"),
            "--log-level",
            "DEBUG",
        ],
    )  # commits logged
    wait_for(lambda: "event=not_registered" in stray.log(), 15, "the stray to say it is not in")
    with secure.user("alice") as c:
        for i in range(10):
            c.put_bytes(b"x%d" % i, f"x{i}")
        assert [w["id"] for w in c.status()["workers"] if w["service"] == "storage"] == [
            "storage-a"
        ]
    assert "event=commit" not in stray.log()


def test_removing_a_key_shuts_it_out_without_a_restart(secure):
    with secure.user("alice") as c:
        c.put_bytes(b"before", "k")
        (secure.allow / "alice.key").unlink()
        # the open connection is refused from the next request on...
        wait_for(lambda: _refused(c), ALLOW_RELOAD * 5, "alice's open connection to be refused")
    # ...and a new connection fails its handshake
    run = secure.cli(*secure.as_user("alice"), "ls", timeout=30)
    assert run.returncode == 1 and b"refused this client's key" in run.stderr
    shutil.copy(secure.keys / "alice.key", secure.allow / "alice.key")
    wait_for(
        lambda: secure.cli(*secure.as_user("alice"), "ls").returncode == 0,
        ALLOW_RELOAD * 5,
        "alice to be let back in",
    )
    # a removed worker key drops the worker: it is refused and stops
    (secure.allow_workers / "worker.key").unlink()
    storage = next(proc for proc in secure.procs if proc.name == "storage-a")
    wait_for(lambda: not storage.alive(), 15, "the shut-out worker to stop")
    assert "refused by the broker" in storage.log()


def test_a_client_key_on_the_backend_is_refused_and_logged_once(secure):
    """alice may connect as a client; as a worker she is refused, and the broker says so once
    although her worker retries every second."""
    fake = secure.start_storage(
        wid="alice-as-worker", extra=[*secure.as_user("alice"), "--log-level", "DEBUG"]
    )
    wait_for(lambda: "event=not_registered" in fake.log(), 15, "the fake worker to give up")
    alice = fms.security.load_public(str(secure.keys / "alice.key")).decode()
    broker = secure.procs[0].log()
    assert broker.count(f"key={alice}") == 1, broker
    assert "side=backend" in broker
    with secure.user("alice") as c:
        assert [w["id"] for w in c.status()["workers"]] == ["cache-1", "storage-a"]
        c.put_bytes(b"real", "r")
        assert c.get_bytes("r") == b"real"
    assert "event=commit" not in fake.log()


def test_broker_needs_a_separate_allow_workers_folder(tmp_path):
    _, secret = keygen(str(tmp_path / "keys"), "broker")
    (tmp_path / "allow").mkdir()
    base = [
        sys.executable,
        os.path.join(ROOT, "broker.py"),
        "--frontend",
        "tcp://127.0.0.1:*",
        "--backend",
        "tcp://127.0.0.1:*",
        "--curve-secret",
        secret,
        "--allow",
        str(tmp_path / "allow"),
    ]
    run = subprocess.run(base, capture_output=True, timeout=30)
    assert run.returncode == 1 and b"--allow-workers" in run.stderr
    run = subprocess.run(
        base + ["--allow-workers", str(tmp_path / "allow")], capture_output=True, timeout=30
    )
    assert run.returncode == 1 and b"must be different folders" in run.stderr


def _refused(client) -> bool:
    try:
        client.get_bytes("k")
    except fms.Refused:
        return True
    return False


def test_fms_up_makes_and_uses_its_own_keys(tmp_path):
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fms",
            "up",
            "--curve",
            "--frontend",
            frontend,
            "--backend",
            backend,
            "--data",
            str(tmp_path / "data"),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    keys = tmp_path / "data" / "keys"
    admin_key = tmp_path / "data" / "storage" / "admin.key_secret"  # the store's first admin
    try:

        def client():
            return fms.Client(
                frontend,
                timeout=2.0,
                curve=fms.security.CurveClient(str(admin_key), str(keys / "broker.key")),
            )

        def ready():
            try:
                with client() as c:
                    return len(c.status()["workers"]) == 3
            except fms.FmsError:
                return False

        wait_for(ready, 20, "fms up --curve to start")
        with client() as c:
            c.put_bytes(b"hi", "hi")
            assert c.get_bytes("hi") == b"hi"
            assert c.whoami()["identity"] == "admin"
        assert stat.S_IMODE(os.stat(admin_key).st_mode) == 0o600
        assert os.listdir(keys / "allow-clients") == []  # clients are identities now
        assert os.listdir(keys / "allow-workers") == ["worker.key"]
        assert f"has the key {admin_key}" in (tmp_path / "up.log").read_text()
        with pytest.raises(fms.TransportError, match="requires encryption"):
            with fms.Client(frontend) as plain:
                plain.ls()
    finally:
        up.terminate()
        up.wait(15)
        log.close()


def test_broker_refuses_a_readable_secret_key_and_insecure_allows_a_public_bind(tmp_path):
    _, secret = keygen(str(tmp_path / "keys"), "broker")
    (tmp_path / "allow").mkdir()
    (tmp_path / "allow-w").mkdir()
    os.chmod(secret, 0o640)
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "broker.py"),
            "--frontend",
            "tcp://127.0.0.1:*",
            "--backend",
            "tcp://127.0.0.1:*",
            "--curve-secret",
            secret,
            "--allow",
            str(tmp_path / "allow"),
            "--allow-workers",
            str(tmp_path / "allow-w"),
        ],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 1 and b"chmod 600" in run.stderr
    port = free_port()
    log = open(tmp_path / "broker.log", "wb")
    broker = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "broker.py"),
            "--frontend",
            f"tcp://0.0.0.0:{port}",
            "--backend",
            "tcp://127.0.0.1:*",
            "--insecure",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        wait_for(
            lambda: b"event=listening" in (tmp_path / "broker.log").read_bytes(),
            15,
            "the broker to bind with --insecure",
        )
        with fms.Client(f"tcp://127.0.0.1:{port}", timeout=2.0) as c:  # traffic: loopback only
            assert c.status()["workers"] == []
    finally:
        broker.terminate()
        broker.wait(15)
        log.close()
