"""``fms s3``: the gateway's process: an aiohttp server on one port (TLS with a certificate
and key), its store client and its keys: the store's identities' S3 keys, and any static ones
given on the command line."""

import asyncio
import importlib
import logging
import signal
import ssl
from collections.abc import Callable

from aiohttp import web

from .. import limits
from ..security import CurveClient
from .app import Gateway, make_server
from .credentials import KEY_TTL, StaticKeys, StoreKeys
from .store import Store

log = logging.getLogger("fms.gateway")

DEFAULT_PORT = 9000  # MinIO's and many S3 tools' habit
DEFAULT_HOST = "127.0.0.1"
SHUTDOWN_TIMEOUT = 5.0  # seconds requests in flight get to finish when stopping


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(
    broker: str,
    static: StaticKeys | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tls: ssl.SSLContext | None = None,
    curve: CurveClient | None = None,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    key_ttl: float = KEY_TTL,
) -> None:
    """Run the gateway until ``stop`` is set (or forever).  ``ready(port)`` is called once it
    listens (the port it got, for port 0).  Access keys are the store's (kept ``key_ttl``
    seconds once looked up), and ``static``'s first."""
    limits.tune_malloc()  # as the broker and workers: big bodies' buffers reused, not trimmed
    store = Store(broker, curve)
    gateway = Gateway(store, StoreKeys(store.s3_key, key_ttl, static))
    runner = web.ServerRunner(
        make_server(gateway), handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=1024, reuse_address=True)
    await site.start()
    bound: int = runner.addresses[0][1]
    scheme = "https" if tls else "http"
    log.info("event=s3_listening url=%s://%s:%d broker=%s", scheme, host, bound, broker)
    if ready is not None:
        ready(bound)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
        store.close()


def run(
    broker: str,
    static: StaticKeys | None,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    curve: CurveClient | None = None,
    key_ttl: float = KEY_TTL,
) -> int:
    """Serve in the foreground until SIGINT or SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(bound: int) -> None:
            scheme = "https" if tls else "http"
            print(
                f"fms s3: S3 gateway at {scheme}://{host}:{bound} (console at "
                f"{scheme}://{host}:{bound}/console), broker {broker}",
                flush=True,
            )

        await serve(broker, static, host, port, tls, curve, ready, stop, key_ttl)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
    return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where uvloop is installed, else None (asyncio's own).

    Every request's work on the loop (its socket reads and writes, the handles and timers of
    its tasks, the broker link's reader) is Python in asyncio's loop and C in uvloop's: about
    a tenth of the gateway's instructions per 4 KiB PUT or GET (callgrind)."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
