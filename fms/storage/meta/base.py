"""The metadata engine's interface.

Every method is one transaction.  Engines take and return model objects
(:mod:`fms.storage.model`), never wire headers: the service layer parses and checks the wire.

The chunk table is what makes garbage collection safe without a scan.  A chunk row is *live*
or *doomed*:

- ``claim_chunk`` records a chunk before its blob is written (or holds a small chunk's bytes
  itself) and restarts its grace clock; ``known`` restarts the clock of the chunks a client is
  told it need not upload.  A commit takes a reference on live rows only, in the transaction
  that stores the version, and refuses a commit that names a chunk with no live row.
- The collector ``doom``\\ s rows that are unreferenced and older than the grace period (in one
  transaction, so no commit can reference them any more), deletes their blobs, then ``forget``\\ s
  the rows.  A collector that dies between the two leaves doomed rows, which the next finishes.
  A claim of a doomed chunk is refused (:class:`~fms.errors.Unavailable`): the uploader retries
  once the row is gone and writes the blob anew.
"""

import builtins
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from ...errors import FmsError
from ...limits import BytesLike
from ...wire.fields import Digest
from ..model import Change, Totals, Version

# How long a finished commit's id is remembered (a retry of it is answered with its result), and
# how long a removed name's tombstone is kept (its version number carries over to a re-created
# name).  Longer than any client's retry budget (seconds) by far.
RETAIN_SECONDS = 3600.0


class ChunkRow:
    """A chunk as the engine knows it."""

    __slots__ = ("data", "digest", "doomed", "refs", "since", "size")

    def __init__(
        self,
        digest: Digest,
        size: int,
        refs: int,
        since: float,
        doomed: bool | int,
        data: bytes | None,
    ) -> None:
        self.digest, self.size, self.refs, self.since = digest, size, refs, since
        self.doomed, self.data = bool(doomed), data

    @property
    def in_engine(self) -> bool:
        """The chunk's bytes live in the metadata engine itself (a small chunk), not as a blob."""
        return self.data is not None


class MetaEngine(ABC):
    """One store's metadata.  ``store_id`` identifies the store (workers on one store share it).

    (``builtins.list`` in the annotations: ``list`` is also a method here.)
    """

    store_id: str
    keep_versions: int = 0  # replaced versions retained per name (0: none)

    # --- names ---

    @abstractmethod
    def get(self, name: str) -> Version | None:
        """The live version of ``name``, or None."""

    @abstractmethod
    def list(self, prefix: str, after: str, limit: int) -> builtins.list[Version]:
        """Up to ``limit`` live versions whose name starts with ``prefix`` and sorts after
        ``after``, in name order (code point order)."""

    @abstractmethod
    def retained(self, name: str) -> builtins.list[Version]:
        """The retained (not current) versions of ``name``, newest first: what an overwrite or
        a removal replaced, at most ``keep_versions`` of them (set by the worker)."""

    @abstractmethod
    def usage(self, prefix: str) -> tuple[int, int]:
        """``(files, bytes)``: how many live names start with ``prefix`` and the sum of their
        sizes, counted in the name index (one range scan, no manifest leaves the engine)."""

    @abstractmethod
    def apply(
        self, changes: Sequence[Change], now: float, small: Mapping[Digest, BytesLike]
    ) -> builtins.list[Version | FmsError]:
        """Apply :class:`~fms.storage.model.NewVersion`, :class:`~fms.storage.model.Removal`,
        :class:`~fms.storage.model.Copy` and :class:`~fms.storage.model.Restore` changes in one
        transaction (a group commit); each
        succeeds or fails on its own.

        ``small`` maps digests to the bytes of small chunks that arrived with their commit; they
        are stored in the same transaction.

        :return: per change, the :class:`Version` it made (a tombstone for a removal, and for a
            retried id the version that id made) or the :class:`~fms.errors.FmsError` that
            refused it.
        """

    @abstractmethod
    def totals(self) -> Totals:
        """The store's totals, kept in the same transactions as the changes: O(1)."""

    @abstractmethod
    def iter_versions(self, after: str, limit: int) -> builtins.list[Version]:
        """Up to ``limit`` live versions after ``after`` in name order (fsck walks them)."""

    # --- chunks ---

    @abstractmethod
    def known(self, digests: Sequence[Digest], now: float) -> set[Digest]:
        """The digests among ``digests`` that have a live row; unreferenced ones among them get
        a fresh grace period (a commit that relies on them is on its way)."""

    @abstractmethod
    def claim_chunk(self, digest: Digest, size: int, now: float, data: bytes | None = None) -> bool:
        """Record a chunk about to be stored, with a fresh grace period; ``data`` keeps a small
        chunk's bytes in the engine.

        :return: True if its bytes are in the engine (nothing more to write).
        :raises Unavailable: the chunk is being collected right now; try again shortly.
        """

    @abstractmethod
    def chunk(self, digest: Digest) -> ChunkRow | None:
        """The chunk's row, or None."""

    # --- garbage collection ---

    @abstractmethod
    def doom(self, cutoff: float, limit: int, dry_run: bool = False) -> builtins.list[ChunkRow]:
        """Mark up to ``limit`` live chunks that no version references and that have been
        unreferenced since before ``cutoff`` as doomed; rows holding their bytes are deleted at
        once.  :return: their :class:`ChunkRow`\\ s (with ``dry_run``, only what would be)."""

    @abstractmethod
    def doomed(self, limit: int) -> builtins.list[ChunkRow]:
        """Rows left doomed (by this collector, or one that died): their blobs must go."""

    @abstractmethod
    def forget(self, digests: Sequence[Digest]) -> None:
        """Delete doomed rows whose blobs are gone."""

    @abstractmethod
    def adopt_orphan(self, digest: Digest, size: int) -> bool:
        """A blob with no row (its writer died before claiming it, or before migration): add
        it as a doomed row so that its deletion cannot race a claim.  False if a row exists."""

    @abstractmethod
    def prune(self, cutoff: float) -> int:
        """Drop tombstones and remembered commit ids older than ``cutoff``; how many."""

    @abstractmethod
    def lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` (one collector at a time)."""

    @abstractmethod
    def release(self, name: str, holder: str) -> None:
        """Give a lease back (or take it from a holder known to be dead)."""

    @abstractmethod
    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease ``name`` (expired or not), or None."""

    # --- checks ---

    @abstractmethod
    def refcount_errors(self) -> builtins.list[tuple[Digest, int | None, int]]:
        """``(digest, stored refs, refs counted from the live versions)`` for every chunk where
        they differ, including referenced chunks with no row (stored refs None)."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's connections."""
