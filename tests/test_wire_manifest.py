"""check_manifest's one-pass check of a plain manifest accepts and refuses exactly what its
field-by-field check does (a dict subclass takes that path), with the same error."""

import struct

import pytest

from fms.wire import check_manifest, one_chunk_digest
from fms.wire.digests import blake3

NAME = "photos/cat.jpg"


class _FieldByField(dict):
    """Not a plain dict: check_manifest checks it field by field."""


def _manifest(**change: object) -> dict:
    extents = struct.pack(">QQ", 1 << 20, 4096)
    chunk = blake3(b"x" * 4096)
    manifest = {
        "name": NAME,
        "size": 4096,
        "count": 1,
        "chunk_size": 1 << 20,
        "digest": one_chunk_digest(extents, chunk, blake3),
        "digest_fn": "blake3",
        "digest_kind": "tree",
        "mtime": 1_700_000_000.5,
        "version": 3,
        "commit": "c1",
        "extents": extents,
        "chunks": [chunk],
    }
    for key, value in change.items():
        if value is _MISSING:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    return manifest


_MISSING = object()
_VALUES = [
    _MISSING,
    None,
    True,
    False,
    -1,
    0,
    1,
    2,
    4096,
    2**63,
    1.5,
    float("nan"),
    1e300,
    "x",
    "blake3",
    "sha256",
    "tree",
    "content",
    "",
    "a/../b",
    "bad\u202ename",
    b"",
    b"\0" * 32,
    b"\0" * 31,
    struct.pack(">QQ", 4096, 4096),
    struct.pack(">QQ", 1 << 20, 4097),
    struct.pack(">QQ", 1024, 4096),
    struct.pack(">QQ", 4096, 2048) * 2,
    [],
    [b"\0" * 32],
    [b"\0" * 32] * 2,
    ["x" * 32],
    {},
    {"k": "v"},
    {"k": 1},
    {"k" * 200: "v"},
    {"k": "v" * 3000},
]
_KEYS = [
    "name",
    "size",
    "count",
    "chunk_size",
    "digest",
    "digest_fn",
    "digest_kind",
    "mtime",
    "version",
    "meta",
    "extents",
    "chunks",
    "pages",
    "body",
]


def _outcome(manifest: dict, name: str | None) -> object:
    try:
        checked = check_manifest(manifest, name)
    except Exception as exc:  # the outcome is compared, whatever it is
        return type(exc), str(exc)
    assert checked is manifest
    return "ok"


@pytest.mark.parametrize("key", _KEYS)
@pytest.mark.parametrize("name", [None, NAME])
def test_one_pass_agrees_with_field_by_field(key: str, name: str | None) -> None:
    for value in _VALUES:
        manifest = _manifest(**{key: value})
        assert _outcome(manifest, name) == _outcome(_FieldByField(manifest), name), (key, value)


def test_an_empty_file_and_metadata_pass() -> None:
    empty = _manifest(size=0, count=0, extents=b"", chunks=[], meta={"a": "b"})
    assert check_manifest(empty) is empty
    assert check_manifest(_manifest(mtime=5)) is not None


def test_a_known_name_is_not_checked_again_but_another_is() -> None:
    with pytest.raises(Exception, match=r"'\.\.' component"):
        check_manifest(_manifest(name="a/../b"), NAME)
    assert check_manifest(_manifest(), NAME)["name"] == NAME
