"""The manifest cache, a plain object with no sockets.

:class:`ManifestCache` keeps manifests in memory and decides whether a fill may be stored.  This is
where read-after-write (DESIGN.md invariant 1) is defended: a fetch records the clock when it
starts; an invalidation of the name (or of everything) ticks the clock; a fill whose fetch started
before the latest invalidation of its name is *stale*: it is neither stored nor handed to requests
that arrived after the invalidation.
"""

import collections

MAX_MANIFESTS = 100_000  # manifests kept in memory; the oldest are dropped past this


class ManifestCache:
    """Manifests in memory, with the invalidation clock that keeps fills honest.

    :param max_entries: bound on manifests kept; least recently used go first.
    """

    def __init__(self, max_entries: int = MAX_MANIFESTS):
        self.max_entries = max_entries
        self._entries = collections.OrderedDict()  # name -> manifest
        self._clock = 0
        self._invalidated_at = {}   # name -> clock of its latest invalidation
        self._cleared_at = 0        # clock of the latest invalidate_all

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: str):
        manifest = self._entries.get(name)
        if manifest is not None:
            self._entries.move_to_end(name)
        return manifest

    def begin_fetch(self) -> int:
        """A token to hand back to :meth:`fresh` / :meth:`fill` when the fetch completes."""
        return self._clock

    def fresh(self, name: str, token: int) -> bool:
        """True if no invalidation of ``name`` happened since the fetch that holds ``token``."""
        return self._invalidated_at.get(name, 0) <= token and self._cleared_at <= token

    def fill(self, name: str, manifest: dict, token: int) -> bool:
        """Store a fetched manifest unless it is stale.  :return: whether it was stored."""
        if not self.fresh(name, token):
            return False
        self._entries[name] = manifest
        self._entries.move_to_end(name)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def invalidate(self, name: str):
        self._clock += 1
        self._invalidated_at[name] = self._clock
        self._entries.pop(name, None)

    def invalidate_all(self):
        self._clock += 1
        self._cleared_at = self._clock
        self._entries.clear()
        self._invalidated_at.clear()  # cleared_at now dominates every older entry

    def forget_before(self, oldest_token):
        """Drop invalidation records no pending fetch can be compared with any more.

        :param oldest_token: the token of the oldest pending fetch, or None if none is pending.
        """
        if oldest_token is None:
            self._invalidated_at.clear()
        else:
            self._invalidated_at = {n: c for n, c in self._invalidated_at.items()
                                    if c > oldest_token}
