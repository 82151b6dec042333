"""Peak memory of every process under the floods of issue 17 (not part of the test suite).

    python -m benchmarks.floods [--seconds 10] [--clients N] [--only NAME ...]

Each scenario starts its own cluster (broker, cache, two storage workers, on random loopback
ports), runs one attack for a bounded time with a well-behaved client beside it that reads a
200 KiB file and a 16 MiB file of 4 MiB chunks every 0.2 s, and reports each process's peak
RSS (VmHWM) and what the well-behaved client saw: reads (and, every round, a put of 64 KiB)
that succeeded / failed, their p99 and the slowest.  ``--clients`` defaults to each scenario's own
count (8, or the one its line says).

- ``none``: no attack, the well-behaved client alone (the peer: its p99 is the machine's);
- ``bomb``: 15 frames of 32 MiB of empty msgpack arrays to the frontend, 3 to the backend;
- ``flood``: clients send 128 have/ls each (the most they may have in flight), then leave;
- ``nonreaders``: clients that never read ask again and again for 16 MiB chunks;
- ``slowreaders``: clients read a file of 16 MiB chunks 1 MiB every 50 ms.
- ``uploaders``: 9 connections keep 64 MiB of uploads each in flight (more than the 512 MiB
  total) while the legit client uploads 2 MiB files beside them.
- ``pacednonreaders``: 300 clients each ask for a 16 MiB chunk once a second and never read
  (each reply leaves the outbox for ZeroMQ: it must still count);
- ``fsck``: 100 connections each keep an fsck in flight.

Big manifests (issue 21; files made cheap by dedup and ``cp``, as an attacker makes them):

- ``million``: clients commit files of 1,000,000 x one chunk (a sparse disk image), again and
  again (each commit sends its two distinct pages and names the 16);
- ``bigls``: ``ls``, ``ls -r``, ``find``, ``du`` and ``fsck`` of a folder of 200 files of 65,536
  chunks each, in CLI processes (their peak RSS is reported as ``cli``), then ``rm -r`` of it;
- ``bigget``: ``get -r`` of a folder of 128 files of 8 GiB each (1 MiB chunks of zeros and a
  1 MiB tail: written as sparse files), while clients ask ``get_many`` of all 128 names;
- ``cps``: clients ``cp`` a 65,536-chunk file again and again; reports the bytes the store's
  data directory grew by per copy.
"""

import argparse
import multiprocessing
import os
import tempfile
import threading
import time

import zmq
from harness import Cluster, cli_with_rss

from fms import wire as p

# The floods' stores are new ones: chunks are named by their BLAKE3 digest.
digest_of = p.hasher(p.NEW_STORE_DIGEST)

MiB = p.MiB


class Legit:
    """Reads each of ``files`` (name -> content) every 0.2 s and checks it; counts successes,
    failures and each one's time; and puts a 64 KiB file each round.  It runs in a process of
    its own, so that what the attack does in this one (building a frame, its threads) never
    holds it up: its latencies are fms's."""

    def __init__(self, cluster, files: dict):
        mp = multiprocessing.get_context("fork")
        self.stop = mp.Event()
        self._results = mp.Queue()
        self._proc = mp.Process(target=self._run, args=(cluster, files), daemon=True)
        self.ok = self.failed = 0
        self.slowest = 0.0
        self.latencies: list = []
        self.worst: list = []  # the five slowest (seconds, what)

    def start(self):
        self._proc.start()

    def join(self, timeout: float):
        self.ok, self.failed, timed = self._results.get(timeout=timeout)
        self.latencies = [t for t, _, _ in timed]
        self.slowest = max(self.latencies, default=0.0)
        self.worst = sorted(timed, reverse=True)[:5]
        self._proc.join(timeout)

    def _run(self, cluster, files: dict):
        mine = os.urandom(64 * 1024)
        counts, latencies = [0, 0], []
        began = time.monotonic()

        def timed(what, action) -> None:
            start = time.monotonic()
            try:
                good = action()
            except Exception:
                good = False
            latencies.append((time.monotonic() - start, what, start - began))
            counts[0 if good else 1] += 1

        with cluster.client(timeout=5.0, retries=0) as c:
            while not self.stop.is_set():
                for name, data in files.items():
                    timed(f"get {name}", lambda name=name, data=data: c.get_bytes(name) == data)
                timed("put", lambda: c.put_bytes(mine, "legit-put") is not None)
                self.stop.wait(0.2)
        self._results.put((counts[0], counts[1], latencies))


