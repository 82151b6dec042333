"""The broker's core (fms.broker.core) driven with no socket and no process: each case hands it
messages as from clients and workers and reads what it sent through a recording transport."""

import time

import pytest
from storage_helpers import commit_fields

from fms import limits
from fms import wire as p
from fms.broker import Core, admission
from fms.broker.admission import (
    CHUNK_GUESS,
    HEAVY_PER_CLIENT,
    HEAVY_TOTAL,
    REPLY_BOUNDS,
    expected_reply,
    reply_bound,
)
from fms.broker.outbox import BACK_OFF_AFTER, FLUSH_INTERVAL, FLUSH_MAX_WAIT
from fms.broker.transit import CLIENT_KERNEL_QUEUE, CLIENT_TRANSIT, LARGE_REPLY
from fms.broker.transport import FULL, GONE, SENT

MiB = limits.MiB


class Recorder:
    """A transport that records what the core sends.  Clients in ``full`` have a full queue,
    those in ``gone`` have left; workers in ``unreachable`` cannot be sent to.  A client in
    ``acked`` has a measured connection (its bytes taken so far); others are measured by the
    kernel's queue (``kernel``) alone."""

    def __init__(self):
        self.sent: list = []  # (to, ident, frames)
        self.full: set = set()
        self.gone: set = set()
        self.unreachable: set = set()
        self.kernel: dict = {}  # client -> bytes the kernel holds for it unread
        self.tries: dict = {}  # client -> sends tried, taken or not
        self.acked: dict = {}  # client -> bytes its connection acknowledged
        self.disconnected: list = []

    def to_client(self, ident, frames):
        self.tries[ident] = self.tries.get(ident, 0) + 1
        if ident in self.gone:
            return GONE
        if ident in self.full:
            return FULL
        self.sent.append(("client", ident, frames))
        return SENT

    def to_worker(self, ident, frames):
        if ident in self.unreachable:
            return False
        self.sent.append(("worker", ident, frames))
        return True

    def queued(self, ident):
        return self.kernel.get(ident)

    def taken(self, ident):
        return self.acked.get(ident)

    def disconnect(self, ident):
        self.disconnected.append(ident)
        self.gone.add(ident)
        self.acked.pop(ident, None)
        return True

    def take(self) -> list:
        """What was sent since the last take, decoded: (to, ident, header, data frame or None)."""
        out = []
        for to, ident, frames in self.sent:
            if to == "worker":
                route = p.decode(frames[0], "route")
                rest = frames[1:]
                header = p.decode(rest[0], "request") if rest else None
                out.append((to, ident, route, header))
            else:
                out.append((to, ident, p.decode(frames[0]), frames[1] if len(frames) > 1 else None))
        self.sent.clear()
        return out


@pytest.fixture
def core():
    return Core(Recorder(), store="s1")


def ready(core, ident: bytes, service: str, wid: str | None = None, **extra):
    core.worker_message(
        ident,
        [
            p.encode(
                {
                    "t": "ready",
                    "v": p.PROTOCOL_VERSION,
                    "svc": service,
                    "wid": wid or ident.decode(),
                    "store": "s1",
                    "digest_fn": p.BLAKE3,
                    **extra,
                }
            )
        ],
    )
    assert core.registry.get(ident) is not None


def ask(core, client: bytes, op: str, req_id, data: bytes | None = None, **fields):
    frames = [p.encode({"v": p.PROTOCOL_VERSION, "op": op, "id": req_id, **fields})]
    if data is not None:
        frames.append(p.pack_data(data))
    core.client_message(client, frames)


def answer(core, worker: bytes, key: int, reply: dict, data: bytes | None = None, **route):
    frames = [p.encode({"t": "rep", "k": key, **route}), p.encode(reply)]
    if data is not None:
        frames.append(p.pack_data(data))
    core.worker_message(worker, frames)


def many(files: dict, req_id: int) -> dict:
    """The fields of a ``commit_many`` of ``files`` (name -> content, sent as its data)."""
    return {
        "names": list(files),
        "sizes": [len(d) for d in files.values()],
        "hashes": [p.sha256(d) for d in files.values()],
        "mtimes": [1.0] * len(files),
        "commits": [f"m{req_id}-{i}" for i in range(len(files))],
        "chunk_size": 65536,
    }


def requests_to(sent: list, worker: bytes) -> list:
    """(key, header) of each request sent to ``worker``."""
    return [
        (route["k"], header)
        for to, ident, route, header in sent
        if to == "worker" and ident == worker and route["t"] == "req"
    ]


def replies_to(sent: list, client: bytes) -> list:
    return [header for to, ident, header, _ in sent if to == "client" and ident == client]


# --- routing and redispatch ---


def test_a_request_goes_to_the_least_loaded_worker_and_its_reply_back_to_the_client(core):
    ready(core, b"s-a", p.STORAGE)
    ready(core, b"s-b", p.STORAGE)
    core.transport.take()
    for i in range(4):
        ask(core, b"alice", "stat", i, name=f"f{i}")
    sent = core.transport.take()
    to_a, to_b = requests_to(sent, b"s-a"), requests_to(sent, b"s-b")
    assert len(to_a) == len(to_b) == 2  # spread, least loaded first
    key, header = to_a[0]
    answer(core, b"s-a", key, p.ok_reply(header["id"], stat={"name": header["name"]}))
    (reply,) = replies_to(core.transport.take(), b"alice")
    assert reply["id"] == header["id"] and reply["stat"]["name"] == header["name"]


def test_changes_go_to_the_storage_worker_with_changes_in_hand_while_it_has_credit(core):
    """A storage worker commits the changes that reach it back to back in one transaction: the
    broker packs changes onto the worker that has changes in hand (while it has credit) instead
    of spreading them (spread over two workers, 8 writers' commits were mostly groups of one).
    A worker busy with reads does not draw them; with none in hand, the least loaded gets one."""
    ready(core, b"s-a", p.STORAGE)
    ready(core, b"s-b", p.STORAGE)
    core.transport.take()
    credit = limits.WORKER_CREDIT[p.STORAGE]
    for i in range(3):  # one worker has reads in hand
        ask(core, b"reader", "stat", 100 + i, name="r")
    sent = core.transport.take()
    reading = b"s-a" if len(requests_to(sent, b"s-a")) == 2 else b"s-b"
    other = b"s-b" if reading == b"s-a" else b"s-a"
    commit = {k: v for k, v in commit_fields("f", b"x").items() if k != "op"}
    ops = [("commit", commit), ("rm", {"name": "g", "commit": "a" * 32})]
    for i in range(credit + 1):
        op, fields = ops[i % 2]
        ask(core, b"writer%d" % (i % 8), op, i, **fields)
    sent = core.transport.take()
    # The first to the least loaded (one read in hand against two), then packed there until
    # its credit ran out, then to the other.
    assert len(requests_to(sent, other)) == credit - 1
    assert len(requests_to(sent, reading)) == 2
    for worker in (other, reading):  # answered: no change in hand any more
        for key, header in requests_to(sent, worker):
            answer(core, worker, key, p.ok_reply(header["id"]))
    core.transport.take()
    assert core.registry.get(other).changes == core.registry.get(reading).changes == 0
    ask(core, b"writer", "rm", 99, name="h", commit="b" * 32)  # to the least loaded again
    assert [h["id"] for _, h in requests_to(core.transport.take(), other)] == [99]


