"""The metadata engine's contract, one suite run against every engine (``engine`` fixture).

A new engine (PostgreSQL) joins by adding a factory to ENGINES; nothing else changes.
"""

import pytest
from storage_helpers import CHUNK, digest_of, h, new_version, page_blobs, split

from fms import wire as p
from fms.errors import BadRequest, Conflict, MissingChunks, NotFound, TooLarge, Unavailable
from fms.storage.meta.sql import ConnectionLost, Retry, prefix_end
from fms.storage.meta.sqlite import SQLiteMeta
from fms.storage.model import Copy, Removal, Restore, Totals

NOW = 1_800_000_000.0


def sqlite_engine(request, tmp_path):
    return SQLiteMeta(str(tmp_path / "meta.db"))


def postgres_engine(request, tmp_path):
    from fms.storage.meta.postgres import PostgresMeta

    return PostgresMeta(request.getfixturevalue("pg_database_url"))


ENGINES = {"sqlite": sqlite_engine, "postgresql": postgres_engine}


@pytest.fixture(params=p.DIGEST_FUNCTIONS)
def store_digest(request) -> str:
    """Every test here runs against a store of each digest function (one suite)."""
    return request.param


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tmp_path):
    meta = ENGINES[request.param](request, tmp_path)
    yield meta
    meta.close()


def second_connection(engine):
    """Another engine on the same store (another worker)."""
    if isinstance(engine, SQLiteMeta):
        return SQLiteMeta(engine.path)
    return type(engine)(engine.url)


def claim_all(meta, content, now=NOW, in_engine=True):
    for chunk in split(content):
        meta.claim_chunk(h(chunk), len(chunk), now, chunk if in_engine else None)


def commit(meta, name, content, commit_id, now=NOW):
    claim_all(meta, content, now)
    for page_id, blob in page_blobs(content):
        meta.put_page(page_id, blob, now)
    [result] = meta.apply([new_version(name, content, commit_id)], now, {})
    if isinstance(result, Exception):
        raise result
    return result


def remove(meta, name, rm_id, now=NOW):
    [result] = meta.apply([Removal(name, rm_id)], now, {})
    if isinstance(result, Exception):
        raise result
    return result


def test_commit_get_and_versions(engine):
    v1 = commit(engine, "a/b", b"one" * 3000, "c1")
    v2 = commit(engine, "a/b", b"two" * 3000, "c2")
    assert (v1.version, v2.version) == (1, 2)
    got = engine.get("a/b")
    assert got.digest == digest_of(b"two" * 3000)
    # A commit made now answers its whole version (a fill on commit needs its chunk list).
    assert got.chunks == new_version("a/b", b"two" * 3000).chunks == v2.chunks
    assert engine.get("nope") is None


def test_get_many_and_small_chunks_read_a_batch_as_get_and_chunk_do(engine):
    for i in range(3):
        commit(engine, f"d/{i}", f"file {i}".encode(), f"c{i}")
    claim_all(engine, b"b" * 5000, in_engine=False)  # a blob: not kept in the engine
    commit(engine, "blob", b"b" * 5000, "cb")
    remove(engine, "d/2", "rm")
    names = ["d/0", "d/1", "d/2", "none", "d/0", "blob"]
    found = engine.get_many(names)
    assert found == {n: engine.get(n) for n in ("d/0", "d/1", "blob")}
    assert engine.get_many([]) == {}
    digests = [found[n].chunks[0] for n in ("d/0", "d/1", "blob")] + [h(b"nothing")]
    assert engine.small_chunks(digests) == {h(b"file 0"): b"file 0", h(b"file 1"): b"file 1"}
    with engine.snapshot():  # and inside a snapshot, as storage reads a batch
        assert engine.get_many(["d/1"]) == {"d/1": found["d/1"]}


def test_remove_leaves_a_tombstone_and_versions_keep_counting(engine):
    commit(engine, "n", b"data" * 2000, "c1")
    tomb = remove(engine, "n", "rm-1")
    assert tomb.deleted and tomb.version == 2
    assert engine.get("n") is None and engine.list("", "", 10) == []
    assert remove(engine, "n", "rm-1") == tomb  # a retried rm: the same answer
    with pytest.raises(NotFound):
        remove(engine, "n", "rm-2")
    assert commit(engine, "n", b"back", "c2").version == 3


def test_ids_are_idempotent_and_scoped_to_their_request(engine):
    first = commit(engine, "n", b"x" * 5000, "same")
    assert first.chunks is not None  # made now: with its lists
    again = commit(engine, "n", b"x" * 5000, "same")  # a retry: no new version, and its stat
    assert again == first.stat() and again.chunks is None  # (the name may have changed since)
    commit(engine, "n", b"y" * 5000, "other")
    assert commit(engine, "n", b"x" * 5000, "same") == first.stat()  # still what it made
    with pytest.raises(BadRequest, match="already used"):
        commit(engine, "m", b"x" * 5000, "same")  # another name
    with pytest.raises(BadRequest, match="already used"):
        commit(engine, "n", b"z" * 5000, "same")  # other content
    from dataclasses import replace

    [other_mtime] = engine.apply(
        [replace(new_version("n", b"x" * 5000, "same"), mtime=5.0)], NOW, {}
    )
    assert isinstance(other_mtime, BadRequest)  # same content, other mtime
    with pytest.raises(BadRequest, match="already used"):
        remove(engine, "n", "same")  # an rm reusing a commit's id
    assert engine.get("n").digest == digest_of(b"y" * 5000)  # nothing was applied


