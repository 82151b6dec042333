"""A storage worker that waits SECONDS before it handles each request, so that a test can kill it
in the middle of work: ``python tests/slow_storage.py SECONDS [storage_worker.py options]``.

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


def main() -> int:
    delay = float(sys.argv[1])
    init = StorageService.__init__

    def slow_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._handlers = {op: slowed(handler, delay) for op, handler in self._handlers.items()}

    StorageService.__init__ = slow_init
    return daemon_main("storage", sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
