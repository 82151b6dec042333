"""The gateway's batched commits of small bodies (fms.gateway.batch.CommitBatcher), against a
broker played by the test (tests/test_gateway_link.py's), then against a real cluster.  Every
receive has a timeout; the tests wait for messages, never for time to pass."""

import asyncio
import hashlib
import os

import pytest
from test_gateway_link import RECV_TIMEOUT, FakeBroker, result

from fms import limits
from fms import wire as p
from fms.errors import (
    BadRequest,
    FmsError,
    Forbidden,
    NotFound,
    Timeout,
    TooLarge,
    Unavailable,
)
from fms.gateway import batch, store
from fms.gateway.batch import CommitBatcher
from fms.gateway.link import AsyncLink

HASH = p.hasher("sha256")


def fields(name: str, data: bytes, meta: dict | None = None) -> dict:
    return store._inline_commit(name, data, HASH, {"etag": f'"{name}"', **(meta or {})})


async def recv(broker: FakeBroker) -> tuple[dict, bytes | None]:
    """The next request: its header and its data (unpacked), within the receive timeout."""
    try:
        ident, header, *data = await asyncio.wait_for(broker.sock.recv_multipart(), RECV_TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"no request from the link within {RECV_TIMEOUT} s") from None
    broker.ident = ident
    return p.decode(header, "request"), bytes(p.unpack_data(data[0])) if data else None


def stat_of(name: str, version: int = 1) -> dict:
    return {"name": name, "version": version}


def all_ok(many: dict) -> list[dict]:
    """The results of a commit_many whose every file was made."""
    return [{"ok": True, "stat": stat_of(name)} for name in many["names"]]


def run(test, timeout: float = RECV_TIMEOUT) -> None:
    """``test(broker, batcher)`` in a new event loop, with a fake broker, a link to it (each
    call's budget ``timeout``) and a batcher on the link."""

    async def main() -> None:
        broker = FakeBroker()
        link = AsyncLink(broker.endpoint, timeout=timeout, retries=0)
        try:
            await test(broker, CommitBatcher(link, store.CHUNK_SIZE))
        finally:
            link.close()
            broker.close()

    asyncio.run(main())


def put(batcher: CommitBatcher, name: str, data: bytes, acting=None, **meta) -> asyncio.Task:
    return asyncio.ensure_future(batcher.commit(fields(name, data, meta), data, acting))


async def one_in_flight(broker: FakeBroker, batcher: CommitBatcher, acting=None) -> tuple:
    """A first commit (``b/first``) sent and not yet answered: ``(its PUT, its request)``.
    While it is in flight, the commits that come wait."""
    first = put(batcher, "b/first", b"1", acting=acting)
    lone, _ = await recv(broker)
    return first, lone


async def two_together(broker: FakeBroker, batcher: CommitBatcher) -> tuple[list, dict]:
    """Two commits (``b/k0``, ``b/k1``, content ``x``) that waited behind a first one and went
    together once it was answered: ``(their PUTs, their commit_many's request)``."""
    first, lone = await one_in_flight(broker, batcher)
    tasks = [put(batcher, f"b/k{i}", b"x") for i in range(2)]
    await asyncio.sleep(0)
    await answer_first(broker, first, lone)
    many, _ = await recv(broker)
    assert many["names"] == ["b/k0", "b/k1"]
    return tasks, many


async def the_queue_goes_on(broker: FakeBroker, batcher: CommitBatcher) -> None:
    """The identity's next commit goes at once and is answered, and nothing is left in flight
    or waiting."""
    after = put(batcher, "b/after", b"2")
    header, _ = await recv(broker)
    assert (header["op"], header["name"]) == ("commit", "b/after")
    await broker.answer(header, stat=stat_of("b/after"))
    assert await result(after) == stat_of("b/after")
    assert not batcher._flying and not batcher._waiting


