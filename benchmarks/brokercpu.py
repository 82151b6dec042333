"""The broker's CPU per 4 KiB request, alone: a real broker process between a client DEALER and
fake workers that answer at once, its CPU read from /proc.

    .venv/bin/python -m benchmarks.brokercpu [--op get|put|both] [--requests 5000]
        [--window 8] [--rounds 10] [--tree PATH ...] [--profile OUT] [--spy OUT] [--core]

- ``get``: the client sends ``get`` of a name (as the S3 gateway does for a small object); the
  fake cache answers it as a hit, with a manifest-sized header and the 4 KiB as a data frame.
- ``put``: the client sends a ``commit`` with the 4 KiB inline (the gateway's inline commit);
  the fake storage worker acks it with ``inv`` and a ``fill`` (the version's manifest), so the
  broker hands the fill to the fake cache before it forwards the ack (as a real commit does).

The client keeps ``--window`` requests in flight (the gateway's link keeps several).  The fake
workers heartbeat (the cache reports the fills it took, so the fill window keeps moving).  Each
``--tree`` (a source tree holding ``fms``, e.g. a ``git worktree add --detach`` of the base
commit; default: this one) gets a broker of its own, all up at once; in each round every broker
serves ``--requests`` of each op in turn (the order turned each round), so the figures compared
are taken side by side on a shared machine.  The CPU is each thread's time on a CPU
(/proc/PID/task/TID/schedstat, in ns).  Printed: the broker's CPU per request (µs) in all, and
of its main thread alone (the rest is ZeroMQ's I/O thread), the medians over rounds, and the
median of each round's ratio to the first tree.  ``--profile OUT``: a run of each tree and op
under cProfile (the main thread's CPU), its stats to ``OUT-TREE-OP.prof``; ``--spy OUT``: under
py-spy (``--native``), its raw samples to ``OUT-TREE-OP.txt``.  ``--core``: no sockets and no
loop, :class:`fms.broker.Core` alone in a process per tree and round (the frames of a request
and its reply handed to it as the loop hands them, a transport that sends nothing): its CPU per
request, less the frames' making.
"""

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import time

import msgpack
import zmq

from fms import wire as p

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import signal, sys
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
from fms.broker import Broker
broker = Broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", store="bench-store")
broker.bind()
print(broker.frontend_endpoint, broker.backend_endpoint, flush=True)
profile = sys.argv[1] if len(sys.argv) > 1 else ""
if profile:
    import cProfile, time
    profiler = cProfile.Profile(time.thread_time)  # the main thread's CPU, not wall time
    profiler.runcall(broker.run, lambda: bool(stop))
    profiler.dump_stats(profile)
else:
    broker.run(lambda: bool(stop))
broker.close()
"""

# --core: fms.broker.Core alone in a process of its own (from the tree's fms), with a transport
# that sends nothing, fed the frames a GET or a PUT brings (zmq.Frame objects, as the loop hands
# them).  Prints the µs of CPU per request: the median of 5 runs of ``n``, less the cost of
# building the frames (timed alone in the same runs).
CORE_CHILD = r"""
import itertools, os, statistics, sys, time
import zmq
from fms import wire as p
from fms.broker import Core
from fms.broker.transport import SENT

class Null:
    acked = 0
    def to_client(self, ident, frames): return SENT
    def to_worker(self, ident, frames): return True
    def queued(self, ident): return 0
    def taken(self, ident):
        self.acked += 1 << 30
        return self.acked
    def disconnect(self, ident): return False

op, n = sys.argv[1], int(sys.argv[2])
core = Core(Null(), store="s1")
for ident, svc in ((b"cache", "cache"), (b"storage", "storage")):
    ready = {"t": "ready", "v": p.PROTOCOL_VERSION, "svc": svc, "wid": svc, "store": "s1",
             "digest_fn": p.BLAKE3}
    core.worker_message(ident, [p.encode(ready)])
