"""The fms wire format: what travels between client, broker and workers.

docs/PROTOCOL.md describes every message; this package is its code, one concern per module:

- :mod:`.messages`: protocol version, ops and the service that serves each, error codes, reply
  builders, and the sizes and times every peer agrees on;
- :mod:`.codec`: msgpack encode/decode of header and route frames (within :mod:`fms.limits`),
  zero-copy data frames;
- :mod:`.fields`: reading and checking a header's fields, name rules, hashes, how a file splits
  into chunks;
- :mod:`.frames`: multipart send/receive on a socket, file reads straight into data frames;
- :mod:`.batch`: the batched read ``get_many``, its request and reply;
- :mod:`.manifest`: a file's shape: extents, pages, the body and the file digest.

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

The names of all six modules are importable from here (``from fms import wire as p``).
"""

from . import batch, codec, fields, frames, manifest, messages
from .batch import *  # noqa: F403
from .codec import *  # noqa: F403
from .fields import *  # noqa: F403
from .frames import *  # noqa: F403
from .manifest import *  # noqa: F403
from .messages import *  # noqa: F403

__all__ = [
    *messages.__all__,
    *codec.__all__,
    *fields.__all__,
    *frames.__all__,
    *batch.__all__,
    *manifest.__all__,
]
