"""The broker's Prometheus metrics (prometheus-client), served on loopback with --metrics-port.

Only fms_ metrics are exported: they live in a registry of their own.  Those counted for every
request (requests and their latency by op and outcome, the cache's hits and misses, its GETs and
bytes) are plain numbers the broker's thread adds to, read by a collector when /metrics is
scraped (:class:`_PerRequest`): a prometheus-client ``Counter.inc`` or ``Histogram.observe``
takes a lock and checks its labels, and the five of a GET were a fifth of the broker's own work
for it.
"""

import bisect
import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)  # seconds


class BrokerMetrics:
    """Counters the broker updates as requests come and go."""

    def __init__(self) -> None:
        # (op, outcome) -> [seconds in all, then a count per LATENCY_BUCKETS bound, then over]
        self._answered: dict[tuple[str, str], list[float]] = {}
        self.cache_hits = 0  # client reads answered from the cache
        self.cache_misses = 0  # ... that the cache had to fetch from storage
        self.reads = ReadTally()  # the broker's core counts GETs and bytes in it
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_PerRequest(self))
        self.cache_evictions = Counter(
            "fms_cache_evictions",
            "Chunks the cache workers evicted to make room",
            registry=self.registry,
        )
        self.cache_refused = Counter(
            "fms_cache_admissions_refused",
            "Chunks the cache workers "
            "did not admit (read less often than what they would "
            "displace, or too large)",
            registry=self.registry,
        )
        self.cache_fills = Counter(
            "fms_cache_commit_fills",
            "Small files' content handed to their cache worker with a commit's invalidation "
            "(sent), or not because the cache had not taken the earlier ones yet (window_full)",
            ["outcome"],
            registry=self.registry,
        )
        self.workers = Gauge(
            "fms_workers", "Live workers, by service", ["service"], registry=self.registry
        )
        self.redispatched = Counter(
            "fms_redispatched_requests",
            "Requests handed to another worker after theirs died",
            registry=self.registry,
        )

    def answered(self, op: str, outcome: str, seconds: float) -> None:
        """A client request answered (``outcome``: ok or the error code) after ``seconds``."""
        tally = self._answered.get((op, outcome))
        if tally is None:
            tally = self._answered[(op, outcome)] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        tally[0] += seconds
        tally[1 + bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics on ``addr:port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)


