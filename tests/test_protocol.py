"""The wire codec and name rules, as pure functions: no sockets."""

import io

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from storage_helpers import manifest_of

from fms import wire as p
from fms.cli import parse_size
from fms.errors import BadRequest


def test_header_round_trip():
    header = {"v": p.PROTOCOL_VERSION, "op": "chunk", "id": 7, "hash": b"\x01" * 32}
    assert p.decode(p.encode(header)) == header


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\xc1",
        b"\x81",
        p.encode([1, 2]),
        p.encode(5),
        p.encode({"a": 1}) + b"extra",
        b"\x92\x01",
    ],
)
def test_decode_rejects_junk_with_bad_request(junk):
    with pytest.raises(BadRequest):
        p.decode(junk)


@given(st.binary(max_size=512))
def test_decode_never_raises_anything_but_bad_request(junk):
    try:
        p.decode(junk)
    except BadRequest:
        pass


def test_data_frame_is_msgpack_bin_read_by_unpackb():
    payload = b"hello chunk" * 1000
    frame = p.pack_data(payload)
    assert frame[:5] == b"\xc6" + len(payload).to_bytes(4, "big")
    assert msgpack.unpackb(bytes(frame)) == payload


def test_data_frame_built_in_place_with_readinto():
    payload = bytes(range(256)) * 40
    frame = p.data_buffer(len(payload))
    n = io.BytesIO(payload).readinto(memoryview(frame)[p.DATA_PREFIX_LEN :])
    assert n == len(payload)
    assert msgpack.unpackb(bytes(frame)) == payload


def test_unpack_data_is_a_view_not_a_copy():
    frame = p.pack_data(b"abcdef")
    view = p.unpack_data(frame)
    frame[p.DATA_PREFIX_LEN] = ord("X")  # write through the buffer...
    assert bytes(view) == b"Xbcdef"  # ...and the view sees it: same memory


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000])
def test_unpack_data_reads_what_msgpack_packb_makes(size):
    payload = bytes(size)
    assert bytes(p.unpack_data(msgpack.packb(payload))) == payload


@pytest.mark.parametrize(
    "bad", [b"", b"\xc6\x00\x00\x00\x05abc", b"\xa3abc", b"\xc4\x05ab", b"\xc6\x00\x00\x00\x01ab"]
)
def test_unpack_data_rejects_frames_that_are_not_one_bin(bad):
    with pytest.raises(BadRequest):
        p.unpack_data(bad)


@pytest.mark.parametrize(
    "name", ["a", "a/b/c.txt", "ünïcødé/ファイル", "x" * 1024, "a..b", ".hidden"]
)
def test_valid_names(name):
    assert p.check_name(name) == name


@pytest.mark.parametrize(
    "name,why",
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a/..", "'..'"),
        ("a\x00b", "NUL"),
        ("x" * 1025, "1024"),
        ("a//b", "empty"),
        ("a/./b", "'.'"),
        ("a/", "empty"),
        ("tab\there", "control"),
        (None, "string"),
    ],
)
def test_invalid_names_say_why(name, why):
    with pytest.raises(BadRequest, match=why):
        p.check_name(name)


def test_names_and_prefixes_are_normalised_to_nfc():
    decomposed, composed = "cafe\u0301/re\u0301sume\u0301.txt", "caf\u00e9/r\u00e9sum\u00e9.txt"
    assert p.check_name(decomposed) == composed == p.check_name(composed)
    assert p.check_prefix("cafe\u0301/") == "caf\u00e9/"
    assert p.check_folder("cafe\u0301") == "caf\u00e9/"


@pytest.mark.parametrize(
    "name,shown",
    [
        ("invoice\u202efdp.exe", "U+202E RIGHT-TO-LEFT OVERRIDE at character 8"),
        ("pay\u200bpal/login", "U+200B ZERO WIDTH SPACE at character 4"),
        ("a/\u2066b", "U+2066 LEFT-TO-RIGHT ISOLATE at character 3"),
        ("\ufeffx", "U+FEFF ZERO WIDTH NO-BREAK SPACE at character 1"),
        ("x\u200dy", "U+200D ZERO WIDTH JOINER at character 2"),
        ("r\u200fl", "U+200F RIGHT-TO-LEFT MARK at character 2"),
    ],
)
def test_bidi_controls_and_zero_width_characters_are_refused_saying_which_and_where(name, shown):
    with pytest.raises(BadRequest) as refused:
        p.check_name(name)
    assert shown in str(refused.value) and "remove it" in str(refused.value)
    assert "\u202e" not in str(refused.value)  # the message itself shows as it is


def test_need_checks_types_and_never_takes_bool_for_int():
    assert p.need_int({"n": 3}, "n") == 3
    with pytest.raises(BadRequest, match="missing"):
        p.need({}, "n", int)
    with pytest.raises(BadRequest, match="bool"):
        p.need_int({"n": True}, "n")
    with pytest.raises(BadRequest, match="out of range"):
        p.need_int({"n": -1}, "n")
    with pytest.raises(BadRequest, match="32-byte"):
        p.need_hash({"h": b"short"}, "h")


