"""The fms wire format: what travels between client, broker and workers.

docs/PROTOCOL.md describes every message; this package is its code, one concern per module:

- :mod:`.messages`: protocol version, ops and the service that serves each, error codes, reply
  builders, and the sizes and times every peer agrees on;
- :mod:`.codec`: msgpack encode/decode of header and route frames (within :mod:`fms.limits`),
  zero-copy data frames;
- :mod:`.fields`: reading and checking a header's fields, name rules, hashes, how a file splits
  into chunks;
- :mod:`.digests`: the digest functions a store may use (sha256, BLAKE3), one helper each;
- :mod:`.requests`: every request field's type, range and default, in one table, and the check
  of a request against it;
- :mod:`.frames`: multipart send/receive on a socket, file reads straight into data frames;
- :mod:`.batch`: the batched read ``get_many``, its request and reply.

Every frame is msgpack.  Frames as they travel (ROUTER sockets add or strip the identity frame
themselves)::

    client  -> broker   [header, data?]
    broker  -> worker   [route{t:req, k, ttl}, header, data?]
    worker  -> broker   [route{t:rep, k, ok, err?, inv?, cache?}, header, data?]   a reply
    worker  -> broker   [route{t:req, svc}, header, data?]                  a worker's own request
    worker <-> broker   [route{t:ready|hb|bye|inv|reregister|refused, ...}] control
    broker  -> client   [header, data?]

``header`` is a map with at least ``v`` (protocol version), ``op`` and ``id`` on requests and
``ok`` and ``id`` on replies.  ``data`` is one msgpack ``bin`` object holding file bytes.

The names of all seven modules are read from here (``from fms import wire as p``; ``p.encode``).
Each module is imported when one of its names is first read, so a command that needs only the
protocol's constants (``fms --help``) does not import ZeroMQ, msgpack or hashlib.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the type checker reads here (every module of _MODULES); at run time
    # each module comes when one of its names is asked for
    from .batch import *  # noqa: F403
    from .codec import *  # noqa: F403
    from .digests import *  # noqa: F403
    from .fields import *  # noqa: F403
    from .frames import *  # noqa: F403
    from .manifest import *  # noqa: F403
    from .messages import *  # noqa: F403
    from .requests import *  # noqa: F403

# Searched in this order, cheapest first; requests (the broker's and storage's) last, since
# the client never reads it.
_MODULES = ("messages", "fields", "digests", "manifest", "codec", "batch", "frames", "requests")


def __getattr__(name: str) -> object:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    for module_name in _MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        if name in module.__all__:
            value = getattr(module, name)
            globals()[name] = value  # looked up once, then read like any module global
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals()) | set(_MODULES)
    for module_name in _MODULES:
        names |= set(importlib.import_module(f"{__name__}.{module_name}").__all__)
    return sorted(names)
