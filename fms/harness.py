"""A local cluster of real fms processes for the soak and the benchmark (not for production:
use `fms up` or start the processes yourself)."""

import os
import re
import signal
import subprocess
import sys
import time

from .client import Client
from .errors import FmsError
from .security import CurveClient, cluster_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 20.0   # seconds for the cluster to come up


def peak_rss(pid: int) -> int:
    """VmHWM: a running process's peak resident set size, in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


class LocalCluster:
    """Broker, cache and storage workers from the top-level scripts, on random loopback ports."""

    def __init__(self, folder: str, curve: bool = False, cache_bytes: str = "256M"):
        """:param curve: make keys in ``folder/keys`` and require CURVE everywhere."""
        self.folder = folder
        self.procs = {}
        self.frontend = self.backend = None
        self.cache_bytes = cache_bytes
        self.server_args, self.worker_args, self.client_keys = [], [], None
        if curve:
            self._make_keys()

    def _make_keys(self):
        self.server_args, self.worker_args, (secret, broker_key) = cluster_keys(
            os.path.join(self.folder, "keys"))
        self.client_keys = CurveClient(secret, broker_key)

    def client(self, **kwargs) -> Client:
        return Client(self.frontend, curve=self.client_keys, **kwargs)

    def start(self, name: str, script: str, *args):
        log = open(os.path.join(self.folder, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args],
                                            stdout=log, stderr=log)
        log.close()

    def log(self, name: str) -> str:
        with open(os.path.join(self.folder, f"{name}.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def start_all(self, storage: int = 2):
        self.start("broker", "broker.py", "--frontend", "tcp://127.0.0.1:*",
                   "--backend", "tcp://127.0.0.1:*", *self.server_args)
        deadline = time.monotonic() + START_TIMEOUT
        while not (m := re.search(r"frontend=(\S+) backend=(\S+)", self.log("broker"))):
            if time.monotonic() > deadline or self.procs["broker"].poll() is not None:
                raise RuntimeError(f"the broker did not start:\n{self.log('broker')}")
            time.sleep(0.05)
        self.frontend, self.backend = m.groups()
        self.start("cache", "cache_worker.py", "--broker", self.backend, "--dir",
                   os.path.join(self.folder, "cache"), "--max-bytes", self.cache_bytes,
                   "--id", "cache", *self.worker_args)
        for i in range(1, storage + 1):
            self.start_storage(i)
        self.wait_workers(storage)

    def start_storage(self, i: int):
        self.start(f"storage-{i}", "storage_worker.py", "--broker", self.backend, "--data",
                   os.path.join(self.folder, "storage"), "--id", f"storage-{i}",
                   *self.worker_args)

    def wait_workers(self, storage: int):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with self.client(timeout=2.0) as c:
                    services = [w["service"] for w in c.status()["workers"]]
                if services.count("storage") == storage and "cache" in services:
                    return
            except FmsError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the workers did not register in time")

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
