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
from fms.storage import groupwait
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

    def on_fills(self, names, at, since, fills, frame):
        self.fills.extend(name for name, _offset, _manifest in fills)


MANY = {"t": "inv", "names": ["a", "b"], "at": 3, "since": 2}


@pytest.mark.parametrize(
    "route, frames",
    [
        ({**MANY, "fills": [b"m", None], "offsets": [0, None]}, 1),  # no data frame
        ({**MANY, "fills": [b"m", None]}, 2),  # no offsets
        ({**MANY, "fills": [b"m"], "offsets": [0]}, 2),  # not an entry per name
        ({**MANY, "fills": [b"m", None], "offsets": [-1, None]}, 2),  # before the data
        ({**MANY, "fills": [b"m", None], "offsets": [True, None]}, 2),
        ({**MANY, "fills": ["m", None], "offsets": [0, None]}, 2),
        ({**MANY, "fills": [b"m", None], "offsets": [None, None]}, 2),
        ({**MANY, "fills": {"a": b"m"}, "offsets": [0, None]}, 2),
        (
            {k: v for k, v in MANY.items() if k != "since"}
            | {"fills": [b"m", None], "offsets": [0, None]},
            2,
        ),
    ],
)
def test_an_inv_whose_fills_are_malformed_still_drops_every_name(route, frames):
    service = _Invalidated()
    message = [_Frame(p.encode(route)), _Frame(p.pack_data(b"x"))][:frames]
    with pytest.raises(BadRequest):
        worker._dispatch(service, None, message, logging.getLogger("test.link"))
    assert [name for name, _at in service.dropped] == ["a", "b"] and not service.fills


def test_an_inv_with_fills_hands_each_to_the_cache_with_its_offset():
    service = _Invalidated()
    route = {**MANY, "fills": [None, b"m"], "offsets": [None, 7]}
    worker._dispatch(
        service, None, [_Frame(p.encode(route)), _Frame(p.pack_data(b"x"))], logging.getLogger("t")
    )
    assert service.fills == ["b"] and service.dropped == []  # on_fills drops the names itself


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


class _Clock:
    """A monotonic clock the test moves (fms.worker's and fms.storage.groupwait's)."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


class _ScriptedLink:
    """A link whose socket always has another batch waiting: each drain hands up the next of
    ``batches`` (lists of ops) and takes ``DRAIN_TIME`` of the clock, each poll a little."""

    DRAIN_TIME = 0.0005
    endpoint = "scripted"
    registered = True
    passes_policy = False

    def __init__(self, clock, batches):
        self.clock, self.batches = clock, iter(batches)
        self.busy_since = None
        self.drains = 0

    def start(self, stats=None):
        pass

    def connect(self):
        pass

    def reply(self, route, header, *args, **kwargs):
        pass

    def poll(self, timeout_ms):
        self.clock.now += 0.00001
        return True

    def drain(self, handle, limit, until=None):
        if until is not None and until():
            return 0
        ops = next(self.batches)
        self.clock.now += self.DRAIN_TIME
        self.drains += 1
        for i, op in enumerate(ops):
            route = {"t": "req", "k": i}
            handle([_Frame(p.encode(route)), _Frame(p.encode({"op": op, "id": i}))])
        return len(ops)


class _GroupingService(BlockingService):
    """Storage's group commit in small: commits wait in hand for the flush or the next other
    op, and ``linger()`` asks a real GroupWait (CPUs always scarce)."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.pending, self.flushed_at = clock, 0, []
        self.wait = groupwait.GroupWait(scarce=lambda now: True)

    def handle_request(self, route, header, data):
        if header["op"] == "commit":
            self.pending += 1
        elif self.pending:  # another op applies the group first, as storage's does
            self.wait.applied(self.pending)
            self.pending = 0

    def linger(self):
        return self.wait.seconds(self.pending)

    def flush(self):
        if self.pending:
            self.wait.applied(self.pending)
            self.pending = 0
        self.flushed_at.append(self.clock.now)


def test_a_turn_waits_for_company_once_however_the_messages_keep_coming(monkeypatch):
    """Storage's group commit makes the loop wait a moment after a drain (``linger()``).  A
    group that another op applies during that wait lets the next change start a wait of its
    own; the turn must not take it, or under a steady mix of changes and other ops it would
    never end: no tick, and after STUCK no heartbeat (the broker lets the worker go)."""
    clock = _Clock()
    monkeypatch.setattr(worker, "time", clock)
    monkeypatch.setattr(groupwait, "time", clock)
    service = _GroupingService(clock)
    service.wait.applied(9)  # a large group lately: a wait goes on until 9 are in hand
    # each drain: the group's commits, another op that applies them, a new lone commit
    batches = [["commit"]] + [["commit"] * 7 + ["stat", "commit"]] * 1000
    link = _ScriptedLink(clock, batches)

    def stop() -> bool:
        return bool(service.flushed_at) or link.drains >= 1000

    serve(service, link, logging.getLogger("test.link"), stop)
    started = 1000.0 + _ScriptedLink.DRAIN_TIME  # the first drain's end: the wait begins
    assert service.flushed_at, "the turn never flushed"
    assert service.flushed_at[0] <= started + groupwait.WAIT + _ScriptedLink.DRAIN_TIME + 1e-3
    assert link.drains < 10


def test_a_worker_told_to_stop_during_a_wait_for_company_flushes_and_stops():
    """A stopping worker takes no more messages; it must not poll on through the rest of a
    wait for company either (the messages it leaves make each poll return at once)."""
    clock = _Clock()
    service = _GroupingService(clock)
    link = _ScriptedLink(clock, [["commit"]] * 10)
    polls = []
    link.poll = lambda timeout_ms: polls.append(timeout_ms) or True
    serve(service, link, logging.getLogger("test.link"), lambda: link.drains >= 1)
    assert link.drains == 1 and service.pending == 0 and service.flushed_at
    assert len(polls) == 1  # the turn's first poll only: no poll waits once it should stop
