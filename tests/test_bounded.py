"""Work bounded by what a request carries, at the broker (issue 21): slow operations take turns,
and bytes handed to ZeroMQ still count.  Real processes on random loopback ports, with a
well-behaved client beside each attack that must keep being served."""

import threading

import zmq
from conftest import random_bytes

from fms import wire as p

MiB = p.MiB


def _dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def _slow_cluster(make_cluster, delay: float):
    """Two storage workers that take ``delay`` seconds a request, and a cache."""
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache()
    for wid in ("storage-a", "storage-b"):
        cluster.start_storage(wid=wid, delay=delay)
    cluster.wait_workers(storage=2, cache=1)
    return cluster


class Flood(threading.Thread):
    """``clients`` connections, each keeping one request of ``fields`` in flight: as soon as
    one is answered (ok, or refused), the next is sent."""

    def __init__(self, endpoint: str, clients: int, fields: dict):
        super().__init__(daemon=True)
        self.endpoint, self.clients, self.fields = endpoint, clients, fields
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.outcomes: dict = {}
        self.error = None

    def run(self):
        socks = [_dealer(self.endpoint) for _ in range(self.clients)]
        try:
            poller = zmq.Poller()
            for i, sock in enumerate(socks):
                poller.register(sock, zmq.POLLIN)
                sock.send(p.encode({"v": 1, "id": i, **self.fields}))
            self.ready.set()
            sent = len(socks)
            while not self.stop.is_set():
                for sock, _ in poller.poll(100):
                    header = p.decode(sock.recv_multipart()[0])
                    outcome = "ok" if header["ok"] else header["error"]
                    self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                    sent += 1
                    sock.send(p.encode({"v": 1, "id": sent, **self.fields}))
        except Exception as exc:  # reported by the test
            self.error = exc
            self.ready.set()
        finally:
            for sock in socks:
                sock.close()


def test_a_flood_of_fsck_leaves_the_workers_to_everyone_else(make_cluster):
    """100 connections each keeping an fsck in flight, against storage that takes 0.2 s a
    request: at most 8 are held at once and the rest are answered `busy`, so a normal client's
    put and get, which may not retry, are served within one 3 s timeout (before: the fscks took
    all 32 slots of the storage workers' credit, and the put waited behind them)."""
    cluster = _slow_cluster(make_cluster, 0.2)
    flood = Flood(cluster.frontend, 100, {"op": "fsck"})
    flood.start()
    try:
        assert flood.ready.wait(10) and flood.error is None
        data = random_bytes(64 * 1024, seed=5)
        with cluster.client(timeout=3.0, retries=0) as c:
            for i in range(3):
                c.put_bytes(data, f"normal/{i}")
                assert c.get_bytes(f"normal/{i}") == data
            status = c.status()["broker"]
    finally:
        flood.stop.set()
        flood.join(10)
    assert flood.error is None, flood.error
    assert flood.outcomes.get("busy", 0) > 0  # the flood was turned away
    assert status["held_bytes"]["heavy"] <= 8 and status["busy"] > 0
