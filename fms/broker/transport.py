"""What the core sends through: a transport to clients and to workers.

The core (core.py) never touches a socket.  Every message it decides to send goes through a
:class:`Transport`, and what happened to the send comes back at once, so the core reacts where it
decided (a worker that cannot be reached is dropped and its requests go to another; a client
whose queue is full gets the reply held, counted, in its outbox).  The loop (loop.py) provides
one over two ZeroMQ ROUTER sockets; the unit tests provide one that records what was sent.
"""

from typing import Protocol

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

    def backed_up(self, ident: bytes) -> bool:
        """Whether client ``ident`` has more than CLIENT_KERNEL_QUEUE bytes untaken in the
        kernel: then a large reply waits in its outbox, counted, instead of in ZeroMQ's queue,
        where nothing counts its bytes."""
        ...
