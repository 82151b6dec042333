"""The worker registry: which workers are connected, for which service and store, and whether
they are still alive.

A worker announces itself with a ``ready`` route (its service, a stable worker id, the store it
serves and, from storage, the store's digest function, the protocol version); the registry
decides whether it may serve (:meth:`Registry.check`), keeps it while its messages and
heartbeats keep arriving (each pushes its expiry on by ``HEARTBEAT_INTERVAL *
HEARTBEAT_LIVENESS``: the zguide's Paranoid Pirate), and forgets it when it says bye, expires
or cannot be reached.  It also keeps the counters a cache worker reports in its
heartbeats.  It knows nothing of requests beyond each worker's count of them in flight.
"""

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .. import wire as p
from ..metrics import BrokerMetrics
from .headers import int_in

MAX_ID_LEN = 128  # characters of a worker id or store id kept (they are shown in status)
LIVENESS = p.HEARTBEAT_INTERVAL * p.HEARTBEAT_LIVENESS  # seconds a worker lives unheard


@dataclass(slots=True, eq=False)
class Worker:
    """A registered worker, and what it holds now."""

    ident: bytes  # its routing id on the backend socket
    service: str
    worker_id: str
    store_id: str | None
    expiry: float  # monotonic time past which it counts as dead unless heard from
    inflight: set = field(default_factory=set)  # broker request keys
    inflight_bytes: int = 0  # their data + the replies expected of them
    changes: int = 0  # how many of them are changes packed onto one worker (routing.packs)
    served: int = 0
    last_used: int = 0  # request key of its latest dispatch
    last_change: int = 0  # request key of the latest change sent to it (routing.pick)
    # monotonic time of its latest answer, or of the dispatch that found it idle (routing.pick)
    progress: float = 0.0
    stats: dict = field(default_factory=dict)  # a cache's counters, from its heartbeats
    digest_fn: str | None = None  # storage: its store's digest function
    serial: bool = False  # storage: its store takes one write transaction at a time (SQLite)
    # a cache: bytes of commit fills handed to ZeroMQ for it, and how many of them its latest
    # heartbeat said it took (dispatch.Dispatcher.invalidate)
    fill_sent: int = 0
    fill_taken: int = 0


