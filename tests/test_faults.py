"""Faults injected into real processes: what must survive them."""

import threading

from fms import protocol as p
from tests.conftest import random_bytes, wait_for

MiB = p.MiB


def test_get_survives_a_storage_worker_killed_mid_transfer(make_cluster, tmp_path):
    """kill -9 of a storage worker in the middle of a cold get of a 40 MiB file: the broker
    hands that worker's outstanding requests to the other one and the get completes."""
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache(max_bytes="256M")
    victim = cluster.start_storage(wid="storage-a", extra=["--read-delay", "0.05"])
    cluster.start_storage(wid="storage-b", extra=["--read-delay", "0.05"])
    cluster.wait_workers(storage=2, cache=1)
    data = random_bytes(40 * MiB, 40)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    result = {}
    with cluster.client() as c:
        c.put(str(src), "big")
        start = c.cache_stats()["fetches"]

        def download():
            try:
                with cluster.client(timeout=5.0) as reader:
                    result["data"] = reader.get_bytes("big")
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        thread = threading.Thread(target=download)
        thread.start()
        wait_for(lambda: c.cache_stats()["fetches"] - start >= 10, 30, "the get to be under way")
        victim.kill()
        thread.join(60)
        assert not thread.is_alive(), "the get hung"
    assert "error" not in result, result.get("error")
    assert result["data"] == data
    assert [w["id"] for w in cluster.workers("storage")] == ["storage-b"]