F = zmq.Frame
BLOB = F(bytes(p.pack_data(os.urandom(4096))))
MANIFEST = p.encode({"name": "x", "size": 4096, "digest": os.urandom(32),
                     "chunks": [os.urandom(32)], "version": 5})
EXTENTS = p.pack_extents(((1 << 20, 4096),))
ids = itertools.count(1)

def frames(key):
    rid = next(ids)
    name = f"bench/object-{rid % 1000:06d}"
    if op == "get":
        request = [F(p.encode({"v": p.PROTOCOL_VERSION, "op": "get", "id": rid,
                               "ttl_ms": 30000, "name": name}))]
        route = {"t": "rep", "k": key, "ok": True, "cache": "hit"}
        reply = [F(p.encode(route)), F(p.encode({"v": 3, "id": rid, "ok": True,
                                                 "manifest": MANIFEST})), BLOB]
    else:
        header = {"v": p.PROTOCOL_VERSION, "op": "commit", "id": rid, "ttl_ms": 30000,
                  "name": name, "extents": EXTENTS, "digest": os.urandom(32),
                  "mtime": time.time(), "commit": os.urandom(16).hex(),
                  "chunks": [os.urandom(32)]}
        request = [F(p.encode(header)), BLOB]
        route = {"t": "rep", "k": key, "ok": True, "inv": name, "fill": MANIFEST}
        reply = [F(p.encode(route)), F(p.encode({"v": 3, "id": rid, "ok": True}))]
    return request, reply

worker = b"cache" if op == "get" else b"storage"
def one():
    request, reply = frames(core.dispatcher.newest_key + 1)
    core.client_message(b"client-1", request)
    core.worker_message(worker, reply)

for _ in range(2000):
    one()
runs = []
for _ in range(5):
    t0 = time.process_time()
    for _ in range(n):
        one()
    t1 = time.process_time()
    for _ in range(n):
        frames(1)
    t2 = time.process_time()
    runs.append(((t1 - t0) - (t2 - t1)) / n * 1e6)
