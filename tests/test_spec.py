"""docs/PROTOCOL.md and the code agree: the spec's tables against the code's constants, and each
point where a client written from the spec alone found them apart (issue 15), over the wire."""

import glob
import logging
import os
import re
import time

import pytest
import zmq
from conftest import ROOT
from storage_helpers import h

from fms import limits, wire
from fms import wire as p
from fms.broker import admission
from fms.errors import BadRequest
from fms.worker import _dispatch

SPEC = os.path.join(ROOT, "docs", "PROTOCOL.md")
REPLY_TIMEOUT_MS = 5000


@pytest.fixture
def raw_of():
    """``raw_of(cluster)`` -> ``ask(frames) -> reply header``, over a bare DEALER on the
    cluster's frontend (closed at the end)."""
    socks = []

    def make(cluster):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(cluster.frontend)
        socks.append(sock)

        def ask(frames: list) -> dict:
            sock.send_multipart([bytes(f) for f in frames])
            assert sock.poll(REPLY_TIMEOUT_MS), f"no reply to {frames!r}"
            reply = sock.recv_multipart()
            assert len(reply) in (1, 2)
            return p.decode(reply[0])

        return ask

    yield make
    for sock in socks:
        sock.close()


@pytest.fixture
def raw(untouched_cluster, raw_of):
    """``raw_of`` a cluster nothing is written to: for requests that must store nothing."""
    return raw_of(untouched_cluster)


def request(op: str, req_id, **fields) -> bytes:
    return p.encode({"v": p.PROTOCOL_VERSION, "op": op, "id": req_id, **fields})


def spec_table(heading: str) -> list:
    """The rows (lists of cells, backticks removed) of the first table under ``heading``."""
    with open(SPEC, encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"\n{heading}\n")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip().replace("`", "") for c in line.strip("|").split("|")]
            if not set(cells[0]) <= set("-"):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header row


# --- the spec's tables against the code ---


def test_every_number_in_the_spec_is_the_code_s():
    rows = spec_table("## Numbers")
    assert len(rows) >= 25
    for what, value, code in rows:
        # a dotted name from the table
        actual = eval(code, {"wire": wire, "limits": limits, "admission": admission})
        assert float(value) == actual, f"{what}: the spec says {value}, {code} is {actual}"


def test_the_ops_table_lists_every_op_with_its_service_and_which_carry_data():
    rows = spec_table("## Ops")
    assert {op: service for op, service, *_ in rows} == p.OP_SERVICE
    assert {op for op, *_, data in rows if "*data*" in data.replace("`", "")} == p.DATA_OPS


def test_the_error_table_lists_exactly_the_code_s_error_codes():
    assert [row[0] for row in spec_table("## Errors")] == list(p.ERROR_CODES)


def test_every_request_field_storage_or_the_broker_reads_is_in_the_request_fields_table():
    read = {"commit"}  # storage's _commit_id
    broker = sorted(glob.glob(os.path.join(ROOT, "fms", "broker", "*.py")))
    assert broker, "the broker's modules are not where this test looks"
    for path, pattern in (
        (os.path.join(ROOT, "fms", "storage", "service.py"), r'need\w*\(header, "(\w+)"'),
        (os.path.join(ROOT, "fms", "storage", "access.py"), r'need\w*\(header, "(\w+)"'),
        *((module, r'header\.get\("(\w+)"') for module in broker),
    ):
        with open(path, encoding="utf-8") as f:
            read |= set(re.findall(pattern, f.read()))
    documented = {row[0] for row in spec_table("### Request fields")}
    documented |= {"v", "op", "id", "ttl_ms"}  # every header's (*Messages*)
    assert read <= documented, f"fields read but not in the spec: {read - documented}"


# --- the points the independent client found ---


def test_rm_replies_with_the_tombstone_which_says_deleted(shared_cluster, prefix, raw_of):
    with shared_cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}gone")
    raw = raw_of(shared_cluster)
    reply = raw([request("rm", 7, name=f"{prefix}gone", commit=f"rm-{prefix}")])
    assert reply["ok"] is True and reply["id"] == 7
    assert reply["stat"]["deleted"] is True and reply["stat"]["count"] == 0
    assert reply["stat"]["version"] == 2
    again = raw(
        [request("rm", 8, name=f"{prefix}gone", commit=f"rm-{prefix}")]
    )  # a repeat: same answer
    assert again["stat"] == reply["stat"]


