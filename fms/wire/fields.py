"""Reading a header's fields: every handler reads its fields through these checks, never by
bare indexing.  Also the rules for names, hashes, mtimes and how a file splits into chunks."""

import unicodedata
from collections.abc import Mapping
from typing import Any, TypeAlias, TypeVar, overload

from ..errors import BadRequest
from ..lazyre import compiled_on_use
from .messages import INLINE_MAX

__all__ = [
    "HASH_LEN",
    "MAX_NAME_BYTES",
    "MTIME_MAX",
    "MTIME_MIN",
    "RESULT_MESSAGE_MAX",
    "Digest",
    "check_entry_name",
    "check_folder",
    "check_folder_name",
    "check_mtime",
    "check_name",
    "check_prefix",
    "chunk_count",
    "chunk_length",
    "is_folder_name",
    "need",
    "need_hash",
    "need_hashes",
    "need_int",
    "result_message",
    "travels_inline",
]

HASH_LEN = 32  # a digest (sha256 or BLAKE3-256), bytes
Digest: TypeAlias = bytes  # a digest (HASH_LEN bytes, the store's function): a chunk's or a file's
MAX_NAME_BYTES = 1024  # a name in UTF-8
# A file's error message in a batch's results (commit_many's): what the broker reserves for each
# in the reply (fms.broker.admission), a name and a sentence, in UTF-8.
RESULT_MESSAGE_MAX = MAX_NAME_BYTES + 256
# A file's mtime, in seconds since the epoch: finite, from 1900-01-01 to 9999-12-31 (what
# datetime and every filesystem fms writes to can hold).
MTIME_MIN = -2208988800.0
MTIME_MAX = 253402300799.0


# --- file shape: the one home of the rules that split a file into chunks ---


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a ``size``-byte file has in ``chunk_size``-byte chunks (0 if empty)."""
    return -(-size // chunk_size)


def chunk_length(i: int, size: int, chunk_size: int) -> int:
    """The length of chunk ``i``: ``chunk_size``, except the last, which holds the rest."""
    return min(chunk_size, size - i * chunk_size)


def travels_inline(size: int, chunks: int) -> bool:
    """Whether a file's content travels in the same message as its manifest (one round trip)."""
    return size <= INLINE_MAX and chunks == 1


# --- field checks: every handler reads its fields through these, never by bare indexing ---


T = TypeVar("T")
U = TypeVar("U")
D = TypeVar("D")