async def answer_first(broker: FakeBroker, first: asyncio.Task, lone: dict) -> None:
    """The first commit answered: its PUT gets its stat (and what waited may go)."""
    await broker.answer(lone, stat=stat_of("b/first"))
    assert await result(first) == stat_of("b/first")


def test_the_time_a_commit_waits_counts_against_its_puts_budget():
    """A PUT gives up when its own commit would have: the time its commit waited behind the
    message in flight counts against its budget (its try's ttl is what is left), and one with
    nothing left fails without being sent."""

    async def test(broker, batcher):
        first = put(batcher, "b/first", b"1")
        await recv(broker)  # never answered: its budget runs out
        late, later = put(batcher, "b/late", b"2"), put(batcher, "b/later", b"3")
        for _ in range(3):
            await asyncio.sleep(0)
        batcher._waiting[None][0].since += 0.1  # as if it had come 0.1 s after the first
        batcher._waiting[None][1].since -= 60  # as if it had waited a minute already
        with pytest.raises(Timeout):
            await result(first)
        header, _ = await recv(broker)  # the late one alone, with what is left of its budget
        assert header["name"] == "b/late" and header["ttl_ms"] < 300 / 2
        with pytest.raises(Timeout, match="waited 60 s"):
            await result(later)
        with pytest.raises(Timeout):
            await result(late)
        assert batcher.sizes == {1: 1, 2: 1}  # the later one was never sent

    run(test, timeout=0.3)


def test_a_lone_commit_goes_as_a_commit_of_its_own():
    async def test(broker, batcher):
        body = os.urandom(4096)
        sent = fields("b/a", body)
        task = asyncio.ensure_future(batcher.commit(sent, body, "alice"))
        header, data = await recv(broker)
        assert header["op"] == "commit" and header["as"] == "alice" and data == body
        assert {k: header[k] for k in sent} == sent
        await broker.answer(header, stat=stat_of("b/a"))
        assert await result(task) == stat_of("b/a")
        assert batcher.sizes == {1: 1}

    run(test)


def test_commits_that_come_while_one_is_answered_go_together_each_with_its_own_result():
    """While a commit is in flight, three more wait; they go as one commit_many (names, sizes,
    digests, mtimes, ids and each one's meta, the contents back to back), and each PUT gets its
    own file's result: a stat, or the error storage gave that file alone."""

    async def test(broker, batcher):
        first, lone = await one_in_flight(broker, batcher)
        bodies = {f"b/k{i}": os.urandom(100 + i) for i in range(3)}
        sent = {name: fields(name, body, {"x-amz-meta-i": name}) for name, body in bodies.items()}
        tasks = {
            name: asyncio.ensure_future(batcher.commit(sent[name], body, None))
            for name, body in bodies.items()
        }
        for _ in range(3):  # passes of the loop: none is sent while one is in flight
            await asyncio.sleep(0)
        assert len(batcher._waiting[None]) == 3
        await answer_first(broker, first, lone)
        header, data = await recv(broker)
        assert header["op"] == "commit_many" and "as" not in header
        assert header["names"] == list(bodies)
        assert header["sizes"] == [len(b) for b in bodies.values()]
        assert header["hashes"] == [HASH(b) for b in bodies.values()]
        assert header["mtimes"] == [sent[n]["mtime"] for n in bodies]
        assert header["commits"] == [sent[n]["commit"] for n in bodies]
        assert [p.decode_meta(m) for m in header["metas"]] == [sent[n]["meta"] for n in bodies]
        assert header["chunk_size"] == store.CHUNK_SIZE
        assert data == b"".join(bodies.values())
        refused = {"ok": False, "error": "forbidden", "message": "no write on b/k1"}
        results = [{"ok": True, "stat": stat_of("b/k0")}, refused]
        await broker.answer(header, results=[*results, {"ok": True, "stat": stat_of("b/k2")}])
        assert await result(tasks["b/k0"]) == stat_of("b/k0")
        with pytest.raises(Forbidden, match="no write on b/k1"):
            await result(tasks["b/k1"])
        assert await result(tasks["b/k2"]) == stat_of("b/k2")
        assert batcher.sizes == {1: 1, 3: 1}

    run(test)