def test_commit_refuses_chunks_without_a_live_row(engine):
    content = b"a" * 4096 + b"b" * 4096 + b"c" * 100
    claim_all(engine, content[:4096])
    [result] = engine.apply([new_version("n", content, "c1")], NOW, {})
    assert isinstance(result, MissingChunks)
    assert set(result.missing) == {h(c) for c in split(content)[1:]}
    assert engine.get("n") is None


def test_group_commit_applies_each_change_on_its_own(engine):
    claim_all(engine, b"good")
    changes = [
        new_version("ok1", b"good", "c1"),
        new_version("bad", b"never claimed", "c2"),
        Removal("absent", "r1"),
        new_version("ok2", b"good", "c3"),
    ]
    results = engine.apply(changes, NOW, {})
    assert [type(r).__name__ for r in results] == [
        "Version",
        "MissingChunks",
        "NotFound",
        "Version",
    ]
    assert [v.name for v in engine.list("", "", 10)] == ["ok1", "ok2"]


def test_a_group_with_a_refused_change_leaves_only_the_others_made(engine):
    """A group is made first without a savepoint per change; a refusal rolls that attempt back
    whole and the group is made again, each change under a savepoint: what stands is exactly
    what the changes that passed made (names, totals, audit, the chunks they claimed)."""
    before, audited = engine.totals(), len(engine.audit_read(0, 0, 1000))
    changes = [new_version(f"ok{i}", b"content %d" % i, f"g{i}") for i in range(3)]
    # Refused after it claimed the first of its two chunks (its bytes came along); the second
    # was never stored.
    halves = [b"a" * CHUNK, b"never claimed"]
    bad = new_version("bad", b"".join(halves), "g-bad")
    small = {c.chunks[0]: b"content %d" % i for i, c in enumerate(changes)}
    small[bad.chunks[0]] = halves[0]
    results = engine.apply([changes[0], changes[1], bad, changes[2]], NOW, small)
    assert [type(r).__name__ for r in results] == ["Version", "Version", "MissingChunks", "Version"]
    assert [r.version for r in results if not isinstance(r, Exception)] == [1, 1, 1]
    after = engine.totals()
    assert (after.files - before.files, after.bytes - before.bytes) == (3, 3 * len(b"content 0"))
    assert after.chunks - before.chunks == 3
    assert len(engine.audit_read(0, 0, 1000)) == audited + 3
    assert [v.name for v in engine.list("", "", 10)] == ["ok0", "ok1", "ok2"]
    assert all(engine.chunk(c.chunks[0]).refs == 1 for c in changes)
    assert engine.chunk(bad.chunks[0]) is None


def test_a_group_answers_a_repeated_commit_from_the_log_and_refuses_a_reused_id(engine):
    """The commit ids of a group are looked up together: a repeat of a request already made is
    answered with what it made then, an id another request used is refused, the rest are made,
    also when the id was used earlier in the same group (as a change, or as the id a move
    makes for its source's removal, ID/src)."""
    first = commit(engine, "a", b"one", "r1")
    again = new_version("a", b"one", "r1")  # the same request again
    reused = new_version("b", b"two", "r1")  # another request with its id
    fresh = new_version("c", b"three", "r2")
    small = {again.chunks[0]: b"one", reused.chunks[0]: b"two", fresh.chunks[0]: b"three"}
    results = engine.apply([again, reused, fresh], NOW, small)
    assert (results[0].name, results[0].version, results[0].digest) == ("a", 1, first.digest)
    assert isinstance(results[1], BadRequest) and results[2].name == "c"
    assert engine.get("b") is None and engine.get("a").version == 1
    twice = [new_version("d", b"four", "r3"), new_version("e", b"five", "r3")]
    small = {twice[0].chunks[0]: b"four", twice[1].chunks[0]: b"five"}
    made, refused = engine.apply(twice, NOW, small)
    assert made.name == "d" and isinstance(refused, BadRequest) and engine.get("e") is None
    # A move logs its source's removal as "m/src": a change of the same group with that id is
    # refused as one that reuses an id, not failed by the log's unique key.
    moved, clash = engine.apply([Copy("c", "f", "m", move=True), Removal("d", "m/src")], NOW, {})
    assert moved.name == "f" and isinstance(clash, BadRequest) and "already used" in str(clash)
    assert engine.get("d") is not None


def test_an_engine_says_whether_its_writes_take_turns(engine):
    """SQLite's write transactions take turns on one lock; PostgreSQL's run side by side.
    Storage says which in ``ready`` (``serial``), and the broker packs a put -r's batches onto
    one worker only where they take turns."""
    assert engine.serial_writes is isinstance(engine, SQLiteMeta)


