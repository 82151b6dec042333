"""Peak memory of every process under the floods of issue 17 (not part of the test suite).

    python -m benchmarks.floods [--seconds 10] [--clients N] [--only NAME ...]

Each scenario starts its own cluster (broker, cache, two storage workers, on random loopback
ports), runs one attack for a bounded time with a well-behaved client beside it that reads a
200 KiB file and a 16 MiB file of 4 MiB chunks every 0.2 s, and reports each process's peak
RSS (VmHWM) and what the well-behaved client saw: reads (and, every round, a put of 64 KiB)
that succeeded / failed, their p99 and the slowest.  ``--clients`` defaults to each scenario's own
count (8, or the one its line says).

- ``bomb``: 15 frames of 32 MiB of empty msgpack arrays to the frontend, 3 to the backend;
- ``flood``: clients send 128 have/ls each (the most they may have in flight), then leave;
- ``nonreaders``: clients that never read ask again and again for 16 MiB chunks;
- ``slowreaders``: clients read a file of 16 MiB chunks 1 MiB every 50 ms.
- ``uploaders``: 9 connections keep 64 MiB of uploads each in flight (more than the 512 MiB
  total) while the legit client uploads 2 MiB files beside them.
- ``pacednonreaders``: 300 clients each ask for a 16 MiB chunk once a second and never read
  (each reply leaves the outbox for ZeroMQ: it must still count);
- ``fsck``: 100 connections each keep an fsck in flight.
"""

import argparse
import os
import tempfile
import threading
import time

import msgpack
import zmq
from harness import Cluster

from fms import wire as p

MiB = p.MiB


class Legit(threading.Thread):
    """Reads each of ``files`` (name -> content) every 0.2 s and checks it; counts successes,
    failures and each one's time; and puts a 64 KiB file each round."""

    def __init__(self, cluster, files: dict):
        super().__init__(daemon=True)
        self.cluster, self.files = cluster, files
        self.ok = self.failed = 0
        self.times: list = []
        self.stop = threading.Event()

    @property
    def slowest(self) -> float:
        return max(self.times, default=0.0)

    @property
    def p99(self) -> float:
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0

    def _timed(self, action) -> None:
        start = time.monotonic()
        try:
            good = action()
        except Exception:
            good = False
        self.times.append(time.monotonic() - start)
        if good:
            self.ok += 1
        else:
            self.failed += 1

    def run(self):
        mine = os.urandom(64 * 1024)
        with self.cluster.client(timeout=5.0, retries=0) as c:
            while not self.stop.is_set():
                for name, data in self.files.items():
                    self._timed(lambda name=name, data=data: c.get_bytes(name) == data)
                self._timed(lambda: c.put_bytes(mine, "legit-put") or True)
                self.stop.wait(0.2)


def _dealer(endpoint, rcvhwm=None):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    if rcvhwm:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    sock.connect(endpoint)
    return sock


def bomb(cluster, seconds, clients, big):
    frame = msgpack.packb([[]] * (p.MAX_FRAME_SIZE - 16))
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
                            "v": 1,
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
                        p.encode({"v": 1, "op": "chunk", "id": n, "hash": digest}), zmq.NOBLOCK
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
        p.encode({"v": 1, "op": "put_chunk", "id": 0, "hash": p.sha256(chunk)}),
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


def pacednonreaders(cluster, seconds, clients, big):
    socks = [_dealer(cluster.frontend, rcvhwm=1) for _ in range(clients)]
    digest, n = big["chunks"][0], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for sock in socks:
            n += 1
            request = {"v": 1, "op": "chunk", "id": n, "hash": digest, "len": 16 * MiB}
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
        sock.send(p.encode({"v": 1, "op": "fsck", "id": i}))
    n, end = len(socks), time.monotonic() + seconds
    while time.monotonic() < end:
        for sock, _ in poller.poll(100):
            sock.recv_multipart()
            n += 1
            sock.send(p.encode({"v": 1, "op": "fsck", "id": n}))
    for sock in socks:
        sock.close()


DEFAULT_CLIENTS = {"pacednonreaders": 300, "fsck": 100}
SCENARIOS = {
    "bomb": bomb,
    "flood": flood,
    "nonreaders": nonreaders,
    "slowreaders": slowreaders,
    "uploaders": uploaders,
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
            alive = all(proc.alive() for proc in cluster.procs)
        finally:
            cluster.stop()
    rss = " ".join(f"{proc}={rss / MiB:.0f}MiB" for proc, rss in peaks.items())
    print(
        f"{name:<12} peak RSS: {rss} | legit ok={legit.ok} failed={legit.failed} "
        f"p99={legit.p99:.2f}s slowest={legit.slowest:.2f}s | all alive={alive}",
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