@pytest.mark.parametrize(
    "frames,req_id",
    [
        ([request("stat", 41, name="a"), b"\xc4\x01x", b"extra"], 41),  # three frames
        ([request("ls", "my-id"), p.pack_data(b"stray")], "my-id"),  # data on an op without
        ([request("put_chunk", 43, hash=b"h" * 32), b"a", b"b"], 43),
    ],
)
def test_a_wrong_frame_count_is_bad_request_and_echoes_a_readable_id(raw, frames, req_id):
    reply = raw(frames)
    assert reply["ok"] is False and reply["error"] == "bad_request", reply
    assert reply["id"] == req_id
    assert "frame" in reply["message"]


def test_an_unreadable_header_gets_an_error_with_a_nil_id(raw):
    reply = raw([b"\xc1", b"more"])
    assert reply["ok"] is False and reply["error"] == "bad_request" and reply["id"] is None


def test_cache_stats_without_a_cache_worker_is_answered_and_stats_exits_0(make_cluster, raw_of):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=1, cache=0)
    reply = raw_of(cluster)([request("cache_stats", 5)])
    assert reply == {"v": p.PROTOCOL_VERSION, "id": 5, "ok": True, "cache": None}
    got = cluster.cli("stats")
    assert got.returncode == 0, got.stderr
    assert b"cache   none connected" in got.stdout


# --- flow control ---


def test_a_client_that_sends_300_requests_before_reading_gets_every_reply(shared_cluster, prefix):
    """Issue 15: a client that sent 300 requests without reading lost 44 replies.  Per the spec
    the first 128 are served and the rest refused with too_large, every one answered."""
    with shared_cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}f")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(shared_cluster.frontend)
    try:
        for i in range(300):
            sock.send(request("stat", i, name=f"{prefix}f"))
        got = {}
        while len(got) < 300 and sock.poll(REPLY_TIMEOUT_MS):
            header = p.decode(sock.recv_multipart()[0])
            assert header["id"] not in got, f"two replies to {header['id']}"
            got[header["id"]] = header.get("error", "ok")
    finally:
        sock.close()
    assert sorted(got) == list(range(300))
    assert set(got.values()) <= {"ok", "too_large"}
    assert list(got.values()).count("ok") >= p.MAX_CLIENT_INFLIGHT


# --- a worker's error replies echo the id too ---


class Link:
    def __init__(self):
        self.replies = []

    def reply(self, route, header, data=None, **route_fields):
        self.replies.append(header)


class Service:
    def handle_request(self, route, header, data):
        raise AssertionError("not to be reached")


@pytest.mark.parametrize(
    "route,body,code",
    [
        ({"t": "req", "k": 1, "ttl": 0}, [request("stat", 9, name="a")], "unavailable"),
        ({"t": "req", "k": 1}, [request("stat", 9, name="a"), b"\xc4\x00", b"x"], "bad_request"),
    ],
)
def test_a_worker_echoes_the_id_on_errors_before_the_handler(route, body, code):
    link = Link()
    _dispatch(
        Service(), link, [FrameOf(p.encode(route)), *map(FrameOf, body)], logging.getLogger("test")
    )
    assert [(r["id"], r["error"]) for r in link.replies] == [(9, code)]


class FrameOf:
    """Stands in for a zmq.Frame."""

    def __init__(self, data: bytes):
        self.bytes = data
        self.buffer = memoryview(data)


# --- issue 26: the request fields, one table, the spec checked against it ---


INT64_MAX = 2**63 - 1


def _numbers_in(text: str) -> set:
    return {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))}


