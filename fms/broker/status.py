"""What the broker's ``status`` answers: its budgets and what is held against them, its
queues, the cache's figures and the live workers."""

import time
from typing import TYPE_CHECKING

from .. import limits

if TYPE_CHECKING:
    from .core import Core


def status_of(core: "Core") -> dict:
    """The ``status`` reply's fields, from ``core``'s parts."""
    admission, outboxes = core.admission, core.outboxes
    return {
        "broker": {
            **core.endpoints,
            "uptime": time.time() - core.started,
            **core.dispatcher.status(),
            "held_bytes": admission.status(),
            "dropped_replies": outboxes.dropped,
            "shed": {"replies": outboxes.shed, "requests": core.dispatcher.shed},
            "backed_off": admission.backed_off,
            "busy": admission.busy,
            "disconnected": admission.kicked,
            "fds": limits.fd_limit(),
            "budgets": {
                "client_bytes": limits.CLIENT_BYTES,
                "total_upload_bytes": limits.TOTAL_REQUEST_BYTES,
                "total_reply_bytes": limits.TOTAL_REPLY_BYTES,
            },
        },
        "cache": {**core.reads.figures(), **core.registry.cache_counters()},
        "workers": core.registry.status(),
    }
