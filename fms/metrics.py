"""The broker's Prometheus metrics (prometheus-client), served on loopback with --metrics-port.

Only fms_ metrics are exported: they live in a registry of their own.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)   # seconds


class BrokerMetrics:
    """Counters the broker updates as requests come and go."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fms_requests", "Client requests answered, by op and outcome "
                                "(ok or the error code)", ["op", "outcome"], registry=self.registry)
        self.latency = Histogram("fms_request_duration_seconds", "Time from a client request's "
                                 "arrival at the broker to its reply leaving, by op and outcome",
                                 ["op", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.cache_hits = Counter("fms_cache_hits", "Client reads answered from the cache",
                                  registry=self.registry)
        self.cache_misses = Counter("fms_cache_misses", "Client reads the cache had to fetch "
                                    "from storage", registry=self.registry)
        self.workers = Gauge("fms_workers", "Live workers, by service", ["service"],
                             registry=self.registry)
        self.redispatched = Counter("fms_redispatched_requests", "Requests handed to another "
                                    "worker after theirs died", registry=self.registry)

    def answered(self, op: str, outcome: str, seconds: float):
        self.requests.labels(op, outcome).inc()
        self.latency.labels(op, outcome).observe(seconds)

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Serve /metrics on ``addr:port`` from a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
