"""Cache policies simulated offline on the issue-16 traces, by bytes, at chunk granularity.

    python -m benchmarks.cachesim [--gets 20000] [--json]

A GET is a hit only if its manifest was cached (manifests are small and kept in memory: one
miss per file, the first time) and every chunk of the file hit.  Policies, each independent of
the others and of fms except the last:

- LRU: what fms had before issue 16.
- S3-FIFO (Yang et al., SOSP 2023): a small FIFO (10 % of the bytes), a main FIFO, a ghost FIFO
  of keys evicted from the small one; 2-bit frequencies.
- W-TinyLFU (exact counts): a 1 % LRU window and a segmented LRU main, admission by exact access
  counts halved every 10 x (entries) accesses: the reference fms's sketch approximates.
- Belady: evicts the entry read again furthest in the future, and does not admit an entry read
  later than all it would displace; the offline optimum that policies are measured against.
- fms: :class:`fms.cache.policy.WTinyLFU`, driven as the cache drives it.

Prints request and byte hit ratios for Zipf 0.7 / 0.9 / 1.1 and the scan trace's hit ratio of the
100 GETs before and after a one-time scan of 3,000 cold files.
"""

import argparse
import collections
import heapq
import json

from fms.cache.policy import WTinyLFU

from . import traces as t

SCAN_WINDOW = 100  # GETs before and after the scan that are compared


class LRU:
    def __init__(self, capacity):
        self.capacity, self.bytes, self.entries = capacity, 0, collections.OrderedDict()

    def request(self, key, size, _next_use=None) -> bool:
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        if size <= self.capacity:
            self.entries[key] = size
            self.bytes += size
            while self.bytes > self.capacity:
                self.bytes -= self.entries.popitem(last=False)[1]
        return False


class S3FIFO:
    def __init__(self, capacity, small_share=0.10):
        self.small_max = int(capacity * small_share)
        self.main_max = capacity - self.small_max
        self.small, self.main = collections.OrderedDict(), collections.OrderedDict()  # key -> size
        self.small_bytes = self.main_bytes = 0
        self.freq = {}
        self.ghost, self.ghost_bytes = collections.OrderedDict(), 0

    def request(self, key, size, _next_use=None) -> bool:
        if key in self.small or key in self.main:
            self.freq[key] = min(self.freq[key] + 1, 3)
            return True
        if size > self.main_max:
            return False
        if key in self.ghost:
            self.ghost_bytes -= self.ghost.pop(key)
            self._insert_main(key, size)
        else:
            while self.small_bytes + size > self.small_max and self.small:
                self._evict_small()
            self.small[key] = size
            self.small_bytes += size
        self.freq[key] = 0
        return False

    def _evict_small(self):
        key, size = self.small.popitem(last=False)
        self.small_bytes -= size
        if self.freq[key] > 0:
            self._insert_main(key, size)
        else:
            del self.freq[key]
            self.ghost[key] = size
            self.ghost_bytes += size
            while self.ghost_bytes > self.main_max:
                self.ghost_bytes -= self.ghost.popitem(last=False)[1]

    def _insert_main(self, key, size):
        while self.main_bytes + size > self.main_max and self.main:
            old, old_size = self.main.popitem(last=False)
            if self.freq[old] > 0:
                self.freq[old] -= 1
                self.main[old] = old_size
            else:
                self.main_bytes -= old_size
                del self.freq[old]
        self.main[key] = size
        self.main_bytes += size
        self.freq[key] = 0


