"""What the core sends through: a transport to clients and to workers.

The core (core.py) never touches a socket.  Every message it decides to send goes through a
:class:`Transport`, and what happened to the send comes back at once, so the core reacts where it
decided (a worker that cannot be reached is dropped and its requests go to another; a client
whose queue is full gets the reply held, counted, in its outbox).  The loop (loop.py) provides
one over two ZeroMQ ROUTER sockets; the unit tests provide one that records what was sent.
"""

import logging
from typing import Protocol

from ..logutil import RateLimitedLog

# Replies that could not be delivered, logged by the loop, the replies and the outboxes alike:
# one rate limit for all of them, so a flood of them costs one budget of log lines.
undeliverable = RateLimitedLog(logging.getLogger("fms.broker"))

SENT = "sent"  # the message is queued in ZeroMQ for the peer
FULL = "full"  # the peer's queue is full: hold it and try again later
GONE = "gone"  # the peer cannot be reached (it disconnected): drop it


class Transport(Protocol):
    def to_client(self, ident: bytes, frames: list) -> str:
        """Queue ``frames`` as one message for client ``ident``: SENT, FULL or GONE (which the
        transport logs)."""
        ...

    def to_worker(self, ident: bytes, frames: list) -> bool:
        """Queue ``frames`` as one message for worker ``ident``; False (logged) if it cannot
        take it: unknown, gone, or its queue is full."""
        ...

    def queued(self, ident: bytes) -> int | None:
        """Bytes the kernel holds for client ``ident`` that it has not taken yet, or None if
        unknown."""
        ...

    def taken(self, ident: bytes) -> int | None:
        """Bytes client ``ident``'s connection has had acknowledged since it opened (what the
        client has taken), or None if that cannot be measured (not TCP, or unknown)."""
        ...

    def disconnect(self, ident: bytes) -> bool:
        """Close client ``ident``'s connection (ZeroMQ then drops what it queued for it);
        False if that cannot be done."""
        ...
