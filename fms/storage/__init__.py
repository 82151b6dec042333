"""The storage side: a store is a metadata engine plus a chunk backend.

- :mod:`.service`  wire -> model: parses storage ops, group commits, runs GC/fsck off-loop
- :mod:`.engine`   commit, remove, read and list over the two; :func:`.engine.open_local`
- :mod:`.gc`       garbage collection with a grace period, and fsck
- :mod:`.model`    versions and changes as plain objects
- :mod:`.meta`     metadata engines (SQLite; the format-1 reader used by migration)
- :mod:`.chunks`   chunk backends (a local directory)
"""