print(statistics.median(runs))
"""

V = p.PROTOCOL_VERSION
BLOB = bytes(p.pack_data(os.urandom(4096)))
EXTENTS = p.pack_extents(((1 << 20, 4096),))
MANIFEST = msgpack.packb(
    {
        "name": "bench/object-000001",
        "size": 4096,
        "digest": os.urandom(32),
        "chunk_size": 1 << 20,
        "chunks": [os.urandom(32)],
        "mtime": 1.7e9,
        "version": 12345,
        "meta": {"etag": "0123456789abcdef0123456789abcdef"},
    },
    use_bin_type=True,
)


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def cpu(pid: int) -> tuple[float, float]:
    """(process CPU-seconds, its main thread's), in nanoseconds from each thread's
    /proc/PID/task/TID/schedstat (its time on a CPU)."""
    total = main = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended
        total += ns
        if int(tid) == pid:
            main = ns
    return total / 1e9, main / 1e9


class Rig:
    """A broker from ``tree`` with a client and two fake workers (cache, storage) around it."""

    live: "list[Rig]" = []  # every rig's fake workers beat while any rig runs

    def __init__(self, tree: str, profile: str = "") -> None:
        env = dict(os.environ, PYTHONPATH=tree)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *([profile] if profile else [])],
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        frontend, backend = self.proc.stdout.readline().split()
        self.ctx = zmq.Context()
        self.client = self._socket(frontend)
        self.cache = self._socket(backend, b"fake-cache")
        self.storage = self._socket(backend, b"fake-storage")
        self.cache.send(pack({"t": "ready", "v": V, "svc": "cache", "wid": "c1", "store": None}))
        self.storage.send(
            pack(
                {
                    "t": "ready",
                    "v": V,
                    "svc": "storage",
                    "wid": "s1",
                    "store": "bench-store",
                    "digest_fn": "blake3",
                }
            )
        )
        for sock in (self.cache, self.storage):
            assert sock.poll(5000), "no welcome"
            route = msgpack.unpackb(sock.recv_multipart()[0])
            assert route["t"] == "welcome", route
        self.ids = itertools.count(1)
        self.filled = 0  # bytes of fills the fake cache took
        self.beat = 0.0
        Rig.live.append(self)

    def _socket(self, endpoint: str, ident: bytes | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        if ident is not None:
            sock.identity = ident
        sock.connect(endpoint)
        return sock

    def _request(self, op: str) -> list:
        req_id = next(self.ids)
        name = f"bench/object-{req_id % 1000:06d}"
        if op == "get":
            return [pack({"v": V, "op": "get", "id": req_id, "ttl_ms": 30000, "name": name})]
        header = {
            "v": V,
            "op": "commit",
            "id": req_id,
            "ttl_ms": 30000,
            "name": name,
            "extents": EXTENTS,
            "digest": os.urandom(32),
            "mtime": time.time(),
            "commit": os.urandom(16).hex(),
            "chunks": [os.urandom(32)],
        }
        return [pack(header), BLOB]

    def _worker(self, sock: zmq.Socket) -> None:
        """Answer what reached a fake worker (and take the cache's invalidations and fills)."""
        while sock.poll(0):
            frames = sock.recv_multipart(copy=False)
            route = msgpack.unpackb(frames[0].buffer)
            kind = route.get("t")
            if kind != "req":
                if kind == "inv" and len(frames) > 1:
                    self.filled += len(frames[1].buffer)
                continue
            header = msgpack.unpackb(frames[1].buffer)
            rep = {"t": "rep", "k": route["k"], "ok": True}
            if header["op"] == "get":
                rep["cache"] = "hit"
                reply = {"v": V, "id": header["id"], "ok": True, "manifest": MANIFEST}
                sock.send_multipart([pack(rep), pack(reply), BLOB], copy=False)
            else:
                rep["inv"] = header["name"]
                rep["fill"] = MANIFEST
                reply = {"v": V, "id": header["id"], "ok": True, "stat": {"version": 1}}
                sock.send_multipart([pack(rep), pack(reply)], copy=False)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.beat >= 0.25:
            self.beat = now
            self.cache.send(pack({"t": "hb", "st": {"filled": self.filled}}))
            self.storage.send(pack({"t": "hb"}))

    def run(self, op: str, count: int, window: int) -> None:
        """``count`` requests of ``op``, ``window`` in flight."""
        poller = zmq.Poller()
        for sock in (self.client, self.cache, self.storage):
            poller.register(sock, zmq.POLLIN)
        sent = done = 0
        while done < count:
            while sent < count and sent - done < window:
                self.client.send_multipart(self._request(op), copy=False)
                sent += 1
            events = dict(poller.poll(5000))
            if not events:
                raise RuntimeError(f"stalled at {done} of {count}")
            if self.cache in events:
                self._worker(self.cache)
            if self.storage in events:
                self._worker(self.storage)
            while self.client.poll(0):
                frames = self.client.recv_multipart(copy=False)
                reply = msgpack.unpackb(frames[0].buffer)
                if not reply.get("ok"):
                    raise RuntimeError(f"error reply: {reply}")
                done += 1
            for rig in Rig.live:
                rig._heartbeat()

    def measure(self, op: str, count: int, window: int, spy: str = "") -> tuple[float, float]:
        """µs of broker CPU per request (process, main thread) over ``count`` requests;
        ``spy``: py-spy samples the broker meanwhile, its raw output to that file."""
        self.run(op, 200, window)  # warm
        sampler = None
        if spy:
            py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
            sampler = subprocess.Popen(
                [py_spy, "record", "-p", str(self.proc.pid), "-r", "500", "--native"]
                + ["-f", "raw", "-o", spy],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
        before = cpu(self.proc.pid)
        self.run(op, count, window)
        after = cpu(self.proc.pid)
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(30)
        return (after[0] - before[0]) * 1e6 / count, (after[1] - before[1]) * 1e6 / count

    def close(self) -> None:
        Rig.live.remove(self)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.ctx.destroy(linger=0)


def core_alone(trees: list[str], ops: tuple, count: int, rounds: int) -> int:
    """``--core``: each tree's Core in a process of its own, in turns, ``rounds`` times."""
    print(f"load average {os.getloadavg()}, {count} requests x 5 per run")
    results: dict = {}  # (tree, op) -> [µs per request] by round
    for r in range(rounds):
        for op in ops:
            for tree in trees if r % 2 == 0 else trees[::-1]:
                out = subprocess.run(
                    [sys.executable, "-c", CORE_CHILD, op, str(count)],
                    cwd=tree,
                    env=dict(os.environ, PYTHONPATH=tree),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                results.setdefault((tree, op), []).append(float(out))
    print(f"load average {os.getloadavg()}")
    print(f"Core alone, median over {rounds} rounds: µs of CPU per request; median ratio")
    for op in ops:
        first = results[(trees[0], op)]
        for tree in trees:
            runs = results[(tree, op)]
            ratio = statistics.median(a / b for a, b in zip(runs, first, strict=True))
            print(
                f"  {op} {os.path.basename(tree):>14}: {statistics.median(runs):6.2f}  x{ratio:.3f}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("get", "put", "both"), default="both")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tree", action="append", help="source tree of a broker (default: this)")
    ap.add_argument("--profile", default="", help="cProfile the broker; stats to OUT-*.prof")
    ap.add_argument("--spy", default="", help="py-spy the broker; raw samples to OUT-*.txt")
    ap.add_argument("--core", action="store_true", help="fms.broker.Core alone, no sockets")
    args = ap.parse_args(argv)
    trees = [os.path.abspath(t) for t in (args.tree or [ROOT])]
    ops = ("get", "put") if args.op == "both" else (args.op,)
    if args.core:
        return core_alone(trees, ops, args.requests, args.rounds)
    results: dict = {}  # (tree, op) -> [(process µs, main thread µs)] by round
    print(f"load average {os.getloadavg()}, {args.requests} requests, window {args.window}")
    if args.profile or args.spy:  # one broker per run: its profile is of that run alone
        for tree in trees:
            for op in ops:
                name = f"{os.path.basename(tree)}-{op}"
                out = os.path.abspath(f"{args.profile}-{name}.prof") if args.profile else ""
                spy = os.path.abspath(f"{args.spy}-{name}.txt") if args.spy else ""
                rig = Rig(tree, out)
                try:
                    figures = rig.measure(op, args.requests, args.window, spy)
                finally:
                    rig.close()
                print(f"{name}: {figures[0]:6.1f} µs/request, main thread {figures[1]:6.1f}")
        return 0
    # One broker per tree, all up at once; in each round every tree takes a turn at each op
    # (the order turned every round), so that the figures compared were taken side by side.
    rigs = {tree: Rig(tree) for tree in trees}
    try:
        for rig in rigs.values():
            for op in ops:
                rig.run(op, 2000, args.window)  # warm
        for r in range(args.rounds):
            for op in ops:
                order = trees if r % 2 == 0 else trees[::-1]
                for tree in order:
                    figures = rigs[tree].measure(op, args.requests, args.window)
                    results.setdefault((tree, op), []).append(figures)
    finally:
        for rig in rigs.values():
            rig.close()
    print(f"load average {os.getloadavg()}")
    print(
        f"median over {args.rounds} rounds: µs of broker CPU per request (its main thread's); "
        "the median of each round's ratio to the first tree"
    )
    for op in ops:
        first = results[(trees[0], op)]
        for tree in trees:
            runs = results[(tree, op)]
            total = statistics.median(r[0] for r in runs)
            main_thread = statistics.median(r[1] for r in runs)
            ratio = statistics.median(r[0] / f[0] for r, f in zip(runs, first, strict=True))
            ratio_main = statistics.median(r[1] / f[1] for r, f in zip(runs, first, strict=True))
            print(
                f"  {op} {os.path.basename(tree):>14}: {total:6.1f} ({main_thread:6.1f})  "
                f"x{ratio:.3f} (x{ratio_main:.3f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
