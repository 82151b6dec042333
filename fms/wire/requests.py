"""Every request field, in one table: its type, its range, the ops that read it, where it is
required, and what it means when absent.  docs/PROTOCOL.md's *Request fields* is this table in
words, and tests/test_spec.py checks that the two say the same.

:func:`check_request` enforces it: the broker calls it on every client request before anything
else is spent on it, so a worker is only ever handed fields of the right type and range; the
handlers then read them with :func:`~fms.wire.fields.need` and its siblings.

**Nil.** For every optional field, nil is the same as the field's absence (its default); for a
required field, nil is a missing field.  A field an op does not read is ignored, whatever it
holds.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import BadRequest, TooLarge
from .codec import decode
from .fields import (
    HASH_LEN,
    MAX_NAME_BYTES,
    MTIME_MAX,
    MTIME_MIN,
    check_entry_name,
    check_folder_name,
    check_name,
    check_prefix,
)
from .manifest import (
    DIGEST_TREE,
    EXTENT_LEN,
    INLINE_CHUNKS,
    MAX_EXTENTS,
    MAX_META_BYTES,
    MAX_META_KEY,
    MAX_PAGES,
    check_extents,
    check_meta,
    unpack_extents,
)
from .messages import (
    INLINE_MAX,
    LS_PAGE_DEFAULT,
    LS_PAGE_MAX,
    MAX_BATCH_FILES,
    MAX_CHUNK_SIZE,
    MAX_COMMIT_ID,
    MAX_GC_GRACE,
    MAX_HAVE_BATCH,
    MIN_CHUNK_SIZE,
)

__all__ = [
    "ANY_OP",
    "AUDIT_PAGE_MAX",
    "REQUEST_FIELDS",
    "RM_PREFIX_PAGE_MAX",
    "RequestField",
    "check_request",
    "decode_meta",
    "op_fields",
]

INT64_MIN, UINT64_MAX, INT64_MAX = -(2**63), 2**64 - 1, 2**63 - 1
RM_PREFIX_PAGE_MAX = 1000  # names one rm_prefix removes at most
AUDIT_PAGE_MAX = 1000  # audit entries one reply holds at most
ANY_OP = "any"  # a field every op may carry (``as``)
_IDENTITY_OPS = ("id_add", "id_rm", "id_key", "grant", "revoke")
MAX_TAG_CHARS = 128  # characters of a str `of`


class RequestField(NamedTuple):
    """One row of the table.

    :param kind: what the value is: ``str``, ``bin``, ``int``, ``number`` (int or float),
        ``bool``, ``id`` (an int or a str, as a request id), ``map``, or ``array of X``.
    :param ops: the ops that read the field.
    :param required: the ops for which it must be present (and not nil).
    :param lo, hi: the range: of the value (numbers), of the length in bytes (``bin``: exact
        when equal), of the number of items (arrays); per op in ``per_op``.
    :param item_len: for arrays of ``bin``: each item's exact length; for a ``bin`` of items
        (``extents``): the bytes of one, ``lo`` and ``hi`` counting items.
    :param items: for arrays of numbers or strings: each item's range (value, or length in
        characters); arrays of names are checked as names.
    :param default: what absence (or nil) means, in words (the spec's column).
    :param rule: what else holds, in words (the spec's column); ``name`` and ``prefix`` rules
        are checked by :func:`check_name` and :func:`check_prefix`.
    """

    kind: str
    ops: tuple
    required: tuple = ()
    lo: float | None = None
    hi: float | None = None
    per_op: dict = {}  # read, never changed: one dict for all is safe
    item_len: int | None = None
    items: tuple | None = None
    default: str = "none"
    rule: str = ""


_NAMED = ("get", "stat", "commit", "rm", "mv", "cp", "versions", "get_version", "restore")

REQUEST_FIELDS: dict = {
    "name": RequestField(
        "str",
        (*_NAMED, "purge", "chunk", "page", *_IDENTITY_OPS),
        (*_NAMED, "purge", *_IDENTITY_OPS),
        rule="a name (see *Names*; for `commit`, `stat` and `rm` also a folder's marker)",
        default="for `chunk` and `page` see *Identities and permissions*",
    ),
    "src": RequestField("str", ("mv", "cp"), ("mv", "cp"), rule="a name, not `name`"),
    "version": RequestField(
        "int",
        ("get_version", "restore", "purge"),
        ("get_version",),
        1,
        INT64_MAX,
        default="for `restore` the newest retained version",
    ),
    "names": RequestField(
        "array of str",
        ("get_many", "commit_many"),
        ("get_many", "commit_many"),
        1,
        MAX_BATCH_FILES,
        default="required",
    ),
    "hash": RequestField(
        "bin",
        ("chunk", "put_chunk", "page", "put_page"),
        ("chunk", "put_chunk", "page", "put_page"),
        HASH_LEN,
        HASH_LEN,
        default="required",
    ),
    "hashes": RequestField(
        "array of bin",
        ("have", "commit_many"),
        ("have", "commit_many"),
        0,
        MAX_HAVE_BATCH,
        per_op={"commit_many": (1, MAX_BATCH_FILES)},  # one per file
        item_len=HASH_LEN,
        default="required",
    ),
    "fresh": RequestField("bool", ("get", "chunk", "get_many", "page"), default="false"),
    "of": RequestField("id", ("chunk",), hi=MAX_TAG_CHARS),
    "len": RequestField("int", ("chunk",), lo=0, hi=MAX_CHUNK_SIZE),
    "chunk_size": RequestField(
        "int",
        ("commit_many",),
        ("commit_many",),
        MIN_CHUNK_SIZE,
        MAX_CHUNK_SIZE,
        default="required",
    ),
    "extents": RequestField(
        "bin", ("commit",), ("commit",), 0, MAX_EXTENTS, item_len=EXTENT_LEN, default="required"
    ),
    "chunks": RequestField(
        "array of bin",
        ("commit",),
        hi=INLINE_CHUNKS,
        item_len=HASH_LEN,
        default="one of `chunks` and `pages`",
    ),
    "pages": RequestField(
        "array of bin",
        ("commit",),
        hi=MAX_PAGES,
        item_len=HASH_LEN,
        default="one of `chunks` and `pages`",
    ),
    "digest": RequestField("bin", ("commit",), ("commit",), HASH_LEN, HASH_LEN, default="required"),
    "digest_kind": RequestField("str", ("commit",), default=DIGEST_TREE),
    "meta": RequestField(
        "map",
        ("commit", "commit_many"),
        hi=MAX_META_BYTES,
        items=(1, MAX_META_KEY),
        default="empty",
    ),
    "metas": RequestField(
        "array of bin",
        ("commit_many",),
        hi=MAX_BATCH_FILES,
        default="every file has `meta`",
        rule="one per file: its `meta`, msgpack-encoded (the header stays flat), held to "
        "its limits",
    ),
    "mtime": RequestField(
        "number", ("commit",), lo=MTIME_MIN, hi=MTIME_MAX, default="storage's clock"
    ),
    "commit": RequestField(
        "str",
        ("commit", "rm", "mv", "cp", "restore", "mv_prefix", "purge", *_IDENTITY_OPS),
        ("commit", "mv", "cp", "restore", "mv_prefix"),
        1,
        MAX_COMMIT_ID,
        default="for `rm`, `purge` a fresh one",
    ),
    "sizes": RequestField(
        "array of int",
        ("commit_many",),
        ("commit_many",),
        items=(0, INLINE_MAX),
        default="required",
        rule="per file, at most `chunk_size`",
    ),
    "mtimes": RequestField(
        "array of number",
        ("commit_many",),
        ("commit_many",),
        items=(MTIME_MIN, MTIME_MAX),
        default="required",
    ),
    "commits": RequestField(
        "array of str",
        ("commit_many",),
        ("commit_many",),
        items=(1, MAX_COMMIT_ID),
        default="required",
    ),
    "prefix": RequestField(
        "str",
        ("ls", "du", "rm_prefix", "mv_prefix", "grant", "revoke"),
        ("rm_prefix", "mv_prefix", "grant", "revoke"),
        hi=MAX_NAME_BYTES,
        default='""',
    ),
    "dest": RequestField(
        "str", ("mv_prefix",), ("mv_prefix",), rule="a folder's name (see *Names*)"
    ),
    "after": RequestField("str", ("ls", "fsck"), default='""'),
    "limit": RequestField(
        "int",
        ("ls", "rm_prefix", "audit"),
        lo=1,
        hi=LS_PAGE_MAX,
        per_op={"rm_prefix": (1, RM_PREFIX_PAGE_MAX), "audit": (1, AUDIT_PAGE_MAX)},
        default=str(LS_PAGE_DEFAULT),
    ),
    "folders": RequestField("bool", ("ls",), default="false"),
    "grace": RequestField(
        "number", ("gc",), lo=0, hi=MAX_GC_GRACE, default="the storage worker's `--gc-grace`"
    ),
    "dry_run": RequestField("bool", ("gc",), default="false"),
    # Identities and permissions.
    "as": RequestField("str", (ANY_OP,), rule="an identity's name"),
    "keys": RequestField("array of str", ("id_add",), items=(40, 40), default="[]"),
    "s3": RequestField("bool", ("id_add", "id_key"), default="false"),
    "gateway": RequestField("bool", ("id_add",), default="false"),
    "curve": RequestField("str", ("id_key",)),
    "remove": RequestField("str", ("id_key",)),
    "role": RequestField("str", ("grant",), ("grant",), default="required"),
    "all": RequestField("bool", ("purge",), default="false"),
    "since": RequestField("number", ("audit",), default="0"),
    "seq": RequestField("int", ("audit",), lo=0, hi=INT64_MAX, default="0"),
    "access_key": RequestField("str", ("s3_key",), ("s3_key",), default="required"),
    "page": RequestField("bin", ("chunk",), lo=HASH_LEN, hi=HASH_LEN),
    "at": RequestField("int", ("chunk",), lo=0, hi=65535),
}


def _range(key: str, f: RequestField, op: str) -> tuple:
    return f.per_op.get(op, (f.lo, f.hi))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value  # not NaN
        and value not in (float("inf"), float("-inf"))
    )


_KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bin": (lambda v: isinstance(v, bytes), "bytes (msgpack bin)"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "id": (lambda v: _is_int(v) or isinstance(v, str), "an integer or a string"),
    "map": (lambda v: isinstance(v, dict), "a map"),
}


def decode_meta(blob: bytes) -> dict[str, str]:
    """One entry of ``metas``: a ``meta`` map, msgpack-encoded.  :raises BadRequest:"""
    try:
        return check_meta(decode(blob, "route"))
    except (BadRequest, TooLarge) as exc:
        raise type(exc)(f"field 'metas': {exc}") from None


def _digest_kind(kind: str) -> None:
    if kind != DIGEST_TREE:
        raise BadRequest(
            f"field 'digest_kind' must be {DIGEST_TREE!r}: a commit's digest is derived from its "
            f"chunk digests, got {kind!r:.40}"
        )


# What else a value must be, beyond its type and range (the spec's rule column); for an array,
# each of its items.
_RULES: dict[str, Callable[[Any], object]] = {
    "names": check_name,
    "metas": decode_meta,
    "name": check_entry_name,  # a file's name; the ops that take only those say so
    "src": check_name,
    "dest": check_folder_name,
    "prefix": check_prefix,
    "extents": lambda blob: check_extents(unpack_extents(blob)),
    "meta": check_meta,
    "digest_kind": _digest_kind,
}


def _check(op: str, key: str, f: RequestField, value: Any) -> None:
    lo, hi = _range(key, f, op)
    if f.kind.startswith("array of "):
        if not isinstance(value, list):
            raise BadRequest(f"field {key!r} must be an array, got {type(value).__name__}")
        if (lo is not None and len(value) < lo) or (hi is not None and len(value) > hi):
            raise BadRequest(f"field {key!r} holds {len(value)} items; {op} takes {lo} to {hi}")
        item = f.kind[len("array of ") :]
        accepts, what = _KINDS[item]
        each = _RULES.get(key)
        for v in value:
            if not accepts(v) or (f.item_len is not None and len(v) != f.item_len):
                size = f" of {f.item_len} bytes" if f.item_len is not None else ""
                raise BadRequest(f"field {key!r} must hold only {what}{size}")
            if (
                f.items is not None
                and not f.items[0] <= (len(v) if item == "str" else v) <= f.items[1]
            ):
                raise BadRequest(f"field {key!r} holds {v!r:.40}, out of range {list(f.items)}")
            if each is not None:
                each(v)
        return
    accepts, what = _KINDS[f.kind]
    if not accepts(value):
        raise BadRequest(f"field {key!r} must be {what}, got {type(value).__name__} {value!r:.40}")
    if f.kind in ("int", "number"):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise BadRequest(f"field {key!r} = {value!r} is out of range [{lo}, {hi}]")
    elif f.kind == "bin" and f.item_len is None and lo is not None and not lo <= len(value) <= hi:
        raise BadRequest(f"field {key!r} must be {lo} bytes, got {len(value)}")
    elif f.kind == "str" and key not in _RULES and lo is not None and not lo <= len(value) <= hi:
        raise BadRequest(f"field {key!r} must be {lo} to {hi} characters, got {len(value)}")
    elif f.kind == "id" and (
        (isinstance(value, str) and len(value) > hi)
        or (_is_int(value) and not INT64_MIN <= value <= UINT64_MAX)
    ):
        raise BadRequest(f"field {key!r} is too long or too large for an id")
    rule = _RULES.get(key)
    if rule is None:
        return
    try:
        rule(value)
    except (BadRequest, TooLarge) as exc:
        if repr(key) in str(exc):
            raise
        raise type(exc)(f"field {key!r}: {exc}") from None


def check_request(op: str, header: dict, partial: bool = False) -> None:
    """Check every field ``op`` reads in ``header`` against :data:`REQUEST_FIELDS`: present
    where required, of its type, within its range; nil counts as absent.  ``partial``: only
    some fields were read (a large header the broker only peeked at: storage checks it whole),
    so a missing one is not held against it.

    :raises BadRequest: saying which field is wrong and how.
    """
    for key, f, required, ok in _BY_OP.get(op, _ANY):
        value = header.get(key)
        if value is None:
            if required and not partial:
                raise BadRequest(f"field {key!r} is missing: {op} needs it")
        elif not ok(value):
            _check(op, key, f, value)  # says what is wrong


def _passes(rule: Callable[[Any], object], value: object) -> bool:
    """Whether ``value`` keeps a field's rule (:data:`_RULES`)."""
    try:
        rule(value)
    except (BadRequest, TooLarge):
        return False
    return True


def _quick(key: str, f: RequestField, op: str) -> Callable[[Any], bool]:
    """A fast yes/no for the common fields (the broker checks every request, storage a commit
    again), or the full check where there is none; :func:`_check` says why on a no.  A yes
    is what :func:`_check` would say; a no may be a value of an unusual type (a subclass) that
    :func:`_check` then passes."""
    lo, hi = _range(key, f, op)
    rule = _RULES.get(key)
    if f.kind == "bin" and lo == hi:
        return lambda v: type(v) is bytes and len(v) == lo
    if f.kind == "bool":
        return lambda v: v is True or v is False
    if f.kind == "int" and lo is not None:
        return lambda v: type(v) is int and lo <= v <= hi
    if f.kind == "id":
        return lambda v: (
            (type(v) is int and INT64_MIN <= v <= UINT64_MAX) or (type(v) is str and len(v) <= hi)
        )
    if f.kind == "number" and lo is not None and hi is not None and rule is None:
        return lambda v: (type(v) is float or type(v) is int) and lo <= v <= hi  # finite
    if f.kind == "str" and rule is not None:  # the rule checks the length too
        return lambda v: type(v) is str and _passes(rule, v)
    if f.kind == "str" and lo is not None and hi is not None:
        return lambda v: type(v) is str and lo <= len(v) <= hi
    if f.kind == "bin" and f.item_len is not None:  # a bin of items: the rule counts them
        return lambda v: type(v) is bytes and (rule is None or _passes(rule, v))
    if f.kind == "map":
        return lambda v: type(v) is dict and (rule is None or _passes(rule, v))
    if f.kind == "array of bin" and f.item_len is not None and f.items is None:
        size = f.item_len
        return lambda v: (
            type(v) is list
            and (lo is None or len(v) >= lo)
            and (hi is None or len(v) <= hi)
            and all(type(x) is bytes and len(x) == size for x in v)
        )

    def full(v: object) -> bool:
        try:
            _check(op, key, f, v)
        except BadRequest:
            return False
        return True

    return full


def op_fields(op: str) -> tuple:
    """``(name, RequestField)`` of the fields ``op`` reads."""
    return tuple((key, f) for key, f, _required, _ok in _BY_OP.get(op, _ANY))


_BY_OP: dict = {}
for _key, _f in REQUEST_FIELDS.items():
    for _op in _f.ops:
        _BY_OP[_op] = (*_BY_OP.get(_op, ()), (_key, _f, _op in _f.required, _quick(_key, _f, _op)))
_ANY = _BY_OP.pop(ANY_OP, ())  # fields every op may carry
for _op in _BY_OP:
    _BY_OP[_op] += _ANY