def test_a_group_made_again_after_a_refusal_is_retried_or_fails_whole(engine, monkeypatch):
    """The group's second attempt (a savepoint per change, after a refusal rolled the first
    back) is a transaction like the first: a deadlock in either attempt runs that attempt
    again from the start, never applying a change twice; a bug or a lost connection in it
    leaves nothing of the group and goes on to the caller."""
    audit = engine._audit
    calls: list[int] = []
    script: dict[int, BaseException] = {}

    def scripted(entry):  # the audit of a change made: fails as the script says
        calls.append(len(calls) + 1)
        if len(calls) in script:
            raise script[len(calls)]
        audit(entry)

    monkeypatch.setattr(engine, "_audit", scripted)

    def group(tag):
        """Two commits and, between them, one refused after it claimed its first chunk."""
        ok = [new_version(f"{tag}{i}", b"%s %d" % (tag.encode(), i), f"{tag}-{i}") for i in (0, 1)]
        small = {c.chunks[0]: b"%s %d" % (tag.encode(), i) for i, c in enumerate(ok)}
        halves = [tag.encode() * CHUNK, b"never sent"]
        bad = new_version(f"{tag}-bad", halves[0][:CHUNK] + halves[1], f"{tag}-b")
        small[bad.chunks[0]] = halves[0][:CHUNK]
        return [ok[0], bad, ok[1]], small

    before, audited = engine.totals(), len(engine.audit_read(0, 0, 1000))
    # Calls: 1 the first attempt's ok0 (Retry: again), 2 its ok0 (the refusal follows),
    # 3 the second attempt's ok0 (Retry: again), 4 its ok0, 5 its ok1.
    script.update({1: Retry(), 3: Retry()})
    changes, small = group("r")
    results = engine.apply(changes, NOW, small)
    assert [type(r).__name__ for r in results] == ["Version", "MissingChunks", "Version"]
    assert [r.version for r in results if not isinstance(r, Exception)] == [1, 1]
    assert len(calls) == 5
    after = engine.totals()
    assert (after.files - before.files, after.chunks - before.chunks) == (2, 2)
    assert len(engine.audit_read(0, 0, 1000)) == audited + 2
    assert engine.chunk(changes[1].chunks[0]) is None
    for failure in (RuntimeError("a bug"), ConnectionLost("the database went away")):
        calls.clear()
        script.clear()
        script[2] = failure  # the second attempt's first change, made
        changes, small = group(type(failure).__name__)
        with pytest.raises(type(failure)):
            engine.apply(changes, NOW, small)
        assert len(calls) == 2 and not engine.in_transaction
        assert engine.totals() == after and engine.get(changes[0].name) is None
        assert engine.chunk(changes[0].chunks[0]) is None
    assert len(engine.audit_read(0, 0, 1000)) == audited + 2


def test_small_content_travels_with_the_commit(engine):
    change = new_version("s", b"tiny", "c1")
    [version] = engine.apply([change], NOW, {change.chunks[0]: b"tiny"})
    assert version.size == 4
    assert engine.chunk(change.chunks[0]).data == b"tiny"


def test_a_refused_change_alone_leaves_nothing_behind(engine):
    commit(engine, "a", b"one", "c1")
    before, audited = engine.totals(), len(engine.audit_read(0, 0, 1000))
    change = new_version("b", b"tiny", "c1")  # the id of another request
    [refused] = engine.apply([change], NOW, {change.chunks[0]: b"tiny"})
    assert isinstance(refused, BadRequest)
    assert engine.chunk(change.chunks[0]) is None  # its claim went with it
    assert engine.get("b") is None and engine.totals() == before
    assert len(engine.audit_read(0, 0, 1000)) == audited
    [made] = engine.apply([new_version("b", b"tiny", "c2")], NOW, {change.chunks[0]: b"tiny"})
    assert made.version == 1 and engine.chunk(change.chunks[0]).refs == 1


def test_an_inline_commit_of_a_held_chunk_restarts_its_clock_and_heals_it(engine):
    change = new_version("a", b"tiny", "c1")
    digest = change.chunks[0]
    engine.apply([change], NOW, {digest: b"tiny"})
    engine._execute("UPDATE chunks SET data = ?, lost = 1 WHERE digest = ?", (b"tony", digest))
    [made] = engine.apply([new_version("b", b"tiny", "c2")], NOW + 10, {digest: b"tiny"})
    row = engine.chunk(digest)
    assert made.version == 1
    assert (row.data, row.lost, row.since, row.refs) == (b"tiny", False, NOW + 10, 2)
    engine.apply([new_version("c", b"tiny", "c3")], NOW + 20, {digest: b"tiny"})
    assert (engine.chunk(digest).since, engine.chunk(digest).refs) == (NOW + 20, 3)
    assert engine.totals().chunks == 1 and engine.refcount_errors() == []


def test_an_inline_commit_sent_again_takes_no_second_reference(engine):
    change = new_version("a", b"tiny", "c1")
    small = {change.chunks[0]: b"tiny"}
    [first] = engine.apply([change], NOW, small)
    [again] = engine.apply([change], NOW + 5, small)
    assert (again.version, again.commit) == (first.version, first.commit) == (1, "c1")
    [other] = engine.apply([new_version("b", b"tiny", "c2"), change], NOW + 6, small)[:1]
    assert other.version == 1 and engine.chunk(change.chunks[0]).refs == 2
    assert engine.refcount_errors() == [] and engine.totals().files == 2


