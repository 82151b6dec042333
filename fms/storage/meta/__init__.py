"""Metadata engines: the names, their versions, the chunk references and the store's totals.

:class:`~fms.storage.meta.base.MetaEngine` is the interface; :mod:`.sqlite` is the embedded
default; :mod:`.legacy` reads the format-1 layout (one manifest file per name) for migration.
"""
