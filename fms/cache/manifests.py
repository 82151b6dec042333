"""The manifest cache, a plain object with no sockets.

:class:`ManifestCache` keeps manifests in memory and decides whether a fill may be stored.  This is
where read-after-write (DESIGN.md invariant 1) is defended: a fetch records the clock when it
starts; an invalidation of the name (or of everything) ticks the clock; a fill whose fetch started
before the latest invalidation of its name is *stale*: it is neither stored nor handed to requests
that arrived after the invalidation.

A fill can also come from a commit (*fills on commit*, docs/PROTOCOL.md): the broker hands a small
file's new manifest and content to the cache with the commit's invalidation.  Commits of one name
on two storage workers may be acked in either order, and an rm's ack may overtake the commit it
removed, so such a fill is kept only if the cache has heard of no change to the name (or to a
folder above it) at or after the commit's request key (``since``): every invalidation says
``at``, the broker's newest request key when it was sent, and any change that landed after the
commit was admitted is told with an ``at`` of at least its key.  What was heard is kept for the
latest ``CHANGED_MAX`` names; beyond them, a floor (the newest ``at`` forgotten) refuses every
older fill.
"""

import collections
import itertools
from typing import Any

from .policy import WTinyLFU

MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # manifests kept in memory, by their estimated weight
MANIFEST_OVERHEAD = 256  # bytes a manifest weighs besides its name and chunks
CHANGED_MAX = 16384  # names (and folders) whose latest change the cache remembers, for fills


def weight(name: str, manifest: dict[str, Any]) -> int:
    """About what a manifest holds in memory: its name, its short chunk list or its pages'
    ids, its metadata, the rest (at most a few KiB: a long list is not in a manifest)."""
    listed = len(manifest.get("chunks") or ()) + len(manifest.get("pages") or ())
    meta = sum(len(k) + len(v) for k, v in (manifest.get("meta") or {}).items())
    return MANIFEST_OVERHEAD + len(name) + listed * 40 + meta