def test_list_is_a_range_in_name_order_with_a_cursor(engine):
    names = ["b/2", "a/1", "b/1", "c", "b/10", "b", "bb/1"]
    for i, name in enumerate(names):
        commit(engine, name, name.encode(), f"c{i}")
    assert [v.name for v in engine.list("b/", "", 10)] == ["b/1", "b/10", "b/2"]
    assert [v.name for v in engine.list("b/", "", 2)] == ["b/1", "b/10"]
    assert [v.name for v in engine.list("b/", "b/10", 2)] == ["b/2"]
    assert [v.name for v in engine.list("", "", 100)] == sorted(names)
    assert [v.name for v in engine.list("", "b/2", 100)] == ["bb/1", "c"]


def test_list_handles_prefixes_at_the_edges_of_unicode(engine):
    names = ["\U0010ffff", "\U0010ffffa", "\ud7ffx", "\ue000", "é/1", "z"]
    for i, name in enumerate(names):
        commit(engine, name, name.encode(), f"c{i}")
    assert [v.name for v in engine.list("\U0010ffff", "", 10)] == ["\U0010ffff", "\U0010ffffa"]
    assert [v.name for v in engine.list("\ud7ff", "", 10)] == ["\ud7ffx"]
    assert [v.name for v in engine.list("é", "", 10)] == ["é/1"]
    assert prefix_end("a\U0010ffff") == "b" and prefix_end("\U0010ffff") is None


def test_totals_follow_every_change(engine):
    commit(engine, "a", b"1" * 5000, "c1")  # 2 chunks: 4096 + 904
    commit(engine, "b", b"2" * 100, "c2")
    assert engine.totals() == Totals(files=2, bytes=5100, chunks=3, chunk_bytes=5100)
    commit(engine, "a", b"3" * 10, "c3")  # overwrite: size changes, old chunks stay held
    remove(engine, "b", "r1")
    assert engine.totals() == Totals(files=1, bytes=10, chunks=4, chunk_bytes=5110)


def test_references_follow_commits_overwrites_and_removes(engine):
    shared = b"s" * 4096
    commit(engine, "a", shared + b"a", "c1")
    commit(engine, "b", shared + shared, "c2")  # the same chunk twice counts once
    assert engine.chunk(h(shared)).refs == 2
    commit(engine, "a", b"other", "c3", now=NOW + 5)
    remove(engine, "b", "r1", now=NOW + 7)
    row = engine.chunk(h(shared))
    assert row.refs == 0 and row.since == NOW + 7  # unreferenced since the last release
    assert engine.refcount_errors() == []


def apply_one(meta, change, now=NOW):
    [result] = meta.apply([change], now, {})
    if isinstance(result, Exception):
        raise result
    return result


def test_copy_shares_the_chunks_and_adds_a_reference_each(engine):
    content = b"c" * 4096 + b"tail"
    commit(engine, "src", content, "c1")
    commit(engine, "dst", b"old", "c2")
    made = apply_one(engine, Copy("src", "dst", "cp-1"))
    assert made.version == 2 and made.digest == digest_of(content)
    assert engine.get("dst").chunks == engine.get("src").chunks
    assert engine.chunk(h(b"c" * 4096)).refs == 2
    assert engine.chunk(h(b"old")).refs == 0  # the overwritten version's
    assert engine.totals() == Totals(
        files=2, bytes=2 * len(content), chunks=3, chunk_bytes=len(content) + 3
    )
    assert apply_one(engine, Copy("src", "dst", "cp-1")) == made  # a retry: the same answer
    assert engine.refcount_errors() == []


def test_move_is_one_change_of_two_names_moving_no_reference(engine):
    content = b"m" * 5000
    commit(engine, "a/old", content, "c1")
    commit(engine, "b/new", b"replaced", "c2")
    made = apply_one(engine, Copy("a/old", "b/new", "mv-1", move=True))
    assert made.name == "b/new" and made.version == 2 and made.digest == digest_of(content)
    assert engine.get("a/old") is None
    assert [v.name for v in engine.list("", "", 10)] == ["b/new"]
    assert engine.chunk(h(b"m" * 4096)).refs == 1
    assert engine.totals().files == 1 and engine.totals().bytes == 5000
    assert apply_one(engine, Copy("a/old", "b/new", "mv-1", move=True)) == made
    assert commit(engine, "a/old", b"again", "c3").version == 3  # after its tombstone
    assert engine.refcount_errors() == []


def test_a_folder_moves_whole_in_one_transaction_moving_no_reference(engine):
    big = b"B" * 4096 * 40  # a paged chunk list: its body gains and loses a reference
    commit(engine, "d/a", b"x" * 5000, "c1")
    commit(engine, "d/sub/b", big, "c2")
    commit(engine, "d/", b"", "c3")  # the folder's own marker
    commit(engine, "dx", b"beside", "c4")  # shares the prefix "d", not the folder "d/"
    commit(engine, "e/", b"", "c5")  # an empty folder where it goes: its marker is replaced
    before = engine.totals()
    assert engine.move_prefix("d/", "e/", "mvp-1", NOW, 10) == 3
    assert [v.name for v in engine.list("", "", 10)] == ["dx", "e/", "e/a", "e/sub/b"]
    assert engine.get("e/sub/b").digest == digest_of(big)
    assert engine.get("e/a").version == 1 and engine.get("d/a") is None
    assert engine.totals() == Totals(
        files=before.files - 1,
        bytes=before.bytes,
        chunks=before.chunks,
        chunk_bytes=before.chunk_bytes,
    )
    assert engine.refcount_errors() == []
    assert engine.move_prefix("d/", "e/", "mvp-1", NOW, 10) == 3  # a retry: the same answer
    with pytest.raises(BadRequest):
        engine.move_prefix("e/", "f/", "mvp-1", NOW, 10)  # the id of another request
    with pytest.raises(NotFound):
        engine.move_prefix("d/", "g/", "mvp-2", NOW, 10)