class _PerRequest(Collector):
    """The figures counted for every request (:class:`BrokerMetrics`), as Prometheus metrics
    when /metrics is scraped, from the HTTP server's thread: each figure is copied whole (a
    list copied by the interpreter at once), so a histogram's count is always its buckets'."""

    def __init__(self, metrics: "BrokerMetrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "fms_requests",
            "Client requests answered, by op and outcome (ok or the error code)",
            labels=["op", "outcome"],
        )
        latency = HistogramMetricFamily(
            "fms_request_duration_seconds",
            "Time from a client request's arrival at the broker to its reply leaving, by op "
            "and outcome",
            labels=["op", "outcome"],
        )
        for key, tally in sorted((k, list(t)) for k, t in list(m._answered.items())):
            count, buckets = 0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), tally[1:], strict=True):
                count += int(n)
                buckets.append((floatToGoString(bound), count))
            requests.add_metric(list(key), count)
            latency.add_metric(list(key), buckets, tally[0])
        yield requests
        yield latency
        reads = m.reads
        for name, doc, value in (
            ("fms_cache_hits", "Client reads answered from the cache", m.cache_hits),
            (
                "fms_cache_misses",
                "Client reads the cache had to fetch from storage",
                m.cache_misses,
            ),
            (
                "fms_cache_get_hits",
                "Client GETs whose manifest and every chunk came from the cache",
                reads.get_hits,
            ),
            (
                "fms_cache_get_misses",
                "Client GETs through the cache with the manifest or a chunk from storage",
                reads.get_misses,
            ),
            (
                "fms_cache_bytes_hit",
                "Content bytes of client GETs served by the cache",
                reads.bytes_hit,
            ),
            (
                "fms_cache_bytes_missed",
                "Content bytes of client GETs through the cache that came from storage",
                reads.bytes_missed,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)


@dataclass(slots=True)
class _OpenGet:
    """A GET through the cache whose chunks are still being answered."""

    left: int  # chunk replies still to come
    hit: bool  # every piece so far came from the cache


class ReadTally:
    """Client GETs and bytes the cache tier served, counted whole (issue 16).

    A GET is a *hit* only when its manifest and every one of its chunks came from the cache.  The
    broker sees every piece go by: the cache's ``get`` reply says in its route whether it was a
    hit and how many chunk requests will follow (``n``); the client tags each of those with the
    GET's request id (``of``).  A GET whose pieces have all been answered is counted; one the
    client abandons part way (a seek, an error) is forgotten after ``MAX_OPEN`` newer ones, or
    when its client is gone, uncounted.  Bytes are counted per reply: from the cache
    (``bytes_hit``) or from storage for a GET that went through the cache (``bytes_missed``).
    GETs that skip the cache (``--no-cache``) are not counted.

    :class:`BrokerMetrics` holds one and exports its figures.
    """

    MAX_OPEN = 10_000  # GETs waiting for their chunks, kept at most

    def __init__(self) -> None:
        self.get_hits = self.get_misses = self.bytes_hit = self.bytes_missed = 0
        # (client, GET request id) -> its chunks still to come
        self._open: collections.OrderedDict[tuple[bytes, object], _OpenGet] = (
            collections.OrderedDict()
        )

    def tally(
        self,
        op: str,
        client: bytes,
        req_id: object,
        read: int | str | None,
        route: dict[str, Any],
        nbytes: int,
    ) -> None:
        """Count a worker's reply to ``client``'s ``op`` (``read``: the GET a chunk request
        belongs to; ``nbytes``: its data's) towards the per-GET figures."""
        if not route.get("ok", True):
            return
        nbytes = max(0, nbytes)
        if op == "get" and route.get("cache") is not None:
            self.get_answered(client, req_id, route["cache"], route.get("n", 0), nbytes)
        elif op == "get_many" and route.get("cache") is not None:
            self.batch_answered(route.get("gh"), route.get("gm"))
        elif op == "chunk" and read is not None:
            self.chunk_answered(client, read, route.get("cache"), nbytes)

    def get_answered(
        self, client: bytes, req_id: object, outcome: object, chunks: object, nbytes: int
    ) -> None:
        """The cache's reply to a ``get`` (``outcome`` "hit" / "miss"; ``chunks`` to follow)."""
        hit = outcome == "hit"
        self._bytes(hit, nbytes)
        if isinstance(chunks, int) and chunks > 0:
            self._open[(client, req_id)] = _OpenGet(chunks, hit)
            if len(self._open) > self.MAX_OPEN:
                self._open.popitem(last=False)
        else:
            self._count(hit)

    def batch_answered(self, whole: object, missed: object) -> None:
        """A ``get_many``: ``whole`` names came whole from the cache, ``missed`` from storage
        (large files of a batch, whose chunks follow untagged, are not counted)."""
        for count, hit in ((whole, True), (missed, False)):
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                self._count(hit, count)

    def chunk_answered(self, client: bytes, read: int | str, outcome: object, nbytes: int) -> None:
        """A reply to a ``chunk`` request tagged with the GET it belongs to (``read``), from
        the cache (``outcome``) or from storage (None)."""
        entry = self._open.get((client, read))
        hit = outcome == "hit"
        if entry is None and outcome is None:
            return  # not part of a GET through the cache
        self._bytes(hit, nbytes)
        if entry is None:
            return
        entry.left -= 1
        entry.hit = entry.hit and hit
        if entry.left <= 0:
            del self._open[(client, read)]
            self._count(entry.hit)

    def client_gone(self, client: bytes) -> None:
        for key in [k for k in self._open if k[0] == client]:
            del self._open[key]

    def _bytes(self, hit: bool, nbytes: int) -> None:
        if hit:
            self.bytes_hit += nbytes
        else:
            self.bytes_missed += nbytes

    def _count(self, hit: bool, gets: int = 1) -> None:
        if hit:
            self.get_hits += gets
        else:
            self.get_misses += gets

    def figures(self) -> dict[str, int]:
        return {
            "get_hits": self.get_hits,
            "get_misses": self.get_misses,
            "bytes_hit": self.bytes_hit,
            "bytes_missed": self.bytes_missed,
        }
