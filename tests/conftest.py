"""Shared fixtures: real fms processes on random loopback ports, always cleaned up."""

import pytest

# The one cluster helper, shared with the benchmarks; ROOT and wait_for are imported from here
# by the test modules too.
from harness import ROOT, Cluster, wait_for  # noqa: F401

# Real PostgreSQL and S3 (SeaweedFS) servers, network namespaces as hosts, fms's own S3
# gateway, and fms mounts, started on first use: tests/servers.py, tests/netns.py, tests/s3gw.py,
# tests/mounts.py; how hard hypothesis searches: tests/fuzzing.py.
pytest_plugins = ["servers", "netns", "s3gw", "mounts", "fuzzing"]


@pytest.fixture
def make_cluster(tmp_path, request):
    """A factory of empty clusters; every process is stopped at the end, even on failure."""
    clusters = []

    def make():
        cluster = Cluster(tmp_path)
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
    c = make_cluster()
    c.start_broker()
    c.start_cache()
    c.start_storage(wid="storage-a")
    c.start_storage(wid="storage-b")
    c.wait_workers(storage=2, cache=1)
    return c


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def random_bytes(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (fast: no per-byte Python loop)."""
    import random

    return random.Random(seed).randbytes(n)