def test_a_folder_move_refuses_a_full_destination_or_too_many_names(engine):
    for i in range(3):
        commit(engine, f"s/{i}", b"%d" % i, f"c{i}")
    commit(engine, "t/keep", b"k", "c9")
    with pytest.raises(Conflict):
        engine.move_prefix("s/", "t/", "mvp-1", NOW, 10)
    with pytest.raises(TooLarge):
        engine.move_prefix("s/", "u/", "mvp-2", NOW, 2)
    assert [v.name for v in engine.list("", "", 10)] == ["s/0", "s/1", "s/2", "t/keep"]
    assert engine.refcount_errors() == []


def test_a_versions_metadata_is_kept_by_mv_cp_and_restore(engine):
    from dataclasses import replace

    engine.keep_versions = 1
    claim_all(engine, b"m")
    meta = {"content-type": "text/plain", "x-amz-meta-owner": "ann"}
    apply_one(engine, replace(new_version("a", b"m", "c1"), meta=meta))
    assert engine.get("a").meta == meta and engine.list("", "", 1)[0].meta == meta
    assert apply_one(engine, Copy("a", "b", "cp-1")).meta == meta
    assert apply_one(engine, Copy("b", "c", "mv-1", move=True)).meta == meta
    commit(engine, "c", b"m", "c2")  # no metadata: the new version has none...
    assert engine.get("c").meta == {}
    assert apply_one(engine, Restore("c", None, "re-1")).meta == meta  # ...the restored one has
    assert engine.refcount_errors() == []


@pytest.mark.parametrize("src, dst, error", [("missing", "x", NotFound), ("a", "a", BadRequest)])
def test_copy_and_move_refuse_a_missing_source_or_itself(engine, src, dst, error):
    commit(engine, "a", b"a", "c1")
    for move in (False, True):
        with pytest.raises(error):
            apply_one(engine, Copy(src, dst, f"x-{move}", move))
    assert [v.name for v in engine.list("", "", 10)] == ["a"]
    assert engine.totals().files == 1 and engine.refcount_errors() == []


def test_retained_versions_keep_their_references_and_the_newest_n_stay(engine):
    engine.keep_versions = 2
    contents = [bytes([65 + i]) * 5000 for i in range(4)]
    for i, content in enumerate(contents):
        commit(engine, "f", content, f"c{i}")
    assert [v.version for v in engine.retained("f")] == [3, 2]
    assert [v.digest for v in engine.retained("f")] == [digest_of(c) for c in contents[2:0:-1]]
    assert engine.chunk(h(contents[1][:4096])).refs == 1  # retained: referenced
    assert engine.chunk(h(contents[0][:4096])).refs == 0  # dropped out: released
    assert engine.totals().files == 1 and engine.totals().bytes == 5000
    assert engine.refcount_errors() == []
    remove(engine, "f", "r1")  # rm retains v4 too
    assert [v.version for v in engine.retained("f")] == [4, 3]
    restored = apply_one(engine, Restore("f", None, "re-1"))
    assert restored.version == 6 and restored.digest == digest_of(contents[3])
    restored = apply_one(engine, Restore("f", 3, "re-2"))
    assert restored.version == 7 and engine.get("f").digest == digest_of(contents[2])
    assert [v.version for v in engine.retained("f")] == [6, 4]
    with pytest.raises(NotFound):
        apply_one(engine, Restore("f", 1, "re-3"))
    assert engine.refcount_errors() == []


def test_a_removed_name_with_retained_versions_keeps_its_tombstone(engine):
    engine.keep_versions = 1
    commit(engine, "g", b"g1", "c1")
    remove(engine, "g", "r1")
    engine.prune(NOW + 10**6, 1000)
    assert apply_one(engine, Restore("g", None, "re-1"), now=NOW + 10**6).version == 3
    engine.keep_versions = 0
    commit(engine, "g", b"g2", "c2", now=NOW + 10**6)  # 0 kept: all released
    assert engine.retained("g") == [] and engine.refcount_errors() == []


def test_usage_counts_a_prefix_in_the_index(engine):
    for name, size in (("p/a", 10), ("p/b/c", 20), ("pq", 40), ("q", 80)):
        commit(engine, name, b"z" * size, f"c-{name}")
    remove(engine, "p/a", "r1")
    assert engine.usage("p/") == (1, 20)
    assert engine.usage("p") == (2, 60)
    assert engine.usage("") == (3, 140)
    assert engine.usage("nothing/") == (0, 0)


