"""The real-server fixtures of tests/servers.py work: connect, use, restart, reconnect."""

import os
import subprocess
import sys

import psycopg
import pytest

pytest_plugins = ["servers"]


def test_postgres_select_1(postgres_url):
    with psycopg.connect(postgres_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        assert conn.execute("SHOW server_version_num").fetchone()[0] >= "150000"


def test_pg_database_url_is_fresh_and_dropped(postgres, pg_database_url):
    with psycopg.connect(pg_database_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone() == (0,)
        conn.execute("CREATE TABLE t (k text PRIMARY KEY)")
    other = postgres.new_database()
    try:
        assert other != pg_database_url
        with psycopg.connect(other) as conn:
            assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
    finally:
        postgres.drop_database(other)
    with postgres.admin() as conn:
        assert (
            conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (other.rsplit("/", 1)[1],)
            ).fetchone()
            is None
        )


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_keeps_data_and_port(postgres, pg_database_url, mode):
    with psycopg.connect(pg_database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (k int)")
        conn.execute("INSERT INTO t VALUES (42)")
    port = postgres.port
    conn = psycopg.connect(pg_database_url, autocommit=True)
    try:
        postgres.restart(mode)
        assert postgres.port == port
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with psycopg.connect(pg_database_url) as conn:
        assert conn.execute("SELECT k FROM t").fetchall() == [(42,)]


def test_postgres_stop_then_start(postgres, pg_database_url):
    postgres.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_database_url, connect_timeout=2)
    postgres.start()
    with psycopg.connect(pg_database_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_s3_put_get_list(s3, s3_bucket):
    c = s3.client()
    body = os.urandom(1 << 20)
    c.put_object(Bucket=s3_bucket, Key="chunks/ab/cd", Body=body)
    assert c.get_object(Bucket=s3_bucket, Key="chunks/ab/cd")["Body"].read() == body
    assert [o["Key"] for o in c.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["chunks/ab/cd"]
    assert s3_bucket in [b["Name"] for b in c.list_buckets()["Buckets"]]
    other = s3.make_bucket()
    try:
        assert other != s3_bucket
        assert c.list_objects_v2(Bucket=other).get("KeyCount", 0) == 0
    finally:
        s3.delete_bucket(other)


def test_s3_wrong_secret_is_refused(s3):
    import boto3
    from botocore.exceptions import ClientError

    bad = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key="wrong" + s3.secret_key,
        region_name=s3.region,
    )
    with pytest.raises(ClientError) as e:
        bad.list_buckets()
    assert e.value.response["Error"]["Code"] in (
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidAccessKeyId",
    )


def test_s3_env_for_subprocesses(s3, s3_bucket):
    """A subprocess configured only by the AWS SDK's standard variables reaches the bucket."""
    code = (
        "import boto3,sys; c=boto3.client('s3'); "
        "c.put_object(Bucket=sys.argv[1], Key='k', Body=b'v'); print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env())
    out = subprocess.run(
        [sys.executable, "-c", code, s3_bucket], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "ok", out.stderr
    assert s3.client().get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"


@pytest.mark.parametrize(
    "graceful", [False, pytest.param(True, marks=[pytest.mark.slow, pytest.mark.timeout(600)])]
)
def test_s3_stop_start_keeps_data_and_port(s3, s3_bucket, graceful):
    from botocore.exceptions import EndpointConnectionError

    c = s3.client()
    c.put_object(Bucket=s3_bucket, Key="k", Body=b"durable")
    endpoint = s3.endpoint_url
    s3.stop(graceful=graceful)
    with pytest.raises(EndpointConnectionError):
        s3.client(retries={"max_attempts": 1}).list_buckets()
    s3.start()
    assert s3.endpoint_url == endpoint
    assert c.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"durable"
    print(
        f"SeaweedFS stop ({'SIGTERM' if graceful else 'SIGKILL'}): {s3.stop_seconds:.2f} s, "
        f"start: {s3.start_seconds:.2f} s"
    )


def test_restart_from_a_helper_thread_survives_the_thread(postgres, pg_database_url, s3, s3_bucket):
    """A fault injector thread may restart the servers: they must outlive that thread."""
    import threading

    t = threading.Thread(target=lambda: (postgres.restart(), s3.restart()))
    t.start()
    t.join(120)
    assert not t.is_alive()
    with psycopg.connect(pg_database_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    s3.client().put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert postgres.running() and s3.running()