class ExactTinyLFU:
    """W-TinyLFU with exact counts instead of a sketch (the reference)."""

    def __init__(self, capacity):
        self.window_max = int(capacity * 0.01)
        self.main_max = capacity - self.window_max
        self.protected_max = int(self.main_max * 0.8)
        self.window = collections.OrderedDict()
        self.probation = collections.OrderedDict()
        self.protected = collections.OrderedDict()
        self.wb = self.pb = self.rb = 0
        self.counts = collections.Counter()
        self.seen = 0

    def _count(self, key):
        self.counts[key] += 1
        self.seen += 1
        if self.seen >= 10 * max(
            1024, len(self.window) + len(self.probation) + len(self.protected)
        ):
            self.counts = collections.Counter({k: c // 2 for k, c in self.counts.items() if c > 1})
            self.seen //= 2

    def request(self, key, size, _next_use=None) -> bool:
        self._count(key)
        if key in self.window:
            self.window.move_to_end(key)
            return True
        if key in self.protected:
            self.protected.move_to_end(key)
            return True
        if key in self.probation:
            self.pb -= self.probation.pop(key)
            self.protected[key] = size
            self.rb += size
            while self.rb > self.protected_max:
                old, old_size = self.protected.popitem(last=False)
                self.rb -= old_size
                self.probation[old] = old_size
                self.pb += old_size
            return True
        if size > self.main_max:
            return False
        self.window[key] = size
        self.wb += size
        while self.wb > self.window_max:
            cand, cand_size = self.window.popitem(last=False)
            self.wb -= cand_size
            self._admit(cand, cand_size)
        return False

    def _admit(self, cand, size):
        while self.pb + self.rb + size > self.main_max:
            seg = self.probation if self.probation else self.protected
            victim = next(iter(seg))
            if self.counts[cand] <= self.counts[victim]:
                return
            if seg is self.probation:
                self.pb -= seg.pop(victim)
            else:
                self.rb -= seg.pop(victim)
        self.probation[cand] = size
        self.pb += size


class Belady:
    """Evicts the entry whose next use is furthest away; bypasses one used later than them."""

    def __init__(self, capacity):
        self.capacity, self.bytes = capacity, 0
        self.entries = {}  # key -> (size, next use)
        self.heap = []  # (-next use, key), lazily deleted

    def request(self, key, size, next_use) -> bool:
        hit = key in self.entries
        if hit:
            self.bytes -= self.entries[key][0]
            del self.entries[key]
        if size <= self.capacity:
            while self.bytes + size > self.capacity:
                neg, victim = heapq.heappop(self.heap)
                entry = self.entries.get(victim)
                if entry is None or entry[1] != -neg:
                    continue
                if -neg <= next_use:  # everything resident is needed sooner: bypass
                    heapq.heappush(self.heap, (neg, victim))
                    return hit
                del self.entries[victim]
                self.bytes -= entry[0]
            self.entries[key] = (size, next_use)
            self.bytes += size
            heapq.heappush(self.heap, (-next_use, key))
        return hit


class FmsPolicy:
    """:class:`fms.cache.policy.WTinyLFU` driven as fms.cache.chunks drives it."""

    def __init__(self, capacity):
        self.policy = WTinyLFU(capacity)

    def request(self, key, size, _next_use=None) -> bool:
        hit = key in self.policy
        self.policy.access(key)
        if not hit:
            self.policy.insert(key, size)
        return hit


POLICIES = {
    "LRU": LRU,
    "S3-FIFO": S3FIFO,
    "W-TinyLFU": ExactTinyLFU,
    "Belady": Belady,
    "fms": FmsPolicy,
}


def requests_of(trace: t.Trace) -> list:
    """Per GET: its chunk keys and sizes, with each chunk's next use (for Belady)."""
    reqs = [
        [((f, i), size) for i, size in enumerate(t.chunks_of(trace.sizes[f]))] for f in trace.gets
    ]
    next_use, far = {}, len(reqs) + 1
    out = [None] * len(reqs)
    for n in range(len(reqs) - 1, -1, -1):
        out[n] = [(key, size, next_use.get(key, far)) for key, size in reqs[n]]
        for key, _size in reqs[n]:
            next_use[key] = n
    return out


def simulate(policy, trace: t.Trace, reqs: list) -> dict:
    """Replay ``reqs`` through ``policy``; :return: hits per GET (bool list) and byte totals."""
    seen, hits, bytes_hit, total = set(), [], 0, 0
    for f, chunks in zip(trace.gets, reqs, strict=False):
        manifest_hit = f in seen
        seen.add(f)
        all_hit = manifest_hit
        for key, size, nxt in chunks:
            hit = policy.request(key, size, nxt)
            all_hit &= hit
            bytes_hit += size if hit else 0
            total += size
        hits.append(all_hit)
    return {"hits": hits, "bytes_hit": bytes_hit, "bytes": total}


def run(gets: int = t.GETS, capacity: int = t.CACHE_BYTES, names=tuple(POLICIES)) -> dict:
    result = {"capacity": capacity, "gets": gets, "zipf": {}, "scan": {}}
    for alpha in t.ALPHAS:
        trace = t.zipf_trace(alpha, gets=gets)
        reqs = requests_of(trace)
        row = result["zipf"][alpha] = {"file_bytes": sum(trace.sizes)}
        for name in names:
            sim = simulate(POLICIES[name](capacity), trace, reqs)
            row[name] = {
                "request": sum(sim["hits"]) / len(sim["hits"]),
                "byte": sim["bytes_hit"] / sim["bytes"],
            }
    trace = t.scan_trace(0.9, gets=gets)
    reqs = requests_of(trace)
    result["scan"]["scan_bytes"] = sum(trace.sizes[t.FILES :])
    for name in names:
        hits = simulate(POLICIES[name](capacity), trace, reqs)["hits"]
        before = hits[trace.scan_at - SCAN_WINDOW : trace.scan_at]
        start = trace.scan_at + trace.scan_len
        after = hits[start : start + SCAN_WINDOW]
        result["scan"][name] = {
            "before": sum(before) / len(before),
            "after": sum(after) / len(after),
        }
    return result


def table(result: dict) -> str:
    names = [n for n in POLICIES if n in result["scan"]]
    lines = ["| trace | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for alpha, row in result["zipf"].items():
        lines.append(
            f"| Zipf {alpha} request | "
            + " | ".join(f"{100 * row[n]['request']:.1f}" for n in names)
            + " |"
        )
        lines.append(
            f"| Zipf {alpha} byte | "
            + " | ".join(f"{100 * row[n]['byte']:.1f}" for n in names)
            + " |"
        )
    for when in ("before", "after"):
        lines.append(
            f"| scan: {SCAN_WINDOW} GETs {when} | "
            + " | ".join(f"{100 * result['scan'][n][when]:.0f}" for n in names)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gets", type=int, default=t.GETS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.gets)
    print(json.dumps(result, indent=1) if args.json else table(result))


if __name__ == "__main__":
    main()
