"""Hostile load (issue 17): each attack with bounded time and count, against real processes on
random loopback ports, with a well-behaved client beside it that must keep being served."""

import contextlib
import os
import signal
import threading
import time
import tracemalloc

import msgpack
import pytest
import zmq
from conftest import random_bytes, wait_for
from harness import peak_rss
from storage_helpers import h

import fms
from fms import limits
from fms import wire as p

MiB = p.MiB


def _empty_arrays(n: int) -> bytes:
    """``msgpack.packb([[]] * n)`` for n of 65,536 or more (an array 32 header, then n empty
    fixarrays), built without the list: packb of 32 million items took 1.5 s in every test
    process at collection."""
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


# 32 MiB of empty arrays: decodes to about 2.3 GiB in about 8 s without limits.
BOMB = _empty_arrays(p.MAX_FRAME_SIZE - 16)


def _dealer(endpoint, **opts):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    for key, value in opts.items():
        sock.setsockopt(getattr(zmq, key), value)
    sock.connect(endpoint)
    return sock


def _keep_sending(socks, messages):
    """Send each socket every message it will take now, without ever reading."""
    for sock in socks:
        for frames in messages():
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break


def _recv(sock, timeout=5.0):
    assert sock.poll(int(timeout * 1000)), "no reply in time"
    return sock.recv_multipart()


# --- 1. bounded decoding ---


@contextlib.contextmanager
def _peak_allocation():
    """Trace Python's allocations in the block; yields a function that gives their peak in bytes
    (a count, not a time: the same on a loaded machine)."""
    seen = [0]
    tracemalloc.start()
    try:
        yield lambda: seen[0]
    finally:
        seen[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_decoding_refuses_oversize_and_amplifying_frames_before_building_them():
    assert _empty_arrays(70_000) == msgpack.packb([[]] * 70_000)  # BOMB is what packb gives
    assert len(BOMB) <= p.MAX_FRAME_SIZE
    # Refused before anything is built: decoding BOMB would build a list of 32 million items
    # (256 MiB of pointers, over a second); the refusal allocates next to nothing.
    for kind in ("request", "route"):
        with _peak_allocation() as peak, pytest.raises(limits.FrameTooLarge):
            p.decode(BOMB, kind)
        assert peak() < 64 * 1024
    # Under the size limit, nesting is what is refused: 60 KiB of empty arrays.
    small_bomb = msgpack.packb({"v": p.PROTOCOL_VERSION, "op": "ls", "id": 1, "x": [[]] * 60000})
    assert len(small_bomb) < limits.MAX_HEADER
    with pytest.raises(fms.BadRequest, match="not valid msgpack"):
        p.decode(small_bomb, "request")
    # A commit may be large, but only flat: a list of digests, nothing nested.
    big_commit = {
        "v": p.PROTOCOL_VERSION,
        "op": "commit",
        "id": 1,
        "name": "f",
        "chunks": [b"d" * 32] * 60000,
    }
    assert p.decode(p.encode(big_commit), "request")["chunks"][-1] == b"d" * 32
    assert limits.peek(p.encode(big_commit)) == {"v": p.PROTOCOL_VERSION, "op": "commit", "id": 1}
    nested = msgpack.packb(
        {"v": p.PROTOCOL_VERSION, "op": "commit", "id": 1, "chunks": [[]] * (MiB)}
    )
    ints = msgpack.packb({"v": p.PROTOCOL_VERSION, "op": "commit", "id": 1, "chunks": [0] * MiB})
    for frame in (nested, ints):  # a million empty lists; a million tiny ints: too long a list
        # Unpacked, either builds a million objects (64 MiB for the lists); refused, no more
        # than copies of the 1 MiB frame are made.
        with _peak_allocation() as peak, pytest.raises(fms.BadRequest):
            p.decode(frame, "request")
        assert peak() < 4 * len(frame)
    with pytest.raises(limits.FrameTooLarge):  # only commit and have may be large
        p.decode(p.encode({**big_commit, "op": "ls"}), "request")


def _map_tree(width: int, depth: int):
    return {f"k{i}": _map_tree(width, depth - 1) for i in range(width)} if depth else {}


def test_a_map_shaped_bomb_in_a_peeked_field_is_refused_without_building_it():
    """Maps nested in a field the broker peeks at (the review's reshaped bomb: 2 s and 750 MiB
    before) are refused; so are keys that are not strings."""
    bomb = msgpack.packb({"op": "have", "v": _map_tree(8, 6)})
    assert len(bomb) > limits.MAX_HEADER
    with pytest.raises(fms.BadRequest):
        limits.peek(bomb)
    with pytest.raises(fms.BadRequest):
        p.decode(bomb, "request")
    with pytest.raises(fms.BadRequest):
        limits.peek(msgpack.packb({("a",) * 3: 1, "op": "have"}, use_bin_type=True))


def test_a_reply_route_with_a_bad_key_costs_one_message_not_the_broker():
    from fms.broker import Broker

    class Frame:
        def __init__(self, data):
            self.bytes = self.buffer = data

    broker = Broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ctx=zmq.Context.instance())
    broker.bind()
    try:
        ident = b"\x00worker"
        broker.process_worker(
            [
                Frame(ident),
                Frame(
                    p.encode(
                        {
                            "t": "ready",
                            "v": p.PROTOCOL_VERSION,
                            "svc": "storage",
                            "wid": "w",
                            "store": "s",
                            "digest_fn": "blake3",
                        }
                    )
                ),
            ]
        )
        assert ident in broker.core.registry.workers
        for key in ([1, 2], {"a": 1}, "k", None):
            broker._guarded(broker.process_worker)(
                [Frame(ident), Frame(p.encode({"t": "rep", "k": key})), Frame(p.encode({}))]
            )
        assert ident in broker.core.registry.workers  # still there, nothing escaped
    finally:
        broker.close()


