"""CurveZMQ keys and the broker's allowlist.

Key files use the ZeroMQ certificate format (``zmq.auth.load_certificate`` reads them):
``NAME.key`` holds the public key, ``NAME.key_secret`` both keys.  A secret key file is written
with mode 0600, and one that others can read is refused, as ssh does.

The broker authenticates every connection with ZAP: on the frontend, clients whose key belongs to
an identity of the store (storage sends the broker the store's keys: :class:`ClientKeys`, and
see :mod:`fms.policy`) or is in the ``--allow`` folder (a key there may do everything, as before
identities existed); on the backend, workers whose key is in the ``--allow-workers`` folder (two
ZAP domains), so a client's key cannot act as a worker.  It checks every message's sender against
the keys as they are now, so a key removed is shut out without a restart, even on a connection
that is already open, and passes the key it authenticated on to the workers, who decide what it
may do.
"""

import contextlib
import ipaddress
import logging
import os
import socket
import stat
import time
from typing import Any, cast

import zmq
import zmq.auth

from .errors import FmsError
from .logutil import RateLimitedLog

ALLOW_RELOAD = 1.0  # seconds an allowlist read stays fresh
ZAP_DOMAIN = "fms"  # the frontend: clients
ZAP_WORKER_DOMAIN = "fms-workers"  # the backend: workers
REFUSED_KEYS_LOGGED = 1024  # distinct refused keys logged once each; past it, rate-limited
CURVE_SECRET_ENV = "FMS_CURVE_SECRET"
SERVER_KEY_ENV = "FMS_SERVER_KEY"

log = logging.getLogger("fms.security")


class SecurityError(FmsError):
    """A key file or the security configuration cannot be used; the message says how to fix it."""