def test_identities_are_never_batched_together():
    async def test(broker, batcher):
        first, lone = await one_in_flight(broker, batcher, "alice")
        bob = put(batcher, "b/bob", b"2", acting="bob")
        header, _ = await recv(broker)  # bob has nothing in flight: his goes at once
        assert (header["op"], header["as"], header["name"]) == ("commit", "bob", "b/bob")
        alice = [put(batcher, f"b/a{i}", b"3", acting="alice") for i in range(2)]
        await asyncio.sleep(0)
        for request, name in ((lone, "b/first"), (header, "b/bob")):
            await broker.answer(request, stat=stat_of(name))
        many, _ = await recv(broker)
        assert (many["op"], many["as"], many["names"]) == ("commit_many", "alice", ["b/a0", "b/a1"])
        await broker.answer(many, results=all_ok(many))
        for task in (first, bob, *alice):
            assert (await result(task))["version"] == 1

    run(test)


def test_a_file_answered_unavailable_is_sent_again_alone_with_its_commit_id():
    async def test(broker, batcher):
        tasks, many = await two_together(broker, batcher)
        busy = {"ok": False, "error": "unavailable", "message": "busy"}
        await broker.answer(many, results=[{"ok": True, "stat": stat_of("b/k0")}, busy])
        again, data = await recv(broker)
        assert (again["op"], again["name"], data) == ("commit", "b/k1", b"x")
        assert again["commit"] == many["commits"][1]
        await broker.answer(again, stat=stat_of("b/k1", 2))
        assert await result(tasks[1]) == stat_of("b/k1", 2)
        assert await result(tasks[0]) == stat_of("b/k0")

    run(test)


def test_a_message_refused_whole_sends_each_file_alone():
    async def test(broker, batcher):
        tasks, many = await two_together(broker, batcher)
        await broker.refuse(many, "bad_request")
        alone = [await recv(broker) for _ in range(2)]
        assert sorted(h["name"] for h, _ in alone) == ["b/k0", "b/k1"]
        for header, _ in alone:
            if header["name"] == "b/k0":
                await broker.answer(header, stat=stat_of("b/k0"))
            else:
                await broker.refuse(header, "not_found")
        assert await result(tasks[0]) == stat_of("b/k0")
        with pytest.raises(NotFound):
            await result(tasks[1])

    run(test)


def test_a_commit_given_up_while_it_waited_is_not_sent():
    async def test(broker, batcher):
        first, lone = await one_in_flight(broker, batcher)
        gone, kept = put(batcher, "b/gone", b"2"), put(batcher, "b/kept", b"3")
        await asyncio.sleep(0)
        gone.cancel()
        await answer_first(broker, first, lone)
        header, data = await recv(broker)
        assert (header["op"], header["name"], data) == ("commit", "b/kept", b"3")
        await broker.answer(header, stat=stat_of("b/kept"))
        assert await result(kept) == stat_of("b/kept")

    run(test)


def test_metadata_over_its_limit_is_refused_for_its_put_alone_before_it_waits():
    async def test(broker, batcher):
        first, lone = await one_in_flight(broker, batcher)
        with pytest.raises(TooLarge):
            await put(batcher, "b/big", b"2", **{"x-amz-meta-big": "v" * p.MAX_META_BYTES})
        kept = put(batcher, "b/kept", b"3")
        await asyncio.sleep(0)
        await answer_first(broker, first, lone)
        header, _ = await recv(broker)
        assert (header["op"], header["name"]) == ("commit", "b/kept")
        await broker.answer(header, stat=stat_of("b/kept"))
        await result(kept)

    run(test)