def test_known_reports_live_rows_and_restarts_their_grace(engine):
    claim_all(engine, b"k" * 10, now=NOW)
    digest = h(b"k" * 10)
    assert engine.known([digest, h(b"unknown")], NOW + 100) == {digest}
    assert engine.chunk(digest).since == NOW + 100
    assert engine.doom(NOW + 50, 10) == []  # protected by the refresh


def test_doom_takes_only_old_unreferenced_chunks_and_blocks_claims(engine):
    commit(engine, "keep", b"kept", "c1")
    engine.claim_chunk(h(b"blob"), 4, NOW)  # a blob, not in the engine
    engine.claim_chunk(h(b"young"), 5, NOW + 100, b"young")
    engine.claim_chunk(h(b"small"), 5, NOW, b"small")
    dry = engine.doom(NOW + 50, 10, dry_run=True)
    assert {r.digest for r in dry} == {h(b"blob"), h(b"small")}
    assert engine.chunk(h(b"small")) is not None  # a dry run changes nothing
    doomed = engine.doom(NOW + 50, 10)
    assert {r.digest for r in doomed} == {h(b"blob"), h(b"small")}
    assert engine.chunk(h(b"small")) is None  # in-engine bytes: gone at once
    assert [r.digest for r in engine.doomed(10)] == [h(b"blob")]
    with pytest.raises(Unavailable, match="being collected"):
        engine.claim_chunk(h(b"blob"), 4, NOW + 60)
    [refused] = engine.apply([new_version("late", b"blob", "c9")], NOW + 60, {})
    assert isinstance(refused, MissingChunks)  # no commit onto a doomed row
    engine.forget([h(b"blob")])
    assert engine.chunk(h(b"blob")) is None
    assert engine.claim_chunk(h(b"blob"), 4, NOW + 70) is False  # a fresh claim works
    assert engine.totals().chunks == 3


def test_chunk_rows_say_where_the_bytes_are_without_reading_them(engine):
    engine.claim_chunk(h(b"small"), 5, NOW, b"small")
    engine.claim_chunk(h(b"blob"), 4, NOW)
    rows = engine.chunk_rows([h(b"small"), h(b"blob"), h(b"none")] * 2)
    assert sorted(rows) == sorted([h(b"small"), h(b"blob")])
    small, blob = rows[h(b"small")], rows[h(b"blob")]
    assert (small.in_engine, small.data, small.size) == (True, b"", 5)
    assert (blob.in_engine, blob.size, blob.lost) == (False, 4, False)
    engine.mark_lost(h(b"blob"))
    assert engine.chunk_rows([h(b"blob")])[h(b"blob")].lost
    assert engine.known([h(b"blob")], NOW) == set()  # lost: uploaded again
    engine.claim_chunk(h(b"blob"), 4, NOW + 1)
    assert engine.known([h(b"blob")], NOW + 1) == {h(b"blob")}


def test_orphans_are_adopted_as_doomed_only_when_unknown(engine):
    engine.claim_chunk(h(b"known"), 5, NOW)
    assert engine.adopt_orphan(h(b"known"), 5) is False
    assert engine.adopt_orphan(h(b"orphan"), 6) is True
    assert engine.chunk(h(b"orphan")).doomed
    engine.forget([h(b"orphan")])
    assert engine.totals().chunk_bytes == 5


def test_prune_drops_old_tombstones_and_ids(engine):
    commit(engine, "gone", b"g", "c1", now=NOW)
    remove(engine, "gone", "r1", now=NOW)
    commit(engine, "recent", b"r", "c2", now=NOW + 100)
    assert engine.prune(NOW + 50, 1000) == 3  # 1 tombstone, 2 ids
    assert commit(engine, "gone", b"g", "c3").version == 1  # its history is gone with it


def test_one_lease_holder_at_a_time(engine):
    assert engine.lease("gc", "w1", NOW, 60)
    assert not engine.lease("gc", "w2", NOW + 1, 60)
    assert engine.lease("gc", "w1", NOW + 2, 60)  # renewal
    assert engine.lease("gc", "w2", NOW + 100, 60)  # expired: taken over
    engine.release("gc", "w2")
    assert engine.lease("gc", "w3", NOW + 101, 60)


def test_refcount_errors_name_drift(engine):
    commit(engine, "a", b"abc", "c1")
    engine._execute("UPDATE chunks SET refs = 5")
    assert engine.refcount_errors() == [("chunk", h(b"abc"), 5, 1)]


def test_two_engines_on_one_store_see_each_other(engine, tmp_path):
    other = second_connection(engine)
    try:
        commit(engine, "x", b"x", "c1")
        assert other.get("x").version == 1 and other.store_id == engine.store_id
    finally:
        other.close()


def test_the_lease_holder_is_known(engine):
    assert engine.lease_holder("gc") is None
    engine.lease("gc", "host:1", NOW, 60)
    assert engine.lease_holder("gc") == "host:1"


def test_a_connection_lost_midway_is_unavailable_for_the_whole_group(pg_database_url):
    """PostgreSQL only: a connection that can be lost mid-transaction."""
    from fms.errors import Unavailable as Lost
    from fms.storage.meta.postgres import PostgresMeta

    engine = PostgresMeta(pg_database_url)
    claim_all(engine, b"one")
    real = engine._commit

    def cut(change, now, *rest):
        engine.db.close()  # the server went away mid-transaction
        return real(change, now, *rest)

    engine._commit = cut
    with pytest.raises(Lost):
        engine.apply([new_version("a", b"one", "c1"), new_version("b", b"one", "c2")], NOW, {})
    engine._commit = real
    assert engine.get("a") is None and engine.get("b") is None  # nothing half applied
    assert commit(engine, "a", b"one", "c1").version == 1  # and it works again
    assert engine.totals().files == 1
    engine.close()


