"""The real-server fixtures of tests/servers.py work: connect, use, restart, reconnect."""

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
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
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
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (other.rsplit("/", 1)[1],)).fetchone() is None


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
