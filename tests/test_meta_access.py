"""The metadata engine's access part (identities, grants, chunk owners, holds, purge, audit), one
suite run against every engine: SQLite and PostgreSQL (the ``engine`` fixture)."""

import pytest
from storage_helpers import h, new_version, split
from test_meta_engine import ENGINES, NOW, claim_all, commit, remove, second_connection

from fms.errors import BadRequest, NotFound
from fms.storage.model import Copy, Removal


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tmp_path):
    meta = ENGINES[request.param](request, tmp_path)
    yield meta
    meta.close()


def test_identities_keys_and_grants_round_trip_and_bump_the_epoch(engine):
    start = engine.access_epoch()
    engine.add_identity("alice", NOW, "admin")
    engine.add_credential("alice", "curve", "K" * 40, NOW, "admin")
    engine.add_credential("alice", "s3", "AKIAALICE", NOW, "admin", secret="s3cr3t")
    engine.set_grant("alice", "write", "alice", NOW, "admin")
    engine.set_grant("alice", "read", "shared", NOW, "admin")
    engine.set_grant("alice", "admin", "shared", NOW, "admin")  # replaces read there
    assert engine.access_epoch() == start + 6
    [alice] = engine.identities()
    assert alice["name"] == "alice" and alice["gateway"] is False
    assert {(k["kind"], k["key"]) for k in alice["keys"]} == {
        ("curve", "K" * 40),
        ("s3", "AKIAALICE"),
    }
    assert "secret" not in str(alice)  # id ls never shows an S3 secret
    assert alice["grants"] == [
        {"role": "write", "prefix": "alice"},
        {"role": "admin", "prefix": "shared"},
    ]
    epoch, snapshot = engine.access_snapshot()
    assert epoch == start + 6
    assert snapshot == [("alice", ["K" * 40], [("write", "alice"), ("admin", "shared")], False)]
    assert engine.s3_credential("AKIAALICE") == ("alice", "s3cr3t")
    assert engine.s3_credential("nope") is None


def test_identity_mistakes_are_refused_and_change_nothing(engine):
    engine.add_identity("bob", NOW, "admin")
    engine.add_credential("bob", "curve", "B" * 40, NOW, "admin")
    epoch = engine.access_epoch()
    with pytest.raises(BadRequest, match="exists already"):
        engine.add_identity("bob", NOW, "admin")
    engine.add_identity("eve", NOW, "admin")
    with pytest.raises(BadRequest, match="belongs to identity 'bob'"):
        engine.add_credential("eve", "curve", "B" * 40, NOW, "admin")
    with pytest.raises(NotFound, match="no identity 'carol'"):
        engine.set_grant("carol", "read", "", NOW, "admin")
    with pytest.raises(NotFound, match="no grant on 'x'"):
        engine.revoke("bob", "x", NOW, "admin")
    with pytest.raises(NotFound):
        engine.remove_credential("bob", "nope", NOW, "admin")
    assert engine.access_epoch() == epoch + 1  # eve's add only


def test_removing_an_identity_removes_its_keys_grants_and_chunks(engine):
    engine.add_identity("bob", NOW, "admin")
    engine.add_credential("bob", "curve", "B" * 40, NOW, "admin")
    engine.set_grant("bob", "write", "bob", NOW, "admin")
    engine.own("bob", [b"\1" * 32])
    engine.remove_identity("bob", NOW, "admin")
    assert engine.identities() == [] and engine.access_snapshot()[1] == []
    assert engine.owned("bob", [b"\1" * 32]) == set()
    engine.add_identity("bob", NOW, "admin")  # the name can be used again, with nothing
    assert engine.identities()[0]["keys"] == [] and engine.identities()[0]["grants"] == []
    with pytest.raises(NotFound):
        engine.remove_identity("nobody", NOW, "admin")


def test_a_second_worker_sees_every_access_change_by_the_epoch(engine):
    other = second_connection(engine)
    try:
        before = other.access_epoch()
        engine.add_identity("alice", NOW, "admin")
        engine.set_grant("alice", "read", "a", NOW, "admin")
        assert other.access_epoch() == before + 2
        assert other.access_snapshot()[1] == [("alice", [], [("read", "a")], False)]
        other.revoke("alice", "a", NOW, "admin")
        assert engine.access_snapshot() == (before + 3, [("alice", [], [], False)])
    finally:
        other.close()


