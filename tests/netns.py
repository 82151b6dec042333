"""Network namespaces as separate "hosts" for the tests (``ip netns`` + veth + one bridge).

Load with ``pytest_plugins = ["netns"]`` (tests/servers.py loads it already).

Topology (root and ``ip`` required; otherwise the fixtures skip, saying why)::

    host (this machine's default namespace)
      bridge fmsbr<pid>   10.231.X.1/24      <- servers bind here as well as 127.0.0.1
        ├── veth fv<pid>-<n>  ──  eth0 in netns fms<pid>-<n>   10.231.X.10/24  (lo up)
        ├── veth ...          ──  eth0 in netns ...            10.231.X.11/24
        ...

Why a bridge: a process inside a namespace has its own loopback, so it cannot reach servers
bound to the host's 127.0.0.1. The bridge gives the host ONE private address (``host_address``)
that exists for the whole test session, before any namespace is made, so the session-scoped
servers (PostgreSQL, SeaweedFS S3; and the broker a test starts) can bind it at start-up and
every namespace of every test reaches them there. X is chosen so that 10.231.X.0/24 is used by
nothing else on the machine (concurrent runs on a shared machine each take their own X, under a
file lock). No default route, no forwarding, no NAT: namespaces reach only the bridge subnet,
i.e. the host's bridge address and each other. Everything is removed at the end, even on
failure; leftovers of a run that was killed (its pid is gone) are removed by the next run.

Fixtures
--------
``netns_bridge`` (session): a :class:`HostBridge` (``.host_address``, ``.subnet``, ``.name``)
    or None when namespaces are unavailable (not root, no ``ip``, or FMS_TEST_NETNS=0).
``make_netns`` (function): ``make_netns(n)`` -> :class:`Namespaces` with ``.names``,
    ``.addresses``, ``.host_address``, ``.argv(i, cmd)``, ``.popen(i, cmd, **kw)``,
    ``.run(i, cmd, **kw)``; skips with the reason when unavailable. Processes started with
    ``.popen`` and any process left inside the namespaces are killed at the end.
"""

import fcntl
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from fms.storage.chunks.localdir import pid_alive

SUBNET_BASE = "10.231"  # 10.231.X.0/24, X in 1..254
LOCK_PATH = "/tmp/fms-netns.lock"
IP_TIMEOUT = 15.0


def _ip(*args, check=True, timeout=IP_TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.environ.get("FMS_TEST_NETNS", "1") == "0":
        return "network namespaces disabled by FMS_TEST_NETNS=0"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip program (iproute2) is missing: apt-get install iproute2"
    return None


def _kill_netns_pids(ns: str):
    """SIGKILL every process still inside namespace ``ns`` (all were started by the tests)."""
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_stale():
    """Remove bridges and namespaces left by earlier runs whose process is gone."""
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.match(r"\d+: (fmsbr(\d+))[:@]", line)
        if m and not pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(r"(fms(\d+)-\d+)\b", line)
        if m and not pid_alive(int(m.group(2))):
            _kill_netns_pids(m.group(1))
            _ip("netns", "del", m.group(1), check=False)


class HostBridge:
    """The host side: bridge ``fmsbr<pid>`` with ``host_address`` in a free 10.231.X.0/24."""

    def __init__(self):
        self.name = f"fmsbr{os.getpid()}"
        self.network = None
        self._next_host = 10
        self._ns_seq = 0

    @property
    def subnet(self) -> str:
        return str(self.network)

    @property
    def host_address(self) -> str:
        return str(self.network.network_address + 1)

    def create(self):
        with open(LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                remove_stale()
                used = set()
                out = _ip("-o", "-4", "addr", "show").stdout
                for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", out):
                    net = ipaddress.ip_network(f"{m.group(1)}/{m.group(2)}", strict=False)
                    used.add(net)
                for x in range(1, 255):
                    cand = ipaddress.ip_network(f"{SUBNET_BASE}.{x}.0/24")
                    if not any(cand.overlaps(u) for u in used):
                        self.network = cand
                        break
                else:
                    raise RuntimeError(f"no free subnet in {SUBNET_BASE}.0.0/16")
                _ip("link", "add", self.name, "type", "bridge")
                try:
                    _ip("addr", "add", f"{self.host_address}/24", "dev", self.name)
                    _ip("link", "set", self.name, "up")
                except BaseException:
                    self.destroy()
                    raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self

    def destroy(self):
        _ip("link", "del", self.name, check=False)

    def allocate(self) -> tuple[str, str, str]:
        """A new (namespace name, host veth name, address) triple."""
        self._ns_seq += 1
        if self._next_host > 250:
            raise RuntimeError("too many namespaces in one session")
        addr = str(self.network.network_address + self._next_host)
        self._next_host += 1
        pid = os.getpid()
        return f"fms{pid}-{self._ns_seq}", f"fv{pid}-{self._ns_seq}", addr


class Namespaces:
    """N network namespaces on ``bridge``; a context manager that removes them on exit."""

    def __init__(self, bridge: HostBridge, n: int):
        self.bridge = bridge
        self.n = n
        self.names, self.veths, self.addresses = [], [], []
        self.procs = []

    @property
    def host_address(self) -> str:
        """The host's address as seen from inside the namespaces (servers bind it)."""
        return self.bridge.host_address

    def __enter__(self):
        try:
            for _ in range(self.n):
                ns, veth, addr = self.bridge.allocate()
                _ip("netns", "add", ns)
                self.names.append(ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self.veths.append(veth)
                _ip("link", "set", veth, "master", self.bridge.name)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.addresses.append(addr)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def argv(self, i: int, cmd) -> list:
        """``cmd`` (a list) wrapped to run inside namespace ``i``."""
        return ["ip", "netns", "exec", self.names[i], *cmd]

    def popen(self, i: int, cmd, **kw) -> subprocess.Popen:
        """Start ``cmd`` inside namespace ``i``; it is killed at the end if still running.
        (``ip netns exec`` execs the command, so the Popen's pid is the command's.)"""
        proc = subprocess.Popen(self.argv(i, cmd), **kw)
        self.procs.append(proc)
        return proc

    def run(self, i: int, cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, cmd), timeout=timeout, **kw)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.names:
            _kill_netns_pids(ns)
        for veth in self.veths:
            _ip("link", "del", veth, check=False)
        for ns in self.names:
            _ip("netns", "del", ns, check=False)
        self.names, self.veths = [], []


@pytest.fixture(scope="session")
def netns_bridge():
    """The host bridge for namespaced tests, or None (with the reason printed) when
    namespaces are unavailable."""
    reason = unavailable_reason()
    if reason is None:
        bridge = HostBridge()
        try:
            bridge.create()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            reason = f"could not create the host bridge: {e}"
    if reason is not None:
        print(f"\n[netns] {reason}; servers listen on 127.0.0.1 only", file=sys.stderr)
        yield None
        return
    print(
        f"\n[netns] bridge {bridge.name} {bridge.host_address} ({bridge.subnet})", file=sys.stderr
    )
    try:
        yield bridge
    finally:
        bridge.destroy()


@pytest.fixture
def make_netns(netns_bridge):
    """``make_netns(n)``: n fresh namespaces attached to the host bridge, removed after the
    test (processes inside them killed first)."""
    if netns_bridge is None:
        pytest.skip(unavailable_reason() or "network namespaces unavailable (see the log)")
    made = []

    def make(n: int = 1) -> Namespaces:
        ns = Namespaces(netns_bridge, n).__enter__()
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.close()