def test_amplifying_frames_on_both_ports_stall_nobody(cluster):
    """15 bombs to the frontend and 3 to the backend: each is refused before decoding, the
    client beside them keeps being served within its 3 s timeout (decoding one took 8 s before),
    no worker is dropped."""
    data = random_bytes(300 * 1024, 1)
    with cluster.client(timeout=3.0, retries=0) as c:
        c.put_bytes(data, "legit")
        front = _dealer(cluster.frontend)
        backs = [_dealer(cluster.backend) for _ in range(3)]
        try:
            for i in range(15):
                front.send(BOMB)
                if i < 3:
                    backs[i].send(BOMB)
                assert c.get_bytes("legit") == data  # served between the bombs
            for _ in range(15):
                header = p.decode(_recv(front, 10)[0])
                assert header["ok"] is False and header["error"] == "too_large"
                assert "over the limit" in header["message"]
            assert c.stat("legit")["size"] == len(data)
        finally:
            front.close()
            for sock in backs:
                sock.close()
        assert sorted(w["id"] for w in c.status()["workers"]) == [
            "cache-1",
            "storage-a",
            "storage-b",
        ]
    assert all(proc.alive() for proc in cluster.procs)


def test_bad_frames_are_logged_rate_limited_and_never_echo_attacker_text(cluster):
    broker = cluster.procs[0]
    before = len(broker.log())
    sock = _dealer(cluster.frontend)
    try:
        for i in range(300):
            sock.send(p.encode({"v": p.PROTOCOL_VERSION, "op": "x" * 50000, "id": i}))
        for _ in range(300):
            assert p.decode(_recv(sock)[0])["error"] == "bad_request"
    finally:
        sock.close()
    grown = broker.log()[before:]
    assert "x" * 201 not in grown
    assert len(grown) < 20000, f"{len(grown)} bytes of log for 300 bad frames"
    with cluster.client() as c:
        assert c.status()["workers"]


def test_commit_and_have_headers_over_64_kib_still_work(cluster):
    data = random_bytes(10 * MiB, 2)  # 2560 chunks of 4 KiB: headers of ~87 KB
    with cluster.client(chunk_size=p.MIN_CHUNK_SIZE) as c:
        c.put_bytes(data, "many-chunks")
        assert c.get_bytes("many-chunks") == data


# --- 2. only workers serve ---


class FakeWorker:
    """A process on the backend that says it is a worker (in a thread of the test process).

    :param handle: ``handle(header) -> (reply header, data frame or None)`` for each request.
    """

    def __init__(self, endpoint, ready: dict, handle=None):
        import threading

        self.endpoint = endpoint
        self.ready = {"t": "ready", "v": p.PROTOCOL_VERSION, **ready}
        self.handle = handle
        self.welcomed = threading.Event()
        self.refused = threading.Event()
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    def _run(self):
        sock = _dealer(self.endpoint)
        try:
            sock.send(p.encode(self.ready))
            next_beat = time.monotonic() + 0.3
            while not self._stop.is_set():
                if sock.poll(50):
                    frames = sock.recv_multipart()
                    route = p.decode(frames[0])
                    if route["t"] == "welcome":
                        self.welcomed.set()
                    elif route["t"] == "refused":
                        self.refused.set()
                    elif route["t"] == "reregister":
                        sock.send(p.encode(self.ready))
                    elif route["t"] == "req" and self.handle is not None:
                        header, data = self.handle(p.decode(frames[1]))
                        back = {"t": "rep", "k": route["k"], "ok": header["ok"]}
                        self.served += 1
                        sock.send_multipart(
                            [p.encode(back), p.encode(header)]
                            + ([data] if data is not None else [])
                        )
                if time.monotonic() >= next_beat:
                    sock.send(p.encode({"t": "hb"}))
                    next_beat = time.monotonic() + 0.3
            sock.send(p.encode({"t": "bye"}))
        finally:
            sock.close()