def test_changes_stay_with_the_worker_that_took_the_last_one_while_both_are_idle(core):
    """With no change in hand anywhere, a change goes to the least loaded storage worker, ties
    to the one that took a change last, not round robin: SQLite keeps a connection's pages
    cached between its transactions only while no other connection writes, so two workers
    taking turns would each read their pages again.  Reads in between do not move the writer;
    one busy with reads when the other is idle does."""
    ready(core, b"s-a", p.STORAGE)
    ready(core, b"s-b", p.STORAGE)
    core.transport.take()
    commit = {k: v for k, v in commit_fields("f", b"x").items() if k != "op"}
    writers = []
    for i in range(6):
        ask(core, b"writer", "commit", i, **commit)
        ((key, header),) = requests_to(sent := core.transport.take(), b"s-a") or requests_to(
            sent, b"s-b"
        )
        writers.append(b"s-a" if requests_to(sent, b"s-a") else b"s-b")
        answer(core, writers[-1], key, p.ok_reply(header["id"]))
        core.transport.take()
        if i % 3 != 2:
            continue
        ask(core, b"reader", "stat", 100 + i, name="r")  # now and then a read, answered
        sent = core.transport.take()
        for worker in (b"s-a", b"s-b"):
            for rkey, rheader in requests_to(sent, worker):
                answer(core, worker, rkey, p.ok_reply(rheader["id"]))
        core.transport.take()
    assert len(set(writers)) == 1, writers
    writer = writers[0]
    other = b"s-b" if writer == b"s-a" else b"s-a"
    ask(core, b"reader", "stat", 200, name="r")  # to the one used least recently: the writer
    assert [h["id"] for _, h in requests_to(core.transport.take(), writer)] == [200]
    ask(core, b"writer", "rm", 201, name="g", commit="c" * 32)  # the writer busy: the other
    assert [h["id"] for _, h in requests_to(core.transport.take(), other)] == [201]


@pytest.mark.parametrize("serial", [True, False])
def test_a_put_rs_commit_many_batches_are_packed_where_the_store_writes_one_at_a_time(core, serial):
    """Over SQLite (storage's ``ready`` says ``serial``: its write transactions take turns on
    one lock) a put -r's batches in flight go to one worker back to back, as changes do, not
    one to each, where each worker's transaction waited for the other's and found its pages
    changed by it.  Over PostgreSQL two workers' batches commit side by side: spread."""
    extra = {"serial": True} if serial else {}
    ready(core, b"s-a", p.STORAGE, **extra)
    ready(core, b"s-b", p.STORAGE, **extra)
    core.transport.take()
    for i in range(4):
        files = {f"tree/{i}": b"batch %d" % i}
        ask(core, b"alice", "commit_many", i, data=b"".join(files.values()), **many(files, i))
    sent = core.transport.take()
    to = {w: requests_to(sent, w) for w in (b"s-a", b"s-b")}
    assert sorted(map(len, to.values())) == ([0, 4] if serial else [2, 2])
    workers = {w: core.registry.get(w) for w in to}
    assert sorted(w.changes for w in workers.values()) == ([0, 4] if serial else [0, 0])
    for ident, requests in to.items():  # answered: nothing in hand any more
        for key, header in requests:
            answer(core, ident, key, p.ok_reply(header["id"], results=[]))
    assert [w.changes for w in workers.values()] == [0, 0]


def test_changes_are_not_packed_onto_a_storage_worker_that_has_stopped_answering(core):
    """A storage worker's heartbeats come from a thread of their own, so one stuck in its work
    (a hung disk, a lock wait) stays registered.  Packing changes must not pile every client's
    changes onto it while the other sits idle: once it has answered nothing for
    limits.PACK_STALL, changes go to the least loaded worker again (and pack there)."""
    ready(core, b"s-a", p.STORAGE)
    ready(core, b"s-b", p.STORAGE)
    core.transport.take()
    commit = {k: v for k, v in commit_fields("f", b"x").items() if k != "op"}
    ask(core, b"writer0", "commit", 0, **commit)
    (stuck,) = {ident for _, ident, *_ in core.transport.take()}
    other = b"s-b" if stuck == b"s-a" else b"s-a"
    # It holds that commit and answers nothing for longer than PACK_STALL (no sleep: its
    # latest progress is moved back, as the clock would move it on).
    core.registry.get(stuck).progress -= limits.PACK_STALL + 1
    for i in range(1, 5):
        ask(core, b"writer%d" % i, "commit", i, **commit)
    sent = core.transport.take()
    assert requests_to(sent, stuck) == []
    assert len(requests_to(sent, other)) == 4


def test_a_worker_that_dies_hands_its_requests_to_another_and_its_late_reply_is_dropped(core):
    ready(core, b"s-a", p.STORAGE)
    ready(core, b"s-b", p.STORAGE)
    ask(core, b"alice", "stat", 1, name="x")
    ((key, _),) = requests_to(core.transport.take(), b"s-a") or requests_to([], b"")
    core.worker_message(b"s-a", [p.encode({"t": "bye"})])  # it leaves holding the request
    redispatched = requests_to(core.transport.take(), b"s-b")
    assert len(redispatched) == 1 and redispatched[0][1]["id"] == 1
    assert core.metrics.redispatched._value.get() == 1
    # The one that left answers after all: nobody gets a second reply.
    ready(core, b"s-a", p.STORAGE)
    answer(core, b"s-a", key, p.ok_reply(1, stat={}))
    assert not replies_to(core.transport.take(), b"alice")
    new_key = redispatched[0][0]
    answer(core, b"s-b", new_key, p.ok_reply(1, stat={}))
    assert [r["id"] for r in replies_to(core.transport.take(), b"alice")] == [1]


def test_a_redispatched_request_never_goes_back_to_the_worker_that_died_holding_it(core):
    ready(core, b"s-a", p.STORAGE)
    ask(core, b"alice", "stat", 1, name="x")
    core.transport.take()
    core.purge_workers(time.monotonic() + 10)  # s-a missed its heartbeats
    (reply,) = replies_to(core.transport.take(), b"alice")  # no worker left: unavailable
    assert reply["ok"] is False and reply["error"] == "unavailable"
    assert not core.dispatcher.pending and not core.admission.inflight


