"""fms: a file store with a cache tier, built as a ZeroMQ broker topology.

The public API is :class:`Client` and the exceptions; everything else is the daemons' code.
"""

__version__ = "0.2.0"

from .client import Client
from .errors import (
    BadRequest,
    FmsError,
    Forbidden,
    IntegrityError,
    MissingChunks,
    NoSpace,
    NotFound,
    Refused,
    RemoteError,
    Timeout,
    TooLarge,
    TransportError,
    Unavailable,
)

__all__ = [
    "BadRequest",
    "Client",
    "FmsError",
    "Forbidden",
    "IntegrityError",
    "MissingChunks",
    "NoSpace",
    "NotFound",
    "Refused",
    "RemoteError",
    "Timeout",
    "TooLarge",
    "TransportError",
    "Unavailable",
    "__version__",
]
