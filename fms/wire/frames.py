"""Frames on a socket and from a file.

Multipart send and receive for the hot path: pyzmq's ``send_multipart``/``recv_multipart`` spend
about a microsecond per frame on Python-level flag arithmetic (enum objects) and option look-ups;
a small GET crosses four hops, each a receive and a send of two to four frames, so these
plain-int loops are measurably cheaper (``python -m benchmarks.bench profile`` shows where the
broker's time goes).  Semantics are the same: frames are sent without copying, and a multipart
message is queued whole or not at all.

Reading files straight into data frames: the payload lands behind the reserved bin32 prefix, so
it is never copied again on its way to the socket.
"""

from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias, cast

import zmq

from ..limits import BytesLike
from .codec import DATA_PREFIX_LEN, data_buffer

__all__ = [
    "NOBLOCK",
    "RawFile",
    "RawReader",
    "Sendable",
    "drain",
    "read_frame",
    "read_full",
    "recv_frames",
    "send_frames",
]

_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)


# A frame to send: bytes built here, or a received zmq.Frame passed on as it is.
Sendable: TypeAlias = BytesLike | zmq.Frame


class RawReader(Protocol):
    """What bytes are read from: an unbuffered binary stream (a file, stdin, a pipe)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class RawFile(RawReader, Protocol):
    """What frames are read from: an unbuffered binary file (``open(path, "rb", buffering=0)``)."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...


def send_frames(sock: zmq.Socket, frames: Sequence[Sendable], flags: int = 0) -> None:
    """Send ``frames`` as one message (``copy=False``).  :raises zmq.ZMQError: as ``send``."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, flags | _SNDMORE if i < last else flags, copy=False)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """Receive one message as a list of :class:`zmq.Frame` (no copy)."""
    # The frame says whether more follow (zmq_msg_more): no option look-up per frame, which
    # pyzmq turns into an enum each time (a microsecond or two per frame).
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame)
    return frames


def drain(
    sock: zmq.Socket,
    handle: Callable[[list[zmq.Frame]], object],
    limit: int,
    ready: bool = False,
) -> int:
    """Hand up to ``limit`` queued messages from ``sock`` to ``handle``, without waiting.

    Under load this takes what is queued without a poll per message (a poll costs about as
    much as routing one).  It asks the socket whether a message is waiting rather than trying
    and catching ``zmq.Again``: an exception per call costs more than the check.  ``ready``: a
    poll has just said the socket holds a message, so the first is taken without asking
    (ZMQ_EVENTS is an option look-up that costs as much as the receive).

    :return: how many messages were handled.
    """
    done = 0
    while done < limit:
        # pyzmq types get() as int or bytes; ZMQ_EVENTS is an int
        if not ready and not cast(int, sock.get(_EVENTS)) & _POLLIN:
            break
        ready = False
        try:
            frames = recv_frames(sock, NOBLOCK)
        except zmq.Again:  # (only if something took it since the poll)
            break
        handle(frames)
        done += 1
    return done


def read_full(f: RawReader, view: memoryview) -> int:
    """Fill ``view`` from the unbuffered file ``f``; :return: bytes read (less only at EOF)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_frame(
    f: RawFile, length: int, offset: int | None = None
) -> tuple[bytearray, memoryview, int]:
    """Read ``length`` bytes (from ``offset``, if given) into a new data frame.

    :return: ``(frame, payload view, bytes actually read)``; a short read means the file shrank.
    """
    frame = data_buffer(length)
    view = memoryview(frame)[DATA_PREFIX_LEN:]
    if offset is not None:
        f.seek(offset)
    return frame, view, read_full(f, view)