class Refused(Exception):
    """A worker may not register: ``message`` says why; ``retry`` tells it to keep asking."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retry = retry


def _clip_id(value: object) -> str | None:
    """A store id as status shows it: a str (another type's repr), at most MAX_ID_LEN long."""
    if value is None:
        return None
    return (value if isinstance(value, str) else repr(value))[:MAX_ID_LEN]


class Registry:
    """The live workers, by routing id.

    :param pinned_store: the store id storage workers must serve (the broker's ``--store``), or
        None: then the first storage worker's store is the one.
    """

    def __init__(self, pinned_store: str | None, metrics: BrokerMetrics) -> None:
        self.pinned_store = pinned_store
        self.metrics = metrics
        self.workers: dict[bytes, Worker] = {}
        self._by_service: dict[str, list] = {}
        self._seen: dict = {}  # (cache worker id, counter) -> value its heartbeat last had
        # (store id, digest function) of the storage worker registered last: what `hello` and
        # the caches' `welcome` say, also while no storage worker is connected.
        self.store: tuple[str | None, str] | None = None

    def get(self, ident: bytes) -> Worker | None:
        return self.workers.get(ident)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self.workers.values()))

    def of(self, service: str) -> list:
        """The live workers of ``service`` (a list kept between changes: do not modify it)."""
        return self._by_service.get(service, [])

    def check(self, ident: bytes, route: dict) -> tuple:
        """What a ``ready`` route registers: ``(service, worker_id, store_id)``.

        :raises Refused: another protocol version, an unknown service, a storage worker of
            another store than the broker serves, or one whose digest function is unknown or
            not its store's.
        """
        service = route.get("svc")
        worker_id = str(route.get("wid", ident.hex()))[:MAX_ID_LEN]
        store_id = _clip_id(route.get("store"))
        if not p.is_version(route.get("v")):
            raise Refused(
                f"protocol version {route.get('v')!r} is not supported; "
                f"this broker speaks {p.PROTOCOL_VERSION}"
            )
        if service not in p.SERVICES:
            raise Refused(f"unknown service {service!r}")
        if service == p.STORAGE:
            # The store is decided by storage (the broker's --store, read from the data
            # directory), else by the storage workers already serving.  A worker of another
            # store is refused but not told to exit: if an impostor registered first, the real
            # workers keep asking and get in as soon as it is gone.
            current = self.pinned_store or self.store_id(exclude=ident)
            if current is not None and store_id != current:
                decided = (
                    "broker was started for"
                    if self.pinned_store
                    else "storage workers already connected"
                )
                raise Refused(
                    f"this worker serves a different store ({store_id!r:.80}) than the "
                    f"{decided} ({current}); start it with the same --data directory as them "
                    f"(sharding across stores comes later); it retries every second",
                    retry=True,
                )
            digest_fn = route.get("digest_fn")
            if digest_fn not in p.DIGEST_FUNCTIONS:
                raise Refused(
                    f"unknown digest function {digest_fn!r:.40}; this broker knows "
                    f"{', '.join(p.DIGEST_FUNCTIONS)}: upgrade the broker or the worker"
                )
            known = self.store
            if known is not None and known[0] == store_id and known[1] != digest_fn:
                raise Refused(
                    f"this worker says its store uses {digest_fn}, the storage workers of the "
                    f"same store registered before said {known[1]}: two stores share one id "
                    f"(a copied data directory?); it retries every second",
                    retry=True,
                )
        return service, worker_id, store_id

    def add(
        self,
        ident: bytes,
        service: str,
        worker_id: str,
        store_id: str | None,
        digest_fn: str | None = None,
        serial: bool = False,
    ) -> bool:
        """Register a worker (checked).  :return: whether the store's digest function became
        known or changed (a storage worker of another store than the last one): the caches
        must be told."""
        worker = Worker(ident, service, worker_id, store_id, time.monotonic() + LIVENESS)
        worker.digest_fn = digest_fn
        worker.serial = serial
        self.workers[ident] = worker
        self._changed()
        if service != p.STORAGE or digest_fn is None:
            return False
        before, self.store = self.store, (store_id, digest_fn)
        return before is None or before[1] != digest_fn

    def remove(self, ident: bytes) -> Worker | None:
        worker = self.workers.pop(ident, None)
        if worker is not None:
            self._changed()
        return worker

    def heard(self, worker: Worker) -> None:
        """A message from ``worker``: it lives on."""
        worker.expiry = time.monotonic() + LIVENESS

    def expired(self, now: float) -> list:
        return [w for w in self.workers.values() if w.expiry < now]

    def store_id(self, exclude: bytes | None = None) -> str | None:
        for worker in self.workers.values():
            if worker.service == p.STORAGE and worker.ident != exclude:
                return worker.store_id
        return None

    def serving(self, service: str, exclude: Iterable = ()) -> str | None:
        """The service whose workers take ``service``'s requests now: itself, else its
        fallback, else None."""
        if not exclude and self._by_service.get(service):
            return service  # (the usual case, without a generator per request)
        for candidate in (service, p.FALLBACK_SERVICE.get(service)):
            if candidate and any(w.ident not in exclude for w in self.of(candidate)):
                return candidate
        return None

    def note_stats(self, worker: Worker, stats: object) -> None:
        """A cache's counters, from its heartbeat: their growth goes to the Prometheus ones.
        What was seen is kept by worker id, so a worker that registers again is not counted
        twice; a value below it means the worker restarted from 0."""
        if not isinstance(stats, dict):
            return
        for name, counter in (
            ("evictions", self.metrics.cache_evictions),
            ("refused", self.metrics.cache_refused),
        ):
            value = stats.get(name)
            if int_in(value, 0):
                seen = self._seen.get((worker.worker_id, name), 0)
                grown = value - seen if value >= seen else value
                if grown > 0:
                    counter.inc(grown)
                self._seen[(worker.worker_id, name)] = value
                worker.stats[name] = value
        taken = stats.get("filled")
        if int_in(taken, 0):
            # Counted since it registered, as fill_sent is: a beat sent before it registered
            # again says at most what was sent since.
            worker.fill_taken = min(taken, worker.fill_sent)

    def cache_counters(self) -> dict:
        """The counters the live cache workers last reported, summed (for ``status``)."""
        return {
            "evictions": sum(w.stats.get("evictions", 0) for w in self.workers.values()),
            "admissions_refused": sum(w.stats.get("refused", 0) for w in self.workers.values()),
        }

    def status(self) -> list:
        return [
            {
                "service": w.service,
                "id": w.worker_id,
                "store": w.store_id,
                "state": "ready",
                "inflight": len(w.inflight),
                "inflight_bytes": w.inflight_bytes,
                "served": w.served,
            }
            for w in sorted(self.workers.values(), key=lambda w: (w.service, w.worker_id))
        ]

    def _changed(self) -> None:
        """A worker came or went: the lists by service are made anew (never changed in place,
        so a loop over an old one is not disturbed), and the metrics count them."""
        self._by_service = {
            service: [w for w in self.workers.values() if w.service == service]
            for service in p.SERVICES
        }
        for service, workers in self._by_service.items():
            self.metrics.workers.labels(service).set(len(workers))
