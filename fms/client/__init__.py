"""The client side: :class:`Client` (``api``) on a :class:`~fms.client.session.Session`
(socket, handshake, pipeline, retry), with ``upload`` and ``download`` doing the transfers."""

from .api import Client
from .download import RemoteFile

__all__ = ["Client", "RemoteFile"]