def test_the_request_fields_table_is_the_code_s_one_table():
    from fms.wire.requests import REQUEST_FIELDS

    rows: dict = {}
    for row in spec_table("### Request fields"):  # a field may have a row per meaning
        rows.setdefault(row[0], []).append(row)
    assert set(rows) == set(REQUEST_FIELDS)
    for name, field in REQUEST_FIELDS.items():
        kinds = {row[1] for row in rows[name]}
        rule = " ".join(row[2] for row in rows[name])
        default = " ".join(row[3] for row in rows[name])
        ops = set()
        for row in rows[name]:
            ops |= set(re.findall(r"\b([a-z_][a-z0-9_]*)\b", re.sub(r"\(.*?\)", "", row[4])))
        assert kinds == {{"id": "int or str"}.get(field.kind, field.kind)}, name
        assert ops == set(field.ops), (name, ops)
        if set(field.required) == set(field.ops):
            assert default.startswith("required"), name
        elif field.required:
            assert "required for " + ", ".join(field.required) in default, name
        else:
            assert "required" not in default, name
        if not field.required or set(field.required) != set(field.ops):
            assert field.default.replace("`", "") in default, (name, field.default, default)
        bounds = [field.lo, field.hi, field.item_len, *(field.items or ())]
        bounds += [n for pair in field.per_op.values() for n in pair]
        for n in bounds:
            if n in (None, 0) or (n == INT64_MAX and ("2^63-1" in rule or "or more" in rule)):
                continue
            assert float(n) in _numbers_in(rule), f"{name}: {n} is not in {rule!r}"


def _bad_values(field):
    """Values of ``field`` that the table refuses: another type, and past each end."""
    kind = field.kind
    bad = {"str": [5], "bin": ["text"], "int": [True, 1.5, "1"], "bool": [1, "yes"]}
    bad.update({"number": [True, "1", float("nan")], "id": [[1], 1.5, True]})
    bad.update({"map": ["text", {"key": 1}]})
    if kind.startswith("array of "):
        item = kind[len("array of ") :]
        values = ["not an array", [bad[item][0]]]
        if field.item_len:
            values.append([b"x" * (field.item_len - 1)])
        if field.hi is not None:
            values.append([b"h" * 32 if item == "bin" else "a"] * (int(field.hi) + 1))
        if field.items is not None and item != "str":
            values.append([field.items[1] + 1])
        return values
    values = list(bad[kind])
    if kind in ("int", "number") and field.lo is not None:
        values += [field.lo - 1, field.hi + 1]
    if kind == "bin" and field.item_len:  # items of item_len bytes (extents)
        values += [b"x" * (field.item_len - 1), b"\0" * field.item_len]
    elif kind == "bin":
        values += [b"x" * (field.lo - 1), b"x" * (field.hi + 1)]
    if kind == "id":
        values += ["x" * (int(field.hi) + 1)]  # (past 2^64-1, msgpack has no int)
    if kind == "str" and field.hi is not None:
        values.append("x" * (int(field.hi) + 1))
    return values


# A good value of each field, so that a request lacks nothing but the field under test.
GOOD = {
    "name": "a",
    "src": "b",
    "version": 1,
    "names": ["a"],
    "hash": b"h" * 32,
    "hashes": [b"h" * 32],
    "chunk_size": 4096,
    "extents": b"",
    "digest": b"d" * 32,
    "commit": "c-1",
    "sizes": [0],
    "mtimes": [1.0],
    "commits": ["c-1"],
    "prefix": "p/",
    "dest": "q/",
    "role": "read",
    "access_key": "AKEXAMPLE",
}


def _ops(field) -> tuple:
    """The ops that read ``field``: a field every op may carry is tried on one."""
    from fms.wire.requests import ANY_OP

    return ("stat",) if field.ops == (ANY_OP,) else field.ops


def _whole(op: str) -> dict:
    """Every field ``op`` requires, each with a good value."""
    from fms.wire.requests import op_fields

    return {name: GOOD[name] for name, field in op_fields(op) if op in field.required}


