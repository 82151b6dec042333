"""A worker's link to the broker (fms.worker), against a broker played by the test: heartbeats go
on while the service works, a stuck service is let go, and replies and control messages leave in
order on the one socket."""

import logging
import threading
import time

import pytest
import zmq
from conftest import wait_for

from fms import wire as p
from fms import worker
from fms.errors import BadRequest
from fms.worker import BrokerLink, serve

RECV_TIMEOUT = 5.0  # seconds any receive of the fake broker waits


class FakeBroker:
    """A ROUTER on a random loopback port that records what the worker sends and heartbeats
    to it while it waits (as the broker does, so the worker does not find it silent)."""

    def __init__(self):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ident = None
        self.next_beat = 0.0

    def _wait(self, deadline: float) -> bool:
        """Poll until a message comes (True) or ``deadline`` passes, heartbeating meanwhile."""
        while (left := deadline - time.monotonic()) > 0:
            if self.ident is not None and time.monotonic() >= self.next_beat:
                self.next_beat = time.monotonic() + p.HEARTBEAT_INTERVAL
                self.send({"t": "hb"})
            if self.sock.poll(int(min(left, p.HEARTBEAT_INTERVAL / 2) * 1000) + 1):
                return True
        return False

    def recv(self, timeout: float = RECV_TIMEOUT):
        """The next message: ``(route, rest of the frames)``."""
        if not self._wait(time.monotonic() + timeout):
            raise AssertionError(f"nothing from the worker within {timeout} s")
        ident, route, *rest = self.sock.recv_multipart()
        self.ident = ident
        return p.decode(route, "route"), rest

    def send(self, route: dict, *frames):
        self.sock.send_multipart([self.ident, p.encode(route), *frames])

    def beats_within(self, seconds: float) -> list:
        """The route types of everything the worker sent for ``seconds``."""
        seen, end = [], time.monotonic() + seconds
        while self._wait(end):
            _ident, route, *_rest = self.sock.recv_multipart()
            seen.append(p.decode(route, "route")["t"])
        return seen

    def close(self):
        self.sock.close(linger=0)


class BlockingService:
    """Answers each request after ``release`` is set (long work the test controls)."""

    def __init__(self):
        self.link = None
        self.started = threading.Event()
        self.release = threading.Event()

    def handle_request(self, route, header, data):
        self.started.set()
        self.release.wait(30)
        self.link.reply(route, p.ok_reply(header["id"], done=True))

    def handle_reply(self, header, data):
        pass

    def on_register(self, at=None):
        pass

    def on_invalidate(self, name, at=None):
        pass

    def tick(self, now):
        pass


@pytest.fixture
def worker_at():
    """Start a worker on a service against a fake broker; stops both at the end."""
    started = []

    def start(service, broker):
        log = logging.getLogger("test.link")
        link = BrokerLink(zmq.Context.instance(), broker.endpoint, {"svc": "storage"}, log)
        service.link = link
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(service, link, log, stop.is_set))
        thread.start()
        started.append((service, link, stop, thread))
        route, _ = broker.recv()
        assert route["t"] == "ready"
        broker.send({"t": "welcome"})
        return link, stop, thread

    yield start
    for service, link, stop, thread in started:
        service.release.set()
        stop.set()
        thread.join(10)
        link.close()


def request(broker, req_id=1):
    broker.send(
        {"t": "req", "k": req_id, "ttl": 60_000},
        p.encode({"v": p.PROTOCOL_VERSION, "op": "x", "id": req_id}),
    )


def test_heartbeats_go_on_while_the_service_is_busy(worker_at):
    broker, service = FakeBroker(), BlockingService()
    try:
        worker_at(service, broker)
        request(broker)
        assert service.started.wait(RECV_TIMEOUT)
        window = p.HEARTBEAT_INTERVAL * p.HEARTBEAT_LIVENESS  # what the broker waits at most
        seen = broker.beats_within(window)
        assert seen.count("hb") >= p.HEARTBEAT_LIVENESS - 1, seen
        service.release.set()
        route, rest = broker.recv()
        while route["t"] == "hb":
            route, rest = broker.recv()
        assert route["t"] == "rep" and route["k"] == 1
        assert p.decode(rest[0])["done"] is True
    finally:
        broker.close()