@overload
def need(header: Mapping[str, Any], key: str, kind: type[T]) -> T: ...
@overload
def need(header: Mapping[str, Any], key: str, kind: tuple[type[T], type[U]]) -> T | U: ...
@overload
def need(
    header: Mapping[str, Any], key: str, kind: type[T], *, optional: bool, default: D
) -> T | D: ...
@overload
def need(
    header: Mapping[str, Any],
    key: str,
    kind: tuple[type[T], type[U]],
    *,
    optional: bool,
    default: D,
) -> T | U | D: ...
@overload
def need(header: Mapping[str, Any], key: str, kind: type[T], *, optional: bool) -> T | None: ...
@overload
def need(
    header: Mapping[str, Any], key: str, kind: tuple[type[T], type[U]], *, optional: bool
) -> T | U | None: ...
def need(
    header: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    *,
    optional: bool = False,
    default: object = None,
) -> Any:
    """Read ``header[key]`` and check its type; bools are never ints.  An optional field that is
    missing reads as ``default``.  Nil counts as absent, for every field (docs/PROTOCOL.md,
    *Request fields*).

    :raises BadRequest: missing (unless optional) or of the wrong type.
    """
    if header.get(key) is None:
        if optional:
            return default
        raise BadRequest(f"field {key!r} is missing")
    value = header[key]
    if isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"field {key!r} must be {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise BadRequest(f"field {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


@overload
def need_int(header: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int: ...
@overload
def need_int(
    header: Mapping[str, Any],
    key: str,
    *,
    lo: int = 0,
    hi: int = 2**63 - 1,
    optional: bool,
    default: D,
) -> int | D: ...
@overload
def need_int(
    header: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 2**63 - 1, optional: bool
) -> int | None: ...
def need_int(
    header: Mapping[str, Any],
    key: str,
    *,
    lo: int = 0,
    hi: int = 2**63 - 1,
    optional: bool = False,
    default: object = None,
) -> object:
    """An integer field from ``lo`` to ``hi`` (an optional one that is missing: ``default``)."""
    value = need(header, key, int, optional=optional, default=default)
    if isinstance(value, int) and not lo <= value <= hi:
        raise BadRequest(f"field {key!r} = {value} is out of range [{lo}, {hi}]")
    return value


def need_hash(header: Mapping[str, Any], key: str) -> bytes:
    value = need(header, key, bytes)
    if len(value) != HASH_LEN:
        raise BadRequest(f"field {key!r} must be a {HASH_LEN}-byte digest, got {len(value)} bytes")
    return value


def need_hashes(header: Mapping[str, Any], key: str, limit: int) -> list[bytes]:
    values = need(header, key, list)
    if len(values) > limit:
        raise BadRequest(f"field {key!r} holds {len(values)} hashes, at most {limit} allowed")
    for value in values:
        if not isinstance(value, bytes) or len(value) != HASH_LEN:
            raise BadRequest(f"field {key!r} must hold {HASH_LEN}-byte digests")
    return values


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        bytes: "bytes",
        list: "a list",
        dict: "a map",
        bool: "a boolean",
        float: "a number",
    }
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


# --- names ---

_CONTROL = compiled_on_use(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
# Characters that make a name show as another (bidi controls: `invoice\u202efdp.exe` shows as
# `invoiceexe.pdf`) or two names show alike (zero-width characters).
_HIDDEN = compiled_on_use(
    "[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidi marks, embeddings, isolates
    "\u200b-\u200d\u2060\ufeff\u180e]"  # zero-width space, (non-)joiner, word joiner, BOM
)


def check_name(name: object) -> str:
    """Return ``name`` in NFC if it is a valid key, else raise :class:`BadRequest` saying why.

    A name is a key, not a path: relative, ``/``-separated, no empty, ``.`` or ``..`` parts,
    no NUL or control characters, no bidi controls or zero-width characters, at most 1024 bytes
    in UTF-8.  It is normalised to NFC, so ``café`` typed as ``e`` + a combining accent and as
    ``é`` is one name.  Storage never uses a name as a path, so this is about clear errors,
    names that show as what they are, and ``get -r`` writing only inside its destination.
    """
    if not isinstance(name, str):
        raise BadRequest(f"a name must be a string, got {type(name).__name__}")
    if not name:
        raise BadRequest("the name is empty; give a name such as 'photos/cat.jpg'")
    if name.isascii() and name.isprintable():
        # No NUL, control, bidi or zero-width character (none is printable ASCII), and in
        # NFC already, a byte a character: the common name, checked without the patterns.
        size = len(name)
    else:
        name, size = _check_characters(name)
    if size > MAX_NAME_BYTES:
        raise BadRequest(f"name is {size} bytes long; names are at most {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise BadRequest(f"name {name!r} is absolute; names are relative keys such as 'a/b.txt'")
    for part in name.split("/"):
        if part == "..":
            raise BadRequest(f"name {name!r} has a '..' component; names cannot climb out")
        if part in ("", "."):
            raise BadRequest(
                f"name {name!r} has an empty or '.' component; write it as "
                f"{'/'.join(p for p in name.split('/') if p not in ('', '.'))!r}"
            )
    return name


def _check_characters(name: str) -> tuple[str, int]:
    """``name`` in NFC and its length in UTF-8, if it holds no NUL, control, bidi or
    zero-width character and encodes; else :class:`BadRequest` saying why."""
    if "\x00" in name:
        raise BadRequest(f"name {name!r} contains a NUL byte; remove it")
    if _CONTROL.search(name):
        raise BadRequest(f"name {name!r} contains a control character; remove it")
    hidden = _HIDDEN.search(name)
    if hidden:
        char = hidden.group()
        raise BadRequest(
            f"name {name!a} contains U+{ord(char):04X} "
            f"{unicodedata.name(char, 'FORMAT CHARACTER')} at character {hidden.start() + 1}: "
            f"bidi controls and zero-width characters are not allowed in names (they make a "
            f"name show as another); remove it"
        )
    try:
        name = unicodedata.normalize("NFC", name)
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"name {name!r} is not valid UTF-8") from None
    return name, size


def is_folder_name(name: object) -> bool:
    """Whether ``name`` is a folder marker's: a name followed by one ``/``."""
    return isinstance(name, str) and name.endswith("/")


def check_folder_name(name: object) -> str:
    """A folder marker's name: a valid name followed by one ``/`` (``photos/2026/``), at most
    MAX_NAME_BYTES in all.  A marker is how an empty folder persists (an object store's
    ``folder/`` key).  :raises BadRequest: anything else."""
    if not is_folder_name(name):
        raise BadRequest(f"a folder's name ends with '/', got {name!r}")
    assert isinstance(name, str)
    name = check_name(name[:-1]) + "/"  # in NFC, as every name
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise BadRequest(f"a folder's name is at most {MAX_NAME_BYTES} bytes, with its '/'")
    return name


def check_entry_name(name: object) -> str:
    """A file's name (:func:`check_name`) or a folder marker's (:func:`check_folder_name`)."""
    return check_folder_name(name) if is_folder_name(name) else check_name(name)


def check_mtime(mtime: float) -> float:
    """An mtime as a float if finite and within [MTIME_MIN, MTIME_MAX], else :class:`BadRequest`."""
    value = float(mtime)
    if not MTIME_MIN <= value <= MTIME_MAX:  # also false for NaN
        raise BadRequest(
            f"mtime {mtime!r} is not a time between the years 1900 and 9999; "
            f"send seconds since 1970 as a finite number"
        )
    return value


def check_prefix(prefix: object) -> str:
    """A listing prefix: any string without NUL, at most MAX_NAME_BYTES, in NFC (as names)."""
    if not isinstance(prefix, str):
        raise BadRequest(f"a prefix must be a string, got {type(prefix).__name__}")
    if "\x00" in prefix or len(prefix.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        raise BadRequest(f"field 'prefix' holds a NUL byte or is over {MAX_NAME_BYTES} bytes")
    try:
        return unicodedata.normalize("NFC", prefix)
    except UnicodeError:
        raise BadRequest(f"prefix {prefix!r} is not valid UTF-8") from None


def check_folder(prefix: object) -> str:
    """A folder, as ``rm -r``, ``du``, ``ls -r`` and ``find`` mean it: ``album`` and ``album/``
    both mean the names under ``album/`` (never ``albumX``); ``""`` is every name."""
    prefix = check_prefix(prefix)
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def result_message(text: str) -> str:
    """``text`` as a file's error message in a batch's results: whole if it fits in
    :data:`RESULT_MESSAGE_MAX` bytes of UTF-8, else its start, cut between characters, and how
    many characters were left out (a refusal names the file twice and the identity's grants:
    up to about 3 KiB, and a batch holds up to MAX_BATCH_FILES of them)."""
    raw = text.encode()
    if len(raw) <= RESULT_MESSAGE_MAX:
        return text
    kept = raw[: RESULT_MESSAGE_MAX - 40].decode("utf-8", "ignore")
    return f"{kept}...({len(text) - len(kept)} more characters)"