def test_a_commit_waits_for_the_small_puts_of_its_identity_on_their_way(monkeypatch):
    """A commit with another small PUT of its identity on its way (being read) is held for it,
    and both go in one message as soon as it joins; one of another identity holds nothing."""
    monkeypatch.setattr(batch, "HOLD", 60.0)  # only the arrivals can let it go in time

    async def test(broker, batcher):
        coming = batcher.expect("alice")
        bobs = batcher.expect("bob")  # never comes: holds no commit of alice's
        first = put(batcher, "b/first", b"1", acting="alice")
        for _ in range(3):  # passes of the loop: it is held
            await asyncio.sleep(0)
        assert len(batcher._waiting["alice"]) == 1
        body = b"second"
        second = asyncio.ensure_future(
            batcher.commit(fields("b/second", body), body, "alice", coming)
        )
        header, data = await recv(broker)
        assert (header["op"], header["names"]) == ("commit_many", ["b/first", "b/second"])
        assert data == b"1second" and coming.arrived
        await broker.answer(
            header, results=[{"ok": True, "stat": stat_of(n)} for n in header["names"]]
        )
        await result(first)
        await result(second)
        other = put(batcher, "b/other", b"2", acting="alice")
        header, _ = await recv(broker)  # none on its way (bob's is not alice's): at once
        assert (header["op"], header["name"]) == ("commit", "b/other")
        await broker.answer(header, stat=stat_of("b/other"))
        await result(other)
        bobs.arrive()

    run(test)


def test_a_held_commit_goes_when_those_on_their_way_will_not_come(monkeypatch):
    """The PUT it waited for failed before its commit (its handler says so on the way out):
    the held commit goes then, alone."""
    monkeypatch.setattr(batch, "HOLD", 60.0)

    async def test(broker, batcher):
        coming = batcher.expect(None)
        first = put(batcher, "b/first", b"1")
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(batcher._waiting[None]) == 1
        coming.arrive()
        coming.arrive()  # said again (its ``finally``): counted once
        header, _ = await recv(broker)
        assert (header["op"], header["name"]) == ("commit", "b/first")
        await broker.answer(header, stat=stat_of("b/first"))
        await result(first)
        assert batcher._coming == {} and batcher._sending == {}

    run(test)


def test_a_held_commit_goes_after_the_hold_at_the_latest():
    async def test(broker, batcher):
        coming = batcher.expect(None)  # never comes
        first = put(batcher, "b/first", b"1")
        header, _ = await recv(broker)  # within the receive timeout, far above HOLD
        assert (header["op"], header["name"]) == ("commit", "b/first")
        await broker.answer(header, stat=stat_of("b/first"))
        await result(first)
        coming.arrive()

    run(test)


def test_a_put_still_on_its_way_when_a_hold_runs_out_holds_no_later_message(monkeypatch):
    """A small PUT whose body never comes whole (a stalled or byte-by-byte client) holds one
    message of its identity, HOLD at most, and no later one: else each commit of everyone
    acting as that identity (every static key acts as the gateway) waits HOLD for as long as
    that client keeps its request open.  Those that come after it still hold as before."""
    monkeypatch.setattr(batch, "HOLD", 0.001)

    async def test(broker, batcher):
        stalled = batcher.expect(None)  # never comes while this test runs
        first = put(batcher, "b/first", b"1")
        header, _ = await recv(broker)  # after the hold, without it
        assert (header["op"], header["name"]) == ("commit", "b/first")
        await broker.answer(header, stat=stat_of("b/first"))
        await result(first)
        monkeypatch.setattr(batch, "HOLD", 60.0)  # a hold now would outlast the receive
        second = put(batcher, "b/second", b"2")
        header, _ = await recv(broker)  # the stalled PUT no longer holds it
        assert (header["op"], header["name"]) == ("commit", "b/second")
        await broker.answer(header, stat=stat_of("b/second"))
        await result(second)
        coming = batcher.expect(None)  # a PUT that starts now holds a message as before
        third = put(batcher, "b/third", b"3")
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(batcher._waiting[None]) == 1 and None in batcher._sending
        coming.arrive()
        header, _ = await recv(broker)
        assert (header["op"], header["name"]) == ("commit", "b/third")
        await broker.answer(header, stat=stat_of("b/third"))
        await result(third)
        stalled.arrive()  # its handler ends at last: nothing is counted twice
        assert batcher._coming == {} and batcher._sending == {}

    run(test)


