"""fms.wire.decode of a small route or request header (up to fms.limits.SMALL_FRAME bytes: decoded
without msgpack's hooks, its maps and arrays counted after) gives what decoding with the hooks
gives: the same map, or a refusal with the same code, whatever the bytes."""

import contextlib

import msgpack
import pytest
import zmq
from fuzzing import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from fms import limits
from fms import wire as p
from fms.broker import headers as h
from fms.errors import BadRequest

SMALL_FRAME = limits.SMALL_FRAME


def hooked(buf, kind):
    """fms.wire.decode with every frame's containers counted by the hooks as they are built
    (as every frame was before the small ones were counted after)."""
    with _small_frame(0):
        return p.decode(buf, kind)


@contextlib.contextmanager
def _small_frame(size: int):
    saved, limits.SMALL_FRAME = limits.SMALL_FRAME, size
    try:
        yield
    finally:
        limits.SMALL_FRAME = saved


KINDS = ("route", "request")


def outcome(decode, buf, kind):
    """What a decoder makes of ``buf``: ("ok", the map packed again: a NaN in it equals
    itself so) or ("refused", its error code)."""
    try:
        return "ok", msgpack.packb(decode(buf, kind), use_bin_type=True)
    except BadRequest as exc:
        return "refused", exc.code


def same(buf: bytes) -> None:
    for kind in KINDS:
        want = outcome(hooked, buf, kind)
        assert outcome(p.decode, buf, kind) == want, (kind, buf)
        # as the broker's loop hands it: a zmq.Frame, read in place
        assert outcome(p.decode, h.buffer(zmq.Frame(buf)), kind) == want, (kind, buf)


def nested(depth: int, width: int = 1) -> object:
    value: object = {}
    for _ in range(depth):
        value = [value] * width
    return value


@pytest.mark.parametrize(
    "obj",
    [
        {"t": "rep", "k": 1733356800000000, "ok": True, "cache": "hit"},
        {"v": 3, "op": "get", "id": 7, "ttl_ms": 30000, "name": "bench/object-000001"},
        {"a": [[], []], "b": {"c": [], "d": {}}, "e": []},  # 8 containers: the most
        {"a": [[], []], "b": {"c": [], "d": {}}, "e": [], "f": []},  # 9: one too many
        {"deep": nested(7)},  # 9 in a chain
        {"deep": nested(6)},  # 8 in a chain
        {"deep": nested(500)},  # nesting far deeper than the count goes
        {"wide": nested(2, 30)},
        [1, 2, 3],  # not a map
        [[], [], [], [], [], [], [], [], []],  # not a map, and too many containers
        {f"k{i}": i for i in range(limits.MAX_MAP_LEN)},
        {f"k{i}": i for i in range(limits.MAX_MAP_LEN + 1)},  # a map over MAX_MAP_LEN
        {"s": "x" * 900, "b": b"y" * 40},
        {1: "an int key"},
        {b"bytes key": 1},
        {"e": msgpack.ExtType(1, b"x")},
        {"e": msgpack.ExtType(1, b"")},
        "a str",
        None,
    ],
)
def test_same_outcome_as_the_wire_decoder(obj):
    buf = msgpack.packb(obj, use_bin_type=True)
    assert len(buf) <= SMALL_FRAME or obj == {"deep": nested(500)}
    same(buf)


def test_the_container_limit_is_kept():
    """MAX_CONTAINERS maps and arrays in all pass, one more is refused, however they nest."""
    assert limits.MAX_CONTAINERS == 8
    for fits, too_many in [
        ({"a": [[], []], "b": {"c": [], "d": {}}, "e": []}, {"a": [[], []], "f": [[[[[]]]]]}),
        ({"deep": nested(6)}, {"deep": nested(7)}),
    ]:
        for kind in KINDS:
            assert p.decode(msgpack.packb(fits), kind) == fits
            with pytest.raises(BadRequest, match="too many nested"):
                p.decode(msgpack.packb(too_many), kind)


@pytest.mark.parametrize(
    "buf",
    [
        b"",
        b"\x81",  # a map header and nothing more
        b"\xc1",  # never used
        b"\x80\x80",  # trailing data
        b"\x81\xa1k\xdb\xff\xff\xff\xff",  # a str claiming 4 GiB
        b"\x81\xa1k\xdd\x00\x01\x00\x00",  # an array claiming 65536 items
        b"\x81\xa1k\xdf\x00\x01\x00\x00",  # a map claiming 65536 keys
        msgpack.packb({"x": 1}) + b"\x00" * (SMALL_FRAME - 4),  # at the size limit
        msgpack.packb({"x": "y" * SMALL_FRAME}),  # over it: fms.wire.decode's own
    ],
)
def test_same_outcome_for_broken_frames(buf):
    same(buf)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), inner, max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=examples(300, 3000), deadline=None)
@given(
    obj=st.one_of(values, st.dictionaries(st.text(max_size=8), values, max_size=8)),
    cut=st.integers(min_value=0, max_value=64),
    junk=st.binary(max_size=8),
)
def test_any_small_frame_gets_the_same_outcome(obj, cut, junk):
    """Whole, cut short, with bytes after it, or with one byte changed."""
    buf = msgpack.packb(obj, use_bin_type=True)
    same(buf)
    same(buf[: max(0, len(buf) - cut)])
    same(buf + junk)
    if buf:
        i = cut % len(buf)
        same(buf[:i] + bytes([(buf[i] + 1 + cut) % 256]) + buf[i + 1 :])


@settings(max_examples=examples(300, 3000), deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_get_the_same_outcome(buf):
    same(buf)
