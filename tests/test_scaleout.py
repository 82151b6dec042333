"""Storage workers over PostgreSQL and S3 (SeaweedFS): real servers, no shared filesystem.

Each worker gets its own empty ``--data`` (scratch); the store is the database plus the bucket.
"""

import os
import subprocess
import sys
import threading

import pytest
from conftest import ROOT, random_bytes, wait_for

from fms import wire as p

MiB = p.MiB


@pytest.fixture
def backends(request, monkeypatch, pg_database_url):
    """--meta and --chunks for a fresh store; the S3 settings in the environment of every
    process the test starts (the AWS SDK's standard variables)."""
    s3 = request.getfixturevalue("s3")
    bucket = request.getfixturevalue("s3_bucket")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return ["--meta", pg_database_url, "--chunks", f"s3://{bucket}/fms"]


def start(cluster, tmp_path, backends, wid, delay=0.0):
    return cluster.start_storage(
        data=str(tmp_path / f"scratch-{wid}"), wid=wid, extra=backends, delay=delay
    )


def files_in(folder) -> list:
    return [os.path.join(root, f) for root, _dirs, names in os.walk(folder) for f in names]


def test_workers_share_a_store_through_postgres_and_s3_and_keep_nothing(
    make_cluster, tmp_path, backends
):
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_cache()
    start(cluster, tmp_path, backends, "storage-a")
    start(cluster, tmp_path, backends, "storage-b")
    cluster.wait_workers(storage=2, cache=1)
    big, small = random_bytes(5 * MiB + 3, 1), b"small file"
    with cluster.client() as c:
        c.put_bytes(big, "big")
        c.put_bytes(small, "dir/small")
        assert c.get_bytes("big") == big and c.get_bytes("dir/small") == small
    served = cluster.served()
    assert served["storage-a"] > 0 and served["storage-b"] > 0  # both took part
    for wid in ("storage-a", "storage-b"):  # only scratch, and empty
        assert files_in(tmp_path / f"scratch-{wid}") == []
    for proc in [p_ for p_ in cluster.procs if p_.name.startswith("storage")]:
        proc.kill()
    start(cluster, tmp_path, backends, "storage-c")  # a new host, empty disk
    cluster.wait_workers(storage=1, cache=1)
    with cluster.client() as c:
        c.rm("dir/small")
        assert c.stat("big")["size"] == len(big)
        cache_off = c.get_bytes("big")  # from the cache or storage
        assert cache_off == big
        for i in range(3):
            c.put_bytes(random_bytes(2 * MiB, 10 + i), "big")  # overwrites leave garbage
    gc_out = cluster.cli("gc", "--grace", "0")
    # garbage: the first big (6 chunks), the small file (1), two overwritten versions (2 + 2)
    assert gc_out.returncode == 0 and b"freed 11 chunks" in gc_out.stdout, gc_out.stdout
    assert cluster.cli("fsck").returncode == 0


def test_a_worker_killed_mid_transfer_costs_only_a_retry(make_cluster, tmp_path, backends):
    cluster = make_cluster()
    cluster.start_broker()
    victim = start(cluster, tmp_path, backends, "storage-a", delay=0.01)
    start(cluster, tmp_path, backends, "storage-b", delay=0.01)
    cluster.wait_workers(storage=2, cache=0)
    data = random_bytes(24 * MiB, 5)
    src = tmp_path / "src"
    src.write_bytes(data)
    upload = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "client.py"),
            "--broker",
            cluster.frontend,
            "put",
            str(src),
            "f",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: cluster.served().get("storage-a", 0) > 3, 30, "the upload to reach storage-a"
        )
        victim.kill()
        _, err = upload.communicate(timeout=120)
    finally:
        upload.kill()
    assert upload.returncode == 0, err
    got = cluster.cli("get", "f", "-")
    assert got.returncode == 0 and got.stdout == data


