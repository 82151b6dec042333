"""Admission and eviction: W-TinyLFU weighed by bytes, as plain objects with no I/O.

Why not LRU (issue 16): LRU is blind to frequency and to size.  One pass over cold files (a
backup, a crawler, a ``get -r``) flushed the hot set, and 1 MiB chunks of large, rarely read
files held most of the bytes.  W-TinyLFU (Einziger, Friedman, Manes: "TinyLFU: A Highly
Efficient Cache Admission Policy", 2017; the policy of Caffeine) keeps:

- a *window*, a small LRU (1 % of the bytes, at most ``WINDOW_BYTES_MAX``: the cache keeps it in
  memory) every new entry enters, so a burst of new keys that are read again soon still hits;
- a *main* segmented LRU (probation, then protected: 80 % of the main bytes) for the rest;
- a *frequency sketch* (count-min, 4-bit counters, halved every ``RESET_FACTOR`` x its width
  increments so old popularity fades) counting every access, hit or miss, resident or not.

An entry leaving the window is a *candidate*: it enters the main part only if the sketch says it
is read more often than the *victim* (the probation LRU entry) it would displace; otherwise it is
*refused*.  A one-time scan is read once, so it is refused and the hot set stays.  Weights are
bytes: a large candidate displaces as many victims as it needs, each one compared in turn.

No kept library fits: theine and cachebox count entries, not bytes, and keep their values (the
cache's are files on disk, written only for entries the main part takes).  The reference
simulation (``benchmarks/cachesim.py``) checks this class against independent LRU, S3-FIFO,
W-TinyLFU and Belady on the issue's traces.
"""

import collections
import zlib
from collections.abc import Hashable
from typing import Generic, TypeVar

WINDOW_SHARE = 0.01  # of the bytes: the admission window (Caffeine's default)...
WINDOW_BYTES_MAX = 16 * 1024 * 1024  # ...and at most this: the window lives in memory
PROTECTED_SHARE = 0.80  # of the main bytes: the protected segment
SKETCH_DEPTH = 4  # rows of the count-min sketch
COUNTER_MAX = 15  # 4-bit counters
RESET_FACTOR = 10  # halve every counter after this many increments per counter width
MIN_WIDTH = 1 << 10
MAX_WIDTH = 1 << 22
_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_SEED_0, _SEED_1, _SEED_2, _SEED_3 = _SEEDS  # one per row of the sketch (SKETCH_DEPTH)
_M64 = (1 << 64) - 1
_HALVE = bytes(i >> 1 for i in range(256))

K = TypeVar("K", bound=Hashable)  # what a policy keeps: chunk digests, file names


class FrequencySketch:
    """Approximate access counts (count-min, saturating at ``COUNTER_MAX``), aged by halving.

    :param width: counters per row; rounded up to a power of two.
    """

    def __init__(self, width: int) -> None:
        width = max(MIN_WIDTH, min(MAX_WIDTH, 1 << max(0, width - 1).bit_length()))
        self.width = width
        self._shift = 64 - width.bit_length() + 1
        self._table = bytearray(width * SKETCH_DEPTH)
        self._additions = 0
        self._reset_at = RESET_FACTOR * width

    def _slots(self, key: Hashable) -> tuple[int, int, int, int]:
        """The key's counter in each row (:meth:`increment` and :meth:`frequency` compute them
        in line, as this does: they run for every lookup, hit or miss, and every fill)."""
        h = _stable_hash(key)
        h ^= h >> 29
        shift, width = self._shift, self.width
        return (
            ((h * _SEED_0) & _M64) >> shift,
            width + (((h * _SEED_1) & _M64) >> shift),
            2 * width + (((h * _SEED_2) & _M64) >> shift),
            3 * width + (((h * _SEED_3) & _M64) >> shift),
        )

    def increment(self, key: Hashable) -> None:
        # _stable_hash and _slots written out: a cache hit runs this twice (the name's and the
        # chunk's), and every call saved is a share of a hit's CPU.
        if type(key) is bytes and len(key) >= 8:
            h = int.from_bytes(key[:8], "little")
        else:
            h = _stable_hash(key)
        h ^= h >> 29
        shift, width, table = self._shift, self.width, self._table
        slot = ((h * _SEED_0) & _M64) >> shift
        count = table[slot]
        if count < COUNTER_MAX:
            table[slot] = count + 1
        slot = width + (((h * _SEED_1) & _M64) >> shift)
        count = table[slot]
        if count < COUNTER_MAX:
            table[slot] = count + 1
        slot = 2 * width + (((h * _SEED_2) & _M64) >> shift)
        count = table[slot]
        if count < COUNTER_MAX:
            table[slot] = count + 1
        slot = 3 * width + (((h * _SEED_3) & _M64) >> shift)
        count = table[slot]
        if count < COUNTER_MAX:
            table[slot] = count + 1
        self._additions += 1
        if self._additions >= self._reset_at:
            self._table = bytearray(table.translate(_HALVE))
            self._additions //= 2

    def frequency(self, key: Hashable) -> int:
        table = self._table
        a, b, c, d = self._slots(key)
        low = table[a]
        if table[b] < low:
            low = table[b]
        if table[c] < low:
            low = table[c]
        if table[d] < low:
            low = table[d]
        return low

    def forget(self, key: Hashable) -> None:
        """Take ``key``'s estimate out of its counters (a dead version must not keep its
        popularity); keys sharing a counter lose at most what they shared."""
        table = self._table
        a, b, c, d = self._slots(key)
        low = min(table[a], table[b], table[c], table[d])  # (rare: a dead version's)
        if low:
            table[a] -= low
            table[b] -= low
            table[c] -= low
            table[d] -= low