def test_concurrent_small_puts_through_a_real_cluster_keep_each_ones_metadata(cluster):
    """Many small bodies committed at once by one gateway store: they go in fewer messages than
    PUTs, and each name reads back with its own content and metadata (its ETag)."""

    async def main() -> None:
        gateway = store.Store(cluster.frontend)
        try:
            bodies = {f"b/m{i}": os.urandom(1 + 97 * i) for i in range(24)}

            async def one(name: str) -> tuple[dict, bytes]:
                meta = {"content-type": f"text/x-{name[-2:]}"}
                return await gateway._put_inline(name, bodies[name], lambda *a: None, meta)

            stats = await asyncio.wait_for(asyncio.gather(*map(one, bodies)), 30)
            for (stat, md5), (name, body) in zip(stats, bodies.items(), strict=True):
                assert (stat["name"], stat["size"], md5) == (name, len(body), _md5(body))
            assert sum(gateway.commits.sizes.values()) < len(bodies)
            for name, body in bodies.items():
                opened = await asyncio.wait_for(gateway.open(name), 10)
                assert opened is not None
                manifest, content, _ = opened
                assert content == body
                want = {"etag": f'"{_md5(body).hex()}"', "content-type": f"text/x-{name[-2:]}"}
                assert manifest["meta"] == want
        finally:
            gateway.close()

    asyncio.run(main())


def _md5(body: bytes) -> bytes:
    return hashlib.md5(body).digest()


def test_commit_manys_metas_are_checked_as_meta_is(cluster):
    """``metas``: one per file, each a ``meta`` map msgpack-encoded, held to meta's limits;
    anything else refuses the message with a clear error and makes nothing."""
    client = cluster.client()
    bodies = [b"one", b"two"]

    def commit_many(**fields):
        return client.call(
            "commit_many",
            p.pack_data(b"".join(bodies)),
            names=["m/a", "m/b"],
            sizes=[len(b) for b in bodies],
            hashes=[client.session.hasher()(b) for b in bodies],
            mtimes=[1.0, 2.0],
            commits=[os.urandom(8).hex() for _ in bodies],
            chunk_size=store.CHUNK_SIZE,
            **fields,
        )

    bad = [
        ([p.encode({"k": "v"})], "one entry per file"),
        ([p.encode({"k": "v"}), b"\xc1"], "metas"),
        ([p.encode({"k": "v"}), p.encode({"k": 1})], "strings"),
        ([p.encode({}), p.encode({"k": "v" * p.MAX_META_BYTES})], "metadata of"),
        (["k", "v"], "metas"),
    ]
    for metas, says in bad:
        with pytest.raises((BadRequest, TooLarge), match=says):
            commit_many(metas=metas)
    assert client.ls("m/") == []
    header, _ = commit_many(metas=[p.encode({"k": "a"}), p.encode({})], meta={"k": "all"})
    assert [r["stat"].get("meta") or {} for r in header["results"]] == [{"k": "a"}, {}]
    assert client.stat("m/a")["meta"] == {"k": "a"}


def test_an_answer_without_a_stat_fails_its_put_and_the_queue_goes_on():
    """A reply the batcher cannot read (an ``ok`` without a stat, alone or for one file of a
    batch) fails that PUT, as a plain commit's handler would fail; it must not leave it, or
    the files after it in the batch, waiting for ever, nor keep the identity's window."""

    async def test(broker, batcher):
        first, lone = await one_in_flight(broker, batcher)
        tasks = [put(batcher, f"b/k{i}", b"x") for i in range(2)]
        await asyncio.sleep(0)
        await broker.answer(lone)  # ok, but no stat
        with pytest.raises(FmsError, match="stat"):
            await result(first)
        many, _ = await recv(broker)
        assert many["names"] == ["b/k0", "b/k1"]
        await broker.answer(many, results=[{"ok": True}, {"ok": True, "stat": stat_of("b/k1")}])
        with pytest.raises(FmsError, match="stat"):
            await result(tasks[0])
        assert await result(tasks[1]) == stat_of("b/k1")
        await the_queue_goes_on(broker, batcher)

    run(test)


