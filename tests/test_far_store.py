"""Storage far away: PostgreSQL and S3 behind a proxy that delays every byte 5 ms each way
(tests/delayproxy.py), as a store in another data centre would be; everything still holds."""

import pytest
from conftest import DIGESTS, random_bytes
from delayproxy import DelayProxy

from fms.errors import NotFound

DELAY = 0.005  # seconds, each way


@pytest.fixture
def far_cluster(make_cluster, tmp_path, postgres, s3, s3_bucket, monkeypatch):
    with (
        DelayProxy(f"{postgres.host}:{postgres.port}", DELAY) as pg_proxy,
        DelayProxy(f"127.0.0.1:{s3.port}", DELAY) as s3_proxy,
    ):
        meta = postgres.new_database().replace(f"{postgres.host}:{postgres.port}", pg_proxy.address)
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)  # inherited by the storage workers
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_proxy.address}")
        cluster = make_cluster()
        cluster.start_broker()
        cluster.start_cache()
        for i in (1, 2):
            scratch = tmp_path / f"scratch-{i}"
            scratch.mkdir()
            extra = ["--meta", meta, "--chunks", f"s3://{s3_bucket}/far"]
            cluster.start_storage(data=str(scratch), wid=f"storage-{i}", extra=extra)
        cluster.wait_workers(storage=2, cache=1)
        yield cluster
        cluster.stop()


@DIGESTS
def test_a_store_far_away_reads_writes_and_reads_after_writes(far_cluster, tmp_path):
    big, small = random_bytes(8 * 2**20 + 77, 1), random_bytes(3000, 2)
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    with far_cluster.client(timeout=20.0) as c:
        c.put(str(src), "far/big")
        c.put_bytes(small, "far/small")
        out = tmp_path / "out.bin"
        c.get("far/big", str(out))  # cold: every chunk from S3, the reads side by side
        assert out.read_bytes() == big
        c.get("far/big", str(out))  # warm: from the cache
        assert out.read_bytes() == big
        assert c.get_bytes("far/small") == small
        c.put_bytes(b"new", "far/small")
        assert c.get_bytes("far/small") == b"new"  # read-after-write, the cache told first
        c.rm("far/big")
        with pytest.raises(NotFound):
            c.get_bytes("far/big")
