"""``fms up``: a whole local cluster (broker, cache worker, N storage workers) as child
processes in the foreground; Ctrl-C stops them all."""

import errno
import os
import re
import signal
import sys
import time
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from .. import wire as p
from ..errors import FmsError
from .commands import count
from .daemons import StopFlag, check_endpoints
from .main import EXIT_OK

if TYPE_CHECKING:
    import subprocess

UP_STOP_TIMEOUT = 8.0  # seconds `fms up` waits for its processes to stop before killing them
RESTART_BACKOFF = 1.0  # seconds before the first restart of a process that died; doubles...
RESTART_BACKOFF_MAX = 30.0  # ... up to this
RESTART_RESET = 60.0  # a process that ran this long starts again from the first backoff
ADMIN_S3_KEY = "s3-admin.json"  # in DATA: the first admin's S3 key, as `fms up --s3` shows it
LEGACY_S3_KEYS = "s3-keys.json"  # in DATA: the key file `fms up --s3` made before identities


def cmd_up(args: Namespace) -> int:
    """Start broker, cache and N storage workers as child processes; start again any that
    dies (with backoff); stop them all on Ctrl-C."""
    if args.storage < 1:
        raise FmsError("--storage must be at least 1")
    if args.caches < 0:
        raise FmsError("--caches must be 0 or more")
    check_endpoints(frontend=args.frontend, backend=args.backend)
    for option in ("frontend", "backend"):
        refuse_taken(option, getattr(args, option))
    py = [sys.executable, "-m", "fms"]
    log = ["--log-level", args.log_level]
    os.makedirs(args.data, exist_ok=True)
    server, workers, client = [], [], None
    keys = os.path.abspath(os.path.join(args.data, "keys"))
    if args.curve:
        from ..security import cluster_keys

        # A cluster made before identities had a client key in the allow folder (it may do
        # everything, and the broker says so in its log); a new one uses the store's first
        # admin, an identity, and the allow folder stays empty.
        legacy = os.path.exists(os.path.join(keys, "client.key_secret"))
        server, workers, client = cluster_keys(keys, client=legacy)
    insecure = ["--insecure"] if args.insecure else []
    # The store id comes from the storage directory, so the broker serves that store whichever
    # storage worker (or impostor) registers first.
    store_id, admin_key, s3_key = _open_store(
        os.path.join(args.data, "storage"), args.meta, args.chunks, args.s3 is not None
    )
    store = ["--store", store_id]
    specs = [
        (
            "broker",
            py
            + ["broker", "--frontend", args.frontend, "--backend", args.backend]
            + server
            + store
            + insecure
            + log,
        )
    ]
    for i in range(args.caches):
        # One cache keeps DATA/cache as before; several split the bound, a folder each.
        name = "cache" if args.caches == 1 else f"cache-{i + 1}"
        specs.append(
            (
                name,
                py
                + [
                    "cache",
                    "--broker",
                    args.backend,
                    "--dir",
                    os.path.join(args.data, name),
                    "--id",
                    name,
                    "--max-bytes",
                    str(args.cache_bytes // args.caches),
                ]
                + workers
                + log,
            )
        )
    for i in range(args.storage):
        specs.append(
            (
                f"storage-{i + 1}",
                py
                + [
                    "storage",
                    "--broker",
                    args.backend,
                    "--data",
                    os.path.join(args.data, "storage"),
                    "--id",
                    f"storage-{i + 1}",
                    "--gc-grace",
                    str(args.gc_grace),
                    "--keep-versions",
                    str(args.keep_versions),
                    "--keep-for",
                    str(args.keep_for),
                    "--audit-days",
                    str(args.audit_days),
                ]
                + (["--meta", args.meta] if args.meta else [])
                + (["--chunks", args.chunks] if args.chunks else [])
                + workers
                + log,
            )
        )
    s3_note = ""
    if args.s3 is not None:
        # A data folder from before identities had S3 keys keeps its key file (a key acting
        # as the gateway); a new one gets an S3 key of the store's first admin.
        legacy_keys = os.path.join(os.path.abspath(args.data), LEGACY_S3_KEYS)
        if os.path.exists(legacy_keys) or s3_key is None:
            keys_file, key_id, secret = _s3_keys(args.data)
            static, whose = ["--keys", keys_file], f"in {keys_file}"
        else:
            key_id, secret, path = s3_key
            static, whose = [], f"identity 'admin''s, in {path}"
        specs.append(
            (
                "s3",
                py
                + ["s3", "--broker", args.frontend, "--port", str(args.s3)]
                + static
                + (
                    ["--curve-secret", client[0] or admin_key, "--server-key", client[1]]
                    if client
                    else []
                )
                + ["--log-level", args.log_level],
            )
        )
        s3_note = (
            f"\nfms up: S3 at http://127.0.0.1:{args.s3} (console: /console), access key "
            f"{key_id}, secret {secret} ({whose})"
        )
    stop = StopFlag()
    procs = []
    try:
        for name, cmd in specs:
            procs.append(_Child(name, cmd))
        fms = _fms_command()
        broker = "" if args.frontend == p.DEFAULT_FRONTEND else f" --broker {args.frontend}"
        hint = f"{fms}{broker} put FILE"
        if client:
            secret = client[0] or admin_key
            hint = f"{fms}{broker} --curve-secret {secret} --server-key {client[1]} put FILE"
        print(
            f"fms up: broker at {args.frontend} (workers on {args.backend}), "
            f"{count(args.caches, 'cache worker')} and "
            f"{count(args.storage, 'storage worker')}, data in {os.path.abspath(args.data)}"
            f"{', CURVE on' if args.curve else ''}\n"
            f"fms up: the store's first admin (identity 'admin', which adds users: {fms} "
            f"id --help) has the key {admin_key}"
            f"{'' if args.curve else '; it is needed with --curve (here, local users are admin)'}"
            f"\nfms up: try `{hint}` in another terminal; Ctrl-C stops all{s3_note}",
            file=sys.stderr,
            flush=True,
        )
        while not stop():
            for child in procs:
                child.watch()
            time.sleep(0.2)  # polling child processes; nothing to synchronise with
        return EXIT_OK
    finally:
        _stop_all([(child.name, child.proc) for child in procs])


def refuse_taken(option: str, endpoint: str) -> None:
    """Refuse a tcp:// endpoint whose port something already listens on (another ``fms up``
    or broker): started anyway, this cluster's broker could not bind and its workers would
    join the other cluster."""
    import socket

    match = re.fullmatch(r"tcp://(\[?[^\]]*\]?|[^:]+):(\d+)", endpoint)
    if match is None or match.group(2) == "0":
        return
    host = match.group(1).strip("[]")
    host = "0.0.0.0" if host == "*" else host
    try:
        infos = socket.getaddrinfo(host, int(match.group(2)), type=socket.SOCK_STREAM)
    except OSError:
        return  # not resolvable: the broker says so
    family, _type, _proto, _name, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return
            raise FmsError(
                f"--{option} {endpoint} is in use: another fms up or broker is running there; "
                f"stop it, or give this cluster other ports (--frontend tcp://127.0.0.1:PORT "
                f"--backend tcp://127.0.0.1:PORT); nothing was started"
            ) from None


def _fms_command() -> str:
    """How the user ran fms, to say how to run its client: the path of the ``fms`` script
    they typed (``.venv/bin/fms``), or ``fms`` if that is the one on PATH."""
    import shutil

    script = sys.argv[0]
    if os.path.basename(script) == "fms" and os.path.exists(script):
        on_path = shutil.which("fms")
        if on_path and os.path.samefile(on_path, script):
            return "fms"
        return script
    return f"{sys.executable} -m fms" if script.endswith("__main__.py") else "fms"


class _Child:
    """A process of the cluster, started again when it dies: after RESTART_BACKOFF seconds,
    doubling with each death up to RESTART_BACKOFF_MAX, back to the first after it has run for
    RESTART_RESET seconds.  Each death and restart is said on stderr."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        self.name, self.cmd = name, cmd
        self.backoff = RESTART_BACKOFF
        self.restarts = 0
        self.due: float | None = None  # when to start it again, while it is dead
        self._start()

    def _start(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(self.cmd)
        self.started = time.monotonic()

    def watch(self) -> None:
        now = time.monotonic()
        if self.due is not None:
            if now >= self.due:
                self.due = None
                self.restarts += 1
                print(
                    f"fms up: starting {self.name} again (restart {self.restarts})",
                    file=sys.stderr,
                    flush=True,
                )
                self._start()
            return
        if self.proc.poll() is None:
            return
        if now - self.started >= RESTART_RESET:
            self.backoff = RESTART_BACKOFF
        print(
            f"fms up: {self.name} exited with code {self.proc.returncode}; starting it again "
            f"in {self.backoff:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        self.due = now + self.backoff
        self.backoff = min(self.backoff * 2, RESTART_BACKOFF_MAX)


def _open_store(data: str, meta: str | None, chunks: str | None, s3: bool = False) -> tuple:
    """The id of the store the storage workers will open (made now if it is new, with its first
    admin), the path of the first admin's key file, and (``s3``) the first admin's S3 key.

    :return: ``(store id, key file, (access key id, secret, file) or None)``.
    """
    from ..storage.access import FIRST_ADMIN, ensure_first_admin
    from ..storage.engine import open_store

    store = open_store(data, meta, chunks)
    try:
        made = ensure_first_admin(store.meta, data)
        key = _admin_s3_key(store.meta, os.path.dirname(os.path.abspath(data))) if s3 else None
        return (
            store.store_id,
            os.path.abspath(made or os.path.join(data, f"{FIRST_ADMIN}.key_secret")),
            key,
        )
    finally:
        store.close()


def _admin_s3_key(meta: Any, folder: str) -> tuple[str, str, str] | None:
    """An S3 access key of the store's first admin (``admin``), made once and written to
    ``folder/s3-admin.json`` (mode 0600) to be shown; made again if that key was removed from
    the store.  :return: ``(access key id, secret, file)``, or None if there is no identity
    ``admin`` any more."""
    import json

    from ..errors import NotFound
    from ..storage.access import FIRST_ADMIN, new_s3_key
    from ..storage.meta.access import S3

    path = os.path.join(folder, ADMIN_S3_KEY)
    try:
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
        if meta.s3_credential(kept["access_key"]) == (FIRST_ADMIN, kept["secret_key"]):
            return kept["access_key"], kept["secret_key"], path
    except (OSError, ValueError, LookupError, TypeError):
        pass
    access_key, secret = new_s3_key()
    try:
        meta.add_credential(FIRST_ADMIN, S3, access_key, time.time(), "fms up", secret=secret)
    except NotFound:
        return None
    tmp = f"{path}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": access_key, "secret_key": secret, "identity": FIRST_ADMIN}, f)
    os.replace(tmp, path)
    return access_key, secret, path


def _stop_all(procs: list[tuple[str, "subprocess.Popen[bytes]"]]) -> None:
    import subprocess

    for _name, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + UP_STOP_TIMEOUT
    for name, proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"fms up: {name} did not stop in time; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()


def _s3_keys(data: str) -> tuple:
    """DATA/s3-keys.json (made once, mode 0600, with one fresh key): ``(path, key id,
    secret)`` of its first key."""
    import json

    from ..gateway.credentials import new_key_pair

    path = os.path.abspath(os.path.join(data, LEGACY_S3_KEYS))
    if not os.path.exists(path):
        key_id, secret = new_key_pair()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([{"access_key": key_id, "secret_key": secret, "identity": "admin"}], f)
    try:
        with open(path) as f:
            first = json.load(f)[0]
        return path, first["access_key"], first["secret_key"]
    except (OSError, ValueError, LookupError, TypeError) as exc:
        raise FmsError(f"cannot read {path}: {exc}; fix or remove it") from None
