"""Transit: bytes handed to ZeroMQ for a client, counted until the client has taken them.

Once a reply is handed to ZeroMQ, the broker's process still holds it (in ZeroMQ's queue for
that peer, then in the kernel's send buffer) until the client reads it.  So it stays counted, as
the client's and in the total reply budget, until the client's connection says it was taken:
the bytes the peer acknowledged (Linux ``TCP_INFO``, ``tcpi_bytes_acked``; a peer that does not
read stops acknowledging once its small receive buffer is full).  A client may have at most
``CLIENT_TRANSIT`` bytes in transit before its next reply waits in its outbox (one reply may
overshoot it, up to a chunk).

A client with bytes in transit that takes none for ``STALLED`` holds room that only closing its
connection gives back (ZeroMQ drops what it queued for it): when another client needs the room,
admission may do that (admission.py).  Where the connection cannot be measured (not TCP, or
its descriptor unknown), its replies are not counted here and a large one waits while the kernel
holds more than ``CLIENT_KERNEL_QUEUE`` bytes for it, as before.
"""

from dataclasses import dataclass

from .. import limits
from .transport import Transport

CLIENT_TRANSIT = 1 * limits.MiB  # a client's bytes in transit before its replies wait
# A reply with this much data or more goes to ZeroMQ's queue for an unmeasured client only while
# the kernel holds less than CLIENT_KERNEL_QUEUE bytes not yet taken by it.
LARGE_REPLY = 256 * limits.KiB
CLIENT_KERNEL_QUEUE = 1 * limits.MiB


@dataclass(slots=True)
class Flow:
    """What one client has in transit."""

    held: int  # bytes handed and not taken yet (high until refreshed: never low)
    acked: int  # the connection's acknowledged bytes when last read
    moved: float  # when the client last took bytes (or was first handed some)


class Transit:
    """Every measured client's bytes in transit, and the total."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.flows: dict[bytes, Flow] = {}
        self.total = 0

    def held(self, ident: bytes) -> int:
        flow = self.flows.get(ident)
        return flow.held if flow is not None else 0

    def may_send(self, ident: bytes, size: int, now: float) -> bool:
        """Whether a reply of ``size`` bytes may go to ZeroMQ now (else it waits, counted).
        A client's first reply reads the connection's count first: the baseline its replies
        are counted from."""
        flow = self.flows.get(ident)
        if flow is None:
            acked = self.transport.taken(ident)
            if acked is None:  # not measurable: not counted, the kernel's queue decides
                return size < LARGE_REPLY or not self._backed_up(ident)
            self.flows[ident] = Flow(0, acked, now)
            return True
        if flow.held >= CLIENT_TRANSIT:
            self.refresh(ident, now)
            return self.held(ident) < CLIENT_TRANSIT
        return True

    def handed(self, ident: bytes, size: int) -> None:
        """A reply of ``size`` bytes went to ZeroMQ for ``ident``: count it until taken."""
        flow = self.flows.get(ident)
        if flow is not None:
            flow.held += size
            self.total += size

    def refresh(self, ident: bytes, now: float) -> bool:
        """Read what ``ident`` has taken since last time; whether it took anything.  A client
        that holds nothing in transit any more is forgotten."""
        flow = self.flows.get(ident)
        if flow is None:
            return False
        acked = self.transport.taken(ident)
        if acked is None:  # the connection is gone: nobody holds its bytes any more
            self.drop(ident)
            return True
        took = acked - flow.acked
        if took > 0:
            flow.acked = acked
            flow.moved = now
            freed = min(took, flow.held)
            flow.held -= freed
            self.total -= freed
        if not flow.held:
            del self.flows[ident]
        return took > 0

    def mark(self, ident: bytes, now: float) -> int | None:
        """A number that grows as ``ident`` takes bytes (for an outbox's back-off): what its
        connection acknowledged, or, unmeasured, minus what the kernel still holds for it."""
        if ident in self.flows:
            self.refresh(ident, now)
            flow = self.flows.get(ident)
            return flow.acked if flow is not None else None
        queued = self.transport.queued(ident)
        return -queued if queued is not None else None

    def sweep(self, now: float) -> None:
        """Refresh every client with bytes in transit (a few each sweep interval)."""
        for ident in list(self.flows):
            self.refresh(ident, now)

    def stalled(self, ident: bytes, now: float) -> bool:
        """Whether ``ident`` holds bytes in transit and has taken none for STALLED."""
        flow = self.flows.get(ident)
        return flow is not None and now - flow.moved >= limits.STALLED

    def drop(self, ident: bytes) -> None:
        """Forget ``ident`` (its connection is gone)."""
        flow = self.flows.pop(ident, None)
        if flow is not None:
            self.total -= flow.held

    def _backed_up(self, ident: bytes) -> bool:
        queued = self.transport.queued(ident)
        return queued is not None and queued > CLIENT_KERNEL_QUEUE
