"""The daemons' commands: ``fms broker``, ``fms storage``, ``fms cache`` (and the scripts
``broker.py``, ``storage_worker.py``, ``cache_worker.py``): build the object from the options,
run it until SIGINT/SIGTERM, and return the exit code."""

import os
import re
import signal
import sys
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from .. import wire as p
from ..errors import FmsError
from .main import EXIT_OK, EXIT_REFUSED
from .parser import DEFAULT_DATA

if TYPE_CHECKING:  # imported at run time by the command that runs, not by every command
    import logging

    from ..security import CurveServer
    from ..storage.engine import Store
    from ..worker import BrokerLink, Service


class StopFlag:
    """Set by SIGINT/SIGTERM; the loops poll at least once a second and then return."""

    def __init__(self) -> None:
        self.stop = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self.stop = True

    def __call__(self) -> bool:
        return self.stop


_ENDPOINT = re.compile(r"^(tcp://[^/\s]+:(\d{1,5}|\*)|ipc://\S+|inproc://\S+)$")


def check_endpoints(**options: str) -> None:
    """Refuse, before any process starts, an option's value that is not a ZeroMQ endpoint
    (``--frontend 47755``): one line saying the form to use."""
    for option, endpoint in options.items():
        if not _ENDPOINT.match(str(endpoint)):
            raise FmsError(
                f"--{option.replace('_', '-')} {endpoint!r} is not an endpoint; write "
                f"it like tcp://127.0.0.1:5555 (or ipc://PATH)"
            )


def cmd_broker(args: Namespace) -> None:
    import logging

    from ..broker import Broker
    from ..logutil import setup_logging
    from ..security import is_loopback

    setup_logging(args.log_level)
    check_endpoints(frontend=args.frontend, backend=args.backend)
    curve = _broker_curve(args)
    if args.store is None and not is_loopback(args.backend):
        # Only workers on this machine could then choose the store; others must not.
        raise FmsError(
            f"a broker whose backend ({args.backend}) other hosts can reach must be "
            f"told which store it serves, so that no worker can decide it by "
            f"registering first: add --store ID (print the id with: python "
            f"storage_worker.py --meta ... --chunks ... --print-store-id)"
        )
    try:
        broker = Broker(args.frontend, args.backend, curve=curve, store=args.store)
        broker.bind()
        if args.metrics_port is not None:
            broker.metrics.serve(args.metrics_port)
            logging.getLogger("fms.broker").info(
                "event=metrics url=http://127.0.0.1:%d/metrics", args.metrics_port
            )
    except Exception as exc:  # zmq.ZMQError / OSError: address in use, bad endpoint
        raise FmsError(f"cannot bind: {exc}; is another broker running on these ports?") from None
    try:
        broker.run(StopFlag())
    finally:
        broker.close()


def _broker_curve(args: Namespace) -> "CurveServer | None":
    """The broker's CurveServer, or None after checking that plaintext is safe to bind."""
    from ..security import CurveServer, SecurityError, exposure

    given = [bool(args.curve_secret), bool(args.allow_workers)]
    if (any(given) or args.allow) and not all(given):
        raise SecurityError(
            "CURVE needs --curve-secret (the broker's .key_secret) and --allow-workers (a "
            "folder of the workers' public .key files, apart from the clients' so that a "
            "client key cannot act as a worker); clients are the store's identities "
            "(client.py id add), and, from set-ups made before them, the keys of --allow"
        )
    if args.curve_secret:
        import zmq

        return CurveServer(
            zmq.Context.instance(), args.curve_secret, args.allow, args.allow_workers
        )
    if args.insecure:
        return None
    exposed = [
        f"{e} ({why})" for e in (args.frontend, args.backend) if (why := exposure(e)) is not None
    ]
    if exposed:
        raise SecurityError(
            f"refusing to bind {'; '.join(exposed)} without encryption: anyone who can reach "
            f"it could read and overwrite every file. Use --curve-secret and --allow "
            f"(docs/SECURITY.md), or --insecure if the network is trusted"
        )
    return None


def _worker_id(args: Namespace, kind: str) -> str:
    return args.id or f"{kind}-{os.uname().nodename}-{os.getpid()}"


def _link(args: Namespace, ready: dict[str, Any], log: "logging.Logger") -> "BrokerLink":
    """The worker's link to the broker (not connected yet): its endpoint and keys checked."""
    import zmq

    from ..security import client_keys
    from ..worker import BrokerLink

    check_endpoints(broker=args.broker)
    curve = client_keys(args.curve_secret, args.server_key)
    return BrokerLink(zmq.Context.instance(), args.broker, ready, log, curve=curve)


