"""The gateway's AsyncLink against a stand-in broker (a ROUTER socket in the test)."""

import asyncio
import os

import pytest
import zmq
import zmq.asyncio

from fms import wire as p
from fms.errors import Timeout
from fms.gateway.link import AsyncLink


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