def test_a_send_cancelled_before_it_ran_fails_its_puts_and_frees_the_window():
    """A send task cancelled before its first step (its coroutine never runs, so no ``finally``
    of its own does): its PUTs fail rather than wait for ever, and the identity's next commit
    still goes."""

    async def test(broker, batcher):
        task = put(batcher, "b/a", b"1")
        while not batcher._tasks:  # the PUT queued, then the flush made the send task
            await asyncio.sleep(0)
        (send,) = batcher._tasks
        send.cancel()
        with pytest.raises(Unavailable):
            await result(task)
        await the_queue_goes_on(broker, batcher)

    run(test)


def test_a_batch_is_cut_before_its_header_is_over_the_brokers_limit():
    """A request header is at most MAX_HEADER (64 KiB) but for commit and have: a larger
    commit_many is refused whole (too_large), and each of its files then goes again alone.
    Long names and metadata make a batch of a few dozen files that large: it is cut into
    messages under the limit."""

    async def test(broker, batcher):
        first, lone = await one_in_flight(broker, batcher)
        names = [f"b/{i:03d}" + "n" * 900 for i in range(40)]
        tasks = [put(batcher, name, b"x", **{"x-amz-meta-m": "v" * 1000}) for name in names]
        await asyncio.sleep(0)
        await answer_first(broker, first, lone)
        sent: list[str] = []
        while len(sent) < len(names):
            try:
                ident, raw, *_ = await asyncio.wait_for(broker.sock.recv_multipart(), RECV_TIMEOUT)
            except TimeoutError:
                raise AssertionError("the batch's files were not all sent") from None
            broker.ident = ident
            assert len(raw) <= limits.MAX_HEADER
            header = p.decode(raw, "request")
            assert header["op"] == "commit_many"
            sent += header["names"]
            stats = [{"ok": True, "stat": stat_of(n)} for n in header["names"]]
            await broker.answer(header, results=stats)
        assert sent == names
        for name, task in zip(names, tasks, strict=True):
            assert (await result(task))["name"] == name

    run(test)


def test_the_link_closed_while_commits_wait_fails_them_all():
    async def test(broker, batcher):
        first = put(batcher, "b/first", b"1")
        await recv(broker)
        tasks = [put(batcher, f"b/k{i}", b"x") for i in range(2)]
        await asyncio.sleep(0)
        batcher.link.close()
        for task in (first, *tasks):
            with pytest.raises(Unavailable):
                await result(task)
        assert not batcher._flying and not batcher._waiting

    run(test)


def test_two_puts_of_one_name_in_one_batch_apply_in_order(cluster):
    """Two commits of one name that wait together go in one commit_many, in the order they
    came: the second is the newer version, and what a read gets."""

    async def main() -> None:
        gateway = store.Store(cluster.frontend)
        try:
            hash_fn = p.hasher(await gateway.link.digest_fn())
            bodies = [b"older", b"newer"]
            batcher = gateway.commits
            tasks = [
                asyncio.ensure_future(
                    batcher.commit(store._inline_commit("d/same", body, hash_fn, None), body, None)
                )
                for body in bodies
            ]
            stats = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert batcher.sizes == {2: 1}
            assert [s["version"] for s in stats] == [1, 2]
            opened = await asyncio.wait_for(gateway.open("d/same"), 10)
            assert opened is not None and opened[1] == b"newer"
        finally:
            gateway.close()

    asyncio.run(main())
