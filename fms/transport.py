"""Multipart send and receive for the hot path.

pyzmq's ``send_multipart``/``recv_multipart`` spend about a microsecond per frame on
Python-level flag arithmetic (enum objects) and option look-ups; a small GET crosses four hops,
each a receive and a send of two to four frames, so these plain-int loops are measurably
cheaper (``python -m benchmarks.bench profile`` shows where the broker's time goes).  Semantics are the
same: frames are sent without copying, and a multipart message is queued whole or not at all.
"""

import zmq

_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)


def send_frames(sock: zmq.Socket, frames, flags: int = 0):
    """Send ``frames`` as one message (``copy=False``).  :raises zmq.ZMQError: as ``send``."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, flags | _SNDMORE if i < last else flags, copy=False)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list:
    """Receive one message as a list of :class:`zmq.Frame` (no copy)."""
    frames = [sock.recv(flags, copy=False)]
    while sock.get(_RCVMORE):
        frames.append(sock.recv(flags, copy=False))
    return frames


def drain(sock: zmq.Socket, handle, limit: int) -> int:
    """Hand up to ``limit`` queued messages from ``sock`` to ``handle``, without waiting.

    Under load this takes what is queued without a poll per message (a poll costs about as
    much as routing one).  It asks the socket whether a message is waiting rather than trying
    and catching ``zmq.Again``: an exception per call costs more than the check.

    :return: how many messages were handled.
    """
    done = 0
    while done < limit and sock.get(_EVENTS) & _POLLIN:
        handle(recv_frames(sock))
        done += 1
    return done
