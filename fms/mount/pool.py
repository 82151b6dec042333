"""Connections for the mount's threads: FUSE calls come from several threads at once, and a
ZeroMQ socket (an :class:`fms.Client`) serves one thread at a time, so each call borrows one."""

import contextlib
import threading
from collections.abc import Callable, Iterator

from .. import wire as p
from ..client.api import Client

POOL_KEPT = 8  # idle connections kept; more are made while more threads need one


class ClientPool:
    """Clients made by ``factory`` and lent out one per call, then taken back.

    A client whose request failed is taken back as it is: every request is idempotent and a
    late reply to an abandoned one is skipped by its id (:class:`fms.client.session.Session`).
    """

    def __init__(self, factory: Callable[[], Client]):
        self.factory = factory
        self._idle: list[Client] = []
        self._lock = threading.Lock()
        self._closed = False
        self._digest_fn: str | None = None  # the store's digest function, once asked
        self._hash: p.Hasher | None = None

    def digest_fn(self) -> str:
        """The name of the store's digest function (asked of the broker once)."""
        if self._digest_fn is None:
            with self.client() as client:
                self._digest_fn = client.session.digest_fn()
        return self._digest_fn

    def hasher(self) -> p.Hasher:
        """The helper of the store's digest function, with which every digest the mount sends
        is made."""
        if self._hash is None:
            self._hash = p.hasher(self.digest_fn())
        return self._hash

    @contextlib.contextmanager
    def client(self) -> Iterator[Client]:
        with self._lock:
            found = self._idle.pop() if self._idle else None
        client = found if found is not None else self.factory()
        try:
            yield client
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < POOL_KEPT
                if keep:
                    self._idle.append(client)
            if not keep:
                client.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()