def _stable_hash(key: Hashable) -> int:
    """A hash of ``key`` that is the same in every process (Python's ``hash`` of str and bytes
    is salted per process, which would make admissions, and so hit ratios, differ run to run):
    a digest's own first 8 bytes, a name's CRC-32, else ``hash`` (ints and tuples of them are
    not salted)."""
    if isinstance(key, bytes) and len(key) >= 8:
        return int.from_bytes(key[:8], "little")
    if isinstance(key, (str, bytes)):
        return zlib.crc32(key.encode() if isinstance(key, str) else key)
    return hash(key) & _M64


class WTinyLFU(Generic[K]):
    """Which keys to keep within ``capacity`` bytes.  Keys are opaque and hashable.

    The caller reports every lookup with :meth:`access` and every fill with :meth:`insert`, and
    drops what these return.

    :param capacity: bytes.
    :param expected_entries: sizes the sketch (default: one per 4 KiB of capacity).
    """

    def __init__(self, capacity: int, expected_entries: int | None = None) -> None:
        self.capacity = capacity
        self.window_max = max(1, min(int(capacity * WINDOW_SHARE), WINDOW_BYTES_MAX))
        self.main_max = capacity - self.window_max
        self.protected_max = int(self.main_max * PROTECTED_SHARE)
        self.sketch = FrequencySketch(expected_entries or capacity // 4096)
        # key -> size, least recent first
        self._window: collections.OrderedDict[K, int] = collections.OrderedDict()
        self._probation: collections.OrderedDict[K, int] = collections.OrderedDict()
        self._protected: collections.OrderedDict[K, int] = collections.OrderedDict()
        self.window_bytes = self.probation_bytes = self.protected_bytes = 0
        self.evictions = 0  # entries taken out of the main part for others
        self.refused = 0  # candidates the main part would not take (incl. too large)

    def __contains__(self, key: object) -> bool:
        return key in self._window or key in self._probation or key in self._protected

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    @property
    def bytes(self) -> int:
        return self.window_bytes + self.probation_bytes + self.protected_bytes

    def in_window(self, key: K) -> bool:
        return key in self._window

    def access(self, key: K) -> bool:
        """Count a lookup of ``key`` (hit or miss) and refresh it if resident (a promotion
        only moves keys between segments: none is pushed out).

        :return: whether ``key`` is resident (what a fill asks next: one pass over the
            segments instead of two).
        """
        self.sketch.increment(key)
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._protected:
            self._protected.move_to_end(key)
        elif key in self._probation:
            size = self._probation.pop(key)
            self.probation_bytes -= size
            self._protected[key] = size
            self.protected_bytes += size
            while self.protected_bytes > self.protected_max and len(self._protected) > 1:
                old, old_size = self._protected.popitem(last=False)
                self.protected_bytes -= old_size
                self._probation[old] = old_size
                self.probation_bytes += old_size
        else:
            return False
        return True

    def insert(self, key: K, size: int) -> tuple[list[K], list[K]]:
        """Add a filled ``key`` of ``size`` bytes (its lookup was counted by :meth:`access`).

        :return: ``(dropped, promoted)``: keys no longer resident (victims, refused
            candidates, or ``key`` itself when it is larger than the whole capacity), and keys
            that moved from the window into the main part.  ``key`` is resident afterwards
            unless it is among the dropped.
        """
        if key in self:
            return [], []
        return self.insert_new(key, size)

    def insert_new(self, key: K, size: int) -> tuple[list[K], list[K]]:
        """:meth:`insert` of a ``key`` the caller knows is not resident."""
        if size > self.capacity:
            self.refused += 1
            return [key], []
        window = self._window
        window[key] = size
        self.window_bytes += size
        dropped: list[K] = []
        promoted: list[K] = []
        while self.window_bytes > self.window_max and window:
            cand, cand_size = window.popitem(last=False)
            self.window_bytes -= cand_size
            if self._admit(cand, cand_size, dropped):
                promoted.append(cand)
            else:
                dropped.append(cand)
        return dropped, promoted

    def _admit(self, cand: K, size: int, dropped: list[K]) -> bool:
        """Make room for ``cand`` in the main part if it is read more than each victim."""
        freq = None
        while self.probation_bytes + self.protected_bytes + size > self.main_max:
            segment = self._probation or self._protected
            victim = next(iter(segment))
            if freq is None:
                freq = self.sketch.frequency(cand)
            if freq <= self.sketch.frequency(victim):
                self.refused += 1
                return False
            self._remove_main(victim)
            dropped.append(victim)
            self.evictions += 1
        self._probation[cand] = size
        self.probation_bytes += size
        return True

    def restore(self, key: K, size: int) -> bool:
        """Put back an entry kept from an earlier run (into the main part), if there is room."""
        if key in self or self.probation_bytes + self.protected_bytes + size > self.main_max:
            return False
        self._probation[key] = size
        self.probation_bytes += size
        return True

    def _remove_main(self, key: K) -> bool:
        size = self._probation.pop(key, None)
        if size is not None:
            self.probation_bytes -= size
            return True
        size = self._protected.pop(key, None)
        if size is not None:
            self.protected_bytes -= size
            return True
        return False

    def remove(self, key: K, forget: bool = False) -> None:
        """Take ``key`` out (its content is gone or dead); ``forget`` also clears its count."""
        size = self._window.pop(key, None)
        if size is not None:
            self.window_bytes -= size
        else:
            self._remove_main(key)
        if forget:
            self.sketch.forget(key)
