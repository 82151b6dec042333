"""Shared fixtures: real fms processes on random loopback ports, always cleaned up."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import zmq

import fms

# Real PostgreSQL and S3 (SeaweedFS) servers, and network namespaces as hosts, started on first
# use: tests/servers.py, tests/netns.py.
pytest_plugins = ["servers", "netns"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 15.0    # seconds for a process to come up / a worker to register
STOP_TIMEOUT = 8.0      # seconds for a process to exit after SIGTERM before it is killed
CLI_TIMEOUT = 60.0      # seconds any one CLI command may take in a test


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns a truthy value; fail the test with ``what`` if not."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


SCRIPTS = {"broker": "broker.py", "storage": "storage_worker.py", "cache": "cache_worker.py"}


class Proc:
    """A running fms process, started from its top-level script as a user would, logging to a
    file."""

    def __init__(self, name: str, kind: str, args: list, log_path: str):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPTS[kind]), *args],
                                      cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def kill(self):
        self.stop(signal.SIGKILL)


class Cluster:
    """Broker, cache and storage workers as separate processes on random loopback ports."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs = []
        self.frontend = None
        self.backend = None
        self.storage_dir = str(tmp_path / "storage")
        self.cache_dir = str(tmp_path / "cache")
        self._clients = []
        self._seq = 0

    def _spawn(self, name: str, args: list) -> Proc:
        self._seq += 1
        proc = Proc(name, args[0], args[1:], str(self.tmp / f"{self._seq:02d}-{name}.log"))
        self.procs.append(proc)
        return proc

    def start_broker(self, frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*",
                     extra=()) -> Proc:
        proc = self._spawn("broker", ["broker", "--frontend", frontend, "--backend", backend,
                                      *extra])
        pattern = re.compile(r"event=listening frontend=(\S+) backend=(\S+)")
        match = wait_for(lambda: pattern.search(proc.log()) or (not proc.alive() and proc.log()),
                         START_TIMEOUT, "the broker to listen")
        assert isinstance(match, re.Match), f"broker failed to start:\n{proc.log()}"
        self.frontend, self.backend = match.group(1), match.group(2)
        return proc

    def start_storage(self, data=None, wid=None, extra=()) -> Proc:
        wid = wid or f"storage-{self._seq + 1}"
        return self._spawn(wid, ["storage", "--broker", self.backend, "--data",
                                 data or self.storage_dir, "--id", wid, *extra])

    def start_cache(self, max_bytes="64M", directory=None) -> Proc:
        return self.start_cache_with([], max_bytes, directory)

    def start_cache_with(self, extra, max_bytes="64M", directory=None) -> Proc:
        return self._spawn("cache", ["cache", "--broker", self.backend, "--dir",
                                     directory or self.cache_dir, "--max-bytes", max_bytes,
                                     "--id", "cache-1", *extra])

    def workers(self, service=None) -> list:
        with self.client(timeout=2.0) as c:
            found = c.status()["workers"]
        return [w for w in found if service is None or w["service"] == service]

    def wait_workers(self, storage: int, cache: int):
        def ready():
            found = self.workers()
            return (sum(w["service"] == "storage" for w in found) == storage
                    and sum(w["service"] == "cache" for w in found) == cache)
        wait_for(ready, START_TIMEOUT, f"{storage} storage and {cache} cache workers")

    def served(self) -> dict:
        """Requests the broker has dispatched, per worker id."""
        return {w["id"]: w["served"] for w in self.workers()}

    def client(self, **kwargs) -> fms.Client:
        kwargs.setdefault("timeout", 5.0)
        client = fms.Client(self.frontend, ctx=zmq.Context.instance(), **kwargs)
        self._clients.append(client)
        return client

    def cli(self, *args, stdin=None, timeout=CLI_TIMEOUT, cwd=None, broker=True):
        """Run ``client.py`` as a user would; returns the CompletedProcess (bytes output)."""
        cmd = [sys.executable, os.path.join(ROOT, "client.py")]
        if broker:
            cmd += ["--broker", self.frontend]
        return subprocess.run(cmd + list(args), input=stdin, capture_output=True,
                              timeout=timeout, cwd=cwd or str(self.tmp))

    def stop(self):
        for client in self._clients:
            client.close()
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-4000:]}" for p in self.procs)


@pytest.fixture
def make_cluster(tmp_path, request):
    """A factory of empty clusters; every process is stopped at the end, even on failure."""
    clusters = []

    def make():
        cluster = Cluster(tmp_path)
        clusters.append(cluster)
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None)
    for cluster in clusters:
        if failed is not None and failed.failed:
            print(cluster.logs())
        cluster.stop()


@pytest.fixture
def cluster(make_cluster):
    """Broker, one cache worker and two storage workers sharing one store."""
    c = make_cluster()
    c.start_broker()
    c.start_cache()
    c.start_storage(wid="storage-a")
    c.start_storage(wid="storage-b")
    c.wait_workers(storage=2, cache=1)
    return c


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def random_bytes(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (fast: no per-byte Python loop)."""
    import random
    return random.Random(seed).randbytes(n)