def test_an_impostor_registered_first_makes_no_real_storage_worker_exit(make_cluster):
    """Unpinned broker, an impostor of another store registers first: the real worker is
    refused for now, stays up, and serves as soon as the impostor is gone."""
    cluster = make_cluster()
    cluster.start_broker()
    with FakeWorker(
        cluster.backend,
        {"svc": "storage", "wid": "impostor", "store": "bogus", "digest_fn": "blake3"},
    ) as fake:
        assert fake.welcomed.wait(10)
        real = cluster.start_storage(wid="storage-a")
        wait_for(lambda: "different store" in real.log(), 15, "the real worker to be refused")
        assert real.alive()
    wait_for(
        lambda: [w["id"] for w in cluster.workers("storage")] == ["storage-a"],
        15,
        "the real worker to get in once the impostor left",
    )
    with cluster.client() as c:
        c.put_bytes(b"real", "r")
        assert c.get_bytes("r") == b"real"
    assert real.alive()


def test_with_the_store_pinned_an_impostor_first_is_refused_and_real_workers_serve(
    make_cluster, tmp_path
):
    from fms.cli.up import _open_store

    cluster = make_cluster()
    os.makedirs(cluster.storage_dir)
    cluster.start_broker(extra=["--store", _open_store(cluster.storage_dir, None, None)[0]])
    with FakeWorker(
        cluster.backend,
        {"svc": "storage", "wid": "impostor", "store": "bogus", "digest_fn": "blake3"},
        lambda h: (p.ok_reply(h["id"], written=True), None),
    ) as fake:
        assert fake.refused.wait(10) and not fake.welcomed.is_set()
        cluster.start_cache()
        cluster.start_storage(wid="storage-a")
        cluster.start_storage(wid="storage-b")
        cluster.wait_workers(storage=2, cache=1)
        with cluster.client() as c:
            for i in range(30):
                c.put_bytes(b"upload %d" % i, f"u{i}")
            for i in range(30):  # every acked upload is there
                assert c.get_bytes(f"u{i}") == b"upload %d" % i
        assert fake.served == 0 and not fake.welcomed.is_set()
    assert all(proc.alive() for proc in cluster.procs)


def test_a_broker_other_hosts_can_reach_must_be_told_its_store(tmp_path):
    """The store is decided by storage, never by whichever worker registers first: a broker
    whose backend is not loopback refuses to start without --store, and says how to get it;
    storage_worker.py --print-store-id prints the id fms up pins."""
    import subprocess
    import sys

    from fms.cli.up import _open_store

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "broker.py"),
            "--frontend",
            "tcp://127.0.0.1:*",
            "--backend",
            "tcp://0.0.0.0:*",
            "--insecure",
        ],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 1 and b"Traceback" not in run.stderr
    assert b"--store ID" in run.stderr and b"--print-store-id" in run.stderr
    data = tmp_path / "storage"
    data.mkdir()
    printed = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "storage_worker.py"),
            "--data",
            str(data),
            "--print-store-id",
        ],
        capture_output=True,
        timeout=30,
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.decode().strip() == _open_store(str(data), None, None)[0]


def test_a_chunk_failing_verification_is_fetched_once_more_from_storage(make_cluster):
    """A cache (here a fake one) that serves forged bytes: the client checks every chunk and
    a small file's content, asks storage itself once, and gets the truth."""
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=1, cache=0)
    big, small = random_bytes(3 * MiB + 5, 3), b"small and true"
    with cluster.client() as c:
        c.put_bytes(big, "big")
        c.put_bytes(small, "small")
        manifests = {name: c.call("get", name=name)[0]["manifest"] for name in ("big", "small")}

    def forge(header):
        if header["op"] == "get":
            forged = bytes(p.pack_data(b"small and FALSE"[: len(small)]))
            manifest = manifests[header["name"]]
            return (
                p.ok_reply(header["id"], manifest=manifest),
                forged if header["name"] == "small" else None,
            )
        size = len(big) - 3 * MiB if header["hash"] == manifests["big"]["chunks"][-1] else MiB
        return p.ok_reply(header["id"]), bytes(p.pack_data(bytes(size)))

    with FakeWorker(cluster.backend, {"svc": "cache", "wid": "fake-cache"}, forge) as fake:
        assert fake.welcomed.wait(10)
        with cluster.client() as c:
            assert c.get_bytes("big") == big
            assert c.get_bytes("small") == small
        assert fake.served >= 2 + 4  # it was asked, and every answer was refused


# --- 3. deadlines: work outlives no one ---


def _slow(make_cluster, delay: float):
    """A cluster whose two storage workers each take ``delay`` seconds a request."""
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache()
    for wid in ("storage-a", "storage-b"):
        cluster.start_storage(wid=wid, delay=delay)
    cluster.wait_workers(storage=2, cache=1)
    return cluster


@pytest.fixture
def slow_cluster(make_cluster):
    """Storage that takes 50 ms a request: 40 requests a second with two workers."""
    return _slow(make_cluster, 0.05)


def _flood(endpoint, clients: int, per_client: int, ttl_ms=None):
    socks = []
    for _ in range(clients):
        sock = _dealer(endpoint)
        for i in range(per_client):
            # Pages of one entry: each reserves little of the reply budget (see the next test
            # for floods of large pages); folder listings, which do not take turns as deep
            # ones do (tests/test_bounded.py).
            fields = {
                "v": p.PROTOCOL_VERSION,
                "op": "ls" if i % 2 else "have",
                "id": i,
                "prefix": "",
                "folders": True,
                "limit": 1,
                "hashes": [bytes(32)] * 64,
            }
            if ttl_ms is not None:
                fields["ttl_ms"] = ttl_ms
            sock.send(p.encode(fields))
        socks.append(sock)
    return socks


