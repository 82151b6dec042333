"""Storage workers on separate hosts: each in its own network namespace with its own address and
its own empty --data, no shared filesystem, all on one PostgreSQL and one S3 store.

The broker's worker port is bound on the host bridge's address (not loopback), so CURVE is on.
"""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, random_bytes, wait_for

import fms
from fms.security import CurveClient, cluster_keys

MiB = 1024 * 1024


class Hosts:
    """A broker and a cache on this host, storage workers in namespaces."""

    def __init__(self, make_cluster, make_netns, tmp_path, pg_url, s3, bucket):
        self.tmp = tmp_path
        self.nets = make_netns(3)
        self.server, self.worker_args, (secret, broker_key) = cluster_keys(str(tmp_path / "keys"))
        self.client_args = ["--curve-secret", secret, "--server-key", broker_key]
        self.curve = CurveClient(secret, broker_key)
        self.env = {**os.environ, **s3.env()}
        self.backends = ["--meta", pg_url, "--chunks", f"s3://{bucket}/fms"]
        self.workers = {}
        # As the README says: the broker serves the store storage prints, never the first
        # worker's (its backend is reachable from the namespaces, so it requires --store).
        printed = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "storage_worker.py"),
                "--data",
                str(tmp_path / "scratch"),
                *self.backends,
                "--print-store-id",
            ],
            capture_output=True,
            env=self.env,
            timeout=60,
        )
        assert printed.returncode == 0, printed.stderr
        self.store = printed.stdout.decode().strip()
        self.cluster = make_cluster()
        self.cluster.start_broker(
            frontend="tcp://127.0.0.1:*",
            backend=f"tcp://{self.nets.host_address}:*",
            extra=[*self.server, "--store", self.store],
        )
        self.cluster.start_cache_with(self.worker_args)

    def start_worker(self, i: int, delay: float = 0.0):
        """Storage worker ``host-i``; with ``delay``, tests/slow_storage.py."""
        script = (
            [os.path.join(ROOT, "tests", "slow_storage.py"), str(delay)]
            if delay
            else [os.path.join(ROOT, "storage_worker.py")]
        )
        log = open(self.tmp / f"host{i}.log", "ab")
        self.workers[i] = self.nets.popen(
            i,
            [
                sys.executable,
                *script,
                "--broker",
                self.cluster.backend,
                "--data",
                str(self.tmp / f"host{i}-scratch"),
                "--id",
                f"host-{i}",
                *self.backends,
                *self.worker_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()

    def client(self, **kw) -> fms.Client:
        return fms.Client(self.cluster.frontend, curve=self.curve, **kw)

    def storage_ids(self) -> set:
        with self.client(timeout=2.0) as c:
            return {w["id"] for w in c.status()["workers"] if w["service"] == "storage"}

    def wait_for_workers(self, ids):
        wait_for(lambda: self.storage_ids() == set(ids), 30, f"storage workers {sorted(ids)}")

    def cli(self, *args):
        return subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "client.py"),
                "--broker",
                self.cluster.frontend,
                *self.client_args,
                *args,
            ],
            capture_output=True,
            timeout=120,
        )

    def logs(self) -> str:
        out = [self.cluster.logs()]
        for i in self.workers:
            with open(self.tmp / f"host{i}.log", "rb") as f:
                out.append(f"--- host {i} ---\n{f.read().decode('utf-8', 'replace')[-3000:]}")
        return "\n".join(out)


@pytest.fixture
def hosts(make_cluster, make_netns, tmp_path, pg_database_url, s3, s3_bucket):
    return Hosts(make_cluster, make_netns, tmp_path, pg_database_url, s3, s3_bucket)


def test_workers_on_three_hosts_serve_one_store(hosts, tmp_path):
    files = {f"h/{i}": random_bytes(1000 + i * 700_000, i) for i in range(6)}
    hosts.start_worker(0)
    hosts.wait_for_workers({"host-0"})
    with hosts.client() as c:  # written through host 0 alone
        for name, data in files.items():
            c.put_bytes(data, name)
    hosts.start_worker(1)
    hosts.start_worker(2)  # started later, on an empty directory
    hosts.wait_for_workers({"host-0", "host-1", "host-2"})
    hosts.workers[0].kill()
    hosts.wait_for_workers({"host-1", "host-2"})
    with hosts.client() as c:  # read through the other two
        for name, data in files.items():
            assert c.get_bytes(name) == data, hosts.logs()
    for i in (0, 1, 2):  # nothing of the store on any host's disk
        scratch = tmp_path / f"host{i}-scratch"
        assert [f for _r, _d, fs in os.walk(scratch) for f in fs] == []


def test_kill_of_a_host_mid_upload_costs_a_retry_and_gc_and_fsck_span_hosts(hosts, tmp_path):
    for i in range(3):
        hosts.start_worker(i, delay=0.01)
    hosts.wait_for_workers({"host-0", "host-1", "host-2"})
    src = tmp_path / "src"
    src.write_bytes(random_bytes(20 * MiB, 9))
    upload = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "client.py"),
            "--broker",
            hosts.cluster.frontend,
            *hosts.client_args,
            "put",
            str(src),
            "f",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def served_by_host1():
            with hosts.client(timeout=2.0) as c:
                return any(w["id"] == "host-1" and w["served"] > 2 for w in c.status()["workers"])

        wait_for(served_by_host1, 30, "the upload to reach host 1")
        hosts.workers[1].kill()
        _out, err = upload.communicate(timeout=120)
    finally:
        upload.kill()
    assert upload.returncode == 0, err + hosts.logs().encode()
    got = hosts.cli("get", "f", "-")
    assert got.returncode == 0 and got.stdout == src.read_bytes()
    with hosts.client() as c:
        c.put_bytes(random_bytes(3 * MiB, 10), "f")  # the 20 MiB version is garbage
    gc_out = hosts.cli("gc", "--grace", "0")
    assert gc_out.returncode == 0 and b"freed 20 chunks" in gc_out.stdout, gc_out
    fsck = hosts.cli("fsck")
    assert fsck.returncode == 0 and b"fsck: 1 file," in fsck.stdout, fsck