def test_prune_drops_old_tombstones_and_ids_a_batch_at_a_time_however_many(engine):
    for i in range(25):  # 25 tombstones and 50 ids older than the cutoff
        commit(engine, f"old/{i:02d}", b"o", f"c-{i}", now=NOW)
        remove(engine, f"old/{i:02d}", f"r-{i}", now=NOW)
    commit(engine, "young", b"y", "c-young", now=NOW + 100)
    remove(engine, "young", "r-young", now=NOW + 100)
    batches = []
    while not batches or batches[-1] == 10:
        batches.append(engine.prune(NOW + 50, 10))
    assert batches == [10] * 7 + [5]
    assert engine.prune(NOW + 50, 10) == 0
    assert commit(engine, "old/00", b"o", "c-again").version == 1  # its history is gone
    assert commit(engine, "young", b"y", "c-young-2").version == 3  # kept: it goes on


def work_done(engine, work) -> int:
    """A count of the work the engine does for ``work()``, independent of time: SQLite's
    virtual machine steps (in hundreds), PostgreSQL's rows fetched from the names table."""
    if isinstance(engine, SQLiteMeta):
        steps = [0]
        engine.db.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1), 100)
        try:
            work()
        finally:
            engine.db.set_progress_handler(None, 0)
        return steps[0]
    stats = (
        "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0) FROM pg_stat_user_tables "
        "WHERE relname = 'names'"
    )

    def fetched():
        engine.db.execute("SELECT pg_stat_force_next_flush()")
        engine.db.execute("SELECT 1")  # its end flushes this backend's counts
        return engine.db.execute(stats).fetchone()[0]

    # What is measured is whether the engine can list by an index of the live names. On a
    # table this small the planner may choose to scan it whole once autovacuum has analysed it
    # (a cost decision it would not make at 200,000 rows), so scans are ruled out here.
    engine.db.execute("SET enable_seqscan = off")
    try:
        before = fetched()
        work()
        return fetched() - before
    finally:
        engine.db.execute("RESET enable_seqscan")


def test_listing_never_steps_over_tombstones(engine):
    """Tombstones sort among the live names; a listing reads the live names only (an index of
    them), so 500 removed names in front cost a root ls nothing (a listing that stepped over
    them would read 25 times the rows; 200,000 took it from 1.0 to 64.6 ms)."""
    live = [f"z/{i:02d}" for i in range(20)]
    for name in live:
        commit(engine, name, b"l", f"c-{name}")
    alone = work_done(engine, lambda: engine.list("", "", 1001))
    tombstones = [new_version(f"a/{i:05d}", b"t", f"t-{i}") for i in range(500)]
    claim_all(engine, b"t")
    engine.apply(tombstones, NOW, {})
    engine.apply([Removal(v.name, f"rm-{v.name}") for v in tombstones], NOW, {})
    assert [v.name for v in engine.list("", "", 1001)] == live
    behind = work_done(engine, lambda: engine.list("", "", 1001))
    assert behind <= 2 * alone + 10, (alone, behind)
    assert engine.usage("") == (20, 20)
    assert [v.name for v in engine.iter_versions("", 1001)] == live


# --- the upgrade from format 2 (a whole chunk list per row, a reference per listing) ---

FORMAT2 = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE names (
    name {name_type} PRIMARY KEY, version BIGINT NOT NULL, size BIGINT NOT NULL,
    sha256 {blob} NOT NULL, chunk_size BIGINT NOT NULL, chunks {blob} NOT NULL,
    mtime {real} NOT NULL, commit_id TEXT NOT NULL, committed {real} NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX names_tombstones ON names (committed) WHERE deleted = 1;
CREATE TABLE chunks (
    digest {blob} PRIMARY KEY, size BIGINT NOT NULL, refs BIGINT NOT NULL DEFAULT 0,
    since {real} NOT NULL, doomed INTEGER NOT NULL DEFAULT 0, data {blob});
CREATE INDEX chunks_unreferenced ON chunks (since) WHERE refs = 0;
CREATE TABLE commits (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, sha256 {blob},
    result {blob} NOT NULL, at {real} NOT NULL);
CREATE INDEX commits_at ON commits (at);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 1), files BIGINT NOT NULL, bytes BIGINT NOT NULL,
    chunks BIGINT NOT NULL, chunk_bytes BIGINT NOT NULL);
CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, until {real} NOT NULL);
CREATE TABLE retained (
    name {name_type} NOT NULL, version BIGINT NOT NULL, size BIGINT NOT NULL,
    sha256 {blob} NOT NULL, chunk_size BIGINT NOT NULL, chunks {blob} NOT NULL,
    mtime {real} NOT NULL, commit_id TEXT NOT NULL, committed {real} NOT NULL,
    PRIMARY KEY (name, version))