def _broker_status(cluster):
    with cluster.client(timeout=2.0, retries=0) as c:
        return c.status()["broker"]


def _storage_served(cluster) -> int:
    """Requests the broker has sent to storage workers so far."""
    with cluster.client(timeout=2.0, retries=0) as c:
        return _served_by_storage(c)


def _served_by_storage(client) -> int:
    return sum(w["served"] for w in client.status()["workers"] if w["service"] == "storage")


def test_a_flood_from_clients_that_leave_leaves_nothing_behind(slow_cluster):
    """8 clients queue 1024 have/ls (25 s of storage work) and disconnect: their queued work
    is dropped, never sent to storage, so a put and a stat then wait behind at most the
    requests already in the workers' hands (their credit), not behind the flood."""
    socks = _flood(slow_cluster.frontend, 8, 128)
    wait_for(
        lambda: _broker_status(slow_cluster)["queued"]["storage"] > 500,
        10,
        "the flood to be queued at the broker",
    )
    for sock in socks:
        sock.close()
    wait_for(
        lambda: _broker_status(slow_cluster)["queued"]["storage"] == 0,
        8,
        "the gone clients' queued work to be dropped",
    )
    served = _storage_served(slow_cluster)
    # The wait is no measure (the machine may be loaded): what storage was sent is.
    with slow_cluster.client(timeout=60.0, retries=0) as c:
        c.put_bytes(b"after the flood", "after")
        assert c.stat("after")["size"] == 15
    assert _broker_status(slow_cluster)["dropped"] > 500
    # The put's have and commit, and the stat if the cache asked storage: nothing of the flood.
    assert _storage_served(slow_cluster) - served <= 3


@contextlib.contextmanager
def _broker_with_a_mute_worker():
    """``(broker, worker, client)``: a broker in this process, driven message by message, with
    one storage worker registered (a socket that answers nothing unless the test makes it) and
    a client socket; all closed at the end."""
    from fms.broker import Broker
    from fms.wire.frames import drain

    broker = Broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ctx=zmq.Context.instance())
    broker.bind()
    worker, client = _dealer(broker.backend_endpoint), _dealer(broker.frontend_endpoint)
    try:
        worker.send(
            p.encode(
                {
                    "t": "ready",
                    "v": p.PROTOCOL_VERSION,
                    "svc": "storage",
                    "wid": "mute",
                    "store": "s",
                    "digest_fn": "blake3",
                }
            )
        )
        assert broker.backend.poll(5000)
        drain(broker.backend, broker.process_worker, 10)
        yield broker, worker, client
    finally:
        worker.close()
        client.close()
        broker.close()


class _IdentityFrame:
    """What the broker's loop reads of an identity frame: its bytes, and the fd it came on."""

    def __init__(self, data, fd):
        self.bytes, self.fd = data, fd

    def get(self, option):
        assert option == zmq.SRCFD
        return self.fd


def test_a_client_on_the_fd_of_one_that_left_is_not_taken_for_gone():
    """The broker in this process, driven message by message.  A client leaves; another
    connection gets its fd and is read before the broker has looked at its monitor (a drain
    of the frontend reads on past the poll).  The one that left is gone; the new one's queued
    work stays (before: both were taken for gone, and the new client's commit was dropped
    unanswered; its put timed out)."""
    from fms.wire.frames import drain

    with _broker_with_a_mute_worker() as (broker, _worker, leaver):

        def stat(i):
            return p.encode({"v": p.PROTOCOL_VERSION, "op": "stat", "id": i, "name": "x"})

        leaver.send(stat(0))
        assert broker.frontend.poll(5000)
        frames = broker.frontend.recv_multipart(copy=False)
        fd = frames[0].get(zmq.SRCFD)
        broker.process_client(frames)
        leaver.close()
        assert broker.monitor.poll(5000)  # its disconnection waits there, unread
        credit = limits.WORKER_CREDIT["storage"]
        newcomer = b"\x00newcomer"
        for i in range(credit + 4):  # the mute worker takes credit - 1 more; 5 are queued
            broker.process_client([_IdentityFrame(newcomer, fd), stat(i)])
        drain(broker.monitor, broker.process_monitor, 10)
        status = broker.core.status()["broker"]
        assert status["queued"]["storage"] == 5
        assert status["dropped"] == 0
        assert broker.transport.client_fd == {newcomer: fd}


