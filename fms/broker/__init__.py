"""The broker: routes requests to services and keeps the registry of live workers.

It knows nothing about files.  It reads the small header frame of a client request (for ``op``
and a few fields) and the route frame of a worker message; data frames pass through untouched
(``copy=False``).  It holds no state that a restart loses: workers re-register, clients retry.

One module per responsibility, each saying what it owns:

- core.py: the socket-free core: decoded messages in, messages out (through a transport);
- registry.py: the workers, their services and stores, liveness and heartbeats;
- routing.py: requests in flight, fair queues per service, which worker serves (rendezvous);
- dispatch.py: requests from admission to answer: queueing, credit, redispatch, deadlines;
- admission.py: byte budgets, reply reservations (one table of reply bounds), shedding;
- outbox.py: replies held for clients that are not taking them, tried only when due;
- replies.py: delivering replies and errors to clients and workers;
- headers.py: the few header fields the broker reads, within bounds;
- transport.py: what the core sends through; loop.py: the sockets and the poll loop.
"""

from .core import Core
from .loop import Broker
from .routing import rendezvous

__all__ = ["Broker", "Core", "rendezvous"]