def test_the_first_admin_is_made_once_per_store(engine):
    assert engine.first_admin("admin", "A" * 40, NOW) is True
    assert engine.first_admin("admin", "Z" * 40, NOW) is False
    engine.remove_identity("admin", NOW, "admin")
    assert engine.first_admin("admin", "Z" * 40, NOW) is False  # never again, whatever happened
    assert engine.identities() == []
    [entry] = [e for e in engine.audit_read(0, 0, 100) if e["op"] == "id add"]
    assert entry["identity"] == "system" and entry["role"] == "admin"


def test_chunk_owners(engine):
    a, b = b"\1" * 32, b"\2" * 32
    assert engine.own("bob", [a, a]) == {a}
    assert engine.own("bob", [a, b]) == {b}
    assert engine.owned("bob", [a, b, b"\3" * 32]) == {a, b}
    assert engine.owned("alice", [a, b]) == set()
    engine.disown([a])
    assert engine.owned("bob", [a, b]) == {b}


def test_held_versions_outlive_any_change_until_their_time(engine):
    engine.keep_versions, engine.keep_for = 1, 100.0
    for i in range(5):
        commit(engine, "n", f"v{i}".encode() * 2000, f"c{i}", now=NOW + i)
    # Four versions replaced, all held: none was pushed out by the count.
    assert [v.version for v in engine.retained("n")] == [4, 3, 2, 1]
    remove(engine, "n", "rm-1", now=NOW + 5)
    assert [v.version for v in engine.retained("n")] == [5, 4, 3, 2, 1]
    assert engine.expire_holds(NOW + 50, 100) == 0  # not yet
    assert engine.expire_holds(NOW + 103.5, 100) == 3  # versions 1..3 ran out: pushed out
    assert [v.version for v in engine.retained("n")] == [5, 4]  # still held
    assert engine.expire_holds(NOW + 200, 100) == 1
    assert [v.version for v in engine.retained("n")] == [5]
    assert engine.refcount_errors() == []


def test_a_hold_is_fixed_when_its_version_is_replaced_a_shorter_keep_for_does_not_shorten_it(
    engine,
):
    """Retention is the storage workers' setting, and a hold is written with its end: a worker
    started again with a shorter --keep-for (or none) does not free what was held before."""
    engine.keep_versions, engine.keep_for = 1, 100.0
    for i in range(3):
        commit(engine, "n", f"v{i}".encode() * 2000, f"c{i}", now=NOW + i)
    assert [v.version for v in engine.retained("n")] == [2, 1]
    engine.keep_versions, engine.keep_for = 0, 0.0  # restarted without retention
    commit(engine, "n", b"v3" * 2000, "c3", now=NOW + 10)
    remove(engine, "n", "rm-1", now=NOW + 11)
    assert [v.version for v in engine.retained("n")] == [2, 1]  # still held; 3 and 4 not kept
    assert engine.expire_holds(NOW + 50, 100) == 0
    assert engine.expire_holds(NOW + 102, 100) == 2  # their own time, as written
    assert engine.retained("n") == [] and engine.refcount_errors() == []


def test_without_keep_for_the_count_alone_decides_as_before(engine):
    engine.keep_versions = 2
    for i in range(5):
        commit(engine, "n", f"v{i}".encode() * 2000, f"c{i}")
    assert [v.version for v in engine.retained("n")] == [4, 3]
    assert engine.refcount_errors() == []


