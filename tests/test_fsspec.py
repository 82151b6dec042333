"""fms as an fsspec filesystem (issue 14, point 1): fsspec's own abstract test suite (copy, get,
put, open, pipe) against a live cluster, pandas and pyarrow round trips through ``fms://`` URLs,
ranged reads that fetch only the chunks they need, and writes in bounded memory."""

import uuid

import pytest

fsspec = pytest.importorskip("fsspec")
from conftest import random_bytes  # noqa: E402
from fsspec.tests import abstract  # noqa: E402
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
    host, port = cluster.frontend[len("tcp://") :].rsplit(":", 1)
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
        return False  # folders are implied by the names under them, as in object stores


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


# --- beyond the abstract suite ---


def url(cluster, name: str) -> str:
    host, port = host_port(cluster)
    return f"fms://{host}:{port}/{name}"


def cache_served(cluster) -> int:
    """Requests the broker has handed to the cache worker (get and chunk reads)."""
    return sum(w["served"] for w in cluster.workers("cache"))


def test_the_fms_protocol_is_registered_by_its_entry_point(live, monkeypatch):
    from fms.client.fsspec import FmsFileSystem

    assert fsspec.get_filesystem_class("fms") is FmsFileSystem
    with fsspec.open(url(live, "urls/a.txt"), "w") as f:
        f.write("by url")
    monkeypatch.setenv("FMS_BROKER", live.frontend)
    with fsspec.open("fms:///urls/a.txt", "r") as f:  # no host: $FMS_BROKER
        assert f.read() == "by url"


def test_pandas_csv_and_pyarrow_parquet_round_trips(live):
    pandas = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pandas.DataFrame(
        {
            "n": range(20_000),
            "s": [f"row {i}" for i in range(20_000)],
            "x": [i / 7 for i in range(20_000)],
        }
    )
    frame.to_csv(url(live, "frames/t.csv"), index=False)
    assert pandas.read_csv(url(live, "frames/t.csv")).equals(frame)
    frame.to_parquet(url(live, "frames/t.parquet"))
    assert pandas.read_parquet(url(live, "frames/t.parquet")).equals(frame)
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("fms", host=host_port(live)[0], port=host_port(live)[1])
    assert pq.read_table("frames/t.parquet", filesystem=fs).num_rows == 20_000


def test_a_ranged_read_fetches_only_the_chunks_it_touches(live, fms_fs):
    data = random_bytes(8 * 1024 * 1024, seed=11)  # 8 chunks of 1 MiB
    fms_fs.pipe_file("ranged/big", data)
    for start, end, chunks in (
        (5 * 2**20 + 10, 5 * 2**20 + 110, 1),
        (3 * 2**20 - 50, 3 * 2**20 + 50, 2),
    ):
        before = cache_served(live)
        assert fms_fs.cat_file("ranged/big", start, end) == data[start:end]
        assert cache_served(live) - before == 1 + chunks  # the manifest, then the chunks
    with fms_fs.open("ranged/big") as f:  # seek + read, the same
        f.seek(7 * 2**20 + 3)
        before = cache_served(live)
        assert f.read(1000) == data[7 * 2**20 + 3 : 7 * 2**20 + 1003]
        assert cache_served(live) - before == 1
        f.seek(0)
        assert f.read() == data  # then on, streamed


def test_a_write_streams_holding_one_chunk_and_shows_nothing_before_close(live, fms_fs):
    fs = fms_fs
    piece = random_bytes(300_000, seed=12)
    with fs.open("stream/out", "wb") as f:
        before = fs.client.usage()["chunk_bytes"]
        for _ in range(20):  # 6 MB in 300 kB writes
            f.write(piece)
            assert len(f._buf) < fs.client.chunk_size  # at most one chunk held
        assert fs.client.usage()["chunk_bytes"] - before >= 5 * 2**20  # already sent
        assert not fs.exists("stream/out")  # committed only on close
    assert fs.cat_file("stream/out") == piece * 20
    with pytest.raises(RuntimeError), fs.open("stream/out", "wb") as f:
        f.write(b"half")
        raise RuntimeError("the writer fails")
    assert fs.cat_file("stream/out") == piece * 20  # the old content stays


def test_get_range_in_the_cli_reads_the_same_bytes_and_refuses_bad_ranges(live, tmp_path):
    data = random_bytes(3 * 1024 * 1024, seed=13)
    with live.client() as c:
        c.put_bytes(data, "ranged/cli")
    got = live.cli("get", "ranged/cli", "-", "--range", "1048570-1048589")
    assert got.returncode == 0 and got.stdout == data[1048570:1048590]
    assert (
        live.cli("get", "ranged/cli", str(tmp_path / "tail"), "--range", "3145720-").returncode == 0
    )
    assert (tmp_path / "tail").read_bytes() == data[3145720:]
    got = live.cli("get", "ranged/cli", "-", "--range", "9-3")
    assert got.returncode == 2 and b"not a byte range" in got.stderr