def _dealer(endpoint, rcvhwm=None):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    if rcvhwm:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    sock.connect(endpoint)
    return sock


def bomb(cluster, seconds, clients, big):
    count = p.MAX_FRAME_SIZE - 16  # empty arrays, as msgpack packs a list of that many
    frame = b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count
    front, backs = _dealer(cluster.frontend), [_dealer(cluster.backend) for _ in range(3)]
    for i in range(15):
        front.send(frame)
        if i < 3:
            backs[i].send(frame)
    time.sleep(seconds)
    for sock in (front, *backs):
        sock.close()


def flood(cluster, seconds, clients, big):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        socks = []
        for _ in range(clients):
            sock = _dealer(cluster.frontend)
            for i in range(128):
                sock.send(
                    p.encode(
                        {
                            "v": p.PROTOCOL_VERSION,
                            "op": "ls" if i % 2 else "have",
                            "id": i,
                            "hashes": [bytes(32)] * 512,
                        }
                    )
                )
            socks.append(sock)
        time.sleep(1.0)
        for sock in socks:
            sock.close()


def nonreaders(cluster, seconds, clients, big):
    socks = [_dealer(cluster.frontend, rcvhwm=1) for _ in range(clients)]
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for sock in socks:
            for digest in big["chunks"]:
                n += 1
                try:
                    sock.send(
                        p.encode({"v": p.PROTOCOL_VERSION, "op": "chunk", "id": n, "hash": digest}),
                        zmq.NOBLOCK,
                    )
                except zmq.Again:
                    pass
        time.sleep(0.1)
    for sock in socks:
        sock.close()


