"""fms: a file store with a cache tier, built as a ZeroMQ broker topology.

The public API is :class:`Client` and the exceptions; everything else is the daemons' code.
:class:`Client` is imported on first use, so a command that needs no connection (``--help``,
``keygen``) does not pay for ZeroMQ.
"""

__version__ = "0.2.0"

from typing import TYPE_CHECKING

from .errors import (
    BadRequest,
    Busy,
    Conflict,
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

if TYPE_CHECKING:  # at run time, imported on first use (below)
    from .client import Client

# The distribution's name (what pip installs); the import package and the command are `fms`.
# The PyPI name `fms` belongs to an unrelated project.
DISTRIBUTION = "fms-store"

__all__ = [
    "DISTRIBUTION",
    "BadRequest",
    "Busy",
    "Client",
    "Conflict",
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
    "install_hint",
]


def install_hint(extra: str) -> str:
    """How to install the optional extra ``extra`` (``postgres``, ``s3``, ``fsspec``)."""
    return (
        f"pip install '{DISTRIBUTION}[{extra}]' (in a clone of the repository: "
        f"pip install -e '.[{extra}]')"
    )


def __getattr__(name: str) -> object:
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(f"module 'fms' has no attribute {name!r}")
