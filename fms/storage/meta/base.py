"""The metadata engine's interface.

Every method is one transaction.  Engines take and return model objects
(:mod:`fms.storage.model`), never wire headers: the service layer parses and checks the wire.

The chunk table is what makes garbage collection safe without a scan.  A chunk row is *live*
or *doomed*:

- ``claim_chunk`` records a chunk before its blob is written (or holds a small chunk's bytes
  itself), restarts its grace clock and clears its *lost* mark (set when its bytes were found
  gone or damaged); ``known`` restarts the clock of the chunks a client is
  told it need not upload.  A commit takes a reference on live rows only, in the transaction
  that stores the version, and refuses a commit that names a chunk with no live row.
- The collector ``doom``\\ s rows that are unreferenced and older than the grace period (in one
  transaction, so no commit can reference them any more), deletes their blobs, then ``forget``\\ s
  the rows.  A collector that dies between the two leaves doomed rows, which the next finishes.
  A claim of a doomed chunk is refused (:class:`~fms.errors.Unavailable`): the uploader retries
  once the row is gone and writes the blob anew.

Chunk lists longer than a few digests are stored as *pages* and *bodies*
(:mod:`fms.wire.manifest`), rows of the engine alone: a page holds a reference on each distinct
chunk it lists from the moment it is stored (``put_page``), a body on each distinct page, a
version on its body (or, for a short list kept with it, on each distinct chunk).  Unreferenced
for the grace period, they are deleted by ``collect_lists``, which releases what they list.
"""

import builtins
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence

from ...errors import FmsError
from ...limits import BytesLike
from ...wire.fields import Digest
from ..model import Change, Totals, Version
from .access import AccessMeta

# How long a finished commit's id is remembered (a retry of it is answered with its result), and
# how long a removed name's tombstone is kept (its version number carries over to a re-created
# name).  Longer than any client's retry budget (seconds) by far.
RETAIN_SECONDS = 3600.0


class ChunkRow:
    """A chunk as the engine knows it."""

    __slots__ = ("data", "digest", "doomed", "lost", "refs", "since", "size")

    def __init__(
        self,
        digest: Digest,
        size: int,
        refs: int,
        since: float,
        doomed: bool | int,
        data: bytes | None,
        lost: bool | int = False,
    ) -> None:
        self.digest, self.size, self.refs, self.since = digest, size, refs, since
        self.doomed, self.data, self.lost = bool(doomed), data, bool(lost)

    @property
    def in_engine(self) -> bool:
        """The chunk's bytes live in the metadata engine itself (a small chunk), not as a blob."""
        return self.data is not None