@pytest.mark.parametrize("problem", ["no bucket", "wrong key", "no endpoint", "no database"])
def test_a_backend_that_cannot_be_used_is_a_clear_error_at_start(
    make_cluster, tmp_path, backends, monkeypatch, problem
):
    cluster = make_cluster()
    cluster.start_broker()
    args = list(backends)
    if problem == "no bucket":
        args[3] = "s3://no-such-bucket-here/fms"
        expect = b"does not exist"
    elif problem == "wrong key":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        expect = b"refused these credentials"
    elif problem == "no endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        expect = b"cannot reach the S3 endpoint"
    else:
        args[1] = args[1].rsplit("/", 1)[0] + "/no_such_database"
        expect = b"cannot use PostgreSQL"
    proc = start(cluster, tmp_path, args, "storage-a")
    proc.popen.wait(60)
    assert proc.popen.returncode == 1
    assert expect in proc.log().encode() and b"Traceback" not in proc.log().encode(), proc.log()


def _load(cluster, stop, errors, counts, k):
    with cluster.client(timeout=5.0) as c:
        i = 0
        while not stop.is_set():
            data = b"%d-%d" % (k, i) * 20000 if i % 2 else b"%d-%d" % (k, i)
            try:
                c.put_bytes(data, f"load/{k}")
                got = c.get_bytes(f"load/{k}")
                if got != data:
                    errors.append(f"stale or wrong content for load/{k}")
                counts[k] = counts.get(k, 0) + 1
            except fms_errors() as exc:  # retried inside; what reaches us must be clear
                counts[f"err-{type(exc).__name__}"] = counts.get(f"err-{type(exc).__name__}", 0) + 1
            i += 1


def fms_errors():
    from fms.errors import Timeout, Unavailable

    return (Unavailable, Timeout)


@pytest.mark.parametrize("server", ["postgres", "s3"])
def test_database_or_object_store_restarted_under_load(
    make_cluster, tmp_path, backends, request, server
):
    cluster = make_cluster()
    cluster.start_broker()
    start(cluster, tmp_path, backends, "storage-a")
    start(cluster, tmp_path, backends, "storage-b")
    cluster.wait_workers(storage=2, cache=0)
    stop, errors, counts = threading.Event(), [], {}
    threads = [
        threading.Thread(target=_load, args=(cluster, stop, errors, counts, k)) for k in range(3)
    ]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: sum(v for k, v in counts.items() if isinstance(k, int)) >= 10, 30, "load to run"
        )
        target = request.getfixturevalue("postgres" if server == "postgres" else "s3")
        felt = "event=database_unreachable" if server == "postgres" else "event=object_store_error"
        target.stop()
        try:  # the outage lasts until a worker has felt it (clients retry meanwhile)
            wait_for(lambda: felt in cluster.logs(), 60, f"a worker to log {felt}")
        finally:
            target.start()
        before = sum(v for k, v in counts.items() if isinstance(k, int))
        wait_for(
            lambda: sum(v for k, v in counts.items() if isinstance(k, int)) >= before + 10,
            60,
            "service to resume after the restart",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert all(proc.alive() for proc in cluster.procs), cluster.logs()  # the workers rode it
    assert "Traceback" not in cluster.logs()
    assert cluster.cli("fsck").returncode == 0


@pytest.mark.parametrize("down", ["s3", "postgres"])
def test_fsck_answers_unavailable_within_the_usual_budget_when_a_backend_is_down(
    make_cluster, tmp_path, backends, request, down
):
    """With the object store or the database down, fsck says so as every other command does,
    within the client's budget (its timeout x 3 tries: 15 s by default, 6 s here, and one page's
    failed try), instead of retrying for as long as a pass may take (686 s printing nothing,
    one chunk tried 265 times)."""
    cluster = make_cluster()
    cluster.start_broker()
    start(cluster, tmp_path, backends, "storage-a")
    cluster.wait_workers(storage=1, cache=0)
    with cluster.client() as c:
        c.put_bytes(random_bytes(3 * MiB, 21), "f")
    assert cluster.cli("fsck").returncode == 0
    server = request.getfixturevalue(down)
    server.stop()
    try:
        # Retrying for as long as a pass may take would run into the command's 40 s limit.
        out = cluster.cli("fsck", "--timeout", "2", timeout=40)
    finally:
        server.start()
    assert out.returncode != 0, out.stdout
    assert {"s3": b"object store", "postgres": b"database"}[down] in out.stderr, out.stderr
    assert cluster.cli("fsck").returncode == 0  # and works again once it is back
