"""The gateway's link to the broker (fms.gateway.link.AsyncLink), against a broker played by the
test: a ROUTER socket that reads the link's requests and answers as it is told.  Every receive
has a timeout; the tests wait for messages, never for time to pass."""

import asyncio
import logging
import os

import msgpack
import pytest
import zmq
import zmq.asyncio

from fms import wire as p
from fms.errors import Timeout, Unavailable
from fms.gateway.link import AsyncLink

RECV_TIMEOUT = 5.0  # seconds any receive of the fake broker, or any wait for a call, takes


class FakeBroker:
    """A ROUTER on a random loopback port (made inside the running loop)."""

    def __init__(self) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ident = b""

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict:
        """The next request's header."""
        try:
            ident, header, *_ = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        except TimeoutError:
            raise AssertionError(f"no request from the link within {timeout} s") from None
        self.ident = ident
        return p.decode(header, "request")

    async def send(self, *frames: bytes) -> None:
        await self.sock.send_multipart([self.ident, *frames])

    async def answer(self, request: dict, **fields) -> None:
        await self.send(p.encode({"id": request["id"], "ok": True, **fields}))

    async def refuse(self, request: dict, code: str = "unavailable") -> None:
        reply = {"id": request["id"], "ok": False, "error": code, "message": "busy, retry"}
        await self.send(p.encode(reply))

    def close(self) -> None:
        self.sock.close(linger=0)


def run(test, **link_args) -> None:
    """``test(broker, link)`` in a new event loop, with a fake broker and a link to it."""

    async def main() -> None:
        broker = FakeBroker()
        link = AsyncLink(broker.endpoint, **link_args)
        try:
            await test(broker, link)
        finally:
            link.close()
            broker.close()

    asyncio.run(main())


async def result(task: "asyncio.Task"):
    """A call's outcome, within the receive timeout."""
    return await asyncio.wait_for(task, RECV_TIMEOUT)


def test_a_try_that_timed_out_is_not_delivered_when_the_broker_comes(tmp_path: str) -> None:
    """A commit tried while the broker was away, and reported failed, must not reach the broker
    when it comes back (it would overwrite what was committed since); and the first request
    once it is back goes out as soon as the connection is up, not after a try's timeout."""
    address = f"ipc://{os.path.join(tmp_path, 'broker')}"

    async def run() -> None:
        link = AsyncLink(address, timeout=0.2, retries=1)
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        try:
            with pytest.raises(Timeout):  # no broker: both tries time out
                await link.call("commit", p.pack_data(b"old"), name="a")
            router.bind(address)
            link.timeout, link.retries = 10.0, 0
            call = asyncio.ensure_future(link.call("get", name="b"))
            envelope = await asyncio.wait_for(router.recv_multipart(), 10)
            header = p.decode(envelope[1])
            assert (header["op"], header.get("name")) == ("get", "b")
            await router.send_multipart([envelope[0], p.encode({"ok": True, "id": header["id"]})])
            reply, _ = await asyncio.wait_for(call, 10)
            assert reply["ok"]
        finally:
            link.close()
            router.close(linger=0)
            ctx.term()

    asyncio.run(run())


def test_requests_beyond_the_window_wait_for_a_place():
    async def test(broker, link):
        calls = [asyncio.create_task(link.call("get", name=f"n{i}")) for i in range(5)]
        first = [await broker.recv() for _ in range(2)]  # every call has started by now
        assert len(link._waiting) == 2
        for request in first:
            await broker.answer(request, name=request["name"])
        for _ in range(3):  # each answer makes room for one more
            request = await broker.recv()
            assert len(link._waiting) <= 2
            await broker.answer(request, name=request["name"])
        for i, call in enumerate(calls):
            header, frame = await result(call)
            assert (header["name"], frame) == (f"n{i}", None)

    run(test, window=2)