def test_a_message_read_after_its_client_left_is_dropped_not_sent_to_a_worker():
    """The broker in this process, driven message by message.  A client sends, then closes:
    ZeroMQ reports the disconnection and still hands up what it had read from that connection.
    Read after the monitor, such a message was taken for a new client's and sent to storage
    (tests/test_hostile.py's flood of clients that leave: 72 requests of the gone clients served
    after their queues were dropped); now it is dropped, counted, and the client stays gone."""
    from fms.wire.frames import drain

    with _broker_with_a_mute_worker() as (broker, _worker, leaver):

        def stat(i):
            return p.encode({"v": p.PROTOCOL_VERSION, "op": "stat", "id": i, "name": "x"})

        for i in range(3):
            leaver.send(stat(i))
        assert broker.frontend.poll(5000)
        first = broker.frontend.recv_multipart(copy=False)
        ident = first[0].bytes
        assert ident[:1] == b"\x00"  # an identity ZeroMQ made (the client set none)
        broker.process_client(first)
        late = []
        while len(late) < 2:  # the other two, read now and handed to the broker after
            assert broker.frontend.poll(5000)
            late.append(broker.frontend.recv_multipart(copy=False))
        leaver.close()
        assert broker.monitor.poll(5000)
        drain(broker.monitor, broker.process_monitor, 10)
        before = broker.core.status()["broker"]
        for frames in late:
            broker.process_client(frames)
        after = broker.core.status()["broker"]
        assert after["dropped"] == before["dropped"] + 2
        assert after["queued"] == before["queued"]
        assert ident not in broker.transport.client_fd
        # a client that sets its own identity may come back under it on a new connection
        fd = _comes_and_leaves(broker, b"me", stat(10))
        broker.process_client([_IdentityFrame(b"me", fd + 1000), stat(11)])  # back, elsewhere
        assert broker.transport.client_fd == {b"me": fd + 1000}
        assert broker.core.status()["broker"]["dropped"] == after["dropped"]


def _comes_and_leaves(broker, ident, message) -> int:
    """A client under its own identity ``ident`` sends ``message`` and leaves; the broker takes
    the message, then the disconnection.  :return: the fd its connection had.  (Its return is
    handed to the broker as a frame the loop reads: ZeroMQ ignores a new connection under an
    identity its ROUTER still holds, until it has let go of the old one, which a test cannot
    wait for.)"""
    from fms.wire.frames import drain

    sock = _dealer(broker.frontend_endpoint, ROUTING_ID=ident)
    try:
        sock.send(message)
        assert broker.frontend.poll(5000)
        frames = broker.frontend.recv_multipart(copy=False)
        assert frames[0].bytes == ident
        fd = frames[0].get(zmq.SRCFD)
        broker.process_client(frames)
        assert broker.transport.client_fd.get(ident) == fd
    finally:
        sock.close()
    assert broker.monitor.poll(5000)
    drain(broker.monitor, broker.process_monitor, 10)
    assert ident not in broker.transport.client_fd
    return fd


def test_a_client_whose_own_identity_starts_with_a_zero_byte_may_come_back_under_it():
    """ZeroMQ (since 4.1) lets a peer choose an identity that starts with a zero byte (a random
    UUID does one time in 256); only the 5-byte ones ZeroMQ makes are never given again, so only
    those are remembered gone.  Such a client that leaves and comes back is served, not dropped
    (review16)."""
    chosen = b"\x00" + bytes(range(1, 16))  # a UUID that happens to start with 0
    stat = p.encode({"v": p.PROTOCOL_VERSION, "op": "stat", "id": 1, "name": "x"})
    with _broker_with_a_mute_worker() as (broker, _worker, _client):
        fd = _comes_and_leaves(broker, chosen, stat)
        broker.process_client([_IdentityFrame(chosen, fd + 1000), stat])
        assert broker.transport.client_fd == {chosen: fd + 1000}
        assert broker.core.status()["broker"]["dropped"] == 0


def test_a_flood_whose_deadline_passes_is_dropped_and_others_take_turns(slow_cluster):
    """Clients that stay connected but whose requests expire after 300 ms: dropped by the
    deadline; during the flood a legit client's requests take turns with it, not after it."""
    socks = _flood(slow_cluster.frontend, 8, 128, ttl_ms=60_000)
    try:
        with slow_cluster.client(timeout=60.0, retries=0) as c:
            # Counted from here, the client connected (the broker answers status itself): the
            # flood goes on being served while a client starts, longer on a loaded machine.
            served = _served_by_storage(c)
            c.put_bytes(b"during", "during")  # have + commit, each queued behind 8
            assert c.stat("during")["size"] == 6
            # Not timed (the machine may be loaded): counted.  Each of the three requests (have,
            # commit, stat) waits for the workers' credit to free (32 in hand) and for one turn
            # of each of the 8 flooders; behind the flood each would wait for the 1024.
            assert _served_by_storage(c) - served <= 3 * (32 + 8 + 1)
        expiring = _flood(slow_cluster.frontend, 4, 128, ttl_ms=300)
        socks += expiring
        wait_for(
            lambda: _broker_status(slow_cluster)["dropped"] >= 4 * 128 - 64,
            5,
            "the expired requests to be dropped",
        )
    finally:
        for sock in socks:
            sock.close()


# --- 4. memory bounded by bytes ---


