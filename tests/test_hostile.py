"""Hostile load (issue 17): each attack with bounded time and count, against real processes on
random loopback ports, with a well-behaved client beside it that must keep being served."""

import os
import time

import msgpack
import pytest
import zmq

import fms
from fms import limits
from fms import protocol as p
from tests.conftest import random_bytes, wait_for

MiB = p.MiB
# 32 MiB of empty arrays: decodes to about 2.3 GiB in about 8 s without limits.
BOMB = msgpack.packb([[]] * (p.MAX_FRAME_SIZE - 16))


def _dealer(endpoint, **opts):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    for key, value in opts.items():
        sock.setsockopt(getattr(zmq, key), value)
    sock.connect(endpoint)
    return sock


def _recv(sock, timeout=5.0):
    assert sock.poll(int(timeout * 1000)), "no reply in time"
    return sock.recv_multipart()


# --- 1. bounded decoding ---

def test_decoding_refuses_oversize_and_amplifying_frames_before_building_them():
    assert len(BOMB) <= p.MAX_FRAME_SIZE
    for kind in ("request", "route"):
        start = time.monotonic()
        with pytest.raises(limits.FrameTooLarge):
            p.decode(BOMB, kind)
        assert time.monotonic() - start < 0.5
    # Under the size limit, nesting is what is refused: 60 KiB of empty arrays.
    small_bomb = msgpack.packb({"v": 1, "op": "ls", "id": 1, "x": [[]] * 60000})
    assert len(small_bomb) < limits.MAX_HEADER
    with pytest.raises(fms.BadRequest, match="not valid msgpack"):
        p.decode(small_bomb, "request")
    # A commit may be large, but only flat: a list of digests, nothing nested.
    big_commit = {"v": 1, "op": "commit", "id": 1, "name": "f", "chunks": [b"d" * 32] * 60000}
    assert p.decode(p.encode(big_commit), "request")["chunks"][-1] == b"d" * 32
    assert limits.peek(p.encode(big_commit)) == {"v": 1, "op": "commit", "id": 1}
    nested = msgpack.packb({"v": 1, "op": "commit", "id": 1, "chunks": [[]] * (MiB)})
    start = time.monotonic()
    with pytest.raises(fms.BadRequest):
        p.decode(nested, "request")
    with pytest.raises(fms.BadRequest):        # a list of a million tiny ints: too long a list
        p.decode(msgpack.packb({"v": 1, "op": "commit", "id": 1, "chunks": [0] * MiB}), "request")
    assert time.monotonic() - start < 0.5
    with pytest.raises(limits.FrameTooLarge):   # only commit and have may be large
        p.decode(p.encode({**big_commit, "op": "ls"}), "request")


def test_amplifying_frames_on_both_ports_stall_nobody(cluster):
    """15 bombs to the frontend and 3 to the backend: each is refused before decoding, the
    client beside them keeps being served within its 2 s timeout, no worker is dropped."""
    data = random_bytes(300 * 1024, 1)
    with cluster.client(timeout=2.0, retries=0) as c:
        c.put_bytes(data, "legit")
        front = _dealer(cluster.frontend)
        backs = [_dealer(cluster.backend) for _ in range(3)]
        try:
            start = time.monotonic()
            for i in range(15):
                front.send(BOMB)
                if i < 3:
                    backs[i].send(BOMB)
                assert c.get_bytes("legit") == data          # served between the bombs
            for _ in range(15):
                header = p.decode(_recv(front, 10)[0])
                assert header["ok"] is False and header["error"] == "too_large"
                assert "over the limit" in header["message"]
            assert c.stat("legit")["size"] == len(data)
            assert time.monotonic() - start < 30
        finally:
            front.close()
            for sock in backs:
                sock.close()
        assert sorted(w["id"] for w in c.status()["workers"]) == ["cache-1", "storage-a",
                                                                   "storage-b"]
    assert all(proc.alive() for proc in cluster.procs)


def test_bad_frames_are_logged_rate_limited_and_never_echo_attacker_text(cluster):
    broker = cluster.procs[0]
    before = len(broker.log())
    sock = _dealer(cluster.frontend)
    try:
        for i in range(300):
            sock.send(p.encode({"v": 1, "op": "x" * 50000, "id": i}))
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
    data = random_bytes(10 * MiB, 2)                 # 2560 chunks of 4 KiB: headers of ~87 KB
    with cluster.client(chunk_size=p.MIN_CHUNK_SIZE) as c:
        c.put_bytes(data, "many-chunks")
        assert c.get_bytes("many-chunks") == data
