"""The hot-path frame helpers, on an in-process socket pair (no network)."""

import pytest
import zmq

from fms.wire.frames import drain, recv_frames, send_frames


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://transport-test")
    b.connect("inproc://transport-test")
    b.rcvtimeo = 2000
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()


def test_multipart_arrives_whole_and_in_order(pair):
    a, b = pair
    send_frames(a, [b"route", bytearray(b"header"), memoryview(b"data" * 1000)])
    send_frames(a, [b"single"])
    assert [f.bytes for f in recv_frames(b)] == [b"route", b"header", b"data" * 1000]
    assert [f.bytes for f in recv_frames(b)] == [b"single"]


def test_drain_takes_at_most_limit_and_never_waits(pair):
    a, b = pair
    for i in range(5):
        send_frames(a, [b"m", str(i).encode()])
    assert b.poll(2000, zmq.POLLIN)  # everything queued has reached b
    seen = []
    assert drain(b, lambda frames: seen.append(frames[1].bytes), 3) == 3
    assert drain(b, lambda frames: seen.append(frames[1].bytes), 3) == 2
    assert drain(b, lambda frames: seen.append(frames[1].bytes), 3) == 0  # empty: returns
    assert seen == [b"0", b"1", b"2", b"3", b"4"]
