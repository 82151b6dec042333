"""check_name's shortcut for printable ASCII names accepts and refuses what its character
checks (the patterns, NFC) do, for every character."""

import re
import unicodedata

from fms.errors import BadRequest
from fms.wire.fields import MAX_NAME_BYTES, check_name

_REFUSED = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u200b-\u200d\u2060\ufeff\u180e]"
)


def _reference(name: str) -> str | None:
    """The name check_name gives, by the rules spelled out, or None if it refuses it."""
    if not name or _REFUSED.search(name):
        return None
    name = unicodedata.normalize("NFC", name)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES or name.startswith("/"):
        return None
    if any(part in ("", ".", "..") for part in name.split("/")):
        return None
    return name


def _checked(name: str) -> str | None:
    try:
        return check_name(name)
    except BadRequest:
        return None


def test_every_character_in_a_name() -> None:
    for code in [*range(0x3000), 0xFEFF, 0x1F600]:
        for name in (f"a{chr(code)}b", chr(code), f"d/{chr(code)}"):
            assert _checked(name) == _reference(name), hex(code)


def test_lengths_and_parts() -> None:
    for name in ("a" * 1024, "a" * 1025, "é" * 512, "é" * 513, "e\u0301", "/a", "a//b", "./a"):
        assert _checked(name) == _reference(name), name
    assert check_name("e\u0301") == "\u00e9"