class ManifestCache:
    """Manifests in memory, with the invalidation clock that keeps fills honest.

    Which manifests stay is decided by the same W-TinyLFU as chunks (:mod:`.policy`), by
    weight.  The frequency of a name is forgotten when the name changes: a new version earns
    its own.  It also counts, for each chunk of a short list, how many cached manifests list it,
    so that the chunks of a dead version can be dropped without dropping a chunk another file
    still shares (the chunks of a long list age out of the cache as any other).

    :param max_bytes: bound on the manifests' weight.
    """

    def __init__(self, max_bytes: int = MAX_MANIFEST_BYTES) -> None:
        self.policy: WTinyLFU[str] = WTinyLFU(
            max_bytes, expected_entries=max_bytes // MANIFEST_OVERHEAD
        )
        self._entries: dict[str, dict[str, Any]] = {}  # name -> manifest
        # chunk digest -> cached manifests listing it
        self._refs: collections.Counter[bytes] = collections.Counter()
        self._clock = 0
        self._invalidated_at: dict[str, int] = {}  # name -> clock of its latest invalidation
        # folder (ending in '/') -> clock of its latest invalidation
        self._folders_at: dict[str, int] = {}
        self._cleared_at = 0  # clock of the latest invalidate_all
        # The broker's order (request keys): name, or folder, -> `at` of its latest change
        # heard; fills on commit older than `_order_floor` are refused (see the module's doc).
        self._changed: dict[str, int] = {}
        self._changed_folders: dict[str, int] = {}
        self._order_floor: float = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: str) -> dict[str, Any] | None:
        """The cached manifest of ``name`` or None; counts towards the name's frequency."""
        self.policy.access(name)
        return self._entries.get(name)

    def peek(self, name: str) -> dict[str, Any] | None:
        """The cached manifest of ``name`` or None, without counting it as a read."""
        return self._entries.get(name)

    def shared(self, digest: bytes) -> bool:
        """Whether a cached manifest lists this chunk."""
        return self._refs[digest] > 0

    def begin_fetch(self) -> int:
        """A token to hand back to :meth:`fresh` / :meth:`fill` when the fetch completes."""
        return self._clock

    def fresh(self, name: str, token: int) -> bool:
        """True if no invalidation of ``name`` happened since the fetch that holds ``token``."""
        if self._invalidated_at.get(name, 0) > token or self._cleared_at > token:
            return False
        # No generator made when no folder was renamed (most of the time): this runs for
        # every fill.
        return not self._folders_at or not any(
            at > token and name.startswith(folder) for folder, at in self._folders_at.items()
        )

    def fill(self, name: str, manifest: dict[str, Any], token: int) -> bool:
        """Store a fetched manifest unless it is stale.  :return: whether it was stored."""
        if not self.fresh(name, token):
            return False
        self._drop(name)
        self._entries[name] = manifest
        refs = self._refs
        for digest in manifest.get("chunks") or ():  # Counter.update's checks, without them
            refs[digest] = refs[digest] + 1
        dropped, _ = self.policy.insert(name, weight(name, manifest))
        for old in dropped:
            self._drop(old)
        return name in self._entries

    def _drop(self, name: str) -> dict[str, Any] | None:
        manifest = self._entries.pop(name, None)
        if manifest is not None:
            refs = self._refs
            for digest in manifest.get("chunks") or ():
                left = refs[digest] - 1
                if left > 0:
                    refs[digest] = left
                else:
                    del refs[digest]  # a Counter's del: no KeyError for a missing key
        return manifest

    def invalidate(self, name: str) -> dict[str, Any] | None:
        """Forget ``name``: its manifest, and its popularity.

        :return: the dropped manifest, or None.
        """
        self._clock += 1
        self._invalidated_at[name] = self._clock
        self.policy.remove(name, forget=True)
        return self._drop(name)

    def invalidate_folder(self, folder: str) -> list[dict[str, Any] | None]:
        """Forget every name under ``folder`` (ending in ``/``: a folder was renamed), and
        refuse fills of them that started before now.  A scan of the cached names: folders
        are renamed far less often than names are read.  :return: the dropped manifests."""
        self._clock += 1
        self._folders_at[folder] = self._clock
        dropped = []
        for name in [n for n in self._entries if n.startswith(folder)]:
            self.policy.remove(name, forget=True)
            dropped.append(self._drop(name))
        return dropped

    def invalidate_all(self) -> None:
        self._clock += 1
        self._cleared_at = self._clock
        for name in list(self._entries):
            self.policy.remove(name)
        self._entries.clear()
        self._refs.clear()
        self._invalidated_at.clear()  # cleared_at now dominates every older entry
        self._folders_at.clear()

    def heard(self, name: str, at: int | None) -> None:
        """A change of ``name`` (a folder if it ends in ``/``) was told with the broker's order
        ``at`` (None: a broker that does not say: no fill on commit is kept from now on)."""
        if at is None:
            self._order_floor = float("inf")
            return
        changed = self._changed_folders if name.endswith("/") else self._changed
        changed.pop(name, None)  # `at` only grows: the dict stays in the order heard
        changed[name] = at
        if len(changed) > CHANGED_MAX:
            old = list(itertools.islice(changed, CHANGED_MAX // 2))
            self._order_floor = max(self._order_floor, changed[old[-1]])
            for forgotten in old:
                del changed[forgotten]

    def may_fill(self, name: str, since: int) -> bool:
        """Whether a fill on commit of ``name``, by the request of key ``since``, is newer than
        every change of it heard so far (call it before hearing the commit's own change)."""
        if self._order_floor >= since or self._changed.get(name, -1) >= since:
            return False
        # The folders above the name, looked up one by one (not a scan of the up to
        # CHANGED_MAX folders remembered, on every fill).
        cut = name.find("/")
        while cut != -1:
            if self._changed_folders.get(name[: cut + 1], -1) >= since:
                return False
            cut = name.find("/", cut + 1)
        return True

    def welcomed(self, at: int | None) -> None:
        """Registered (again) with a broker whose newest request key is ``at``: everything is
        forgotten, and no fill on commit of an older request is kept (its invalidations may
        have been lost while the cache was cut off)."""
        self.invalidate_all()
        self._changed.clear()
        self._changed_folders.clear()
        self._order_floor = float("inf") if at is None else at

    def forget_before(self, oldest_token: int | None) -> None:
        """Drop invalidation records no pending fetch can be compared with any more.

        :param oldest_token: the token of the oldest pending fetch, or None if none is pending.
        """
        if oldest_token is None:
            self._invalidated_at.clear()
            self._folders_at.clear()
        else:
            self._invalidated_at = {
                n: c for n, c in self._invalidated_at.items() if c > oldest_token
            }
            self._folders_at = {f: c for f, c in self._folders_at.items() if c > oldest_token}
