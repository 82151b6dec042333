"""The gateway process's event loop (:func:`fms.gateway.server.loop_factory`): uvloop's where
uvloop is installed, asyncio's own where it is not."""

import asyncio
import sys
import types

import pytest

pytest.importorskip("aiohttp")
from fms.gateway import server


def test_the_loop_is_uvloops_where_it_is_installed(monkeypatch):
    made = []

    def new_event_loop() -> asyncio.AbstractEventLoop:
        made.append(True)
        return asyncio.new_event_loop()

    fake = types.ModuleType("uvloop")
    fake.new_event_loop = new_event_loop  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", fake)
    factory = server.loop_factory()
    assert factory is new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, "ran")) == "ran"
    assert made == [True]


def test_the_loop_is_asyncios_where_uvloop_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert server.loop_factory() is None