def test_clients_that_never_read_16_mib_chunks_stall_only_themselves(cluster):
    """8 clients ask again and again for 16 MiB chunks and never read (before: the broker
    passed 4 GiB and the legit client got nothing). Now the broker holds a bounded number of
    bytes for them, and a legit client's reads keep succeeding within 3 s each."""
    big = random_bytes(64 * MiB, 4)
    small = random_bytes(200 * 1024, 5)
    with cluster.client(chunk_size=16 * MiB) as c:
        c.put_bytes(big, "big")
        c.put_bytes(small, "small")
        chunks = [h(big[i : i + 16 * MiB]) for i in range(0, len(big), 16 * MiB)]
    ids = iter(range(1, 1 << 30))

    def asks():
        return (
            [p.encode({"v": p.PROTOCOL_VERSION, "op": "chunk", "id": next(ids), "hash": d})]
            for d in chunks
        )

    socks = [_dealer(cluster.frontend, RCVHWM=1, RCVBUF=64 * 1024) for _ in range(8)]
    try:
        with cluster.client(timeout=3.0, retries=0) as legit:
            end = time.monotonic() + 4
            reads = 0
            while time.monotonic() < end:
                _keep_sending(socks, asks)
                assert legit.get_bytes("small") == small
                reads += 1
            assert reads >= 3
            status = legit.status()["broker"]
            assert status["held_bytes"]["replies"] <= status["budgets"]["total_reply_bytes"]
            assert status["dropped_replies"] > 0
    finally:
        for sock in socks:
            sock.close()
    broker, cache = cluster.procs[0], cluster.procs[1]
    assert peak_rss(broker.pid) < 600 * MiB, peak_rss(broker.pid) / MiB
    assert peak_rss(cache.pid) < 400 * MiB, peak_rss(cache.pid) / MiB
    assert all(proc.alive() for proc in cluster.procs)


def test_clients_that_never_read_cannot_make_a_readers_large_replies_drop(cluster):
    """Three clients that never read ask for 4 MiB chunks until they hold the broker's whole
    reply budget (before: a reader's replies of 256 KiB and more were then dropped, and its
    reads timed out). A reply to an admitted request has its room reserved, and once the
    non-readers have left their replies unread for STALLED seconds, those are shed to make
    room (or, for replies already handed to ZeroMQ, their clients disconnected): the reader
    reads a file of 4 MiB chunks again and again with no retry."""
    hog = random_bytes(32 * MiB, 8)
    mine = random_bytes(24 * MiB, 9)
    with cluster.client(chunk_size=4 * MiB) as c:
        c.put_bytes(hog, "hog")
        c.put_bytes(mine, "mine")
    chunks = [h(hog[i : i + 4 * MiB]) for i in range(0, len(hog), 4 * MiB)]
    ids = iter(range(1, 1 << 30))

    def asks():
        return (
            [
                p.encode(
                    {
                        "v": p.PROTOCOL_VERSION,
                        "op": "chunk",
                        "id": next(ids),
                        "hash": d,
                        "len": 4 * MiB,
                    }
                )
            ]
            for d in chunks
        )

    socks = [_dealer(cluster.frontend, RCVHWM=1, RCVBUF=64 * 1024) for _ in range(3)]
    try:
        with cluster.client(timeout=3.0, retries=0) as reader:

            def budget_full():
                _keep_sending(socks, asks)
                held = reader.status()["broker"]["held_bytes"]
                in_zeromq = held["replies_in_transit"]  # handed to ZeroMQ, not taken: counted
                return held["replies"] + held["replies_reserved"] + in_zeromq > 120 * MiB

            wait_for(budget_full, 20, "the non-readers to hold most of the reply budget")
            full = time.monotonic()
            wait_for(
                lambda: budget_full() and time.monotonic() - full > limits.STALLED,
                20,
                "the non-readers to leave their replies unread for STALLED seconds",
            )
            for _ in range(4):
                _keep_sending(socks, asks)
                assert reader.get_bytes("mine") == mine
            status = reader.status()["broker"]
    finally:
        for sock in socks:
            sock.close()
    # Room was made: replies or requests shed, or a client that took nothing disconnected.
    assert status["shed"]["replies"] + status["shed"]["requests"] + status["disconnected"] > 0
    assert status["held_bytes"]["replies"] <= status["budgets"]["total_reply_bytes"]


