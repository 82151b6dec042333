"""Outboxes: replies the broker holds, counted in bytes, for clients that are not taking them.

A reply goes straight to ZeroMQ while the client has less than ``CLIENT_TRANSIT`` bytes in
transit (transit.py) and its ZeroMQ queue takes it (its SNDHWM is ``CLIENT_PIPE`` messages);
otherwise it waits here, in the client's outbox, where its bytes count against the budgets
(admission.py), in order behind whatever waits already.

Only outboxes that are due are tried.  One whose client sends, or took bytes, within
``BACK_OFF_AFTER`` is tried again ``FLUSH_INTERVAL`` later, and at once when its client sends
a message (a client reading a window of chunks asks for the next as it takes one); one whose
client has done neither for longer backs off, doubling up to ``FLUSH_MAX_WAIT``, so clients that
never read cost the loop nothing per tick.  A held reply past its deadline by
``INFLIGHT_GRACE`` is dropped (a client still reading matches a late reply by its id).
"""

import collections
import heapq
import logging
from dataclasses import dataclass

from .. import limits
from .. import wire as p
from .transit import Transit
from .transport import FULL, GONE, Transport, undeliverable

log = logging.getLogger("fms.broker")

FLUSH_INTERVAL = 0.002  # seconds: retry of an outbox whose client reads
FLUSH_MAX_WAIT = 0.1  # seconds: the longest an outbox waits between tries
BACK_OFF_AFTER = 0.05  # seconds without progress before an outbox's tries back off
SHED_KEEPS = 1024  # bytes: a held reply this small is not worth shedding (its error is as big)


@dataclass(slots=True)
class Box:
    """One client's held replies, oldest first: ``(frames, size, deadline, req_id)``."""

    replies: collections.deque
    moved: float  # when it last sent or its client took bytes (or it was made): it reads
    due: float  # when it is tried next
    held: int = 0  # bytes of its replies
    wait: float = FLUSH_INTERVAL  # its current back-off
    mark: int | None = None  # the client's Transit.mark when last tried


class Outboxes:
    """Every client's outbox, the bytes they hold, and when each is tried next."""

    def __init__(self, transport: Transport, transit: Transit) -> None:
        self.transport = transport
        self.transit = transit
        self.boxes: dict[bytes, Box] = {}
        self.total = 0  # bytes held in all outboxes
        self.dropped = 0  # replies dropped: past their deadline, their client gone, no room
        self.shed = 0  # unread replies replaced by `unavailable` to make room for others
        self._due: list = []  # heap of (due, ident); stale entries are skipped

    def __contains__(self, ident: bytes) -> bool:
        return ident in self.boxes

    def __bool__(self) -> bool:
        return bool(self.boxes)

    def holding(self, ident: bytes) -> int:
        box = self.boxes.get(ident)
        return box.held if box is not None else 0

    def count(self, ident: bytes) -> int:
        box = self.boxes.get(ident)
        return len(box.replies) if box is not None else 0

    def next_due(self) -> float | None:
        """When the next outbox is to be tried (None: nothing is held)."""
        due = self._due
        while due:
            when, ident = due[0]
            box = self.boxes.get(ident)
            if box is not None and box.due == when:
                return when
            heapq.heappop(due)  # gone, or rescheduled since
        return None

    def wake(self, ident: bytes, now: float) -> None:
        """``ident`` sent a message: it is alive, so its outbox (if any) is tried now."""
        box = self.boxes.get(ident)
        if box is not None and box.due > now:
            box.due = now
            box.wait = FLUSH_INTERVAL
            heapq.heappush(self._due, (now, ident))

    def hold(
        self, ident: bytes, frames: list, size: int, deadline: float, req_id: object, now: float
    ) -> None:
        """Append a reply to ``ident``'s outbox (the budgets were checked by the caller)."""
        box = self.boxes.get(ident)
        if box is None:
            box = self.boxes[ident] = Box(collections.deque(), now, now)
            heapq.heappush(self._due, (now, ident))
        box.replies.append((frames, size, deadline, req_id))
        box.held += size
        self.total += size

    def drop(self, ident: bytes) -> None:
        """Forget ``ident``'s outbox (the client is gone)."""
        box = self.boxes.pop(ident, None)
        if box is not None:
            self.dropped += len(box.replies)
            self.total -= box.held

    def flush(self, now: float) -> None:
        """Try the outboxes that are due, each as far as its client's queue takes it."""
        due = self._due
        while due and due[0][0] <= now:
            when, ident = heapq.heappop(due)
            box = self.boxes.get(ident)
            if box is None or box.due != when:
                continue  # gone, or rescheduled since
            if self._send(ident, box, now):
                box.moved = now
            if ident not in self.boxes:
                continue
            if not box.replies:
                del self.boxes[ident]
                continue
            idle = now - box.moved >= BACK_OFF_AFTER
            box.wait = min(box.wait * 2, FLUSH_MAX_WAIT) if idle else FLUSH_INTERVAL
            box.due = now + box.wait
            heapq.heappush(due, (box.due, ident))

    def _send(self, ident: bytes, box: Box, now: float) -> bool:
        """Send from the head of ``box`` until the client's queue is full; whether anything
        moved (sent or dropped, or the client took bytes from the kernel since last time)."""
        replies = box.replies
        moved = False
        while replies:
            frames, size, deadline, _ = replies[0]
            if deadline + limits.INFLIGHT_GRACE > now:
                if not self.transit.may_send(ident, size, now):
                    break
                outcome = self.transport.to_client(ident, frames)
                if outcome == FULL:
                    break
                if outcome == GONE:
                    self.drop(ident)
                    return True
                self.transit.handed(ident, size)
            else:
                self.dropped += 1
            replies.popleft()
            box.held -= size
            self.total -= size
            moved = True
        if replies:  # blocked: has the client taken bytes since the last try?
            mark = self.transit.mark(ident, now)
            if mark is not None and box.mark is not None and mark > box.mark:
                moved = True
            box.mark = mark
        return moved

    def shed_reply(self, ident: bytes, now: float) -> bool:
        """Replace the oldest reply ``ident`` has left unread for STALLED seconds by a small
        ``unavailable`` with the same id; False if it is reading (or nothing would be freed)."""
        box = self.boxes.get(ident)
        if box is None or now - box.moved < limits.STALLED:
            return False
        for i, (_, size, deadline, req_id) in enumerate(box.replies):
            if req_id is None or size <= SHED_KEEPS:
                continue
            error = [
                p.encode(
                    p.error_reply(
                        req_id,
                        "unavailable",
                        "this client left its replies unread while others needed the room; "
                        "ask again",
                    )
                )
            ]
            freed = size - len(error[0])
            box.replies[i] = (error, size - freed, deadline, req_id)
            box.held -= freed
            self.total -= freed
            self.shed += 1
            undeliverable.warning(
                "event=reply_shed peer=%s error=%r",
                ident.hex(),
                "the client does not read and another needs the room",
            )
            return True
        return False