def test_a_cache_request_goes_to_the_owner_of_its_key_and_falls_back_to_storage(core):
    for wid in ("c1", "c2", "c3"):
        ready(core, wid.encode(), p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    owners = set()
    for attempt in range(3):
        ask(core, b"alice", "get", attempt, name="album/p1.jpg")
        (sent,) = [s for s in core.transport.take() if s[0] == "worker"]
        owners.add(sent[1])
    assert len(owners) == 1  # the same name, the same cache worker, every time
    for wid in (b"c1", b"c2", b"c3"):
        core.worker_message(wid, [p.encode({"t": "bye"})])
    ask(core, b"alice", "get", 9, name="album/p1.jpg")
    assert requests_to(core.transport.take(), b"s")  # no cache: storage serves the get


# --- read-after-write ---


def test_a_storage_reply_that_changed_a_name_invalidates_every_cache_before_the_ack(core):
    ready(core, b"c1", p.CACHE)
    ready(core, b"c2", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    ask(core, b"alice", "rm", 7, name="a", commit="x")
    ((key, _),) = requests_to(core.transport.take(), b"s")
    answer(core, b"s", key, p.ok_reply(7, stat={}), inv="a")
    sent = core.transport.take()
    order = [(to, ident) for to, ident, *_ in sent]
    assert order == [("worker", b"c1"), ("worker", b"c2"), ("client", b"alice")]
    assert all(
        route == {"t": "inv", "name": "a", "at": key} for to, _, route, _ in sent if to == "worker"
    )


def test_a_cache_that_cannot_be_told_is_dropped_before_the_ack_leaves(core):
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    ask(core, b"alice", "rm", 7, name="a", commit="x")
    ((key, _),) = requests_to(core.transport.take(), b"s")
    core.transport.unreachable.add(b"c1")
    answer(core, b"s", key, p.ok_reply(7, stat={}), inv=["a", "b"])
    assert core.registry.get(b"c1") is None  # it would serve the old version: gone first
    assert replies_to(core.transport.take(), b"alice")[0]["ok"] is True
    ask(core, b"alice", "get", 8, name="a")  # reads go to storage now
    assert requests_to(core.transport.take(), b"s")


def test_a_late_storage_reply_still_invalidates_what_it_changed(core):
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    ask(core, b"alice", "rm", 7, name="a", commit="x", ttl_ms=50)
    ((key, _),) = requests_to(core.transport.take(), b"s")
    core.tick(time.monotonic() + 1 + limits.INFLIGHT_GRACE)  # given up on
    answer(core, b"s", key, p.ok_reply(7, stat={}), inv="a")
    sent = core.transport.take()
    assert [(to, ident) for to, ident, *_ in sent] == [("worker", b"c1")]  # inv, no reply


def _commit_with_fill(core, req_id: int, content: bytes, ttl_ms: int | None = None):
    """A client commits ``content`` to "a" (inline) and storage s acks it with a fill: the key,
    and what the broker sent (raw frames) after the ack came."""
    fields = {k: v for k, v in commit_fields("a", content, f"x{req_id}").items() if k != "op"}
    if ttl_ms is not None:
        fields["ttl_ms"] = ttl_ms
    ask(core, b"alice", "commit", req_id, data=content, **fields)
    ((key, _),) = requests_to(core.transport.take(), b"s")
    return key, lambda: answer(
        core, b"s", key, p.ok_reply(req_id, stat={}), inv="a", fill=b"MANIFEST"
    )


def _fills(sent: list) -> dict:
    """cache ident -> (inv route, data frame or None) of each inv sent, from raw frames."""
    return {
        ident: (p.decode(frames[0], "route"), frames[1] if len(frames) > 1 else None)
        for to, ident, frames in sent
        if to == "worker" and p.decode(frames[0], "route")["t"] == "inv"
    }


def test_a_commit_fill_goes_to_the_owner_of_the_name_with_the_requests_data_before_the_ack(core):
    ready(core, b"c1", p.CACHE)
    ready(core, b"c2", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    key, ack = _commit_with_fill(core, 7, b"hello")
    ack()
    sent = core.transport.sent[:]
    core.transport.sent.clear()
    told = _fills(sent)
    owner = core.registry.get(b"c1" if told[b"c1"][1] is not None else b"c2")
    ask(core, b"alice", "get", 8, name="a")  # the get goes to the cache that was filled
    assert [ident for to, ident, *_ in core.transport.take()] == [owner.ident]
    other = b"c2" if owner.ident == b"c1" else b"c1"
    route, frame = told[owner.ident]
    assert route == {"t": "inv", "name": "a", "at": key, "fill": b"MANIFEST", "since": key}
    assert p.unpack_data(frame) == b"hello"
    assert told[other] == ({"t": "inv", "name": "a", "at": key}, None)
    assert [to for to, *_ in sent] == ["worker", "worker", "client"]  # the ack goes last
    assert owner.fill_sent == len(p.pack_data(b"hello"))


def test_commit_fills_stop_at_the_window_until_the_caches_heartbeat_says_it_took_them(
    core, monkeypatch
):
    monkeypatch.setattr(limits, "FILL_WINDOW", 100)
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    content = b"x" * 40  # 45 bytes with its prefix: two fit in the window, not three
    outcomes = []
    for req_id in (1, 2, 3):
        _key, ack = _commit_with_fill(core, req_id, content)
        ack()
        outcomes.append(_fills(core.transport.sent)[b"c1"][1] is not None)
        core.transport.sent.clear()
    assert outcomes == [True, True, False]
    assert core.metrics.cache_fills.labels("window_full")._value.get() == 1
    hb = {"t": "hb", "st": {"evictions": 0, "refused": 0, "filled": 90}}
    core.worker_message(b"c1", [p.encode(hb)])
    _key, ack = _commit_with_fill(core, 4, content)
    ack()
    assert _fills(core.transport.sent)[b"c1"][1] is not None  # room again


def test_a_late_commit_reply_invalidates_without_a_fill(core):
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    _key, ack = _commit_with_fill(core, 7, b"hello", ttl_ms=50)
    core.tick(time.monotonic() + 1 + limits.INFLIGHT_GRACE)  # given up on
    ack()
    route, frame = _fills(core.transport.sent)[b"c1"]
    assert frame is None and "fill" not in route


def test_a_welcome_says_the_newest_request_key(core):
    ready(core, b"s", p.STORAGE)
    ask(core, b"alice", "stat", 1, name="a")
    ask(core, b"alice", "stat", 2, name="b")
    _first, (key, _) = requests_to(core.transport.take(), b"s")
    ready(core, b"c1", p.CACHE)
    (welcome,) = [r for to, ident, r, _ in core.transport.take() if r["t"] == "welcome"]
    assert welcome["at"] == key  # the second stat's


def test_a_broker_started_again_gives_keys_above_the_last_ones_given(core):
    ready(core, b"s", p.STORAGE)
    ask(core, b"alice", "stat", 1, name="a")
    ((old, _),) = requests_to(core.transport.take(), b"s")
    again = Core(Recorder(), store="s1")  # a broker started again: its first key is above
    ready(again, b"s", p.STORAGE)
    ask(again, b"bob", "stat", 1, name="a")
    ((new, _),) = requests_to(again.transport.take(), b"s")
    assert new > old
    answer(again, b"s", old, p.ok_reply(1, stat={}))  # the old broker's, answered late
    assert replies_to(again.transport.take(), b"bob") == []  # not taken for bob's


def test_invalidations_of_many_names_go_in_messages_of_bounded_size(core):
    ready(core, b"c1", p.CACHE)
    core.transport.take()
    names = [f"folder/{i:04d}-" + "x" * 200 for i in range(1000)]
    core.invalidate(names)
    sent = core.transport.take()
    told = [n for _, _, route, _ in sent for n in route.get("names", [route.get("name")])]
    assert told == names and len(sent) > 1
    assert all(len(p.encode(route)) < limits.MAX_HEADER for _, _, route, _ in sent)


# --- deadlines ---


def test_queued_requests_past_their_deadline_are_dropped_and_a_mute_worker_loses_its_credit(core):
    ready(core, b"mute", p.STORAGE)
    credit = limits.WORKER_CREDIT["storage"]
    for i in range(credit + 4):
        ask(core, b"alice", "stat", i, name="x", ttl_ms=100)
    assert len(requests_to(core.transport.take(), b"mute")) == credit
    assert core.status()["broker"]["queued"]["storage"] == 4
    core.tick(time.monotonic() + 1)  # past the deadline: the queued ones go
    assert core.status()["broker"]["queued"]["storage"] == 0
    assert len(core.dispatcher.pending) == credit  # held by the worker, within the grace
    core.tick(time.monotonic() + 1 + limits.INFLIGHT_GRACE)
    assert not core.dispatcher.pending and core.dispatcher.dropped == credit + 4
    assert not core.admission.inflight and not core.admission.reserved
    ask(core, b"alice", "stat", 99, name="x")  # its credit is back
    assert [h["id"] for _, h in requests_to(core.transport.take(), b"mute")] == [99]


def test_a_request_carries_its_remaining_time_to_the_worker(core):
    ask(core, b"alice", "stat", 1, name="x", ttl_ms=5000)  # no worker yet: unavailable
    assert replies_to(core.transport.take(), b"alice")[0]["error"] == "unavailable"
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    ask(core, b"alice", "stat", 2, name="x", ttl_ms=5000)
    ((_, route, _),) = [(i, r, h) for to, i, r, h in core.transport.take() if to == "worker"]
    assert 4000 < route["ttl"] <= 5000
    ask(core, b"alice", "stat", 3, name="x", ttl_ms=10**9)  # cut to the largest
    ((_, route, _),) = [(i, r, h) for to, i, r, h in core.transport.take() if to == "worker"]
    assert route["ttl"] <= limits.MAX_TTL_MS


def test_a_client_that_leaves_has_its_queued_requests_and_held_replies_dropped(core):
    ready(core, b"s", p.STORAGE)
    for i in range(limits.WORKER_CREDIT["storage"] + 3):
        ask(core, b"alice", "stat", i, name="x")
    core.client_gone(b"alice")
    assert core.status()["broker"]["queued"]["storage"] == 0
    assert core.dispatcher.dropped == 3


# --- admission and shedding ---


def test_a_client_over_its_request_budget_backs_off_and_others_are_served(core):
    ready(core, b"s", p.STORAGE)
    data = b"x" * (16 * MiB)
    for i in range(4):  # 4 x 16 MiB: the client's whole budget (headers count too)
        ask(core, b"alice", "put_chunk", i, data=data[: 16 * MiB - 4096], hash=b"\x01" * 32)
    ask(core, b"alice", "put_chunk", 4, data=data[:65536], hash=b"\x02" * 32)
    refused = replies_to(core.transport.take(), b"alice")
    assert [r["id"] for r in refused] == [4] and refused[0]["error"] == "unavailable"
    assert "requests in flight" in refused[0]["message"]
    assert core.admission.backed_off == 1
    ask(core, b"bob", "stat", 1, name="x")  # admitted: it waits for the busy worker
    assert not replies_to(core.transport.take(), b"bob")
    assert core.status()["broker"]["queued"]["storage"] == 1


def test_the_reply_room_of_each_request_is_reserved_and_released_with_its_reply(core):
    ready(core, b"c", p.CACHE)
    core.transport.take()
    for i in range(4):  # 4 x 16 MiB chunks: 64 MiB reserved, the client's budget
        ask(core, b"alice", "chunk", i, hash=bytes([i]) * 32, len=16 * MiB - 8192)
    ask(core, b"alice", "chunk", 4, hash=b"\x09" * 32, len=65536)
    assert replies_to(core.transport.take(), b"alice")[0]["id"] == 4  # over: backs off
    assert core.admission.reserved[b"alice"] == 4 * (16 * MiB - 8192 + 4096)
    pending = dict(core.dispatcher.pending)
    for key, request in pending.items():
        answer(core, b"c", key, p.ok_reply(request.req_id), data=b"d")
    assert not core.admission.reserved and core.admission.total_reserved == 0
    assert len(replies_to(core.transport.take(), b"alice")) == 4


def _fill_outbox(core, client: bytes, count: int, size: int):
    """``count`` replies of ``size`` bytes held for ``client`` (its queue is full)."""
    core.transport.full.add(client)
    for i in range(count):
        ask(core, client, "chunk", f"{client.decode()}{i}", hash=bytes([i]) * 32, len=size)
    for key, request in list(core.dispatcher.pending.items()):
        if request.origin["from"] == client:
            answer(core, b"c", key, p.ok_reply(request.req_id), data=b"d" * size)


def test_replies_a_client_does_not_take_wait_counted_and_leave_in_order(core):
    ready(core, b"c", p.CACHE)
    _fill_outbox(core, b"alice", 3, 1000)
    assert core.status()["broker"]["held_bytes"]["replies"] > 3000
    core.transport.take()
    core.transport.full.discard(b"alice")
    core.outboxes.flush(time.monotonic() + 1)
    assert [r["id"] for r in replies_to(core.transport.take(), b"alice")] == [
        "alice0",
        "alice1",
        "alice2",
    ]
    assert core.status()["broker"]["held_bytes"]["replies"] == 0 and not core.outboxes


def test_a_large_reply_waits_in_the_outbox_while_the_clients_connection_is_backed_up(core):
    ready(core, b"c", p.CACHE)
    core.transport.kernel[b"alice"] = CLIENT_KERNEL_QUEUE + 1
    ask(core, b"alice", "chunk", 1, hash=b"\x01" * 32, len=LARGE_REPLY)
    ((key, _),) = requests_to(core.transport.take(), b"c")
    answer(core, b"c", key, p.ok_reply(1), data=b"d" * LARGE_REPLY)
    assert not replies_to(core.transport.take(), b"alice") and b"alice" in core.outboxes
    core.transport.kernel[b"alice"] = 0  # the client read
    core.outboxes.flush(time.monotonic() + 1)
    assert [r["id"] for r in replies_to(core.transport.take(), b"alice")] == [1]


def test_an_outbox_that_makes_no_progress_backs_off_and_one_that_reads_does_not(core):
    """No per-tick scan of idle outboxes: a client that never reads is tried ever less often
    (up to FLUSH_MAX_WAIT apart); one whose kernel queue drains is tried every tick."""
    ready(core, b"c", p.CACHE)
    _fill_outbox(core, b"idle", 2, 100)
    _fill_outbox(core, b"slow", 2, 100)
    core.transport.tries.clear()
    # A second of ticks a little over FLUSH_INTERVAL apart (so float rounding never makes a
    # reading client's box due a hair after the tick).
    start, ticks, step = time.monotonic(), 500, FLUSH_INTERVAL * 1.01
    for tick in range(ticks):
        core.transport.kernel[b"slow"] = 10**6 - tick  # its client takes bytes
        core.outboxes.flush(start + tick * step)
    idle, slow = core.transport.tries[b"idle"], core.transport.tries[b"slow"]
    # backed off after BACK_OFF_AFTER without progress, to FLUSH_MAX_WAIT apart
    assert idle <= BACK_OFF_AFTER / FLUSH_INTERVAL + 1 / FLUSH_MAX_WAIT + 10, idle
    assert slow >= ticks - 1, slow  # tried every tick: it is reading


def test_a_backed_off_outbox_is_tried_at_once_when_its_client_sends(core):
    ready(core, b"c", p.CACHE)
    _fill_outbox(core, b"alice", 1, 100)
    start = time.monotonic()
    for tick in range(100):  # it takes nothing: its box backs off
        core.outboxes.flush(start + tick * 0.01)
    # Not due at the next flush, as a box that was not backed off would be (its tries are
    # FLUSH_MAX_WAIT apart, on the ticks' grid: the next at 1.0 s or later).
    assert core.outboxes.next_due() >= start + 0.99 + 2 * FLUSH_INTERVAL
    core.transport.full.discard(b"alice")
    core.transport.take()
    ask(core, b"alice", "stat", "next", name="x")  # it sends: it is alive, its box is due now
    core.outboxes.flush(time.monotonic())
    # The held reply goes, then the answer to the new request (no storage: unavailable), in
    # the order they came.
    replies = replies_to(core.transport.take(), b"alice")
    assert [r["id"] for r in replies] == ["alice0", "next"]


def test_a_client_that_leaves_leaves_no_outbox_due(core):
    """Its box is gone with it, and so is its turn: nothing is due (a stale turn would make
    the loop poll without waiting)."""
    ready(core, b"c", p.CACHE)
    _fill_outbox(core, b"alice", 2, 100)
    assert core.outboxes.next_due() is not None
    core.client_gone(b"alice")
    assert core.outboxes.next_due() is None and not core.outboxes


def test_a_full_total_sheds_from_the_client_holding_most_never_from_a_reader(core, monkeypatch):
    monkeypatch.setattr(limits, "TOTAL_REPLY_BYTES", 8 * MiB)
    ready(core, b"c", p.CACHE)
    _fill_outbox(core, b"hog", 6, MiB)  # 6 MiB it does not read
    _fill_outbox(core, b"reader", 1, MiB)  # 1 MiB, but it is reading
    core.outboxes.boxes[b"reader"].moved = time.monotonic() + 3600
    core.transport.take()
    # bob needs 2 MiB of room: the hog has left its replies unread for STALLED, so its oldest
    # is replaced by a small `unavailable` with the same id.
    core.outboxes.boxes[b"hog"].moved = time.monotonic() - limits.STALLED - 1
    ask(core, b"bob", "chunk", 1, hash=b"\x07" * 32, len=2 * MiB - 8192)
    assert requests_to(core.transport.take(), b"c")  # admitted
    assert core.outboxes.shed >= 1
    box = core.outboxes.boxes[b"hog"]
    (first, *_), size, _, req_id = box.replies[0]
    assert req_id == "hog0" and p.decode(first)["error"] == "unavailable" and size < 1024
    assert core.outboxes.boxes[b"reader"].held >= MiB  # the reader kept its reply


def test_a_full_request_total_sheds_the_newest_queued_request_of_the_biggest_holder(
    core, monkeypatch
):
    monkeypatch.setattr(limits, "TOTAL_REQUEST_BYTES", 3 * MiB)
    monkeypatch.setattr(limits, "WORKER_CREDIT", {"storage": 1, "cache": 32})
    ready(core, b"s", p.STORAGE)
    for i in range(2):  # one in flight, one queued: 2 MiB held
        ask(core, b"hog", "put_chunk", i, data=b"x" * (MiB - 4096), hash=bytes([i]) * 32)
    core.transport.take()
    ask(core, b"bob", "put_chunk", 9, data=b"y" * (MiB + 65536), hash=b"\x09" * 32)
    shed = replies_to(core.transport.take(), b"hog")
    assert [(r["id"], r["error"]) for r in shed] == [(1, "unavailable")]  # the newest
    assert core.dispatcher.shed == 1
    assert core.status()["broker"]["queued"]["storage"] == 1  # bob's, in its place


# --- reply bounds: one table ---


def test_every_reply_bound_is_an_op_and_within_a_frame():
    assert set(REPLY_BOUNDS) <= set(p.OP_SERVICE)
    for op in p.OP_SERVICE:
        bound = reply_bound(op, {"names": ["n"] * p.MAX_BATCH_FILES, "limit": 10**9}, 65536)
        assert 0 < bound <= limits.MAX_FRAME, op


def test_a_chunk_reserves_its_declared_or_seen_length_else_the_largest():
    assert reply_bound("chunk", {"len": 1000}, 50) == 1000 + 4096
    assert reply_bound("chunk", {}, 50, seen=2000) == 2000 + 4096
    assert reply_bound("chunk", {"len": 1000}, 50, seen=2000) == 2000 + 4096
    assert reply_bound("chunk", {"len": -1}, 50) == p.MAX_CHUNK_SIZE + 4096
    assert reply_bound("chunk", {"len": True}, 50) == p.MAX_CHUNK_SIZE + 4096


def test_a_workers_credit_counts_the_bound_but_a_chunk_at_its_seen_or_usual_size():
    assert expected_reply("chunk", {}, 50) == CHUNK_GUESS  # a cache's fetch: no len
    # A client's `len` reserves its own budget, but does not take a shared worker's credit.
    assert expected_reply("chunk", {"len": 16 * MiB}, 50) == CHUNK_GUESS
    assert expected_reply("chunk", {"len": 16 * MiB}, 50, seen=4096) == 4096 + 4096
    big = {"names": ["n"] * 30000}  # a batch claiming more names than a batch may hold
    assert reply_bound("get_many", big, 65536) == reply_bound(
        "get_many", {"names": ["n"] * p.MAX_BATCH_FILES}, 65536
    )
    for op in ("ls", "get", "get_many", "have", "versions", "stat"):
        header = {"limit": 100, "names": ["a", "b"]}
        assert expected_reply(op, header, 300) == reply_bound(op, header, 300)
    assert reply_bound("ls", {"limit": 10}, 50) < reply_bound("ls", {"limit": 5000}, 50)
    # Every stat of a commit_many's reply echoes the message's metadata.
    meta = {"fs.mode": "644", "note": "x" * 2000}
    assert (
        reply_bound("commit_many", {"meta": meta}, 4000)
        >= reply_bound("commit_many", {}, 4000) + p.MAX_BATCH_FILES * 2000
    )
    # Each file's own (``metas``) is echoed by its stat: all of them, at most the header's size.
    metas = {"metas": [p.encode(meta)] * 20}
    size = len(p.encode(metas))
    assert reply_bound("commit_many", metas, size) >= reply_bound("commit_many", {}, size) + size
    assert reply_bound("have", {}, 10_000) > reply_bound("have", {}, 100)


# --- bad input ---


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xc1"],
        [p.encode([1, 2])],
        [p.encode({"v": p.PROTOCOL_VERSION, "op": "nope", "id": 3})],
    ],
)
def test_bad_client_messages_get_one_error_and_leave_nothing_behind(core, frames):
    core.client_message(b"alice", frames)
    (reply,) = replies_to(core.transport.take(), b"alice")
    assert reply["ok"] is False and reply["error"] in p.ERROR_CODES
    assert not core.dispatcher.pending and not core.admission.inflight


def test_a_worker_of_another_store_or_version_is_refused(core):
    for route in (
        {"t": "ready", "v": p.PROTOCOL_VERSION, "svc": "storage", "wid": "w", "store": "other"},
        {"t": "ready", "v": p.PROTOCOL_VERSION + 1, "svc": "storage", "wid": "w", "store": "s1"},
        {"t": "ready", "v": p.PROTOCOL_VERSION, "svc": "nope", "wid": "w"},
    ):
        core.worker_message(b"w", [p.encode(route)])
        ((_, _, reply, _),) = core.transport.take()
        assert reply["t"] == "refused" and core.registry.get(b"w") is None
    core.worker_message(b"stranger", [p.encode({"t": "hb"})])  # not registered: re-register
    assert core.transport.take()[0][2] == {"t": "reregister"}


# --- slow operations take turns ---


def test_slow_operations_past_a_clients_or_the_total_limit_are_busy_and_take_turns(core):
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    for i in range(HEAVY_PER_CLIENT + 1):
        ask(core, b"alice", "fsck", i)
    sent = core.transport.take()
    assert len(requests_to(sent, b"s")) == HEAVY_PER_CLIENT
    (busy,) = replies_to(sent, b"alice")
    assert busy["error"] == "busy" and busy["id"] == HEAVY_PER_CLIENT
    ask(core, b"alice", "stat", 9, name="x")  # other ops are not limited
    ask(core, b"alice", "ls", 10, prefix="a/", folders=True)  # nor a folder listing
    assert len(requests_to(core.transport.take(), b"s")) == 2
    clients = [f"c{i}".encode() for i in range(HEAVY_TOTAL)]
    for client in clients:  # every kind of slow op counts towards the total
        ask(core, client, "du", 1, prefix="")
    sent = core.transport.take()
    refused = [h for to, ident, h, _ in sent if to == "client"]
    assert len(refused) == HEAVY_PER_CLIENT and all(r["error"] == "busy" for r in refused)
    assert core.status()["broker"]["held_bytes"]["heavy"] == HEAVY_TOTAL
    assert core.status()["broker"]["busy"] == 1 + HEAVY_PER_CLIENT
    # An answer gives the turn back.
    key, header = requests_to(sent, b"s")[0]
    answer(core, b"s", key, p.ok_reply(header["id"], du={"files": 0, "bytes": 0}))
    core.transport.take()
    ask(core, b"late", "ls", 1, prefix="")  # a deep listing: slow
    assert requests_to(core.transport.take(), b"s")


def test_a_slow_operation_dropped_at_its_deadline_gives_its_turn_back(core):
    ready(core, b"s", p.STORAGE)
    for i in range(HEAVY_PER_CLIENT):
        ask(core, b"alice", "gc", i, ttl_ms=50)
    core.tick(time.monotonic() + 1 + limits.INFLIGHT_GRACE)
    assert core.admission.total_heavy == 0 and not core.admission.heavy
    core.worker_message(b"s", [p.encode({"t": "bye"})])
    assert core.admission.total_heavy == 0


# --- bytes handed to ZeroMQ count until the client takes them ---


def _chunk_reply(core, client: bytes, req_id, size: int, cache: bytes = b"c"):
    """``client`` asks for a chunk of ``size`` bytes and the cache answers it."""
    ask(core, client, "chunk", req_id, hash=bytes([len(client)]) * 32, len=size)
    for key, request in list(core.dispatcher.pending.items()):
        if request.origin["from"] == client and request.req_id == req_id:
            answer(core, cache, key, p.ok_reply(req_id), data=b"d" * size)


def test_a_reply_handed_to_zeromq_counts_until_the_clients_connection_has_taken_it(core):
    ready(core, b"c", p.CACHE)
    core.transport.acked[b"alice"] = 5000  # what the connection had taken before
    _chunk_reply(core, b"alice", 1, 100_000)
    assert replies_to(core.transport.take(), b"alice")  # sent at once...
    held = core.status()["broker"]["held_bytes"]
    assert held["replies_in_transit"] > 100_000  # ...and still counted
    assert core.admission.holding(b"alice") == held["replies_in_transit"]
    core.transport.acked[b"alice"] += 60_000  # part taken
    core.tick(time.monotonic())
    assert 40_000 < core.transit.total < 50_000
    core.transport.acked[b"alice"] += 60_000
    core.tick(time.monotonic())
    assert core.transit.total == 0 and not core.transit.flows


def test_past_its_transit_allowance_a_clients_replies_wait_in_its_outbox_until_it_reads(core):
    ready(core, b"c", p.CACHE)
    core.transport.acked[b"alice"] = 0
    _chunk_reply(core, b"alice", 1, CLIENT_TRANSIT)  # fills its allowance
    _chunk_reply(core, b"alice", 2, 1000)
    assert [r["id"] for r in replies_to(core.transport.take(), b"alice")] == [1]
    assert b"alice" in core.outboxes and core.transit.held(b"alice") > CLIENT_TRANSIT
    core.outboxes.flush(time.monotonic() + 1)
    assert not replies_to(core.transport.take(), b"alice")  # it took nothing yet
    core.transport.acked[b"alice"] = CLIENT_TRANSIT + 4096  # it read
    core.outboxes.flush(time.monotonic() + 2)
    assert [r["id"] for r in replies_to(core.transport.take(), b"alice")] == [2]


def test_clients_that_never_read_hold_at_most_the_total_and_a_stalled_one_is_disconnected(
    core, monkeypatch
):
    """Bytes in ZeroMQ count in the total reply budget: two clients that never read hold their
    16 MiB replies in transit; a third client's request finds the total full, so the one that
    has taken nothing for STALLED loses its connection, and the newcomer is admitted."""
    monkeypatch.setattr(limits, "TOTAL_REPLY_BYTES", 40 * MiB)
    ready(core, b"c", p.CACHE)
    for hog in (b"hog1", b"hog2"):
        core.transport.acked[hog] = 0
        _chunk_reply(core, hog, 1, 16 * MiB - 8192)
    core.transport.take()
    assert core.status()["broker"]["held_bytes"]["replies_in_transit"] >= 32 * MiB - 16384
    core.transport.acked[b"bob"] = 0
    ask(core, b"bob", "chunk", 1, hash=b"\x0b" * 32, len=16 * MiB - 8192)
    (refused,) = replies_to(core.transport.take(), b"bob")  # nobody stalled yet: back off
    assert refused["error"] == "unavailable" and not core.transport.disconnected
    core.transit.flows[b"hog1"].moved -= limits.STALLED + 1  # hog1 has taken nothing since
    ask(core, b"bob", "chunk", 2, hash=b"\x0b" * 32, len=16 * MiB - 8192)
    assert core.transport.disconnected == [b"hog1"]
    assert requests_to(core.transport.take(), b"c")  # bob's request went on
    status = core.status()["broker"]
    assert status["disconnected"] == 1 and b"hog1" not in core.transit.flows
    assert status["held_bytes"]["replies_in_transit"] < 17 * MiB


def test_a_client_that_takes_its_replies_is_never_disconnected(core, monkeypatch):
    monkeypatch.setattr(limits, "TOTAL_REPLY_BYTES", 20 * MiB)
    ready(core, b"c", p.CACHE)
    core.transport.acked[b"reader"] = 0
    _chunk_reply(core, b"reader", 1, 16 * MiB - 8192)
    core.transit.flows[b"reader"].moved -= limits.STALLED + 1
    core.transport.acked[b"reader"] = 1000  # it is reading, slowly
    ask(core, b"bob", "chunk", 1, hash=b"\x0b" * 32, len=8 * MiB)
    assert not core.transport.disconnected
    assert replies_to(core.transport.take(), b"bob")[0]["error"] == "unavailable"


def test_a_burst_finding_the_total_full_counts_what_clients_took_once(core, monkeypatch):
    """Counting what a client took of its bytes in transit is a system call per client.  Each
    request finding the total full used to count every client anew: 300 clients asking at once
    made 90,000 of them, the broker's loop spent half its time there, and a well-behaved
    client's requests waited behind them.  Now one count serves the burst (TRANSIT_RECOUNT)."""
    monkeypatch.setattr(limits, "TOTAL_REPLY_BYTES", 40 * MiB)
    monkeypatch.setattr(admission, "TRANSIT_RECOUNT", 3600.0)  # the whole burst in one count
    ready(core, b"c", p.CACHE)
    hogs = [b"hog1", b"hog2"]
    for hog in hogs:
        core.transport.acked[hog] = 0
        _chunk_reply(core, hog, 1, 16 * MiB - 8192)
    core.transport.take()
    asked = []
    taken = core.transport.taken
    monkeypatch.setattr(core.transport, "taken", lambda ident: asked.append(ident) or taken(ident))
    for i in range(100):
        ask(core, b"new%d" % i, "chunk", 1, hash=b"\x0b" * 32, len=16 * MiB - 8192)
    refused = [r for _, _, r, _ in core.transport.take() if r.get("error") == "unavailable"]
    assert len(refused) == 100  # the total is full and nobody has stalled: all back off
    assert [asked.count(hog) for hog in hogs] == [1, 1]


# --- the store's digest function ---


def routes_to(sent: list, worker: bytes) -> list:
    return [route for to, ident, route, _ in sent if to == "worker" and ident == worker]


def test_hello_says_the_stores_digest_function_once_storage_has_announced_it(core):
    ask(core, b"c", "hello", 1)
    assert replies_to(core.transport.take(), b"c")[0]["error"] == "unavailable"  # no storage
    ready(core, b"k", p.CACHE)
    # not yet
    start = core.dispatcher.newest_key
    assert routes_to(core.transport.take(), b"k") == [{"t": "welcome", "pol": True, "at": start}]
    ready(core, b"s", p.STORAGE)
    sent = core.transport.take()
    # The cache hears of it before anything can be dispatched to the storage worker.
    told = {"t": "welcome", "pol": True, "digest_fn": p.BLAKE3, "at": start}
    assert routes_to(sent, b"k") == [told]
    assert routes_to(sent, b"s") == [told]
    ask(core, b"c", "hello", 2)
    (reply,) = replies_to(core.transport.take(), b"c")
    assert reply["ok"] and (reply["store"], reply["digest_fn"]) == ("s1", p.BLAKE3)
    ready(core, b"s2", p.STORAGE)  # the same store: the caches are not told again
    assert routes_to(core.transport.take(), b"k") == []
    core.worker_message(b"s", [p.encode({"t": "bye"})])
    core.worker_message(b"s2", [p.encode({"t": "bye"})])
    ask(core, b"c", "hello", 3)  # still known with no storage worker connected
    assert replies_to(core.transport.take(), b"c")[0]["digest_fn"] == p.BLAKE3


def storage_ready(core, ident: bytes, **fields):
    route = {"t": "ready", "v": p.PROTOCOL_VERSION, "svc": p.STORAGE, "wid": "w", "store": "s1"}
    core.worker_message(ident, [p.encode({**route, **fields})])
    return routes_to(core.transport.take(), ident)


@pytest.mark.parametrize("digest_fn", [None, "md5", 7])
def test_a_storage_worker_with_no_known_digest_function_is_refused(core, digest_fn):
    (refused,) = storage_ready(core, b"s", digest_fn=digest_fn)
    assert core.registry.get(b"s") is None
    assert refused["t"] == "refused" and "digest function" in refused["msg"]


def test_a_storage_worker_of_the_same_store_with_another_function_is_refused_for_now(core):
    ready(core, b"s-a", p.STORAGE)
    (refused,) = storage_ready(core, b"s-b", digest_fn=p.SHA256)
    assert core.registry.get(b"s-b") is None and refused["retry"] is True


def test_a_fill_too_large_for_a_manifest_goes_as_a_plain_inv_the_cache_can_read(core):
    """Storage's route may be up to MAX_HEADER: a 'fill' near that, with the inv's own fields,
    would make a route the cache cannot decode, and it would lose the invalidation itself."""
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    fields = {k: v for k, v in commit_fields("a", b"x", "x1").items() if k != "op"}
    ask(core, b"alice", "commit", 1, data=b"x", **fields)
    ((key, _),) = requests_to(core.transport.take(), b"s")
    # storage's route at its limit, exactly
    base = len(p.encode({"t": "rep", "k": key, "ok": True, "inv": "a", "fill": b""}))
    big = b"m" * (limits.MAX_HEADER - base - 4)
    while len(p.encode({"t": "rep", "k": key, "ok": True, "inv": "a", "fill": big})) < (
        limits.MAX_HEADER
    ):
        big += b"m"
    answer(core, b"s", key, p.ok_reply(1, stat={}), inv="a", fill=big, ok=True)
    (frames,) = [f for to, ident, f in core.transport.sent if to == "worker" and ident == b"c1"]
    route = p.decode(frames[0], "route")  # what the cache worker does first
    assert route["t"] == "inv" and route["name"] == "a"


def _commit_many_with_fills(core, req_id: int, files: dict, fills: list | None = None):
    """A client commits ``files`` (name -> content) in one ``commit_many``; storage s acks it
    with a fill for each (or ``fills``): the key, and the ack."""
    names = list(files)
    data = b"".join(files.values())
    ask(core, b"alice", "commit_many", req_id, data=data, **many(files, req_id))
    ((key, _),) = requests_to(core.transport.take(), b"s")
    if fills is None:
        fills = {
            "fills": [b"MANIFEST " + n.encode() for n in names],
            "offsets": [sum(len(files[n]) for n in names[:i]) for i in range(len(names))],
        }
    return key, lambda: answer(core, b"s", key, p.ok_reply(req_id, results=[]), inv=names, **fills)


def test_a_commit_manys_fills_go_each_to_the_owner_of_its_name_with_the_data_before_the_ack(
    core,
):
    ready(core, b"c1", p.CACHE)
    ready(core, b"c2", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    files = {f"d/{i}": b"%d" % i * (i + 1) for i in range(12)}
    key, ack = _commit_many_with_fills(core, 7, files)
    ack()
    sent = core.transport.sent[:]
    core.transport.sent.clear()
    assert [to for to, *_ in sent] == ["worker", "worker", "client"]  # the ack goes last
    told = _fills(sent)
    owned = {}
    for ident in (b"c1", b"c2"):
        route, frame = told[ident]
        assert route["names"] == list(files) and route["at"] == key  # each drops every name
        assert route.get("since", key) == key
        given = route.get("fills") or [None] * len(files)
        owned[ident] = [name for name, manifest in zip(files, given, strict=True) if manifest]
        if owned[ident]:
            assert p.unpack_data(frame) == b"".join(files.values())  # the request's data
            offered = zip(route["names"], route["fills"], route["offsets"], strict=True)
            for name, manifest, offset in offered:
                if manifest is None:
                    assert offset is None
                    continue
                assert manifest == b"MANIFEST " + name.encode()
                assert p.unpack_data(frame)[offset : offset + len(files[name])] == files[name]
        else:
            assert frame is None
    assert sorted(owned[b"c1"] + owned[b"c2"]) == sorted(files)  # each file to one cache
    assert owned[b"c1"] and owned[b"c2"]  # 12 names: both own some (rendezvous hashing)
    for ident in (b"c1", b"c2"):  # a get of each goes to the cache that was given it
        for name in owned[ident]:
            ask(core, b"alice", "get", 8, name=name)
            assert [i for _to, i, *_ in core.transport.take()] == [ident]
    assert core.metrics.cache_fills.labels("sent")._value.get() == len(files)


@pytest.mark.parametrize(
    "fills",
    [
        {"fills": [b"M", None], "offsets": [-1, None]},  # an offset before the data
        {"fills": ["M", None], "offsets": [0, None]},  # a manifest that is not bytes
        {"fills": [b"M" * (p.MANIFEST_MAX + 1), None], "offsets": [0, None]},  # too large
        {"fills": [b"M", None], "offsets": [None, None]},  # no offset
        {"fills": [b"M"], "offsets": [0]},  # not an entry per name
        {"fills": [b"M", None]},
        {"fills": b"M", "offsets": 0},
        {"fills": [None, None], "offsets": [None, None]},  # nothing offered
    ],
)
def test_a_commit_manys_fills_the_cache_could_not_read_go_as_a_plain_inv(core, fills):
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    key, ack = _commit_many_with_fills(core, 3, {"d/0": b"zero", "d/1": b"one"}, fills)
    ack()
    told = _fills(core.transport.sent)
    assert told[b"c1"] == ({"t": "inv", "names": ["d/0", "d/1"], "at": key}, None)


def test_a_commit_manys_fills_stop_at_the_window(core, monkeypatch):
    monkeypatch.setattr(limits, "FILL_WINDOW", 100)
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    outcomes = []
    for req_id in (1, 2, 3):  # 40 bytes of content, 45 with the frame's prefix: two fit
        _key, ack = _commit_many_with_fills(
            core, req_id, {f"{req_id}/a": b"a" * 20, f"{req_id}/b": b"b" * 20}
        )
        ack()
        outcomes.append(_fills(core.transport.sent)[b"c1"][1] is not None)
        core.transport.sent.clear()
    assert outcomes == [True, True, False]
    assert core.metrics.cache_fills.labels("window_full")._value.get() == 2  # its two files


def test_a_commit_manys_names_over_one_inv_go_as_plain_invs_to_every_cache(core, monkeypatch):
    """Names that take more than one ``inv`` (INV_NAME_BYTES) hand no fill on: every cache
    still drops every name before the ack, and no data frame goes with them."""
    monkeypatch.setattr(limits, "INV_NAME_BYTES", 8)
    ready(core, b"c1", p.CACHE)
    ready(core, b"c2", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    files = {f"d/{i}": b"%d" % i for i in range(6)}
    key, ack = _commit_many_with_fills(core, 3, files)
    ack()
    sent = core.transport.sent[:]
    assert [to for to, *_ in sent][-1] == "client"  # the ack goes last
    for ident in (b"c1", b"c2"):
        told = [
            p.decode(frames[0], "route")
            for to, i, frames in sent
            if to == "worker" and i == ident and len(frames) == 1
        ]
        assert [n for route in told for n in route["names"]] == list(files)
        assert all(set(route) == {"t", "names", "at"} and route["at"] == key for route in told)
    assert all(len(frames) == 1 for to, _i, frames in sent if to == "worker")
    assert core.metrics.cache_fills.labels("sent")._value.get() == 0


def test_a_commit_many_of_the_most_content_a_message_may_carry_fills_an_idle_cache(core):
    """128 files of 64 KiB (or 64 of 128 KiB) fill a commit_many to MAX_BATCH_BYTES: its data
    frame, with its prefix, must fit the window of a cache that has taken all it was handed,
    else a put -r of such files never fills the cache."""
    ready(core, b"c1", p.CACHE)
    ready(core, b"s", p.STORAGE)
    core.transport.take()
    size = p.MAX_BATCH_BYTES // p.MAX_BATCH_FILES * 2  # 64 KiB
    files = {f"d/{i:03d}": bytes([i]) * size for i in range(p.MAX_BATCH_BYTES // size)}
    _key, ack = _commit_many_with_fills(core, 1, files)
    ack()
    route, frame = _fills(core.transport.sent)[b"c1"]
    assert frame is not None and len(route["fills"]) == len(files)
    assert core.registry.get(b"c1").fill_sent == p.MAX_BATCH_BYTES + p.DATA_PREFIX_LEN