def keygen(folder: str, name: str) -> tuple[str, str]:
    """Write ``folder/name.key`` and ``folder/name.key_secret`` (mode 0600) for a new keypair.

    :return: the two paths.
    :raises SecurityError: a file of that name exists already (it is never overwritten).
    """
    if not name or "/" in name or name.startswith("."):
        raise SecurityError(f"key name {name!r} must be a plain file name, such as 'alice'")
    os.makedirs(folder, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_path = os.path.join(folder, f"{name}.key")
    secret_path = os.path.join(folder, f"{name}.key_secret")
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_new(
        secret_path,
        0o600,
        f"#   fms CURVE secret key, made {now}; keep it private\n"
        f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
        f'    secret-key = "{secret.decode()}"\n',
    )
    _write_new(
        public_path,
        0o644,
        f"#   fms CURVE public key, made {now}\nmetadata\ncurve\n"
        f'    public-key = "{public.decode()}"\n',
    )
    return public_path, secret_path


def _write_new(path: str, mode: int, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SecurityError(
            f"{path} exists already; choose another name or remove it first"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_secret(path: str) -> tuple[bytes, bytes]:
    """Read a secret key file.  :return: ``(public, secret)`` z85 keys.

    :raises SecurityError: missing, readable by others, or without a secret key.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecurityError(f"cannot read secret key file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"secret key file {path} is accessible by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); it must be private: "
            f"chmod 600 {path}"
        )
    public, secret = _load(path)
    if not secret:
        raise SecurityError(f"{path} holds no secret key; give the .key_secret file")
    return public, secret


def load_public(path: str) -> bytes:
    """:return: the z85 public key in ``path`` (a .key or .key_secret file)."""
    return _load(path)[0]


def _load(path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read key file {path}: {exc}") from None


class AllowList:
    """The public keys in a folder of ``*.key`` files, re-read when it may have changed.

    :param role: who these keys are for (``clients``, ``workers``), for messages and logs.
    """

    def __init__(self, folder: str, role: str = "clients") -> None:
        if not os.path.isdir(folder):
            raise SecurityError(
                f"allow directory {folder} does not exist; create it and put "
                f"the public .key files of allowed {role} in it"
            )
        self.folder = folder
        self.role = role
        self._keys: frozenset[bytes] = frozenset()
        self._read_at = -ALLOW_RELOAD
        self._logged: set[bytes] = set()  # refused keys already logged (each once)
        self._bad = RateLimitedLog(log)

    def keys(self) -> frozenset[bytes]:
        now = time.monotonic()
        if now - self._read_at >= ALLOW_RELOAD:
            self._read_at = now
            try:
                self._keys = frozenset(zmq.auth.load_certificates(self.folder))
            except (OSError, ValueError) as exc:
                log.error("event=allowlist_unreadable folder=%s error=%r", self.folder, str(exc))
        return self._keys

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            key = key.encode()
        return key in self.keys()

    # ZAP credentials-provider interface (zmq.auth)
    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self
        if not allowed:
            self.refused(key)
        return allowed

    def refused(self, key: str | bytes) -> None:
        """Log a refused key once (a peer retrying every second must not flood the log)."""
        if isinstance(key, str):
            key = key.encode()
        if key in self._logged:
            return
        line = (
            "event=key_refused side=%s key=%s hint=%r",
            "frontend" if self.role == "clients" else "backend",
            key.decode(errors="replace"),
            f"not in the {self.role}' allow directory {self.folder}",
        )
        if len(self._logged) < REFUSED_KEYS_LOGGED:
            self._logged.add(key)
            log.warning(*line)
        else:
            self._bad.warning(*line)


class ClientKeys:
    """Who may connect on the frontend: the CURVE keys of the store's identities (storage sends
    them, :meth:`set_identities`) and, for set-ups made before identities, the keys in the
    ``--allow`` folder, which may do everything (logged when they are read).

    :param folder: the ``--allow`` folder, or None.
    """

    def __init__(self, folder: str | None) -> None:
        self.allow = AllowList(folder, "clients") if folder else None
        # z85 str: replaced whole, so the ZAP thread reads it safely
        self.identities: frozenset[str] = frozenset()
        self._folder_seen: frozenset[bytes] | None = None
        self._logged: set[str] = set()
        self._bad = RateLimitedLog(log)

    def set_identities(self, keys: frozenset[str]) -> None:
        self.identities = frozenset(keys)

    def _folder(self) -> frozenset[bytes]:
        if self.allow is None:
            return frozenset()
        keys = self.allow.keys()
        if keys != self._folder_seen:
            self._folder_seen = keys
            if keys:
                log.warning(
                    "event=allow_dir_keys_are_admin folder=%s keys=%d hint=%r",
                    self.allow.folder,
                    len(keys),
                    "a key in the --allow folder may do everything in the store (as before "
                    "identities); give each user an identity and grants instead: client.py id "
                    "add NAME --key FILE; client.py grant NAME ROLE PREFIX",
                )
        return keys

    def classify(self, user: str) -> dict[str, Any] | None:
        """The route fields for a message from ``user`` (its z85 key): ``{"u": user}`` for an
        identity's key, with ``"l": True`` for a key of the ``--allow`` folder; None (logged
        once) for a key that is neither."""
        if user.encode() in self._folder():
            return {"u": user, "l": True}
        if user in self.identities:
            return {"u": user}
        self.refused(user)
        return None

    # ZAP credentials-provider interface (zmq.auth)
    def callback(self, domain: str, key: bytes) -> bool:
        return self.classify(key.decode(errors="replace")) is not None

    def refused(self, key: str) -> None:
        """Log a refused key once (a peer retrying every second must not flood the log)."""
        if key in self._logged:
            return
        line = (
            "event=key_refused side=frontend key=%s hint=%r",
            key,
            "neither the key of an identity of the store (client.py id add NAME --key FILE) "
            "nor in the --allow folder",
        )
        if len(self._logged) < REFUSED_KEYS_LOGGED:
            self._logged.add(key)
            log.warning(*line)
        else:
            self._bad.warning(*line)


class CurveServer:
    """The broker's side: ZAP authenticator plus the settings for its two sockets.

    :param allow_dir: public keys of clients that may do everything (frontend), or None: only
        the store's identities connect.
    :param allow_workers_dir: public keys of the workers (backend), kept apart so that a
        client's key is refused on the backend.
    """

    def __init__(
        self, ctx: zmq.Context, secret_file: str, allow_dir: str | None, allow_workers_dir: str
    ):
        self.public, self.secret = load_secret(secret_file)
        if allow_dir and os.path.realpath(allow_dir) == os.path.realpath(allow_workers_dir):
            raise SecurityError(
                "--allow and --allow-workers must be different folders: a "
                "client's key must not let it act as a worker"
            )
        self.clients = ClientKeys(allow_dir)
        self.allow_workers = AllowList(allow_workers_dir, "workers")
        both = self.clients._folder() & self.allow_workers.keys()
        if both:
            log.warning(
                "event=key_in_both_allow_dirs keys=%d hint=%r",
                len(both),
                "a key in both folders may act as a client and as a worker; give "
                "workers their own keys",
            )
        # Imported here: it pulls in asyncio, which clients (who load this module for their
        # keys) would otherwise pay for at every start.
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("fms.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.clients)
        self.auth.configure_curve_callback(
            ZAP_WORKER_DOMAIN, credentials_provider=self.allow_workers
        )

    def apply(self, sock: zmq.Socket, workers: bool = False) -> None:
        sock.zap_domain = (ZAP_WORKER_DOMAIN if workers else ZAP_DOMAIN).encode()
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def allowed(self, frame: zmq.Frame, workers: bool = False) -> bool:
        """Whether the sender of ``frame`` (a received zmq.Frame) is in the clients' (or the
        workers') allowlist now."""
        if not workers:
            return self.client(frame) is not None
        try:
            user = cast(str, frame.get("User-Id"))  # pyzmq types it int or str: a str
        except zmq.ZMQError:
            return False
        if user in self.allow_workers:
            return True
        self.allow_workers.refused(user)
        return False

    def client(self, frame: zmq.Frame) -> dict[str, Any] | None:
        """The route fields that say who sent ``frame`` (a client's message), as
        :meth:`ClientKeys.classify`; None if its key may not connect any more."""
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return self.clients.classify(str(user))  # a str: the ZAP handler set it

    def stop(self) -> None:
        self.auth.stop()


class CurveClient:
    """A client's or worker's keys: its own keypair and the broker's public key."""

    def __init__(self, secret_file: str, server_key_file: str) -> None:
        self.public, self.secret = load_secret(secret_file)
        self.server = load_public(server_key_file)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def client_keys(secret_file: str | None, server_key_file: str | None) -> CurveClient | None:
    """The CurveClient for these options (falling back to $FMS_CURVE_SECRET / $FMS_SERVER_KEY),
    or None for plaintext.

    :raises SecurityError: only one of the two is given.
    """
    secret_file = secret_file or os.environ.get(CURVE_SECRET_ENV)
    server_key_file = server_key_file or os.environ.get(SERVER_KEY_ENV)
    if not secret_file and not server_key_file:
        return None
    if not (secret_file and server_key_file):
        raise SecurityError(
            "CURVE needs both --curve-secret (this side's .key_secret) and "
            "--server-key (the broker's .key)"
        )
    return CurveClient(secret_file, server_key_file)


def cluster_keys(folder: str, client: bool = True) -> tuple:
    """Keys for a one-machine cluster in ``folder``, made once and reused: the broker's, one
    shared by the workers, and (``client``) one for clients; ``folder/allow-clients`` holds the
    client's public key (a key there may do everything: users are better given identities, see
    fms.policy), ``folder/allow-workers`` the workers' (the two folders' names as the docs and
    ``fms keygen`` call them; ``folder/allow``, as an older fms named the first, is renamed).

    :return: ``(broker args, worker args, (client secret file or None, broker public key
        file))``.
    """
    allow = os.path.join(folder, "allow-clients")
    allow_workers = os.path.join(folder, "allow-workers")
    older = os.path.join(folder, "allow")
    if os.path.isdir(older) and not os.path.lexists(allow):
        os.rename(older, allow)
    os.makedirs(allow, exist_ok=True)
    os.makedirs(allow_workers, exist_ok=True)
    # Keys made by an older fms kept the worker's key among the clients': not any more.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(allow, "worker.key"))
    for name, into in (("broker", None), ("worker", allow_workers), ("client", allow)):
        if name == "client" and not client:
            continue
        if not os.path.exists(os.path.join(folder, f"{name}.key_secret")):
            keygen(folder, name)
        if into is not None:
            with (
                open(os.path.join(folder, f"{name}.key")) as src,
                open(os.path.join(into, f"{name}.key"), "w") as dst,
            ):
                dst.write(src.read())
    broker_key = os.path.join(folder, "broker.key")
    server = [
        "--curve-secret",
        os.path.join(folder, "broker.key_secret"),
        "--allow",
        allow,
        "--allow-workers",
        allow_workers,
    ]
    workers = [
        "--curve-secret",
        os.path.join(folder, "worker.key_secret"),
        "--server-key",
        broker_key,
    ]
    return (
        server,
        workers,
        (os.path.join(folder, "client.key_secret") if client else None, broker_key),
    )


def is_loopback(endpoint: str) -> bool:
    """Whether binding ``endpoint`` exposes it to this machine only."""
    return exposure(endpoint) is None


def exposure(endpoint: str) -> str | None:
    """Why binding ``endpoint`` would reach beyond this machine, or None if it would not.

    ``ipc://`` and ``inproc://`` stay on this machine.  A ``tcp://`` host counts as loopback only
    if every address it resolves to (``getaddrinfo``, as ZeroMQ resolves it) is a loopback
    address: a name is judged by where it points, never by how it is spelt, so
    ``localhost.example.com`` or ``127.x.net`` are not loopback unless they resolve there.  A host
    that does not resolve, a wildcard (``*``) and a network interface's name are not loopback.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return None
    if not endpoint.startswith("tcp://"):
        return "is not a tcp://, ipc:// or inproc:// endpoint"
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("", "*"):
        return "binds every network interface"
    if host in {name for _index, name in socket.if_nameindex()}:
        return f"names the network interface {host}; bind 127.0.0.1 for this machine only"
    try:
        # str(): an address is a str for AF_INET and AF_INET6 (typeshed also allows the int of
        # a family this Python was built without)
        found = {
            str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        }
    except (socket.gaierror, UnicodeError) as exc:
        return f"names a host {host!r} that does not resolve ({exc}); use 127.0.0.1 or ::1"
    addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]  # fe80::1%lo: scoped
    if any(a.is_unspecified for a in addresses):
        return "binds every network interface"
    outside = sorted(str(a) for a in addresses if not a.is_loopback)
    if outside:
        return f"resolves to {', '.join(outside)}, which is not loopback"
    return None