def _run_worker(service: "Service", link: "BrokerLink", log: "logging.Logger") -> int:
    from ..worker import WorkerRefused, serve

    try:
        serve(service, link, log, StopFlag())
    except WorkerRefused as exc:
        log.error("event=refused reason=%r", str(exc))
        print(f"fms {link.ready['svc']}: refused by the broker: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        link.close()
    return EXIT_OK


def cmd_storage(args: Namespace) -> int:
    import logging

    from ..logutil import setup_logging
    from ..storage.access import ensure_first_admin
    from ..storage.engine import open_store
    from ..storage.service import StorageService

    setup_logging(args.log_level)
    if args.data == os.path.join(DEFAULT_DATA, "storage"):
        os.makedirs(DEFAULT_DATA, exist_ok=True)  # the default just works; a given path must exist

    def opened() -> "Store":
        store = open_store(
            args.data, args.meta, args.chunks, args.keep_versions, args.keep_for, args.digest
        )
        store.meta.audit_keep = args.audit_days * 86400
        return store

    if not args.print_store_id:
        check_endpoints(broker=args.broker)  # before anything is made
    store = opened()
    # The first admin's key files go into the data directory where it is the store's (SQLite);
    # a worker on a remote store keeps nothing there, so its operator makes them with
    # --print-store-id (the first step of setting such a store up).
    made = (
        ensure_first_admin(store.meta, args.data)
        if args.meta is None or args.print_store_id
        else None
    )
    if made:
        logging.getLogger("fms.storage").warning(
            "event=first_admin identity=admin key_secret=%s hint=%r",
            made,
            "the store's first admin: give this file as --curve-secret to manage identities "
            "(client.py id --help)",
        )
    if args.print_store_id:
        print(store.store_id)
        store.close()
        return EXIT_OK
    store.chunks.clean_tmp()
    log = logging.getLogger("fms.storage")
    ready: dict[str, object] = {
        "svc": p.STORAGE,
        "wid": _worker_id(args, "storage"),
        "store": store.store_id,
        "digest_fn": store.digest_fn,
    }
    if store.meta.serial_writes:
        ready["serial"] = True
    try:
        link = _link(args, ready, log)
    except BaseException:
        store.close()
        raise
    service = StorageService(store, link, gc_grace=args.gc_grace, maintenance_store=opened())
    try:
        return _run_worker(service, link, log)
    finally:
        service.close()


def cmd_cache(args: Namespace) -> int:
    import logging

    from ..cache import CacheService, ChunkCache
    from ..logutil import setup_logging

    setup_logging(args.log_level)
    try:
        chunks = ChunkCache(args.dir, args.max_bytes, args.memory_bytes)
    except OSError as exc:
        raise FmsError(f"cannot use cache directory {args.dir}: {exc.strerror}") from None
    try:
        log = logging.getLogger("fms.cache")
        link = _link(args, {"svc": p.CACHE, "wid": _worker_id(args, "cache")}, log)
        service = CacheService(chunks, link, max_file=args.max_file)
        return _run_worker(service, link, log)
    finally:
        chunks.close()


def cmd_s3(args: Namespace) -> int | None:
    """``fms s3``: the S3 gateway in the foreground until SIGINT/SIGTERM."""
    try:
        from ..gateway import credentials, server
    except ImportError as exc:
        from .. import install_hint

        raise FmsError(
            f"the S3 gateway needs its extra ({exc.name} is missing): {install_hint('s3gw')}"
        ) from None
    from ..logutil import setup_logging
    from ..security import client_keys, is_loopback

    setup_logging(getattr(args, "log_level", "INFO"))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise FmsError("give both --tls-cert and --tls-key (or neither)")
    if not args.tls_cert and not args.insecure and not is_loopback(f"tcp://{args.host}:1"):
        raise FmsError(
            f"--host {args.host} is reachable from other machines: serve HTTPS there "
            f"(--tls-cert and --tls-key), or add --insecure"
        )
    if not 0 <= args.port <= 65535:
        raise FmsError("--port must be between 0 and 65535")
    if not 0 <= args.key_cache <= 3600:
        raise FmsError("--key-cache must be between 0 and 3600 seconds")
    try:
        keys = credentials.from_args(args.keys, args.access_key, args.secret_key)
        tls = server.tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (ValueError, OSError) as exc:
        raise FmsError(str(exc)) from None
    curve = client_keys(getattr(args, "curve_secret", None), getattr(args, "server_key", None))
    broker = getattr(args, "broker", None) or os.environ.get("FMS_BROKER") or p.DEFAULT_FRONTEND
    try:
        return server.run(broker, keys, args.host, args.port, tls, curve, args.key_cache)
    except OSError as exc:
        raise FmsError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
