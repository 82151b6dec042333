"""Replies: each answer goes back to whoever asked, a client or a worker.

A client's reply goes straight to ZeroMQ, counted in transit until the client takes it
(transit.py), unless its outbox holds replies already (they keep their order) or it has too much
in transit; then it waits in the outbox, counted (outbox.py), if the budgets let it
(admission.py).  A worker's request (a cache's fetch
from storage) is answered on the backend with a ``rep`` route.
"""

import logging
import time

from .. import limits
from .. import wire as p
from ..metrics import BrokerMetrics
from .admission import Admission
from .headers import nbytes
from .outbox import Outboxes
from .transit import Transit
from .transport import FULL, SENT, Transport, undeliverable

log = logging.getLogger("fms.broker")

FRONTEND = "f"  # a request's origin: a client on the frontend
BACKEND = "b"  # ... or a worker on the backend
_REP = p.encode({"t": "rep"})


class Replies:
    """Delivers replies, and answers errors, counting them in the metrics."""

    def __init__(
        self,
        transport: Transport,
        outboxes: Outboxes,
        admission: Admission,
        metrics: BrokerMetrics,
    ) -> None:
        self.transport = transport
        self.outboxes = outboxes
        self.transit: Transit = outboxes.transit
        self.admission = admission
        self.metrics = metrics

    def deliver(
        self,
        origin: dict,
        body: list,
        deadline: float | None = None,
        admitted: int = 0,
        req_id: object = None,
    ) -> None:
        """Send a reply (``body``) to whoever asked; to a client whose queue is full or whose
        connection is backed up (for a large reply), hold it, counted."""
        if origin["via"] != FRONTEND:
            self.transport.to_worker(origin["from"], [_REP, *body])
            return
        ident = origin["from"]
        size = sum(map(nbytes, body))
        now = time.monotonic()
        if ident not in self.outboxes.boxes and self.transit.may_send(ident, size, now):
            outcome = self.transport.to_client(ident, body)
            if outcome == SENT:
                self.transit.handed(ident, size)
                return
            if outcome != FULL:
                return  # the client is gone (the transport logged it)
        if not self.admission.may_hold(ident, size, admitted):
            self.outboxes.dropped += 1
            undeliverable.warning(
                "event=undeliverable socket=frontend peer=%s error=%r held=%d",
                ident.hex(),
                "queue full: the client does not read; reply dropped (byte budget)",
                self.outboxes.holding(ident),
            )
            return
        if deadline is None:
            deadline = now + limits.DEFAULT_TTL_MS / 1000
        self.outboxes.hold(ident, body, size, deadline, req_id, now)

    def error(
        self,
        origin: dict,
        req_id: object,
        code: str,
        message: str,
        op: str = "unknown",
        started: float | None = None,
        admitted: int = 0,
    ) -> None:
        """Answer ``code`` with ``message`` (and count it, for a client)."""
        reply = [p.encode(p.error_reply(req_id, code, message))]
        self.deliver(origin, reply, admitted=admitted, req_id=req_id)
        if origin["via"] == FRONTEND:
            elapsed = time.monotonic() - started if started is not None else 0.0
            self.metrics.answered(op if op in p.OP_SERVICE else "unknown", code, elapsed)
