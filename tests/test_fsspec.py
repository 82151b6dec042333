"""fms as an fsspec filesystem (issue 14, point 1): fsspec's own abstract test suite (copy, get,
put, open, pipe) against a live cluster, pandas and pyarrow round trips through ``fms://`` URLs,
ranged reads that fetch only the chunks they need, and writes in bounded memory."""

import io
import os
import uuid

import pytest

fsspec = pytest.importorskip("fsspec")
from fsspec.tests import abstract  # noqa: E402

from conftest import random_bytes  # noqa: E402
from harness import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One cluster for the module (the abstract suite is over a hundred tests)."""
    cluster = Cluster(tmp_path_factory.mktemp("fsspec"))
    try:
        cluster.start_all(storage=1)
        yield cluster
    finally:
        cluster.stop()


def host_port(cluster) -> tuple:
    host, port = cluster.frontend[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


@pytest.fixture
def fms_fs(live):
    host, port = host_port(live)
    return fsspec.filesystem("fms", host=host, port=port, skip_instance_cache=True)


class FmsFixtures(abstract.AbstractFixtures):
    @pytest.fixture
    def fs(self, fms_fs):
        return fms_fs

    @pytest.fixture
    def fs_path(self):
        return f"abstract-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def supports_empty_directories(self):
        return False      # folders are implied by the names under them, as in object stores


class TestFmsCopy(abstract.AbstractCopyTests, FmsFixtures):
    pass


class TestFmsGet(abstract.AbstractGetTests, FmsFixtures):
    pass


class TestFmsPut(abstract.AbstractPutTests, FmsFixtures):
    pass


class TestFmsOpen(abstract.AbstractOpenTests, FmsFixtures):
    pass


class TestFmsPipe(abstract.AbstractPipeTests, FmsFixtures):
    pass
