"""What the storage engine stores, as plain objects: no wire headers, no SQL.

A *version* is what a name points at: its size, whole-file sha256, chunk size, chunk digests,
mtime, version number and the id of the commit that made it.  A *change* asks the metadata
engine to make a new version (:class:`NewVersion`), remove a name (:class:`Removal`), give a
name another name's content (:class:`Copy`: metadata only, the chunks gain a reference; with
``move``, the source is removed in the same transaction), or make a retained version current
again (:class:`Restore`).  Every change has ``names``: the names it changes.

With versions kept (``--keep-versions N``), a version that an overwrite or a removal replaces is
*retained*: it keeps its chunks' references, and ``N`` of them per name are kept, the newest.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from .. import wire as p


@dataclass(frozen=True, slots=True)
class Version:
    name: str
    size: int
    sha256: bytes
    chunk_size: int
    chunks: tuple[p.Digest, ...]  # in file order
    mtime: float
    version: int
    commit: str  # id of the commit (or rm) that made this version
    committed: float  # when, in seconds since the epoch
    deleted: bool = False  # a tombstone: the name was removed by `commit`

    def manifest(self) -> dict[str, Any]:
        """The wire form of a manifest (docs/PROTOCOL.md)."""
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
            "mtime": self.mtime,
            "version": self.version,
            "commit": self.commit,
            "committed": self.committed,
        }

    def summary(self) -> dict[str, Any]:
        """What ls and stat return: the manifest without its chunk list."""
        out = {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "mtime": self.mtime,
            "version": self.version,
            "chunk_size": self.chunk_size,
            "chunks": len(self.chunks),
            "committed": self.committed,
        }
        if self.deleted:
            out["deleted"] = True
        return out


@dataclass(frozen=True, slots=True)
class NewVersion:
    """A commit: make ``name`` point at this content.  Checked by the engine before it is asked."""

    name: str
    size: int
    sha256: bytes
    chunk_size: int
    chunks: tuple[p.Digest, ...]
    mtime: float
    commit: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Removal:
    """An rm: remove ``name``."""

    name: str
    commit: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Copy:
    """A cp (or with ``move`` an mv): make ``name`` point at the live content of ``src``."""

    src: str
    name: str
    commit: str
    move: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.src, self.name) if self.move else (self.name,)


@dataclass(frozen=True, slots=True)
class Restore:
    """Make retained version ``version`` of ``name`` (None: the newest retained one) current
    again, as a new version; also after the name was removed."""

    name: str
    version: int | None
    commit: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, slots=True)
class Totals:
    files: int = 0  # live names
    bytes: int = 0  # the sum of their sizes
    chunks: int = 0  # chunks held, referenced or awaiting collection
    chunk_bytes: int = 0  # their bytes (after dedup)

    def as_dict(self) -> dict[str, int]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
        }


# What the metadata engine is asked to apply (:meth:`~.meta.base.MetaEngine.apply`).
Change: TypeAlias = NewVersion | Removal | Copy | Restore


def pack_digests(chunks: Iterable[p.Digest]) -> bytes:
    return b"".join(chunks)


def unpack_digests(blob: bytes) -> tuple[p.Digest, ...]:
    n = p.HASH_LEN
    return tuple(bytes(blob[i : i + n]) for i in range(0, len(blob), n))