def test_many_uploaders_cannot_keep_another_clients_upload_out(slow_cluster):
    """Nine connections keep up to 64 MiB of uploads each at the broker, more than its 512 MiB
    total (before: everyone else's uploads were then refused). Another client's upload gets
    room: the newest queued upload of whoever holds the most is answered `unavailable`."""
    chunk = random_bytes(MiB - 64, 10)  # 64 fill a client's 64 MiB budget
    digest = h(chunk)
    data = p.pack_data(chunk)
    ids = iter(range(1, 1 << 30))

    def uploads():
        return (
            [
                p.encode(
                    {"v": p.PROTOCOL_VERSION, "op": "put_chunk", "id": next(ids), "hash": digest}
                ),
                data,
            ]
            for _ in range(16)
        )

    socks = [_dealer(slow_cluster.frontend, RCVHWM=1, RCVBUF=64 * 1024) for _ in range(9)]
    stop = threading.Event()

    def flood():  # the sockets are used by this thread alone from here on
        while not stop.is_set():
            _keep_sending(socks, uploads)
            zmq.select([], socks, [], 0.01)  # until one takes more, or 10 ms

    flooder = threading.Thread(target=flood, daemon=True)
    try:
        with slow_cluster.client(timeout=10.0, retries=0) as c:
            flooder.start()
            wait_for(
                lambda: (
                    c.status()["broker"]["held_bytes"]["uploads"]
                    > limits.TOTAL_REQUEST_BYTES - 32 * MiB
                ),
                20,
                "the uploaders to hold the broker's upload budget",
            )
            mine = random_bytes(3 * MiB, 11)
            c.put_bytes(mine, "mine")
            status = c.status()["broker"]
            assert c.get_bytes("mine") == mine
    finally:
        stop.set()
        flooder.join(10) if flooder.is_alive() else None
        for sock in socks:
            sock.close()
    assert status["shed"]["requests"] > 0
    assert status["held_bytes"]["uploads"] <= limits.TOTAL_REQUEST_BYTES


def test_large_request_headers_count_in_the_clients_budget(make_cluster):
    """A `have` header may be up to 32 MiB: five of 16 MiB sent at once would hold 80 MiB at
    the broker (before, headers were in no budget: 128 of them could hold 4 GiB). Those over
    the client's 64 MiB are refused at once.  The storage workers are stopped (SIGSTOP) while
    they are sent: storage refuses such a `have` as soon as it reads it (it takes at most 4096
    digests), which gave its room back before the fifth reached a loaded broker (one run in
    many saw a single refusal, with storage slowed by 50 ms and then by 2 s: the refusal
    comes before the slow part)."""
    slow_cluster = _slow(make_cluster, 0.05)
    frozen = [slow_cluster.proc(wid).pid for wid in ("storage-a", "storage-b")]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        refused, others = _five_large_headers(slow_cluster)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert len(refused) == 2, (refused, others)