def test_a_request_that_finds_no_place_within_its_budget_is_unavailable():
    async def test(broker, link):
        await link._slots.acquire()  # the window is full: a request is in flight
        with pytest.raises(Unavailable, match="in flight"):  # within result's RECV_TIMEOUT
            await result(asyncio.create_task(link.call("get", name="n")))
        assert not link._waiting

    run(test, window=1, timeout=0.2, retries=1)


def test_close_fails_waiting_calls_with_unavailable():
    async def test(broker, link):
        sent = asyncio.create_task(link.call("get", name="sent"))
        await broker.recv()
        queued = asyncio.create_task(link.call("get", name="queued"))  # no place: waits
        await asyncio.sleep(0)  # let it start waiting (a turn of the loop, not a delay)
        link.close()
        for call in (sent, queued):
            with pytest.raises(Unavailable, match="closed"):
                await result(call)
        with pytest.raises(Unavailable, match="closed"):  # and none reopens the socket
            await result(asyncio.create_task(link.call("get", name="later")))
        assert link._sock is None

    run(test, window=1, timeout=RECV_TIMEOUT)


def test_close_fails_a_call_waiting_to_send_with_unavailable(tmp_path) -> None:
    """With no broker to connect to, a call waits for the connection to send: closed, it gets
    Unavailable."""

    async def main() -> None:
        link = AsyncLink(f"ipc://{os.path.join(tmp_path, 'nobroker')}", timeout=RECV_TIMEOUT)
        call = asyncio.create_task(link.call("get", name="n"))

        async def waiting() -> None:  # until it waits for the socket (turns of the loop)
            while link._writable is None:
                await asyncio.sleep(0)

        await asyncio.wait_for(waiting(), RECV_TIMEOUT)
        link.close()
        with pytest.raises(Unavailable, match="closed"):
            await result(call)

    asyncio.run(main())


def test_a_malformed_reply_is_dropped_and_the_rest_are_read(caplog):
    async def test(broker, link):
        calls = [asyncio.create_task(link.call("get", name=f"n{i}")) for i in range(2)]
        requests = [await broker.recv() for _ in range(2)]
        await broker.send(msgpack.packb({"id": [requests[0]["id"]], "ok": True}))  # unhashable
        await broker.send(msgpack.packb([1, 2]))  # not a map
        await broker.send(b"\xc1")  # not msgpack
        for request in requests:
            await broker.answer(request, name=request["name"])
        for i, call in enumerate(calls):
            header, _ = await result(call)
            assert header["name"] == f"n{i}"

    with caplog.at_level(logging.WARNING, logger="fms.gateway"):
        run(test, timeout=RECV_TIMEOUT)
    dropped = [r for r in caplog.records if "event=link_bad_reply" in r.getMessage()]
    assert len(dropped) == 3


def test_the_last_try_ends_with_the_budget():
    """Answered ``unavailable`` late in the budget, the try after is cut to what is left of it
    (not a whole timeout past it)."""
    timeout = 1.5  # one try, retries=0: the budget is one timeout

    async def test(broker, link):
        call = asyncio.create_task(link.call("get", name="n"))
        first = await broker.recv()
        await asyncio.sleep(timeout * 0.8)  # a slow broker: the answer comes late
        await broker.refuse(first)
        second = await broker.recv()
        # What is left of the budget, not a whole timeout (a loaded machine only makes it less)
        assert second["ttl_ms"] < timeout * 1000 * 0.5
        with pytest.raises(Unavailable):  # the budget spent: no third try
            await result(call)

    run(test, timeout=timeout, retries=0)


def test_no_reply_is_a_timeout():
    async def test(broker, link):
        # Connected first: a try made before the connection is up is not sent, and a loaded
        # machine once took longer than the 0.2 s try to connect (one request, not two).
        warm = asyncio.create_task(link.call("get", name="warm"))
        await broker.answer(await broker.recv(), name="warm")
        await result(warm)
        call = asyncio.create_task(link.call("get", name="n"))
        for _ in range(2):
            await broker.recv()
        with pytest.raises(Timeout):
            await result(call)

    run(test, timeout=0.2, retries=1)