"""


def format2_store(engine) -> dict:
    """Turn ``engine``'s (new, empty) store into a format-2 one holding a short file, a long
    one (40 chunks, its first chunk listed twice), a retained version, a tombstone and a
    remembered commit; :return: name -> content of the live files."""
    import msgpack

    for table in ("settings", "names", "retained", "chunks", "pages", "bodies", "commits"):
        engine._execute(f"DROP TABLE {table}")
    engine._execute("DROP TABLE totals")
    engine._execute("DROP TABLE leases")
    engine._create(FORMAT2)
    engine._execute("INSERT INTO settings VALUES ('format', '2'), ('store_id', 'old-store')")
    long = b"".join(bytes([i]) * CHUNK for i in range(39))
    live = {"short": b"s" * 5000, "long": long[:CHUNK] + long}  # 40 chunks, one twice
    old, gone = b"o" * 100, b"g" * 10
    refs = {}
    rows = [("names", n, 1, c) for n, c in live.items()] + [("retained", "short", 0, old)]
    for table, name, version, data in rows:
        chunks = split(data)
        for chunk in chunks:
            refs[h(chunk)] = refs.get(h(chunk), 0) + 1
            engine._execute(
                "INSERT INTO chunks VALUES (?, ?, 0, ?, 0, ?) ON CONFLICT (digest) DO NOTHING",
                (h(chunk), len(chunk), NOW, chunk),
            )
        values = (name, version, len(data), h(data), CHUNK)
        values += (b"".join(h(c) for c in chunks), NOW, f"old-{name}", NOW)
        if table == "names":
            values += (0,)
        engine._execute(f"INSERT INTO {table} VALUES ({','.join('?' * len(values))})", values)
    engine._execute(
        "INSERT INTO names VALUES (?, 2, 10, ?, ?, ?, ?, 'rm-1', ?, 1)",
        ("gone", h(gone), CHUNK, b"", NOW, NOW),
    )
    for digest, n in refs.items():
        engine._execute("UPDATE chunks SET refs = ? WHERE digest = ?", (n, digest))
    result = {
        "name": "long",
        "size": len(live["long"]),
        "sha256": h(live["long"]),
        "chunk_size": CHUNK,
        "chunks": [h(c) for c in split(live["long"])],
        "mtime": NOW,
        "version": 1,
        "commit": "old-long",
        "committed": NOW,
        "deleted": False,
    }
    engine._execute(
        "INSERT INTO commits VALUES ('old-long', 'commit', 'long', ?, ?, ?)",
        (b"r" * 32, msgpack.packb(result, use_bin_type=True), NOW),
    )
    engine._execute(
        "INSERT INTO totals VALUES (1, 2, ?, ?, ?)", (sum(map(len, live.values())), 0, 0)
    )
    return live


def test_a_format2_store_is_upgraded_in_place_once(engine):
    live = format2_store(engine)
    engine.close()
    engine = second_connection(engine)
    try:
        assert engine.store_id == "old-store" and engine.setting("format") == "3"
        assert [v.name for v in engine.list("", "", 10)] == ["long", "short"]
        for name, data in live.items():
            got = engine.get(name)
            assert (got.digest, got.digest_kind, got.size) == (
                h(data),
                p.DIGEST_CONTENT,
                len(data),
            )
        long = engine.get("long")
        assert long.chunks is None and long.body is not None  # 40 chunks: paged
        [page] = long.pages
        assert p.split_digests(engine.page(page)) == [h(c) for c in split(live["long"])]
        assert engine.get("short").chunks == tuple(h(c) for c in split(live["short"]))
        assert [v.version for v in engine.retained("short")] == [0]
        assert engine.chunk(h(live["long"][:CHUNK])).refs == 1  # listed twice: once
        assert engine.refcount_errors() == []
        remembered = engine._logged("old-long", "commit", "long", None)  # as a stat now
        assert (remembered.digest, remembered.count, remembered.chunks) == (
            h(live["long"]),
            40,
            None,
        )
        [reused] = engine.apply([Copy("short", "long", "old-long")], NOW, {})  # another request
        assert isinstance(reused, BadRequest)
        assert engine.totals().files == 2
    finally:
        engine.close()
    reopened = second_connection(engine)  # nothing more to do
    assert reopened.setting("format") == "3" and reopened.refcount_errors() == []
    reopened.close()


def test_the_recount_in_digest_ranges_finds_every_drift(engine, monkeypatch):
    """A store with more chunks than one recount holds is counted a range of digests at a
    time: the same errors as counted at once."""
    from fms.storage.meta import sql

    for i in range(12):
        commit(engine, f"f{i}", bytes([i]) * 5000, f"c{i}")  # two chunks each
    commit(engine, "long", b"".join(bytes([100 + i]) * CHUNK for i in range(40)), "c-long")
    drifted = sorted(h(bytes([i]) * CHUNK) for i in (1, 5, 9))
    for digest in drifted:
        engine._execute("UPDATE chunks SET refs = refs + 3 WHERE digest = ?", (digest,))
    at_once = sorted(engine.refcount_errors())
    monkeypatch.setattr(sql, "RECOUNT_CHUNKS", 4)  # 64 chunks: 16 ranges
    assert sorted(engine.refcount_errors()) == at_once
    assert [e[1] for e in at_once] == drifted and {e[2] - e[3] for e in at_once} == {3}