def test_a_service_stuck_for_longer_than_any_client_waits_stops_heartbeating(
    worker_at, monkeypatch, caplog
):
    monkeypatch.setattr(worker, "STUCK", 0.0)  # every turn counts as stuck: no heartbeat
    broker, service = FakeBroker(), BlockingService()
    try:
        worker_at(service, broker)
        request(broker)
        assert service.started.wait(RECV_TIMEOUT)
        wait_for(lambda: "event=worker_stuck" in caplog.text, 5, "the link to say it is stuck")
        assert broker.beats_within(p.HEARTBEAT_INTERVAL * 2.5) == []  # the broker lets it go
        service.release.set()
        seen = broker.beats_within(p.HEARTBEAT_INTERVAL * 2.5)
        assert seen[0] == "rep" and "hb" in seen  # back to work: heartbeats again
    finally:
        broker.close()


class ChattyService(BlockingService):
    """Answers each request with a stream of three-frame replies until ``enough`` is set (the
    receiver has seen heartbeats between them; a loaded machine may run the heartbeat thread
    late, so a fixed time would not do), or for ``seconds`` at most."""

    seconds = 30.0
    data = p.pack_data(bytes(range(256)) * 1024)

    def __init__(self):
        super().__init__()
        self.enough = threading.Event()

    def handle_request(self, route, header, data):
        end = time.monotonic() + self.seconds
        n = 0
        while not self.enough.is_set() and time.monotonic() < end:
            n += 1
            self.link.reply({"k": n}, p.ok_reply(header["id"], n=n), self.data)
        self.link.reply({"k": "last"}, p.ok_reply(header["id"], n=n))


def test_replies_and_heartbeats_never_interleave_on_the_one_socket(worker_at):
    """The heartbeat thread sends while the service's thread streams multi-frame replies: every
    message arrives whole, in the order sent."""
    broker, service = FakeBroker(), ChattyService()
    try:
        worker_at(service, broker)
        request(broker)
        kinds, count = [], 0
        while True:
            route, rest = broker.recv()
            kinds.append(route["t"])
            if route["t"] == "hb":
                assert rest == []
                if kinds.count("hb") >= 2 and count > 10:
                    service.enough.set()  # replies came around two heartbeats: it may stop
                continue
            assert route["t"] == "rep"
            header = p.decode(rest[0])
            if route["k"] == "last":
                assert header["n"] == count and len(rest) == 1
                break
            count += 1
            assert route["k"] == header["n"] == count
            assert len(rest) == 2 and rest[1] == service.data
        assert kinds.count("hb") >= 2 and count > 10
    finally:
        broker.close()


class _Frame:
    def __init__(self, data: bytes):
        self.buffer = memoryview(data)


class _Invalidated:
    """A cache-like service that records what it was told to drop."""

    def __init__(self):
        self.dropped = []
        self.fills = []

    def on_invalidate(self, name, at=None):
        self.dropped.append((name, at))

    def on_fill(self, name, at, since, manifest, frame):
        self.fills.append(name)


@pytest.mark.parametrize(
    "route, frames",
    [
        ({"t": "inv", "name": "a", "at": 3, "fill": "not bytes", "since": 2}, 1),
        ({"t": "inv", "name": "a", "at": 3, "fill": b"m"}, 2),  # no since
        ({"t": "inv", "name": "a", "at": 3, "fill": b"m", "since": 2}, 1),  # no data frame
        ({"t": "inv", "name": "a", "at": -1}, 1),  # a bad order
    ],
)
def test_an_inv_whose_fill_or_order_is_malformed_still_drops_its_name(route, frames):
    service = _Invalidated()
    message = [_Frame(p.encode(route)), _Frame(p.pack_data(b"x"))][:frames]
    with pytest.raises(BadRequest):
        worker._dispatch(service, None, message, logging.getLogger("test.link"))
    assert [name for name, _at in service.dropped] == ["a"] and not service.fills
