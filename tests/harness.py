"""A local cluster of real fms processes on random loopback ports: the one helper the tests
(through the fixtures in conftest.py) and the benchmarks, soak and floods (benchmarks/) start
clusters with.  Not for production: use `fms up` or start the processes yourself."""

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

import fms
from fms.security import CurveClient, cluster_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 15.0  # seconds for a process to come up / a worker to register
STOP_TIMEOUT = 8.0  # seconds for a process to exit after SIGTERM before it is killed
CLI_TIMEOUT = 60.0  # seconds any one CLI command may take in a test

SCRIPTS = {
    "broker": "broker.py",
    "storage": "storage_worker.py",
    "cache": "cache_worker.py",
    "slow_storage": os.path.join("tests", "slow_storage.py"),
}


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` if not."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def peak_rss(pid: int) -> int:
    """VmHWM: a running process's peak resident set size, in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


class Proc:
    """A running fms process, started from its top-level script as a user would, logging to a
    file."""

    def __init__(self, name: str, kind: str, args: list, log_path: str):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # A command of the fms script with no script of its own (the S3 gateway) runs as
        # `python -m fms COMMAND`.
        script = [os.path.join(ROOT, SCRIPTS[kind])] if kind in SCRIPTS else ["-m", "fms", kind]
        self.popen = subprocess.Popen(
            [sys.executable, *script, *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM):
        stop_all([self], sig)

    def kill(self):
        self.stop(signal.SIGKILL)


def stop_all(procs, sig=signal.SIGTERM):
    """Stop ``procs`` together: signal every one, then wait for all (killing those still up
    after STOP_TIMEOUT), so stopping N processes takes as long as the slowest, not the sum."""
    for proc in procs:
        if proc.alive():
            proc.popen.send_signal(sig)
    _wait_stopped(procs)


_reapers: list = []  # threads waiting for clusters stopped in the background


def stop_in_background(procs, sig=signal.SIGTERM):
    """Signal ``procs`` now and wait for their exit on a thread, as :func:`stop_all` does: a
    test's teardown then need not wait out the processes' shutdown (about 0.3 s a cluster).
    Every one is waited for, killed if need be, before the test process exits."""
    for proc in procs:
        if proc.alive():
            proc.popen.send_signal(sig)
    reaper = threading.Thread(target=_wait_stopped, args=(procs,), daemon=True)
    reaper.start()
    _reapers.append(reaper)


@atexit.register
def _join_reapers():
    while _reapers:
        _reapers.pop().join()


def _wait_stopped(procs):
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
        proc._log.close()


class Cluster:
    """Broker, cache and storage workers as separate processes on random loopback ports, logging
    into ``folder``.

    :param curve: make keys in ``folder/keys`` and require CURVE everywhere.
    :param digest_fn: the digest function of the store its storage workers make (None: a new
        store's default).
    """

    def __init__(self, folder, curve: bool = False, digest_fn: str | None = None):
        self.tmp = Path(folder)
        self.digest_fn = digest_fn
        self.procs = []
        self.frontend = None
        self.backend = None
        self.storage_dir = str(self.tmp / "storage")
        self.cache_dir = str(self.tmp / "cache")
        self._clients = []
        self._seq = 0
        self.server_args, self.worker_args, self.client_keys = [], [], None
        if curve:
            self.server_args, self.worker_args, (secret, broker_key) = cluster_keys(
                str(self.tmp / "keys")
            )
            self.client_keys = CurveClient(secret, broker_key)

    def _spawn(self, name: str, args: list) -> Proc:
        self._seq += 1
        proc = Proc(name, args[0], args[1:], str(self.tmp / f"{self._seq:02d}-{name}.log"))
        self.procs.append(proc)
        return proc

    def proc(self, name: str) -> Proc:
        """The process last started under ``name``."""
        return [p for p in self.procs if p.name == name][-1]

    def start_all(self, storage: int = 2, cache_bytes: str = "256M", cache_args=()):
        """A broker, a cache worker (``cache``, with ``cache_args``) and ``storage`` workers
        (``storage-1`` ...) sharing one store; returns once all have registered."""
        self.start_broker()
        self.start_cache_with(list(cache_args), max_bytes=cache_bytes)
        for i in range(1, storage + 1):
            self.start_storage(wid=f"storage-{i}")
        self.wait_workers(storage=storage, cache=1)

    def start_broker(
        self, frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", extra=(), kind="broker"
    ) -> Proc:
        """The broker (``kind``: its entry in SCRIPTS; benchmarks/brokers.py adds others)."""
        proc = self._spawn(
            "broker",
            [kind, "--frontend", frontend, "--backend", backend, *self.server_args, *extra],
        )
        pattern = re.compile(r"event=listening frontend=(\S+) backend=(\S+)")
        match = wait_for(
            lambda: pattern.search(proc.log()) or (not proc.alive() and proc.log()),
            START_TIMEOUT,
            "the broker to listen",
        )
        assert isinstance(match, re.Match), f"broker failed to start:\n{proc.log()}"
        self.frontend, self.backend = match.group(1), match.group(2)
        return proc

    def start_storage(
        self, data=None, wid=None, extra=(), delay: float = 0.0, reply_delay: float = 0.0
    ) -> Proc:
        """A storage worker; with ``delay``, one that waits that long before each request
        (tests/slow_storage.py), so that a test can kill it in the middle of work; with
        ``reply_delay``, before each reply that changed names (its ack comes late)."""
        wid = wid or f"storage-{self._seq + 1}"
        slow = delay or reply_delay
        kind = ["slow_storage", f"{delay}:{reply_delay}"] if slow else ["storage"]
        return self._spawn(
            wid,
            [
                *kind,
                "--broker",
                self.backend,
                "--data",
                data or self.storage_dir,
                "--id",
                wid,
                *(["--digest", self.digest_fn] if self.digest_fn else []),
                *self.worker_args,
                *extra,
            ],
        )

    def start_cache(self, max_bytes="64M", directory=None, wid="cache-1") -> Proc:
        return self.start_cache_with([], max_bytes, directory, wid)

    def start_cache_with(self, extra, max_bytes="64M", directory=None, wid="cache-1") -> Proc:
        """A cache worker; another ``wid`` gets a directory of its own by default."""
        if directory is None:
            directory = self.cache_dir if wid == "cache-1" else str(self.tmp / wid)
        return self._spawn(
            "cache",
            [
                "cache",
                "--broker",
                self.backend,
                "--dir",
                directory,
                "--max-bytes",
                max_bytes,
                "--id",
                wid,
                *self.worker_args,
                *extra,
            ],
        )

    def workers(self, service=None) -> list:
        with self.client(timeout=2.0) as c:
            found = c.status()["workers"]
        return [w for w in found if service is None or w["service"] == service]

    def wait_workers(self, storage: int, cache: int):
        def ready():
            found = self.workers()
            return (
                sum(w["service"] == "storage" for w in found) == storage
                and sum(w["service"] == "cache" for w in found) == cache
            )

        wait_for(ready, START_TIMEOUT, f"{storage} storage and {cache} cache workers")

    def served(self) -> dict:
        """Requests the broker has dispatched, per worker id."""
        return {w["id"]: w["served"] for w in self.workers()}

    def peak_rss(self) -> dict:
        """Each running process's peak RSS in bytes, by name."""
        return {p.name: peak_rss(p.pid) for p in self.procs if p.alive()}

    def client(self, **kwargs) -> fms.Client:
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("curve", self.client_keys)
        client = fms.Client(self.frontend, ctx=zmq.Context.instance(), **kwargs)
        self._clients.append(client)
        return client

    def cli(self, *args, stdin=None, timeout=CLI_TIMEOUT, cwd=None, broker=True):
        """Run ``client.py`` as a user would; returns the CompletedProcess (bytes output)."""
        cmd = [sys.executable, os.path.join(ROOT, "client.py")]
        if broker:
            cmd += ["--broker", self.frontend]
        return subprocess.run(
            cmd + list(args),
            input=stdin,
            capture_output=True,
            timeout=timeout,
            cwd=cwd or str(self.tmp),
        )

    def stop(self, wait: bool = True):
        """Stop every process; with ``wait`` false, return once they are signalled
        (:func:`stop_in_background`), for a teardown that nothing after it depends on."""
        for client in self._clients:
            client.close()
        (stop_all if wait else stop_in_background)(self.procs)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-4000:]}" for p in self.procs)


def cli_with_rss(cluster, *args, timeout: float = 300) -> tuple:
    """Run the CLI against ``cluster``: ``(completed process, its peak RSS in bytes)``.  Its
    arguments are passed to ``fms.cli.main``, which then returns (a read-only command run with
    the process's own arguments ends the process at once, without this ``finally``)."""
    code = (
        "import sys\n"
        "from fms.cli import main\n"
        "try:\n"
        f"    status = main(['--broker', {cluster.frontend!r}, *{list(args)!r}])\n"
        "finally:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "    sys.stderr.write('\\nPEAK ' + hwm.split()[1] + '\\n')\n"
        "sys.exit(status)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=timeout, cwd=ROOT
    )
    err = run.stderr.decode()
    return run, int(err.rsplit("PEAK ", 1)[1].split()[0]) * 1024
