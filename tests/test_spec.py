"""docs/PROTOCOL.md and the code agree: the spec's tables against the code's constants, and each
point where a client written from the spec alone found them apart (issue 15), over the wire."""

import os

import pytest
import zmq

from fms import wire as p
from conftest import ROOT

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


# --- the points the independent client found ---

def test_rm_replies_with_the_tombstone_which_says_deleted(cluster, raw):
    with cluster.client() as c:
        c.put_bytes(b"x", "gone")
    reply = raw([request("rm", 7, name="gone", commit="rm-1")])
    assert reply["ok"] is True and reply["id"] == 7
    assert reply["stat"]["deleted"] is True and reply["stat"]["chunks"] == 0
    assert reply["stat"]["version"] == 2
    again = raw([request("rm", 8, name="gone", commit="rm-1")])      # a repeat: same answer
    assert again["stat"] == reply["stat"]


@pytest.mark.parametrize("frames,req_id", [
    ([request("stat", 41, name="a"), b"\xc4\x01x", b"extra"], 41),     # three frames
    ([request("ls", "my-id"), p.pack_data(b"stray")], "my-id"),       # data on an op without
    ([request("put_chunk", 43, hash=b"h" * 32), b"a", b"b"], 43),
])
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

