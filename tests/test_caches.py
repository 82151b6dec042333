"""Several cache workers share the key space (issue 16): rendezvous hashing on the name and the
chunk hash, so each key has one owner; the broker routes by it; a worker that leaves or joins
moves only its share; misses for one key still make one storage fetch."""

import threading

import pytest
from conftest import random_bytes, wait_for
from storage_helpers import h

from fms import wire as p
from fms.broker import rendezvous
from fms.errors import BadRequest

MiB = 1024 * 1024


def owners(keys, workers) -> dict:
    return {key: rendezvous(key, workers) for key in keys}


def test_each_key_has_one_owner_and_a_joining_worker_takes_only_its_share():
    keys = [f"name-{i}" for i in range(3000)] + [h(b"%d" % i) for i in range(3000)]
    three = owners(keys, ["cache-1", "cache-2", "cache-3"])
    assert three == owners(keys, ["cache-3", "cache-1", "cache-2"])  # order does not matter
    shares = {w: sum(o == w for o in three.values()) for w in ("cache-1", "cache-2", "cache-3")}
    assert min(shares.values()) > 0.28 * len(keys), shares  # about a third each
    four = owners(keys, ["cache-1", "cache-2", "cache-3", "cache-4"])
    moved = [k for k in keys if four[k] != three[k]]
    assert all(four[k] == "cache-4" for k in moved)  # only to the new one
    assert 0.2 * len(keys) < len(moved) < 0.3 * len(keys)  # about a quarter
    two = owners(keys, ["cache-1", "cache-3"])  # cache-2 leaves
    assert all(two[k] == three[k] for k in keys if three[k] != "cache-2")


def start(make_cluster, caches: int, delay: float = 0.0):
    """A cluster with ``caches`` cache workers; :return: it, and the cache processes by id."""
    cluster = make_cluster()
    cluster.start_broker()
    procs = {f"cache-{i}": cluster.start_cache(wid=f"cache-{i}") for i in range(1, caches + 1)}
    for wid in ("storage-a", "storage-b"):
        cluster.start_storage(wid=wid, delay=delay)
    cluster.wait_workers(storage=2, cache=caches)
    return cluster, procs


def storage_served(cluster) -> int:
    return sum(n for w, n in cluster.served().items() if w.startswith("storage"))


@pytest.mark.parametrize("caches", [2, 3])
def test_concurrent_misses_make_one_storage_fetch_per_key_with_several_caches(make_cluster, caches):
    cluster, _ = start(make_cluster, caches, delay=0.05)
    data = random_bytes(3 * MiB + 5, 16)
    with cluster.client() as c:
        c.put_bytes(data, "cold")
    before = storage_served(cluster)
    results, errors = [], []

    def read():
        try:
            with cluster.client() as reader:
                results.append(reader.get_bytes("cold"))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == [data] * 6
    assert storage_served(cluster) - before == 1 + 4  # the manifest and 4 chunks, once each
    with cluster.client() as c:
        assert c.get_bytes("cold") == data  # now all from the caches
        figures = c.status()["cache"]
    assert storage_served(cluster) - before == 5
    assert figures["get_hits"] >= 1


def test_keys_spread_over_the_caches_and_a_dead_cache_moves_only_its_share(make_cluster):
    cluster, procs = start(make_cluster, 3)
    files = {f"f{i}": random_bytes(2000 + i, i) for i in range(60)}
    with cluster.client() as c:
        for name, data in files.items():
            c.put_bytes(data, name)
        for name, data in files.items():
            assert c.get_bytes(name) == data  # fills each name at its owner
        served = {w: n for w, n in cluster.served().items() if w.startswith("cache")}
        assert min(served.values()) >= 8, served  # about 20 names each
        victim = rendezvous("f0", ["cache-1", "cache-2", "cache-3"])
        procs[victim].kill()
        wait_for(lambda: len(cluster.workers("cache")) == 2, 10, "the broker to drop it")
        before = storage_served(cluster)
        for name, data in files.items():
            assert c.get_bytes(name) == data
        refetched = storage_served(cluster) - before
    lost = sum(rendezvous(n, ["cache-1", "cache-2", "cache-3"]) == victim for n in files)
    assert refetched == lost  # only the dead cache's names


def test_no_cache_reads_and_files_over_max_file_skip_the_cache(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache_with(["--max-file", "1M"])
    cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=1, cache=1)
    small, large = random_bytes(300_000, 1), random_bytes(2 * MiB, 2)
    with cluster.client() as c:
        c.put_bytes(small, "small")
        c.put_bytes(large, "large")
    before = cluster.served()["cache-1"]
    got = cluster.cli("get", "--no-cache", "small", str(tmp_path / "small"))
    assert got.returncode == 0 and (tmp_path / "small").read_bytes() == small
    assert cluster.served()["cache-1"] == before  # not even the manifest
    with cluster.client() as c:
        assert c.get_bytes("large") == large  # manifest from the cache,
        assert cluster.served()["cache-1"] == before + 1  # its chunks from storage
        assert c.cache_stats()["entries"] == 0
        assert c.status()["cache"]["get_misses"] == 1


