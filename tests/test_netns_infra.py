"""tests/netns.py works: a process inside a namespace reaches a server on the host's bridge
address, and the PostgreSQL and S3 fixtures are reachable from inside a namespace too."""

import os
import socket
import subprocess
import sys
import threading

pytest_plugins = ["servers"]


class EchoServer:
    """A tiny TCP echo server on (host, random port), in a thread."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.peers = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.peers.append(peer[0])
            with conn:
                conn.settimeout(5)
                data = conn.recv(1024)
                conn.sendall(b"echo:" + data)

    def close(self):
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


CLIENT = (
    "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), "
    "timeout=5); s.sendall(sys.argv[3].encode()); print(s.recv(1024).decode())"
)


def test_echo_from_namespaces(make_netns):
    nets = make_netns(2)
    assert len(set(nets.addresses)) == 2
    server = EchoServer(nets.host_address)
    try:
        for i in range(2):
            out = nets.run(
                i,
                [
                    sys.executable,
                    "-c",
                    CLIENT,
                    nets.host_address,
                    str(server.address[1]),
                    f"hello-{i}",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == f"echo:hello-{i}"
        # each connection came from the namespace's own address: they are separate hosts
        assert server.peers == nets.addresses
    finally:
        server.close()


def test_namespace_cannot_reach_host_loopback(make_netns):
    nets = make_netns(1)
    server = EchoServer("127.0.0.1")
    try:
        out = nets.run(
            0,
            [sys.executable, "-c", CLIENT, "127.0.0.1", str(server.address[1]), "x"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode != 0 and "Connection refused" in out.stderr
    finally:
        server.close()


def _netns_list() -> list:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def test_namespaces_are_removed(make_netns):
    nets = make_netns(1)
    name = nets.names[0]
    proc = nets.popen(0, ["sleep", "300"])
    assert name in _netns_list()
    nets.close()
    assert proc.poll() is not None
    assert name not in _netns_list()


def test_servers_reachable_from_namespace(make_netns, pg_database_url, s3, s3_bucket):
    nets = make_netns(1)
    code = (
        "import sys, psycopg, boto3\n"
        "with psycopg.connect(sys.argv[1], connect_timeout=5) as c:\n"
        "    assert c.execute('SELECT 1').fetchone() == (1,)\n"
        "boto3.client('s3').put_object(Bucket=sys.argv[2], Key='from-ns', Body=b'ns')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env())
    out = nets.run(
        0,
        [sys.executable, "-c", code, pg_database_url, s3_bucket],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.stdout.strip() == "ok", out.stderr
    assert s3.client().get_object(Bucket=s3_bucket, Key="from-ns")["Body"].read() == b"ns"