def test_the_broker_refuses_every_field_of_another_type_or_out_of_range_whatever_the_op():
    """The five contradictions the independent client found, and every one like them."""
    from test_broker_core import Recorder, ask, ready, replies_to

    from fms.broker import Core
    from fms.wire.requests import REQUEST_FIELDS

    core = Core(Recorder(), store="s1")
    ready(core, b"s", p.STORAGE)
    ready(core, b"c", p.CACHE)
    tried = 0
    for name, field in REQUEST_FIELDS.items():
        for op in _ops(field):
            for value in _bad_values(field):
                core.transport.take()
                ask(core, b"alice", op, tried, **{**_whole(op), name: value})
                sent = core.transport.take()
                replies = replies_to(sent, b"alice")
                if len(p.encode({**_whole(op), name: value})) > limits.MAX_HEADER:
                    continue  # only peeked at by the broker: storage checks it whole (below)
                errors = [r["error"] for r in replies]
                assert errors in (["bad_request"], ["too_large"]), (op, name, value, errors)
                assert repr(name) in replies[0]["message"], replies[0]["message"]
                assert not [s for s in sent if s[0] == "worker"]  # no worker saw it
                tried += 1
    assert tried > 100  # every op of every field, each way it can be wrong


def test_nil_is_absence_for_every_optional_field_and_missing_for_a_required_one():
    from fms.wire.requests import REQUEST_FIELDS, check_request

    for name, field in REQUEST_FIELDS.items():
        for op in _ops(field):
            if op in field.required:
                with pytest.raises(BadRequest) as e:
                    check_request(op, {**_whole(op), name: None})
                assert f"field {name!r} is missing" in str(e.value)
            else:
                check_request(op, {**_whole(op), name: None})  # nothing to refuse
    assert p.need_int({"limit": None}, "limit", optional=True, default=7) == 7


def test_a_large_header_the_broker_only_peeked_at_is_checked_whole_by_storage(raw):
    reply = raw([request("have", 1, hashes=[b"h" * 32] * (p.MAX_HAVE_BATCH + 1))])
    assert reply["error"] == "bad_request" and "'hashes'" in reply["message"], reply
    pages = [b"h" * 32] * 3000 + [b"short"]
    reply = raw([request("commit", 2, **{**_whole("commit"), "pages": pages})])
    assert reply["error"] == "bad_request" and "'pages'" in reply["message"], reply


def test_version_true_or_1_0_is_not_version_1(raw):
    for v in (True, 1.0):
        reply = raw([p.encode({"v": v, "op": "stat", "id": 3, "name": "x"})])
        assert reply["error"] == "version" and reply["id"] == 3, reply


def test_the_chunk_and_read_fields_are_checked_over_the_wire(shared_cluster, prefix, raw_of):
    with shared_cluster.client() as c:
        c.put_bytes(b"z" * 5000, f"{prefix}f")
    raw = raw_of(shared_cluster)
    digest = h(b"z" * 5000)  # its one chunk, by the store's digest function
    for fields in ({"len": -1}, {"len": 2**40}, {"of": [1]}, {"fresh": "yes"}):
        reply = raw([request("chunk", 1, hash=digest, **fields)])
        assert reply["error"] == "bad_request", (fields, reply)
    assert raw([request("get", 2, name=f"{prefix}f", fresh="yes")])["error"] == "bad_request"
    assert raw([request("get_many", 3, names=[f"{prefix}f"], fresh=1)])["error"] == "bad_request"
    assert raw([request("get", 4, name=f"{prefix}f", fresh=None)])["ok"] is True  # nil: absent
    assert raw([request("ls", 5, prefix="", limit=None)])["ok"] is True
    served = raw([request("chunk", 6, hash=digest, len=5000, of=4)])
    assert served["ok"] is True


def test_put_chunk_of_a_small_chunk_storage_holds_says_written_false(cluster, raw_of):
    raw = raw_of(cluster)  # a fresh store: the first put of the chunk writes it
    data = b"small chunk" * 100  # 1,100 bytes: kept in the metadata database
    digest = h(data)
    first = raw([request("put_chunk", 1, hash=digest), p.pack_data(data)])
    again = raw([request("put_chunk", 2, hash=digest), p.pack_data(data)])
    assert (first["written"], again["written"]) == (True, False)
    big = b"b" * (100 * 1024)  # over 64 KiB: a blob, which already said so
    digest = h(big)
    raw([request("put_chunk", 3, hash=digest), p.pack_data(big)])
    assert raw([request("put_chunk", 4, hash=digest), p.pack_data(big)])["written"] is False


