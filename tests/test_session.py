"""The client's session (fms.client.session) driven with no other process: a ROUTER socket in
the test plays the broker over inproc://, so each case controls exactly what comes back."""

import contextlib
import itertools
import re
import threading

import pytest
import zmq

from fms import wire as p
from fms.client.session import Session
from fms.errors import NotFound, Timeout, Unavailable

RECV_TIMEOUT_MS = 5000
ENDPOINTS = (f"inproc://session-test-{i}" for i in itertools.count())


@pytest.fixture
def broker():
    """The fake broker's ROUTER, and a Session connected to it (timeout 0.3 s, 2 retries)."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    endpoint = next(ENDPOINTS)
    router.bind(endpoint)
    session = Session(endpoint, timeout=0.3, retries=2, ctx=ctx)
    yield router, session
    session.close()
    router.close()


@contextlib.contextmanager
def serving(script):
    """Run ``script`` (the fake broker's side) in a thread while the body runs the client."""
    errors = []

    def run():
        try:
            script()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        thread.join(RECV_TIMEOUT_MS / 1000)
    assert not thread.is_alive() and not errors, errors


def receive(router) -> tuple:
    """One request at the fake broker: (client identity, header)."""
    assert router.poll(RECV_TIMEOUT_MS), "the session sent nothing"
    ident, header, *_ = router.recv_multipart()
    return ident, p.decode(header)


def answer(router, ident, reply: dict):
    router.send_multipart([ident, p.encode(reply)])


def test_replies_out_of_order_are_matched_to_their_requests_by_id(broker):
    router, session = broker

    def script():
        asked = [receive(router) for _ in range(3)]
        for ident, header in reversed(asked):
            answer(router, ident, p.ok_reply(header["id"], echo=header["name"]))

    with serving(script):
        got = [
            (tag, header["echo"])
            for tag, header, _ in session.pipeline(
                [(tag, "stat", {"name": tag}, None) for tag in "abc"]
            )
        ]
    assert got == [("c", "c"), ("b", "b"), ("a", "a")]


def test_no_more_than_window_requests_are_in_flight(broker):
    router, session = broker

    def script():
        for _ in range(2):  # two rounds of two
            asked = [receive(router) for _ in range(2)]
            assert not router.poll(200)  # a third waits for a reply
            for ident, header in asked:
                answer(router, ident, p.ok_reply(header["id"]))

    # The fake broker holds each round's replies for 200 ms: wait far longer than that for each
    # (the fixture's 0.3 s left a loaded machine 100 ms, and a try timed out in a full run).
    with serving(script), session.patience(30.0):
        replies = list(
            session.pipeline([(i, "stat", {"name": "x"}, None) for i in range(4)], window=2)
        )
    assert len(replies) == 4


def test_sent_runs_once_with_the_first_window_on_its_way_before_any_reply_is_waited_for(
    broker,
):
    """``pipeline(sent=...)``: work that overlaps the first round trip (get -r's checks of its
    destination): called once, after the first ``window`` requests went out; what it raises
    ends the pipeline with nothing yielded."""
    router, session = broker
    calls = []
    window_seen = threading.Event()  # the router is the script's alone (a socket, one thread)

    def script():
        asked = [receive(router) for _ in range(2)]
        calls.append(("broker saw", len(asked)))
        window_seen.set()
        for ident, header in asked:
            answer(router, ident, p.ok_reply(header["id"]))
        asked = [receive(router) for _ in range(2)]
        for ident, header in asked:
            answer(router, ident, p.ok_reply(header["id"]))

    def sent():
        # The client's thread is here, so it sent the window before it came here.
        assert window_seen.wait(RECV_TIMEOUT_MS / 1000)  # the window is on its way
        calls.append(("sent", None))

    with serving(script), session.patience(30.0):
        tags = [
            tag
            for tag, _header, _ in session.pipeline(
                [(i, "stat", {"name": "x"}, None) for i in range(4)], window=2, sent=sent
            )
        ]
    assert sorted(tags) == [0, 1, 2, 3]
    assert calls.count(("sent", None)) == 1

    def refuse():
        raise NotFound("a check failed")

    def unanswered():
        receive(router)  # asked; its answer would come too late

    with serving(unanswered), pytest.raises(NotFound, match="a check failed"):
        for _ in session.pipeline([(0, "stat", {"name": "x"}, None)], sent=refuse):
            pytest.fail("a reply was handed on after the check failed")


def test_unavailable_is_sent_again_with_the_same_id_then_succeeds(broker):
    router, session = broker
    seen = []

    def script():
        ident, header = receive(router)
        seen.append(header["id"])
        answer(router, ident, p.error_reply(header["id"], "unavailable", "no worker"))
        ident, header = receive(router)
        seen.append(header["id"])
        answer(router, ident, p.ok_reply(header["id"], entries=[]))

    with serving(script):
        header, _ = session.call("ls")
    assert header["entries"] == [] and len(seen) == 2 and seen[0] == seen[1]


def test_no_reply_is_retried_with_the_same_id_and_then_times_out_clearly(broker):
    router, session = broker
    with pytest.raises(Timeout, match=r"no reply to stat .*\(3 tries\)"):
        session.call("stat", name="x")
    ids = []
    while router.poll(0):
        ids.append(p.decode(router.recv_multipart()[1])["id"])
    assert len(ids) == 3 and len(set(ids)) == 1


def test_an_error_reply_raises_its_exception_and_a_late_duplicate_is_ignored(broker):
    router, session = broker

    def script():
        ident, first = receive(router)
        answer(router, ident, p.error_reply(first["id"], "not_found", "no such name"))
        ident, second = receive(router)
        answer(router, ident, p.ok_reply(first["id"], late=True))  # stale: the first id
        answer(router, ident, p.ok_reply(second["id"], fresh=True))

    with serving(script):
        with pytest.raises(NotFound, match="no such name"):
            session.call("stat", name="x")
        header, _ = session.call("stat", name="y")
    assert header.get("fresh") is True and "late" not in header


@pytest.mark.timeout(20)  # it retried for up to 3 x 600 s
def test_patience_waits_longer_for_work_but_not_for_a_store_that_stays_unavailable(broker):
    """Within patience (fsck, gc: a reply may take minutes), a request answered `unavailable`
    again and again (its database or object store is down) is given up within the usual
    budget, timeout * (retries + 1), not the patient one (fsck once retried for 686 s)."""
    router, session = broker
    asked = []

    def script():
        while router.poll(3000):  # longer than the longest backoff
            ident, header = receive(router)
            asked.append(header["id"])
            answer(router, ident, p.error_reply(header["id"], "unavailable", "store down"))

    with serving(script), session.patience(600.0):
        # Given up within the usual budget (0.9 s) and the backoff under way: the patient one
        # (3 x 600 s) would run into the test's 20 s timeout.
        with pytest.raises(Unavailable, match="store down"):
            session.call("fsck")
    assert len(set(asked)) == 1 and len(asked) >= 2  # retried, with the same id


def test_an_error_the_client_gives_up_on_says_so_not_that_it_is_retrying(broker):
    """Issue 26: final errors ended in "retrying" after the client had given up."""
    router, session = broker
    told = "the object store did not answer (connect timeout); retrying"

    def script():  # every try is answered unavailable, until the client stops asking
        while router.poll(1000):
            ident, header = receive(router)
            answer(router, ident, p.error_reply(header["id"], "unavailable", told))

    with serving(script), pytest.raises(Unavailable) as raised:
        session.call("stat", name="x")
    text = str(raised.value)
    assert "retrying" not in text and "the object store did not answer" in text
    assert re.search(r"gave up after \d+ tr(?:y|ies) in \d+ s", text), text


@pytest.mark.parametrize(
    "given,endpoint",
    [
        ("127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("localhost:20001", "tcp://localhost:20001"),
        ("[::1]:5555", "tcp://[::1]:5555"),
        ("tcp://10.0.0.1:5555", "tcp://10.0.0.1:5555"),
        ("ipc:///tmp/fms.sock", "ipc:///tmp/fms.sock"),
    ],
)
def test_a_broker_given_as_host_port_is_a_tcp_endpoint(given, endpoint):
    assert Session(given).broker == endpoint