class MetaEngine(AccessMeta, ABC):
    """One store's metadata.  ``store_id`` identifies the store (workers on one store share it);
    ``digest_fn`` names the digest function it recorded when it was created, and ``hash`` is
    that function's helper (:mod:`fms.wire.digests`)."""

    store_id: str
    digest_fn: str
    hash: Callable[..., bytes]
    keep_versions: int = 0  # replaced versions retained per name (0: none)
    # Whether its write transactions take turns on one lock, all workers of the store together
    # (SQLite), rather than run side by side (PostgreSQL): announced in ``ready`` as ``serial``.
    serial_writes: bool = True

    # --- names ---

    @abstractmethod
    def get(self, name: str, lists: bool = True) -> Version | None:
        """The live version of ``name`` with what it lists (``lists``), or None."""

    def get_many(self, names: Iterable[str]) -> dict[str, Version]:
        """The live versions, with what they list, of those of ``names`` that have one, by
        name (an engine reads them in one query where it can)."""
        found = {name: self.get(name) for name in names}
        return {name: version for name, version in found.items() if version is not None}

    @abstractmethod
    def list(self, prefix: str, after: str, limit: int) -> builtins.list[Version]:
        """Up to ``limit`` live versions whose name starts with ``prefix`` and sorts after
        ``after``, in name order (code point order), without what they list (a listing never
        reads a chunk list)."""

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

        :return: per change, the :class:`Version` it made, without its chunk list (a tombstone
            for a removal, and for a retried id the version that id made), or the
            :class:`~fms.errors.FmsError` that refused it.
        """

    @abstractmethod
    def move_prefix(
        self, prefix: str, dest: str, commit: str, now: float, limit: int, actor: str = "local"
    ) -> int:
        """Rename a folder: every live name under ``prefix`` (a folder's name, ending in ``/``;
        its own marker too) becomes ``dest`` + the rest of it, as :class:`Copy` with ``move``
        would make it, all in one transaction (metadata only), written to the audit log as one
        ``mv`` by ``actor``.  Idempotent by ``commit``.

        :return: how many names moved.
        :raises NotFound: no live name under ``prefix``.
        :raises Conflict: a live name under ``dest`` other than ``dest``'s own marker.
        :raises TooLarge: more than ``limit`` names under ``prefix`` (nothing moved).
        :raises BadRequest: ``commit`` was used by another request.
        """

    @abstractmethod
    def totals(self) -> Totals:
        """The store's totals, kept in the same transactions as the changes: O(1)."""

    @abstractmethod
    def iter_versions(self, after: str, limit: int) -> builtins.list[Version]:
        """Up to ``limit`` live versions after ``after`` in name order, with what they list
        (fsck walks them)."""

    # --- chunks ---

    @abstractmethod
    def known(self, digests: Sequence[Digest], now: float) -> set[Digest]:
        """The digests among ``digests`` that have a live row not marked lost; each of them
        gets a fresh grace period (a commit that relies on them is on its way)."""

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

    @abstractmethod
    def mark_lost(self, digest: Digest) -> None:
        """The chunk's bytes were found gone or damaged: until they are claimed again, ``known``
        does not report it, so the next upload of a file that lists it sends it (and heals it)."""

    def small_chunks(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of those of ``digests`` kept in the engine (small chunks), by digest, as
        stored (unverified); a blob's digest is not in it."""
        rows = (self.chunk(digest) for digest in set(digests))
        return {row.digest: row.data for row in rows if row is not None and row.data is not None}

    @abstractmethod
    def chunk_rows(self, digests: Iterable[Digest]) -> dict[Digest, ChunkRow]:
        """The rows of those of ``digests`` that have one, by digest, without a small chunk's
        bytes (its ``data`` is ``b""``: it says where the bytes are, and costs nothing)."""

    # --- pages and bodies ---

    @abstractmethod
    def put_page(self, page_id: Digest, blob: bytes, now: float) -> bool:
        """Store a page (``blob``: its digests back to back, ``page_id`` their digest, both
        checked by the caller) unless it is stored, with a fresh grace period either way, and
        a reference on each distinct chunk it lists.

        :return: True if it was stored now.
        :raises MissingChunks: it lists chunks with no live row (``missing``: those).
        """

    @abstractmethod
    def page(self, page_id: Digest) -> bytes | None:
        """A page's digests back to back, or None."""

    @abstractmethod
    def has_page(self, page_id: Digest) -> bool:
        """Whether the page is stored (without reading it)."""

    @abstractmethod
    def body(self, body_id: Digest) -> bytes | None:
        """A body (:func:`fms.wire.manifest.pack_body`), or None."""

    @abstractmethod
    def collect_lists(self, cutoff: float, limit: int, dry_run: bool = False) -> tuple[int, int]:
        """Delete up to ``limit`` bodies and then up to ``limit`` pages unreferenced since before
        ``cutoff``, releasing what each lists (one left unreferenced keeps the clock of the list
        that held it, so a removed file's pages and chunks go in the same collection).

        :return: ``(bodies, pages)`` deleted (with ``dry_run``, unreferenced now: would be).
        """

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
    def prune(self, cutoff: float, limit: int) -> int:
        """Drop up to ``limit`` tombstones and remembered commit ids older than ``cutoff``, in
        one transaction; how many (less than ``limit``: none older is left)."""

    @abstractmethod
    def lease(self, name: str, holder: str, now: float, seconds: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` (one collector at a time)."""

    @abstractmethod
    def release(self, name: str, holder: str) -> None:
        """Give a lease back (or take it from a holder known to be dead)."""

    @abstractmethod
    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease ``name`` (expired or not), or None."""

    @abstractmethod
    def setting(self, key: str) -> str | None:
        """The store's setting ``key`` (its id, whether its first admin was made), or None."""

    # --- checks ---

    @abstractmethod
    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        """A context in which every read sees one consistent state of the store: what every
        transaction committed before it began, nothing committed later (fsck reads a page in
        one, so concurrent writes never look like damage).  Only reads may run in it."""

    @abstractmethod
    def refcount_errors(self) -> builtins.list[tuple[str, bytes, int | None, int]]:
        """``(kind, id, stored refs, refs counted)`` for every body, page or chunk (``kind``)
        whose stored count differs from a recount (bodies from the versions, pages from the
        bodies, chunks from short lists and pages), including referenced ones with no row
        (stored refs None)."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's connections."""