def test_read_tally_counts_a_get_as_a_hit_only_when_every_piece_came_from_the_cache():
    from fms.metrics import ReadTally

    tally = ReadTally()
    tally.get_answered(b"c", 1, "hit", 0, 100)  # a small file, inline: a hit
    tally.get_answered(b"c", 2, "hit", 2, 0)  # a manifest hit, 2 chunks to come
    tally.chunk_answered(b"c", 2, "hit", 1000)
    tally.chunk_answered(b"c", 2, "miss", 1000)  # one chunk from storage: a miss
    tally.get_answered(b"c", 3, "hit", 1, 0)
    tally.chunk_answered(b"c", 3, "hit", 500)
    tally.get_answered(b"d", 4, "hit", 3, 0)  # abandoned: its client left
    tally.chunk_answered(b"d", 4, "hit", 500)
    tally.client_gone(b"d")
    tally.chunk_answered(b"d", 4, "hit", 500)
    tally.chunk_answered(b"e", 9, None, 700)  # --no-cache: not a GET through it
    tally.batch_answered(3, 2)
    assert tally.figures() == {
        "get_hits": 2 + 3,
        "get_misses": 1 + 2,
        "bytes_hit": 100 + 1000 + 500 + 500 + 500,
        "bytes_missed": 1000,
    }


def test_a_chunk_request_tagged_with_junk_is_answered_and_crashes_nothing(make_cluster):
    cluster, _ = start(make_cluster, 2)
    data = random_bytes(2 * MiB, 3)
    with cluster.client() as c:
        c.put_bytes(data, "f")
        digest = h(data[:MiB])
        for junk in ([1, 2], {"a": 1}, True, "x" * 1000):  # refused by the one table of fields
            with pytest.raises(BadRequest, match="field 'of'"):
                c.call("chunk", hash=digest, of=junk)
        _, frame = c.call("chunk", hash=digest, of=None)  # nil: as absent
        assert bytes(p.unpack_data(frame.buffer)) == data[:MiB]
        assert c.get_bytes("f") == data
        assert c.status()["cache"]["get_misses"] == 1
    assert "message_handling_crashed" not in cluster.procs[0].log()


def test_the_per_request_figures_are_exported_as_prometheus_counters_and_histograms():
    """The figures the broker counts for every request are plain numbers, turned into metrics
    when /metrics is scraped: counts, a histogram whose buckets add up (cumulative, the last
    +Inf equal to the count) and whose sum is the seconds, and the cache's counters."""
    from prometheus_client import generate_latest

    from fms.metrics import LATENCY_BUCKETS, BrokerMetrics

    m = BrokerMetrics()
    for seconds in (0.0002, 0.0005, 0.003, 0.003, 30.0):  # 0.0005: on a bound, counted in it
        m.answered("get", "ok", seconds)
    m.answered("stat", "not_found", 0.02)
    m.cache_hits += 2
    m.cache_misses += 1
    m.reads.get_answered(b"c", 1, "hit", 0, 100)
    m.reads.get_answered(b"c", 2, "miss", 0, 40)
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in generate_latest(m.registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    get = 'op="get",outcome="ok"'
    assert samples[f"fms_requests_total{{{get}}}"] == 5
    assert samples['fms_requests_total{op="stat",outcome="not_found"}'] == 1
    assert samples[f"fms_request_duration_seconds_count{{{get}}}"] == 5
    assert samples[f"fms_request_duration_seconds_sum{{{get}}}"] == pytest.approx(30.0067)
    buckets = [
        samples[f'fms_request_duration_seconds_bucket{{le="{b}",{get}}}']
        for b in ("0.0005", "0.001", "0.0025", "0.005", "10.0", "+Inf")
    ]
    assert buckets == [2, 2, 2, 4, 4, 5]
    assert (
        len(
            [
                k
                for k in samples
                if k.startswith("fms_request_duration_seconds_bucket{") and get in k
            ]
        )
        == len(LATENCY_BUCKETS) + 1
    )
    assert samples["fms_cache_hits_total"] == 2 and samples["fms_cache_misses_total"] == 1
    assert samples["fms_cache_get_hits_total"] == 1 and samples["fms_cache_get_misses_total"] == 1
    assert samples["fms_cache_bytes_hit_total"] == 100
    assert samples["fms_cache_bytes_missed_total"] == 40