def test_commit_many_over_8_mib_of_content_is_too_large(raw):
    count, size = 72, 128 * 1024  # 9 MiB in files of 128 KiB
    content = [bytes([i]) * size for i in range(count)]
    header = request(
        "commit_many",
        1,
        names=[f"m/{i}" for i in range(count)],
        sizes=[size] * count,
        hashes=[h(c) for c in content],
        mtimes=[1.0e9] * count,
        commits=[f"cm-{i}" for i in range(count)],
        chunk_size=p.DEFAULT_CHUNK_SIZE,
    )
    reply = raw([header, p.pack_data(b"".join(content))])
    assert reply["error"] == "too_large" and "8388608" in reply["message"], reply


# --- issue 26: the three points where the spec said two things, now one ---


def test_a_request_still_queued_when_its_deadline_passes_is_dropped_without_a_reply():
    from test_broker_core import Recorder, ask, ready, replies_to

    from fms.broker import Core

    core = Core(Recorder(), store="s1")
    ready(core, b"busy", p.STORAGE)
    credit = limits.WORKER_CREDIT["storage"]
    for i in range(credit + 1):
        ask(core, b"alice", "stat", i, name="x", ttl_ms=100)
    core.transport.take()
    core.tick(time.monotonic() + 1)
    assert core.status()["broker"]["queued"]["storage"] == 0
    assert replies_to(core.transport.take(), b"alice") == []  # dropped: no reply, no error


def test_a_reply_larger_than_its_reservation_is_held_while_the_budgets_have_room(monkeypatch):
    from test_broker_core import Recorder, answer, ask, ready, replies_to, requests_to

    from fms.broker import Core

    for budget, kept in ((limits.CLIENT_BYTES, True), (64 * 1024, False)):
        monkeypatch.setattr(limits, "CLIENT_BYTES", budget)
        core = Core(Recorder(), store="s1")
        ready(core, b"c", p.CACHE)
        core.transport.full.add(b"alice")  # it does not read now: the reply must wait
        ask(core, b"alice", "chunk", 1, hash=b"\x01" * 32, len=10)  # a false len
        ((key, _),) = requests_to(core.transport.take(), b"c")
        answer(core, b"c", key, p.ok_reply(1), data=b"d" * 200_000)
        assert (b"alice" in core.outboxes) is kept
        core.transport.full.discard(b"alice")
        core.outboxes.flush(time.monotonic() + 1)
        assert [r["id"] for r in replies_to(core.transport.take(), b"alice")] == (
            [1] if kept else []
        )


def test_an_unread_reply_is_dropped_inflight_grace_after_its_deadline_not_at_it():
    from test_broker_core import Recorder, answer, ask, ready, replies_to, requests_to

    from fms.broker import Core

    core = Core(Recorder(), store="s1")
    ready(core, b"c", p.CACHE)
    core.transport.full.add(b"alice")
    ask(core, b"alice", "chunk", 1, hash=b"\x02" * 32, len=1000, ttl_ms=100)
    ((key, _),) = requests_to(core.transport.take(), b"c")
    answer(core, b"c", key, p.ok_reply(1), data=b"d" * 1000)
    start = time.monotonic()
    core.outboxes.flush(start + 1)  # past its deadline, within the grace: kept
    assert b"alice" in core.outboxes
    core.outboxes.flush(start + limits.INFLIGHT_GRACE + 1)  # past the grace: dropped
    assert b"alice" not in core.outboxes and core.outboxes.dropped == 1
    core.transport.full.discard(b"alice")
    assert replies_to(core.transport.take(), b"alice") == []


def test_the_spec_says_each_of_the_three_points_one_way():
    """Where the spec said two things (issue 26), it now says what the tests above check."""
    with open(SPEC, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    assert "before a worker could take it" not in text  # (it was dropped, not answered)
    assert "still queued at the broker when its deadline passes is dropped without a reply" in text
    assert "still unread when its request's deadline (`ttl_ms`) passes" not in text
    assert "still unread 30 s (`INFLIGHT_GRACE`) after its request's deadline" in text
    assert "the client's and the total reply budgets have no room for the excess" in text
    assert "is kept only while the budgets have room for the excess, else dropped" in text
    history = text[text.index("## Version history") :]
    assert "128 KiB" in history and "**no**" in history  # the incompatible change, said so