def uploaders(cluster, seconds, clients, big):
    """One more connection than the upload total has room for, each keeping its 64 MiB of
    1 MiB uploads in flight, never reading; the legit client also uploads beside them."""
    chunk = os.urandom(MiB - 64)
    header, data = (
        p.encode({"v": p.PROTOCOL_VERSION, "op": "put_chunk", "id": 0, "hash": digest_of(chunk)}),
        p.pack_data(chunk),
    )
    socks = [_dealer(cluster.frontend, rcvhwm=1) for _ in range(max(clients, 9))]
    end = time.monotonic() + seconds
    ok = failed = 0
    with cluster.client(timeout=10.0, retries=0) as c:
        while time.monotonic() < end:
            for sock in socks:
                for _ in range(16):
                    try:
                        sock.send_multipart([header, data], zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
            try:
                c.put_bytes(os.urandom(2 * MiB), "legit-upload")
                ok += 1
            except Exception:
                failed += 1
    print(f"uploaders: the legit client's 2 MiB uploads beside them: ok={ok} failed={failed}")
    for sock in socks:
        sock.close()


def slowreaders(cluster, seconds, clients, big):
    stop = threading.Event()

    def read():
        with cluster.client(timeout=30.0) as c:
            while not stop.is_set():
                with c.open(big["name"]) as f:
                    while not stop.is_set() and f.read(MiB):
                        stop.wait(0.05)

    threads = [threading.Thread(target=read, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)


def _commit_repeated(client, name: str, chunk: bytes, count: int, tail: bytes = b""):
    """A file of ``count`` x ``chunk`` (and ``tail``), sent as a client sends it."""
    from fms.client.upload import Plan, commit_plan

    for piece in {chunk, tail} - {b""}:
        client.call("put_chunk", data=p.pack_data(piece), hash=digest_of(piece))
    digests = digest_of(chunk) * count + (digest_of(tail) if tail else b"")
    plan = Plan(len(chunk) * count + len(tail), len(chunk), digests, time.time(), None, digest_of)
    return commit_plan(client.session, name, plan)


def _in_threads(clients: int, seconds: float, work):
    """Run ``work(i, n)`` (thread i, its n-th round) in ``clients`` threads for ``seconds``."""
    end = time.monotonic() + seconds
    errors = []

    def loop(i):
        n = 0
        while time.monotonic() < end:
            try:
                work(i, n)
            except Exception as exc:  # counted: an attack's failures are its own
                errors.append(repr(exc))
            n += 1

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return errors


CLI_PEAKS = []  # the peak RSS of every CLI process a scenario ran


def _cli(cluster, *args, timeout: float = 600):
    """Run the CLI in its own process; its peak RSS goes to CLI_PEAKS."""
    run, rss = cli_with_rss(cluster, *args, timeout=timeout)
    CLI_PEAKS.append(rss)
    if run.returncode:
        print(f"  {' '.join(args)}: exit {run.returncode}: {run.stderr.decode()[-300:]}")
    return run


def million(cluster, seconds, clients, big):
    with cluster.client() as c:
        c.call("put_chunk", data=p.pack_data(bytes(4096)), hash=digest_of(bytes(4096)))
    made = []

    def work(i, n):
        with cluster.client(timeout=30.0) as c:
            start = time.monotonic()
            _commit_repeated(c, f"disk/{i}-{n}.img", bytes(4096), 1_000_000)
            made.append(time.monotonic() - start)

    errors = _in_threads(clients, seconds, work)
    print(
        f"million: {len(made)} commits of 1,000,000 chunks, slowest {max(made, default=0):.2f} s, "
        f"{len(errors)} failed {errors[:1]}"
    )


def bigls(cluster, seconds, clients, big):
    with cluster.client() as c:
        _commit_repeated(c, "big/000", b"x" * 4096, 65_536)
        for i in range(1, 200):
            c.cp("big/000", f"big/{i:03d}")
    end = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < end or not runs:
        for args in (("ls", "big/"), ("ls", "-r"), ("find", "big/"), ("du", "big/"), ("fsck",)):
            _cli(cluster, *args, "--json")
        runs += 1
    _cli(cluster, "rm", "-r", "big/")
    print(f"bigls: {runs} rounds of ls, ls -r, find, du, fsck over 200 x 65,536 chunks; rm -r")


def bigget(cluster, seconds, clients, big):
    with cluster.client() as c:
        _commit_repeated(c, "big/000", bytes(MiB), 8191, tail=os.urandom(MiB))
        for i in range(1, 128):
            c.cp("big/000", f"big/{i:03d}")
    names = [f"big/{i:03d}" for i in range(128)]
    sizes = []

    def work(i, n):
        with cluster.client() as c:
            header, _ = c.call("get_many", names=names)
            sizes.append(len(p.encode(header)))

    with tempfile.TemporaryDirectory(prefix="fms-bigget-") as dest:
        start = time.monotonic()
        run = _cli(cluster, "get", "-r", "big", os.path.join(dest, "out"))
        took = time.monotonic() - start
        errors = _in_threads(clients, seconds, work)
    print(
        f"bigget: get -r of 128 x 8 GiB: exit {run.returncode} in {took:.1f} s; get_many of the "
        f"128 names: {len(sizes)} replies of at most {max(sizes, default=0):,} bytes, "
        f"{len(errors)} failed"
    )


def cps(cluster, seconds, clients, big):
    with cluster.client() as c:
        _commit_repeated(c, "big", b"y" * 4096, 65_536)

    def du() -> int:
        total = 0
        for root, _dirs, files in os.walk(cluster.storage_dir):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    before, made = du(), []

    def work(i, n):
        with cluster.client() as c:
            c.cp("big", f"copies/{i}/{n}")
            made.append(1)

    errors = _in_threads(clients, seconds, work)
    grown = du() - before
    print(
        f"cps: {len(made)} copies of a 65,536-chunk file, data directory grew {grown:,} bytes "
        f"({grown // max(1, len(made)):,} per copy), {len(errors)} failed"
    )


def pacednonreaders(cluster, seconds, clients, big):
    socks = [_dealer(cluster.frontend, rcvhwm=1) for _ in range(clients)]
    digest, n = big["chunks"][0], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for sock in socks:
            n += 1
            request = {
                "v": p.PROTOCOL_VERSION,
                "op": "chunk",
                "id": n,
                "hash": digest,
                "len": 16 * MiB,
            }
            try:
                sock.send(p.encode(request), zmq.NOBLOCK)
            except zmq.Again:
                pass
        time.sleep(1.0)
    with cluster.client(timeout=5.0) as c:
        held = c.status()["broker"]["held_bytes"]
    print(f"pacednonreaders: the broker's status says it holds {held}", flush=True)
    for sock in socks:
        sock.close()


def fsck(cluster, seconds, clients, big):
    socks = [_dealer(cluster.frontend) for _ in range(clients)]
    poller = zmq.Poller()
    for i, sock in enumerate(socks):
        poller.register(sock, zmq.POLLIN)
        sock.send(p.encode({"v": p.PROTOCOL_VERSION, "op": "fsck", "id": i}))
    n, end = len(socks), time.monotonic() + seconds
    while time.monotonic() < end:
        for sock, _ in poller.poll(100):
            sock.recv_multipart()
            n += 1
            sock.send(p.encode({"v": p.PROTOCOL_VERSION, "op": "fsck", "id": n}))
    for sock in socks:
        sock.close()


def none(cluster, seconds, clients, big):
    """No attack: the well-behaved client alone, the peer every flood's latency is compared
    with on the same machine in the same run."""
    time.sleep(seconds)


DEFAULT_CLIENTS = {"pacednonreaders": 300, "fsck": 100}
SCENARIOS = {
    "none": none,
    "bomb": bomb,
    "flood": flood,
    "nonreaders": nonreaders,
    "slowreaders": slowreaders,
    "uploaders": uploaders,
    "million": million,
    "bigls": bigls,
    "bigget": bigget,
    "cps": cps,
    "pacednonreaders": pacednonreaders,
    "fsck": fsck,
}


def run(name, seconds, clients):
    with tempfile.TemporaryDirectory(prefix="fms-floods-") as folder:
        cluster = Cluster(folder)
        try:
            cluster.start_all(storage=2, cache_bytes="1G")
            files = {"legit": os.urandom(200 * 1024), "legit-large": os.urandom(16 * MiB)}
            with cluster.client(chunk_size=4 * MiB) as c:  # replies over 256 KiB
                c.put_bytes(files["legit-large"], "legit-large")
            with cluster.client(chunk_size=16 * MiB) as c:
                c.put_bytes(files["legit"], "legit")
                c.put_bytes(os.urandom(64 * MiB), "big")
                header, _ = c.call("get", name="big")
            legit = Legit(cluster, files)
            legit.start()
            SCENARIOS[name](cluster, seconds, clients, header["manifest"])
            legit.stop.set()
            legit.join(30)
            peaks = cluster.peak_rss()
            if CLI_PEAKS:
                peaks["cli"] = max(CLI_PEAKS)
                CLI_PEAKS.clear()
            alive = all(proc.alive() for proc in cluster.procs)
        finally:
            cluster.stop()
    rss = " ".join(f"{proc}={rss / MiB:.0f}MiB" for proc, rss in peaks.items())
    waits = sorted(legit.latencies)
    p99 = waits[int(len(waits) * 0.99)] if waits else 0.0
    print(
        f"{name:<12} peak RSS: {rss} | legit ok={legit.ok} failed={legit.failed} "
        f"p99={p99:.2f}s slowest={legit.slowest:.2f}s | all alive={alive}\n    slowest: "
        + ", ".join(f"{what} {t:.2f}s at {at:.1f}s" for t, what, at in legit.worst),
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    args = parser.parse_args(argv)
    for name in args.only or SCENARIOS:
        run(name, args.seconds, args.clients or DEFAULT_CLIENTS.get(name, 8))


if __name__ == "__main__":
    main()
