"""The store's access snapshot as the broker passes it on: who may connect, nothing more.

Storage decides what each identity may do (:mod:`fms.policy`); the broker only authenticates.
So a storage worker sends the broker the store's access snapshot (a ``policy`` route with the
snapshot's epoch, and the snapshot in a data frame) when it registers and whenever identities or
grants change; the broker keeps the newest (the highest epoch, from whichever storage worker),
lets in the CURVE keys it lists (``on_keys``, the frontend's ZAP), and passes the same frames on
to every other worker: the cache workers decide their hits with it, the other storage workers
take it at once instead of within a second.  A worker that registers gets the newest one after
its ``welcome``, which says (``pol``) that this broker passes them on.
"""

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from .. import wire as p
from ..errors import BadRequest
from ..policy import Policy
from . import headers as h

if TYPE_CHECKING:
    import zmq

    from ..wire import Sendable

log = logging.getLogger("fms.broker")


class StoreKeys:
    """The newest access snapshot a storage worker sent.

    :param on_keys: called with the identities' CURVE keys (a frozenset of z85 str) whenever
        a newer snapshot arrives.
    """

    def __init__(self, on_keys: Callable[[frozenset[str]], None] | None = None) -> None:
        self.epoch = -1
        self.frames: list[Sendable] | None = None  # [route, data] to pass on, once one arrived
        self.on_keys = on_keys

    def offer(self, route: dict[str, Any], body: "list[zmq.Frame]") -> bool:
        """A ``policy`` route and its data frame from a storage worker.  :return: it is newer
        than the one kept (then kept, and its keys let in).  :raises BadRequest: malformed."""
        epoch = route.get("e")
        if not h.int_in(epoch, 0) or len(body) != 1:
            raise BadRequest("a policy route has an int epoch 'e' and one data frame")
        if epoch <= self.epoch:
            return False
        try:
            # From a storage worker (authenticated); its size is bounded by the frame's.
            snapshot = msgpack.unpackb(p.unpack_data(h.buffer(body[0])), raw=False)
            policy = Policy.from_wire(snapshot)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise BadRequest(f"a policy snapshot that cannot be read: {exc}") from None
        self.epoch = epoch
        self.frames = [p.encode({"t": "policy", "e": epoch}), body[0]]
        if self.on_keys is not None:
            self.on_keys(policy.keys())
        log.info("event=access_snapshot epoch=%d identities=%d", epoch, len(policy.by_name))
        return True
