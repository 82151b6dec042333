"""docs/PROTOCOL.md and the code agree: the spec's tables against the code's constants, and each
point where a client written from the spec alone found them apart (issue 15), over the wire."""

import glob
import logging
import os
import re

import pytest
import zmq
from conftest import ROOT

from fms import limits, wire
from fms import wire as p
from fms.broker import admission
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
def raw(cluster, raw_of):
    return raw_of(cluster)


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


def test_rm_replies_with_the_tombstone_which_says_deleted(cluster, raw):
    with cluster.client() as c:
        c.put_bytes(b"x", "gone")
    reply = raw([request("rm", 7, name="gone", commit="rm-1")])
    assert reply["ok"] is True and reply["id"] == 7
    assert reply["stat"]["deleted"] is True and reply["stat"]["count"] == 0
    assert reply["stat"]["version"] == 2
    again = raw([request("rm", 8, name="gone", commit="rm-1")])  # a repeat: same answer
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


def test_a_client_that_sends_300_requests_before_reading_gets_every_reply(cluster, raw_of):
    """Issue 15: a client that sent 300 requests without reading lost 44 replies.  Per the spec
    the first 128 are served and the rest refused with too_large, every one answered."""
    with cluster.client() as c:
        c.put_bytes(b"x", "f")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(cluster.frontend)
    try:
        for i in range(300):
            sock.send(request("stat", i, name="f"))
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
