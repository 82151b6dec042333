"""A storage worker that waits SECONDS before it handles each request, so that a test can kill it
in the middle of work: ``python tests/slow_storage.py SECONDS[:AFTER] [storage_worker.py options]``;
with AFTER, it also waits that long before it sends each reply that changed names (after the
change is made), so that another worker's later change can be acked first.

The wait comes after the worker has logged and checked the request, right before the work, so
a test that sees ``event=request`` in the log knows the work is under way.  It is the tests'
need, so it lives here and not in the shipped worker.
"""

import sys
import time

from fms.cli import daemon_main
from fms.storage.service import StorageService


def slowed(handler, delay: float):
    def slow(*args):
        time.sleep(delay)  # the point of this worker: work that takes time
        return handler(*args)

    return slow


def late(reply, after: float):
    def send(route, header, *args, **kwargs):
        if kwargs.get("invalidate") is not None:
            time.sleep(after)  # the point: an ack that comes late
        return reply(route, header, *args, **kwargs)

    return send


def main() -> int:
    before, _, after = sys.argv[1].partition(":")
    delay, reply_delay = float(before), float(after or 0)
    init = StorageService.__init__

    def slow_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if delay:
            self._handlers = {op: slowed(h, delay) for op, h in self._handlers.items()}
        if reply_delay:
            self.link.reply = late(self.link.reply, reply_delay)

    StorageService.__init__ = slow_init
    return daemon_main("storage", sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
