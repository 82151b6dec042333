"""Shared fixtures: real fms processes on random loopback ports, always cleaned up."""

import compileall
import itertools
import os
import sys

import pytest
import storage_helpers

# The one cluster helper, shared with the benchmarks; ROOT and wait_for are imported from here
# by the test modules too.
from harness import ROOT, Cluster, wait_for  # noqa: F401

from fms import wire as p

# Real PostgreSQL and S3 (SeaweedFS) servers, network namespaces as hosts, fms's own S3
# gateway, and fms mounts, started on first use: tests/servers.py, tests/netns.py, tests/s3gw.py,
# tests/mounts.py; how hard hypothesis searches: tests/fuzzing.py.
pytest_plugins = ["servers", "netns", "s3gw", "mounts", "fuzzing"]


def pytest_configure(config):
    """Under PYTHONDONTWRITEBYTECODE (or -B) no process writes bytecode, so each of the few
    thousand Python processes the suite starts (workers, brokers, CLI runs) would compile fms
    from source again: 0.1-0.3 s of CPU each. Compile it once, before the test processes start,
    as pip does for a package it installs; Python still reads bytecode under the variable."""
    if sys.dont_write_bytecode and not hasattr(config, "workerinput"):
        compileall.compile_dir(os.path.join(ROOT, "fms"), quiet=1)


@pytest.fixture
def store_digest() -> str:
    """The digest function of the stores a test makes: a new store's, unless the test is
    parametrized over ``store_digest`` (``DIGESTS``: a store of each kind, one suite)."""
    return p.NEW_STORE_DIGEST


DIGESTS = pytest.mark.parametrize("store_digest", p.DIGEST_FUNCTIONS)


@pytest.fixture(autouse=True)
def _stores_of_the_kind(store_digest, monkeypatch):
    """Every store a test makes, in its process or as a cluster's, records ``store_digest``
    (what a new store records otherwise), and the test's builders (storage_helpers) hash with
    it."""
    monkeypatch.setattr(p, "NEW_STORE_DIGEST", store_digest)
    storage_helpers.use_digest(store_digest)
    yield
    storage_helpers.use_digest(p.digests.NEW_STORE_DIGEST)


@pytest.fixture
def make_cluster(tmp_path, request, store_digest):
    """A factory of empty clusters; every process is stopped at the end, even on failure."""
    clusters = []

    def make():
        # --digest only where it is not what a new store records anyway: as a user runs it
        other = store_digest if store_digest != p.digests.NEW_STORE_DIGEST else None
        cluster = Cluster(tmp_path, digest_fn=other)
        clusters.append(cluster)
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None)
    for cluster in clusters:
        if failed is not None and failed.failed:
            print(cluster.logs())
        cluster.stop(wait=False)  # reaped in the background: the next test need not wait


@pytest.fixture
def cluster(make_cluster):
    """Broker, one cache worker and two storage workers sharing one store."""
    return start_cluster(make_cluster())


def start_cluster(cluster: Cluster) -> Cluster:
    """``cluster``'s broker, one cache worker and two storage workers sharing one store."""
    cluster.start_broker()
    cluster.start_cache()
    cluster.start_storage(wid="storage-a")
    cluster.start_storage(wid="storage-b")
    cluster.wait_workers(storage=2, cache=1)
    return cluster


@pytest.fixture(scope="session")
def _shared_clusters(tmp_path_factory):
    """Clusters as ``cluster`` makes them that tests share (starting one costs about 0.7 s):
    one per use and digest function, started on first use, in each test process."""
    started: dict = {}

    def get(use: str, digest: str) -> Cluster:
        if (use, digest) not in started:
            other = digest if digest != p.digests.NEW_STORE_DIGEST else None
            folder = tmp_path_factory.mktemp(f"shared-{use}-{digest}")
            started[use, digest] = start_cluster(Cluster(folder, digest_fn=other))
        cluster = started[use, digest]
        assert all(proc.alive() for proc in cluster.procs), cluster.logs()
        return cluster

    yield get
    for cluster in started.values():
        cluster.stop(wait=False)


def _with_logs_on_failure(request, cluster):
    yield cluster
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(cluster.logs())


@pytest.fixture
def shared_cluster(_shared_clusters, store_digest, request):
    """A cluster like ``cluster``, shared by the tests that neither stop, start nor reconfigure
    its processes, nor read the store's totals or counters: each such test writes and reads
    only names under its own ``prefix``."""
    yield from _with_logs_on_failure(request, _shared_clusters("prefixed", store_digest))


_prefix_numbers = itertools.count(1)


@pytest.fixture
def prefix() -> str:
    """A name prefix no other test uses (a folder: ``t0001/``), for a ``shared_cluster``."""
    return f"t{next(_prefix_numbers):04d}/"


@pytest.fixture
def untouched_cluster(_shared_clusters, store_digest, request):
    """A cluster like ``cluster`` into which no test writes anything: shared by the tests whose
    point is that a request stores nothing (so it stays empty) or that a name is not found."""
    yield from _with_logs_on_failure(request, _shared_clusters("untouched", store_digest))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def random_bytes(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (fast: no per-byte Python loop)."""
    import random

    return random.Random(seed).randbytes(n)
