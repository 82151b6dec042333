"""The chunk backend's interface: blobs named by their digest (made with the store's digest
function), written once, never changed.

A backend does not verify what it returns: the engine checks every chunk it reads against its
digest (invariant 3) and asks the backend to set a bad one aside.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

from ...limits import BytesLike
from ...wire.fields import Digest


class ChunkBackend(ABC):
    # Reads a storage worker makes side by side: more than one for a backend far away, where
    # each read waits a round trip (fms.storage.service gathers a drain's chunk reads).
    read_threads = 1

    @abstractmethod
    def put(self, digest: Digest, data: BytesLike) -> bool:
        """Store ``data`` under ``digest`` (a blob already there may be left as it is or written
        again: content never changes), durably once :meth:`sync` returns.  :return: True if
        written."""

    @abstractmethod
    def get(self, digest: Digest) -> bytearray:
        """The blob as a data frame (bin32 prefix + bytes, :func:`fms.wire.codec.data_buffer`).

        :raises NotFound: no such blob.
        """

    @abstractmethod
    def has(self, digest: Digest) -> bool:
        """Whether the blob exists."""

    @abstractmethod
    def size(self, digest: Digest) -> int | None:
        """The blob's size, or None if it does not exist (a metadata look-up: no read)."""

    def sizes(self, digests: Iterable[Digest]) -> dict[Digest, int | None]:
        """:meth:`size` of each of ``digests`` (a backend may ask for them side by side)."""
        return {d: self.size(d) for d in digests}

    @abstractmethod
    def delete(self, digest: Digest) -> None:
        """Delete the blob; a missing one is not an error."""

    @abstractmethod
    def list(self) -> Iterator[tuple[Digest, int, float]]:
        """Every blob as ``(digest, size, mtime)``, in no particular order."""

    @abstractmethod
    def quarantine(self, digest: Digest) -> None:
        """Set a blob that failed verification aside (kept for inspection, out of the store)."""

    @abstractmethod
    def store_marker(self) -> str | None:
        """The id of the store these chunks belong to (written by :meth:`mark_store`), or None."""

    @abstractmethod
    def mark_store(self, store_id: str) -> None:
        """Record which store these chunks belong to."""

    def sync(self) -> None:  # noqa: B027 (optional: a no-op where puts are durable)
        """Make every blob put so far, by any process, durable: called once before a commit
        that names blobs, instead of once per blob.  Nothing, where a put is durable when it
        returns."""

    def clean_tmp(self) -> int:
        """Remove what dead writers left half written; how many.  Nothing, where writes are
        atomic."""
        return 0