def test_purge_removes_versions_for_good_held_or_not(engine):
    engine.keep_versions, engine.keep_for = 3, 1000.0
    for i in range(3):
        commit(engine, "shadow", f"secret{i}".encode() * 2000, f"c{i}")
    files = engine.totals().files
    assert engine.purge("shadow", 1, False, NOW, "root") == [1]
    assert [v.version for v in engine.retained("shadow")] == [2]
    with pytest.raises(NotFound, match="no version 1"):
        engine.purge("shadow", 1, False, NOW, "root")
    assert engine.purge("shadow", 3, False, NOW, "root") == [3]  # the current one
    assert engine.get("shadow") is None and engine.totals().files == files - 1
    assert [v.version for v in engine.retained("shadow")] == [2]  # not retained: purged
    assert engine.purge("shadow", None, True, NOW, "root") == [2]
    assert engine.retained("shadow") == [] and engine.get("shadow") is None
    assert engine.refcount_errors() == []
    # Every chunk of it is unreferenced now: gc frees it.
    secret = {h(c) for i in range(3) for c in split(f"secret{i}".encode() * 2000)}
    assert all(engine.chunk(d).refs == 0 for d in secret)
    assert secret <= {row.digest for row in engine.doom(NOW + 10, 100, dry_run=True)}
    entries = [e for e in engine.audit_read(0, 0, 100) if e["op"] == "purge"]
    assert [e["versions"] for e in entries] == [[1], [3], [2]]
    assert {e["identity"] for e in entries} == {"root"}
    # The name starts again from version 1: nothing of it is left.
    assert commit(engine, "shadow", b"new" * 100, "c9").version == 1
    with pytest.raises(NotFound):
        engine.purge("never", None, True, NOW, "root")


def test_every_change_is_in_the_audit_log_with_its_actor(engine):
    claim_all(engine, b"x" * 5000)
    changes = [
        new_version("a", b"x" * 5000, "c1"),
        Copy("a", "b", "c2", actor="bob"),
        Copy("b", "c", "c3", move=True, actor="bob"),
        Removal("a", "r1", actor="alice"),
        Removal("c", "r2", actor="alice", prefix=""),
    ]
    from dataclasses import replace

    changes[0] = replace(changes[0], actor="alice")
    results = engine.apply(changes, NOW, {})
    assert not any(isinstance(r, Exception) for r in results)
    engine.apply([new_version("a", b"x" * 5000, "c1")], NOW, {})  # a retry: not a new change
    log = engine.audit_read(0, 0, 100)
    assert [(e["op"], e["identity"], e["names"]) for e in log] == [
        ("put", "alice", ["a"]),
        ("cp", "bob", ["a", "b"]),
        ("mv", "bob", ["b", "c"]),
        ("rm", "alice", ["a"]),
        ("rm -r", "alice", ["c"]),
    ]
    assert all(e["result"] == "ok" and e["time"] == NOW for e in log)
    assert log[0]["versions"] == [1] and log[0]["size"] == 5000
    assert [e["op"] for e in engine.audit_read(0, log[1]["seq"], 2)] == ["mv", "rm"]
    engine.audit_write([{"time": NOW + 10, "identity": "eve", "op": "rm", "result": "forbidden"}])
    assert [e["identity"] for e in engine.audit_read(NOW + 5, 0, 100)] == ["eve"]
    assert engine.prune_audit(NOW + 1) == 5
    assert [e["identity"] for e in engine.audit_read(0, 0, 100)] == ["eve"]


def test_a_repeated_access_change_returns_its_first_answer_once(engine):
    made = engine.add_identity("gw", NOW, "admin", s3=("FMSKEY1", "secret1"), commit="a1")
    epoch, log = engine.access_epoch(), len(engine.audit_read(0, 0, 100))
    again = engine.add_identity("gw", NOW, "admin", s3=("FMSKEY2", "secret2"), commit="a1")
    assert again == made == {"s3": {"access_key": "FMSKEY1", "secret": "secret1"}}
    assert engine.access_epoch() == epoch and len(engine.audit_read(0, 0, 100)) == log
    assert engine.s3_credential("FMSKEY2") is None
    engine.set_grant("gw", "read", "x", NOW, "admin", commit="g1")
    engine.revoke("gw", "x", NOW, "admin", commit="r1")
    engine.revoke("gw", "x", NOW, "admin", commit="r1")  # sent again: not "no grant"
    with pytest.raises(BadRequest, match="already used"):
        engine.remove_identity("gw", NOW, "admin", commit="g1")
    engine.keep_versions = 2
    commit(engine, "f", b"1" * 5000, "c1")
    commit(engine, "f", b"2" * 5000, "c2")
    assert engine.purge("f", 1, False, NOW, "admin", commit="p1") == [1]
    assert engine.purge("f", 1, False, NOW, "admin", commit="p1") == [1]