@pytest.mark.parametrize(
    "text,value",
    [
        ("4096", 4096),
        ("512M", 512 * p.MiB),
        ("2G", 2 * p.GiB),
        ("1.5k", 1536),
        ("64MiB", 64 * p.MiB),
        ("3mb", 3 * p.MiB),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "12Q", "-5", "1e3"])
def test_parse_size_rejects_nonsense(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(text)


def test_protocol_doc_covers_every_op_error_code_and_route_type():
    import os

    doc_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "PROTOCOL.md")
    with open(doc_path) as f:
        doc = f.read()
    assert f"version {p.PROTOCOL_VERSION}" in doc
    for name in [
        *p.OP_SERVICE,
        *p.ERROR_CODES,
        "ready",
        "welcome",
        "refused",
        "hb",
        "bye",
        "reregister",
        "req",
        "rep",
        "inv",
        "policy",
    ]:
        assert f"`{name}`" in doc, f"docs/PROTOCOL.md does not mention `{name}`"


# --- get_many: the batched read's reply ---


def _manifest(name, content):
    return manifest_of(name, content, chunk_size=p.DEFAULT_CHUNK_SIZE)


def test_batch_reply_round_trip_keeps_order_errors_and_contents():
    files = {"a": b"alpha", "e": b"", "b": b"beta" * 1000}
    batch = p.BatchReply()
    batch.manifest(_manifest("a", files["a"]), files["a"])
    batch.error("not_found", "'gone' not found")
    batch.manifest(_manifest("e", b""), None)
    batch.manifest(_manifest("b", files["b"]), files["b"])
    header = msgpack.unpackb(p.encode({"results": batch.results}))  # as it travels
    results = p.read_batch(header, batch.frame(), ["a", "gone", "e", "b"])
    assert [r.get("error") for r, _ in results] == [None, "not_found", None, None]
    assert [bytes(d) if d is not None else None for _, d in results] == [
        b"alpha",
        None,
        None,
        b"beta" * 1000,
    ]
    assert all(p.inline_ok(r["manifest"], d) for r, d in results if d is not None)


def test_batch_reply_leaves_out_content_past_its_byte_cap(monkeypatch):
    monkeypatch.setattr(p.batch, "MAX_BATCH_BYTES", 10)
    batch = p.BatchReply()
    for name in ("a", "b", "c"):
        batch.manifest(_manifest(name, b"1234"), b"1234")
    assert [r["inline"] for r in batch.results] == [True, True, False]
    assert len(p.unpack_data(batch.frame())) == 8


@pytest.mark.parametrize(
    "frame, names, why",
    [
        (p.pack_data(b"abc"), ["a"], "shorter"),
        (p.pack_data(b"alpha!"), ["a"], "longer"),
        (p.pack_data(b"alpha"), ["other"], "another name"),
        (p.pack_data(b"alpha"), ["a", "b"], "1 results for 2 names"),
    ],
)
def test_read_batch_refuses_replies_that_do_not_add_up(frame, names, why):
    header = {"results": [{"manifest": _manifest("a", b"alpha"), "inline": True}]}
    with pytest.raises(BadRequest, match=why):
        p.read_batch(header, frame, names)


def test_get_many_takes_1_to_256_valid_names():
    assert p.need_names({"names": ["a", "b/c"]}) == ["a", "b/c"]
    for bad in ([], ["x"] * (p.MAX_BATCH_FILES + 1), ["../etc"], [1]):
        with pytest.raises(BadRequest):
            p.need_names({"names": bad})


def test_the_largest_manifest_and_stat_fit_their_bounds():
    """What the broker reserves for a manifest (MANIFEST_MAX) and for a change's reply (4 KiB)
    holds at the limits: the longest name, 2 KiB of metadata, the most a manifest lists."""
    from fms.storage.model import Version

    meta = {f"k{i:03d}xxxx": "v" * 24 for i in range(64)}  # 2,048 bytes of keys and values
    assert p.check_meta(meta) == meta
    name, commit = "é" * 512, "c" * p.MAX_COMMIT_ID
    stat = (name, 2**62, b"d" * 32, p.DIGEST_CONTENT, p.MAX_CHUNK_SIZE, p.MAX_FILE_CHUNKS)
    stat += (1.5e9, 2**40, commit, 1.7e9, meta)
    one_chunk_each = tuple((p.MIN_CHUNK_SIZE, 1) for _ in range(p.INLINE_CHUNKS))
    inline = Version(*stat, extents=one_chunk_each, chunks=(b"c" * 32,) * p.INLINE_CHUNKS)
    paged = Version(*stat, extents=((4096, 4096 * 31 * p.PAGE_CHUNKS),), pages=(b"p" * 32,) * 31)
    listed_by_id = Version(*stat, body=b"b" * 32)
    for version in (inline, paged, listed_by_id):
        assert len(p.encode(version.manifest(p.BLAKE3))) <= p.MANIFEST_MAX
    reply = p.ok_reply(2**63 - 1, stat={**inline.summary(), "deleted": True})
    assert len(p.encode(reply)) <= 4096