def _five_large_headers(slow_cluster) -> tuple[list, list]:
    """Send five 16 MiB `have` headers at once; :return: ``(refused, other replies)`` as read
    until two refusals came (or five replies)."""
    sock = _dealer(slow_cluster.frontend)
    header = p.encode(
        {"v": p.PROTOCOL_VERSION, "op": "have", "id": 0, "hashes": [bytes(32)] * (16 * MiB // 34)}
    )
    refused, others = [], []
    try:
        for _ in range(5):
            sock.send(header)
        # Every request is answered: the refused at once, the admitted when storage has looked
        # (which may take a loaded machine past the request's deadline: an error, not a refusal)
        for _ in range(5):
            reply = p.decode(_recv(sock, 30)[0])
            over = reply.get("error") == "unavailable" and "requests in flight" in reply["message"]
            (refused if over else others).append(
                {k: reply.get(k) for k in ("ok", "error", "message")}
            )
            if len(refused) == 2:
                break
    finally:
        sock.close()
    return refused, others


def test_uploads_over_a_clients_byte_budget_back_off_and_large_chunks_still_upload(make_cluster):
    """128 MiB of uploads sent at once: what is over the client's 64 MiB is refused (storage
    takes 0.5 s a request, so none is answered before all have arrived); fms.Client keeps
    within the budget and uploads a file of 16 MiB chunks."""
    slow_cluster = _slow(make_cluster, 0.5)
    sock = _dealer(slow_cluster.frontend)
    chunk = random_bytes(16 * MiB, 6)
    try:
        for i in range(8):  # 128 MiB at once, never waiting for a reply
            sock.send_multipart(
                [
                    p.encode(
                        {
                            "v": p.PROTOCOL_VERSION,
                            "op": "put_chunk",
                            "id": i,
                            "hash": h(chunk),
                        }
                    ),
                    p.pack_data(chunk),
                ]
            )
        replies = [p.decode(_recv(sock, 10)[0]) for _ in range(8)]
    finally:
        sock.close()
    refused = [r for r in replies if not r["ok"]]
    assert refused and all(
        r["error"] == "unavailable" and "requests in flight" in r["message"] for r in refused
    )
    with slow_cluster.client(chunk_size=16 * MiB, timeout=20.0) as c:  # it keeps within it
        data = random_bytes(80 * MiB, 7)
        c.put_bytes(data, "big16")
        assert c.get_bytes("big16") == data


# --- 5. inodes, descriptors ---


@pytest.fixture
def few_inodes(tmp_path):
    """A tmpfs with room for bytes but only 80 inodes; skipped where mounting is not allowed."""
    import subprocess

    mount = tmp_path / "inodes"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=80", "tmpfs", str(mount)],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_running_out_of_inodes_is_no_space_and_acked_files_stay(make_cluster, few_inodes):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache()
    storage = cluster.start_storage(data=str(few_inodes / "storage"), wid="storage-a")
    cluster.wait_workers(storage=1, cache=1)
    acked = []
    with cluster.client(timeout=5.0) as c:
        with pytest.raises(fms.NoSpace, match="full"):
            for i in range(500):  # over 64 KiB: a chunk file each (smaller ones go in meta.db)
                c.put_bytes(b"file %d " % i * 9000, f"d{i % 7}/f{i}")
                acked.append(i)
        assert acked
        for i in acked:
            assert c.get_bytes(f"d{i % 7}/f{i}") == b"file %d " % i * 9000
    assert storage.alive() and "handler_crashed" not in storage.log()


def test_a_thousand_idle_connections_do_not_exhaust_descriptors(make_cluster):
    """1,100 idle connections (a 1,024-descriptor limit fell to them before): started with a
    soft limit of 1,024, the broker raises it to the hard limit and says so in status; everyone
    is still served."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the broker inherits
    try:
        cluster = make_cluster()
        cluster.start_broker()
        cluster.start_storage(wid="storage-a")
        cluster.wait_workers(storage=1, cache=0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with cluster.client() as c:
        fds = c.status()["broker"]["fds"]
        assert fds["soft"] > 1024 and fds["soft"] in (fds["hard"], 1 << 20), fds
    idle = []
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4096)  # this test's own side needs them too
    try:
        for _ in range(1100):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(cluster.frontend)
            idle.append(sock)
        with cluster.client(timeout=5.0, retries=0) as c:
            wait_for(
                lambda: c.status()["broker"]["fds"]["open"] > 1100,
                15,
                "the idle connections to be accepted",
            )
            c.put_bytes(b"still served", "served")
            assert c.get_bytes("served") == b"still served"
    finally:
        for sock in idle:
            sock.close()
        ctx.term()
    assert all(proc.alive() for proc in cluster.procs)


def test_slow_readers_of_16_mib_chunks_stall_only_themselves(cluster):
    """8 clients read a file of 16 MiB chunks 1 MiB every 50 ms (before: the broker passed
    4 GiB and the cache 2.6 GiB); a legit client's reads keep succeeding within 3 s each."""
    import threading

    big = random_bytes(48 * MiB, 8)
    small = random_bytes(1000, 9)
    with cluster.client(chunk_size=16 * MiB) as c:
        c.put_bytes(big, "big")
        c.put_bytes(small, "small")
    stop = threading.Event()
    errors = []

    def read():
        try:
            with cluster.client(timeout=30.0) as reader, reader.open("big") as f:
                while not stop.is_set() and f.read(MiB):
                    stop.wait(0.05)
        except Exception as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read, daemon=True) for _ in range(8)]
    for thread in readers:
        thread.start()
    try:
        with cluster.client(timeout=3.0, retries=0) as legit:
            end = time.monotonic() + 3
            while time.monotonic() < end:
                assert legit.get_bytes("small") == small
                stop.wait(0.1)
    finally:
        stop.set()
        for thread in readers:
            thread.join(30)
    assert not errors, errors
    broker, cache = cluster.procs[0], cluster.procs[1]
    assert peak_rss(broker.pid) < 400 * MiB, peak_rss(broker.pid) / MiB
    assert peak_rss(cache.pid) < 400 * MiB, peak_rss(cache.pid) / MiB


def test_expired_work_is_dropped_and_a_worker_that_never_answers_loses_its_credit():
    """The broker in this process, driven message by message: queued requests past their
    deadline are dropped; requests a worker holds unanswered long past theirs are forgotten,
    so its credit comes back and the next request reaches it."""
    from fms.wire.frames import drain

    with _broker_with_a_mute_worker() as (broker, worker, client):
        for i in range(20):
            client.send(
                p.encode(
                    {"v": p.PROTOCOL_VERSION, "op": "stat", "id": i, "name": "x", "ttl_ms": 100}
                )
            )
        deadline = time.monotonic() + 5
        while len(broker.core.dispatcher.pending) < 20 and time.monotonic() < deadline:
            if broker.frontend.poll(100):
                drain(broker.frontend, broker.process_client, 64)
        credit = limits.WORKER_CREDIT["storage"]
        assert broker.core.status()["broker"]["queued"]["storage"] == 20 - credit
        broker.core.tick(time.monotonic() + 1)  # past the 100 ms deadline
        assert broker.core.status()["broker"]["queued"]["storage"] == 0
        assert len(broker.core.dispatcher.pending) == credit  # held by the mute worker
        broker.core.tick(time.monotonic() + 1 + limits.INFLIGHT_GRACE)
        assert not broker.core.dispatcher.pending and broker.core.dispatcher.dropped == 20
        assert broker.core.status()["workers"][0]["inflight"] == 0
        got = 0
        while worker.poll(200):
            route = p.decode(worker.recv_multipart()[0])
            got += route["t"] == "req"
        assert got == credit
        client.send(p.encode({"v": p.PROTOCOL_VERSION, "op": "stat", "id": 99, "name": "x"}))
        assert broker.frontend.poll(5000)
        drain(broker.frontend, broker.process_client, 1)
        frames = _recv(worker)
        assert p.decode(frames[0])["t"] == "req" and p.decode(frames[1])["id"] == 99
