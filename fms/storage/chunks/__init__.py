"""Chunk backends: immutable blobs by their digest (put-if-absent, get, delete, list).

:class:`~fms.storage.chunks.base.ChunkBackend` is the interface; :mod:`.localdir` keeps them in
the data directory.  A backend knows nothing about names.
"""
