"""The client side: :class:`Client` (``api``) on a :class:`~fms.client.session.Session`
(socket, handshake, pipeline, retry), with ``upload`` and ``download`` doing the transfers."""

from typing import TYPE_CHECKING, Any

from .api import Client

if TYPE_CHECKING:
    from .download import RemoteFile

__all__ = ["Client", "RemoteFile"]


def __getattr__(name: str) -> Any:
    """``RemoteFile``, imported on first use: listing needs no download module."""
    if name == "RemoteFile":
        from .download import RemoteFile

        return RemoteFile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
