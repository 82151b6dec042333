"""Bounded memory (DESIGN.md invariant 4): moving a 2 GiB file keeps every process well under
150 MiB peak RSS.  Slow (several GiB of disk traffic): run with ``pytest -m slow``."""

import hashlib
import os
import resource

import pytest

from fms import wire as p

FILE_SIZE = 2 * p.GiB
RSS_LIMIT = 150 * p.MiB


@pytest.mark.slow
@pytest.mark.timeout(900)  # 2 GiB up and down, hashed at each end, on a loaded machine
def test_moving_a_2_gib_file_keeps_every_process_under_150_mib(make_cluster, tmp_path):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache(max_bytes="3G")
    cluster.start_storage(wid="storage-a")
    cluster.start_storage(wid="storage-b")
    cluster.wait_workers(storage=2, cache=1)

    src = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(FILE_SIZE // p.MiB):
            block = os.urandom(p.MiB)
            digest.update(block)
            f.write(block)

    for args in (
        ["put", str(src), "big"],  # PUT
        ["get", "big", str(tmp_path / "cold.bin")],  # cold GET: every chunk a miss
        ["get", "big", str(tmp_path / "warm.bin")],
    ):  # warm GET: every chunk a hit
        run = cluster.cli("--quiet", *args, timeout=900)
        assert run.returncode == 0, run.stderr
    for out in ("cold.bin", "warm.bin"):
        h = hashlib.sha256()
        with open(tmp_path / out, "rb") as f:
            while block := f.read(8 * p.MiB):
                h.update(block)
        assert h.digest() == digest.digest()

    peaks = cluster.peak_rss()
    # The CLI runs were children of this process, already waited for.
    peaks["client (largest of put/get)"] = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    )
    report = ", ".join(f"{name}={rss / p.MiB:.0f} MiB" for name, rss in peaks.items())
    print(f"peak RSS while moving 2 GiB: {report}")
    assert all(rss < RSS_LIMIT for rss in peaks.values()), report
