"""The cache tier: plain objects with no sockets, and the service that drives them.

- :mod:`.service`: the handlers: hits, coalesced misses, fills, invalidation.
- :mod:`.chunks`: chunks on disk (and a memory tier), bounded in bytes.
- :mod:`.manifests`: manifests in memory, with the invalidation clock that keeps fills honest.
"""

from .chunks import ChunkCache
from .manifests import ManifestCache
from .service import CacheService

__all__ = ["CacheService", "ChunkCache", "ManifestCache"]
