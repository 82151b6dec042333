"""A TCP proxy that delays every byte by a fixed time each way: a server "far away" on one
machine (the kernel's netem, which would do this, is not available here).

    python tests/delayproxy.py --to HOST:PORT --delay 0.005 [--listen 127.0.0.1:0]

prints ``listening HOST:PORT`` once it accepts connections; each connection is forwarded to
``--to``, and what one side sends reaches the other ``--delay`` seconds later (so a request and
its answer take two delays more, a round trip), while the bytes keep flowing at the pace both
ends take them: a window of data is in flight, as on a long link.  Used by the tests and by
benchmarks/farstore.py; :class:`DelayProxy` starts one as a process of its own.
"""

import argparse
import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import time

READ_SIZE = 256 * 1024  # bytes read at once from either side
MAX_IN_FLIGHT = 64 * 1024 * 1024  # bytes held for one direction before reading waits


async def _pump(reader, writer, delay: float):
    """Copy ``reader`` to ``writer``, each piece ``delay`` seconds after it was read."""
    queue = collections.deque()
    held = 0
    wake = asyncio.Event()
    room = asyncio.Event()
    room.set()
    done = False

    async def read():
        nonlocal held, done
        try:
            while data := await reader.read(READ_SIZE):
                queue.append((time.monotonic() + delay, data))
                held += len(data)
                wake.set()
                if held > MAX_IN_FLIGHT:
                    room.clear()
                    await room.wait()
        finally:
            done = True
            wake.set()

    task = asyncio.ensure_future(read())
    try:
        while True:
            if not queue:
                if done:
                    break
                wake.clear()
                await wake.wait()
                continue
            due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            held -= len(data)
            if held <= MAX_IN_FLIGHT:
                room.set()
        with contextlib.suppress(OSError):
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()


async def _serve(listen_host: str, listen_port: int, to_host: str, to_port: int, delay: float):
    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(to_host, to_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, server_writer, delay),
            _pump(server_reader, client_writer, delay),
        )
        for w in (client_writer, server_writer):
            with contextlib.suppress(OSError):
                w.close()

    server = await asyncio.start_server(handle, listen_host, listen_port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def _host_port(text: str) -> tuple:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, required=True, help="seconds, each way")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (%(default)s)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(*_host_port(args.listen), *_host_port(args.to), args.delay))
    return 0


class DelayProxy:
    """A proxy process in front of ``to`` (``HOST:PORT``): ``address`` is where to connect."""

    def __init__(self, to: str, delay: float):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--to", to, "--delay", str(delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the delay proxy did not start: {line!r}")
        self.address = line.split()[1]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
