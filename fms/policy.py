"""Who may do what: identities, their grants, and the one place that decides every op.

An **identity** is a name with credentials (CURVE public keys, S3 access keys) and **grants**. A
grant is a role on a prefix:

- ``read``: get, ls, stat, versions, du (and the chunks of the files it may read);
- ``write``: read, plus put, rm, rm -r, mv, cp, restore;
- ``admin``: everything under its prefix, including purge; on the whole store (prefix ``""``)
  also gc, fsck, the audit log, the store's totals and managing identities and grants.

A prefix is matched at folder boundaries: a grant on ``album`` covers the name ``album`` and
every name under ``album/``, never ``albumX``; a grant on ``""`` covers every name.

Every decision takes the :class:`Identity` that the request's *authenticated* key resolved to
(the broker passes the key it authenticated; storage and the cache resolve it in the store's
:class:`Policy`) and the names the request touches, never a name or role the request claims.
Two identities are built in: :data:`LOCAL`, the user of a cluster without CURVE (on loopback,
as before identities existed) and the system's own requests (a worker asking for a client),
and :data:`ALLOW_DIR`, a key found in the broker's ``--allow`` folder; both may do everything.
A key that is neither in the store nor in that folder gets :data:`UNKNOWN`, which may do
nothing.  A refusal is :class:`~fms.errors.Forbidden` (the wire's ``forbidden``), naming the op,
the name or prefix, and the grants the identity has.

Listings are filtered, not refused: :func:`scans` turns an identity's grants and a listing's
prefix into the disjoint ranges of the name index it may read, so a listing, ``du`` or
``usage`` costs what the identity may see, whatever others store.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, TypeAlias

from .errors import Forbidden

READ, WRITE, ADMIN = "read", "write", "admin"
ROLES = (READ, WRITE, ADMIN)
_RANK = {READ: 1, WRITE: 2, ADMIN: 3}
STORE = ""  # the prefix of a grant on the whole store
# What a refusal shows, so that it fits the reply room the broker reserved for it (4 KiB,
# fms.broker.admission.SMALL_REPLY), whatever the name and the grants: of an identity's grants
# this many (Identity.describe), each folder quoted in at most SHOWN_PREFIX bytes of UTF-8, and
# the name (twice) in at most SHOWN_NAME bytes: a name of 1,024 bytes (MAX_NAME_BYTES) and its
# quotes, so a printable one shows whole; one that repr spells out (\U000f0000: ten bytes for
# four) is cut.
SHOWN_GRANTS = 8
SHOWN_PREFIX = 80
SHOWN_NAME = 1026

# An identity's name: what `id add` takes and the audit log shows.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
RESERVED_NAMES = frozenset({"local", "allow-dir", "unknown", "system"})

# What each op needs.  A role on the names the request touches; ``ANYWHERE``: that role on some
# prefix (an upload's chunks belong to no name yet); ``STORE_ADMIN``: admin on the whole store;
# ``ANYONE``: any identity (the answer is filtered to what it may read, or says nothing about
# files).  Every op of the protocol is here (tests check it): an op missing from this table is
# refused.
ANYONE = "anyone"
ANYWHERE = "anywhere"
STORE_ADMIN = "store-admin"
GATEWAY = "gateway"
OP_ROLE = {
    # reads: each name (mv/cp sources below)
    "get": READ,
    "get_many": READ,
    "chunk": READ,  # by the file it belongs to: see fms.storage / fms.cache
    "page": READ,  # a page or body of a chunk list, by the file too
    "stat": READ,
    "versions": READ,
    "get_version": READ,
    "ls": ANYONE,  # filtered
    "du": ANYONE,  # filtered
    "usage": ANYONE,  # filtered; chunk totals only for a store admin
    "cache_stats": ANYONE,
    "status": ANYONE,
    "hello": ANYONE,  # the store id and its digest function: nothing about files
    "whoami": ANYONE,
    # writes
    "have": ANYWHERE,  # write somewhere; answers only for the caller's own chunks
    "put_chunk": ANYWHERE,
    "put_page": ANYWHERE,
    "commit": WRITE,
    "commit_many": WRITE,
    "rm": WRITE,
    "rm_prefix": WRITE,  # on the folder: every name under it
    "mv": WRITE,  # source and destination
    "mv_prefix": WRITE,  # a folder's rename: every name under the source and the destination
    "cp": WRITE,  # destination; READ on the source
    "restore": WRITE,
    "purge": ADMIN,
    # the store
    "gc": STORE_ADMIN,
    "fsck": STORE_ADMIN,
    "audit": STORE_ADMIN,
    "id_add": STORE_ADMIN,
    "id_ls": STORE_ADMIN,
    "id_rm": STORE_ADMIN,
    "id_key": STORE_ADMIN,
    "grant": STORE_ADMIN,
    "revoke": STORE_ADMIN,
    "s3_key": GATEWAY,  # a gateway (or a store admin) resolving an S3 access key
}


# How a refusal (and the audit log) names an op: as the command line says it.
OP_SHOWN = {
    "commit": "put",
    "commit_many": "put",
    "have": "upload",
    "put_chunk": "upload",
    "put_page": "upload",
    "page": "read",
    "rm_prefix": "rm -r",
    "mv_prefix": "mv",
    "get_many": "get",
    "get_version": "get",
    "chunk": "read",
    "id_add": "id add",
    "id_ls": "id ls",
    "id_rm": "id rm",
    "id_key": "id key",
    "s3_key": "look up S3 keys",
}


def shown_op(op: str) -> str:
    return OP_SHOWN.get(op, op)


def normalise_prefix(prefix: str) -> str:
    """A grant's prefix as stored: without the trailing ``/`` (``album/`` is ``album``)."""
    return prefix.rstrip("/")


def covers(prefix: str, name: str) -> bool:
    """Whether a grant on ``prefix`` covers ``name``: the name itself or a name under
    ``prefix/``; ``""`` covers every name."""
    return not prefix or name == prefix or name.startswith(prefix + "/")


class Grant:
    """A role on a prefix (normalised: no trailing ``/``)."""

    __slots__ = ("prefix", "role")

    def __init__(self, role: str, prefix: str) -> None:
        if role not in _RANK:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        self.role = role
        self.prefix = normalise_prefix(prefix)

    def allows(self, role: str, name: str) -> bool:
        return _RANK[self.role] >= _RANK[role] and covers(self.prefix, name)

    def as_list(self) -> list[str]:
        return [self.role, self.prefix]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grant) and (self.role, self.prefix) == (other.role, other.prefix)

    def __hash__(self) -> int:
        return hash((self.role, self.prefix))

    def __repr__(self) -> str:
        return f"Grant({self.role!r}, {self.prefix!r})"


class Identity:
    """Who a request comes from: a name, its grants, and whether it may act for another
    identity (``gateway``: the S3 gateway, which authenticates its own users)."""

    __slots__ = ("all", "gateway", "grants", "name")

    def __init__(
        self,
        name: str,
        grants: Iterable[Grant] = (),
        gateway: bool = False,
        superuser: bool = False,
    ) -> None:
        self.name = name
        self.grants = tuple(sorted(set(grants), key=lambda g: (g.prefix, _RANK[g.role])))
        self.gateway = gateway
        # Admin on the whole store: every check passes (the fast path of LOCAL).
        self.all = superuser or any(g.role == ADMIN and g.prefix == STORE for g in self.grants)

    def may(self, role: str, name: str) -> bool:
        """Whether this identity has ``role`` (or more) on ``name``."""
        return self.all or any(g.allows(role, name) for g in self.grants)

    def may_folder(self, role: str, folder: str) -> bool:
        """Whether ``role`` covers every name under ``folder/`` (and ``folder`` itself)."""
        folder = normalise_prefix(folder)
        return self.all or any(
            _RANK[g.role] >= _RANK[role] and covers(g.prefix, folder) for g in self.grants
        )

    def may_anywhere(self, role: str) -> bool:
        return self.all or any(_RANK[g.role] >= _RANK[role] for g in self.grants)

    def describe(self) -> str:
        """Its grants, for messages: ``write on 'bob', read on 'shared'``.  At most
        :data:`SHOWN_GRANTS` of them, each folder quoted in at most :data:`SHOWN_PREFIX` bytes:
        about a KiB at most however many grants an identity has, and says how to list the rest."""
        if self.all:
            return "admin on the whole store"
        if not self.grants:
            return "no grants"
        shown = ", ".join(
            f"{g.role} on {quoted(g.prefix, SHOWN_PREFIX) if g.prefix else 'the whole store'}"
            for g in self.grants[:SHOWN_GRANTS]
        )
        more = len(self.grants) - SHOWN_GRANTS
        if more <= 0:
            return shown
        return f"{shown} and {more} more (an admin's `fms id ls` lists them all)"

    def __repr__(self) -> str:
        return f"Identity({self.name!r}, {list(self.grants)!r})"


# An identity as a Policy is built from: (name, its CURVE keys, its grants, gateway)
IdentityRow: TypeAlias = tuple[str, Iterable[str], Iterable[Grant], bool]
# Parts of the name index: ("name", NAME) or ("prefix", P), in name order (see scans)
Scans: TypeAlias = list[tuple[str, str]]

LOCAL = Identity("local", superuser=True)
ALLOW_DIR = Identity("allow-dir", superuser=True)
UNKNOWN = Identity("unknown")


class Policy:
    """A snapshot of a store's identities: CURVE key -> identity, name -> identity.

    ``epoch`` grows with every change to identities, keys or grants (kept in the metadata
    engine), so a newer snapshot always replaces an older one, wherever it came from.
    """

    __slots__ = ("by_key", "by_name", "epoch")

    def __init__(self, epoch: int = 0, identities: Iterable[IdentityRow] = ()) -> None:
        """:param identities: ``(name, curve keys, grants, gateway)`` tuples."""
        self.epoch = epoch
        self.by_name: dict[str, Identity] = {}
        self.by_key: dict[str, Identity] = {}
        for name, keys, grants, gateway in identities:
            ident = Identity(name, grants, gateway)
            self.by_name[name] = ident
            for key in keys:
                self.by_key[key] = ident

    def keys(self) -> frozenset[str]:
        """Every CURVE public key of an identity (z85 str): what the broker lets in."""
        return frozenset(self.by_key)

    def resolve(
        self, key: str | None, allow_dir: bool = False, acting_as: object = None
    ) -> Identity:
        """The identity a request comes from.

        :param key: the CURVE public key the broker authenticated (z85), or None: no CURVE
            (the local user) or a worker's own request: :data:`LOCAL`.
        :param allow_dir: the broker found ``key`` in its ``--allow`` folder: :data:`ALLOW_DIR`.
        :param acting_as: the identity a gateway (or the system) acts for, from the request.
        :raises Forbidden: ``acting_as`` from an identity that may not act for others, or an
            identity that does not exist.
        """
        if key is None:
            who = LOCAL
        elif allow_dir:
            who = ALLOW_DIR
        else:
            who = self.by_key.get(key, UNKNOWN)
        if acting_as is None:
            return who
        if not (who.all or who.gateway):
            raise Forbidden(
                f"forbidden: {who.name!r} may not act for another identity (field 'as'); only "
                f"a gateway identity may (client.py id add NAME --gateway)"
            )
        if not isinstance(acting_as, str) or acting_as not in self.by_name:
            raise Forbidden(f"forbidden: no identity {str(acting_as)[:80]!r} to act for")
        return self.by_name[acting_as]

    def to_wire(self) -> dict[str, Any]:
        """The snapshot as the workers pass it on (keys and grants; never an S3 secret)."""
        return {
            "epoch": self.epoch,
            "ids": [
                [
                    ident.name,
                    sorted(k for k, i in self.by_key.items() if i is ident),
                    [g.as_list() for g in ident.grants],
                    ident.gateway,
                ]
                for ident in self.by_name.values()
            ],
        }

    @classmethod
    def from_wire(cls, snapshot: dict[str, Any]) -> Policy:
        """:raises ValueError: not a snapshot."""
        epoch = snapshot.get("epoch") if isinstance(snapshot, dict) else None
        if not isinstance(epoch, int) or not isinstance(snapshot.get("ids"), list):
            raise ValueError("a policy snapshot is a map with an int 'epoch' and a list 'ids'")
        identities: list[IdentityRow] = []
        for item in snapshot["ids"]:
            if not (isinstance(item, list) and len(item) == 4):
                raise ValueError("a policy snapshot's identity is [name, keys, grants, gateway]")
            name, keys, grants, gateway = item
            if not (isinstance(name, str) and isinstance(keys, list) and isinstance(grants, list)):
                raise ValueError("a policy snapshot's identity is [name, keys, grants, gateway]")
            identities.append(
                (
                    name,
                    [k for k in keys if isinstance(k, str)],
                    [Grant(*g) for g in grants],
                    gateway is True,
                )
            )
        return cls(epoch, identities)


# --- decisions ---


def quoted(text: str, limit: int) -> str:
    """``text`` quoted (its repr) in at most ``limit`` bytes of UTF-8; a longer one is its
    longest start that fits, quoted, then how many characters were left out."""
    shown = repr(text)
    if len(shown.encode()) <= limit:
        return shown
    fits, over = 0, len(text)  # the quoted start of ``fits`` characters fits; of ``over``, not
    while over - fits > 1:
        mid = (fits + over) // 2
        if len(repr(text[:mid]).encode()) <= limit:
            fits = mid
        else:
            over = mid
    return f"{text[:fits]!r}...({len(text) - fits} more characters)"


def _refuse(who: Identity, op: str, what: str, role: str, where: str) -> Forbidden:
    return Forbidden(
        f"forbidden: {who.name!r} may not {shown_op(op)} {what}: that needs the {role} role on "
        f"{where}; {who.name!r} has {who.describe()}"
    )


def check(who: Identity, op: str, name: str, role: str | None = None) -> None:
    """That ``who`` may do ``op`` on ``name`` (with ``role``, default the op's own).

    :raises Forbidden: it may not, naming the op, the name and the grants ``who`` has.
    """
    if who.all:
        return
    role = role or OP_ROLE[op]
    if not who.may(role, name):
        shown = quoted(name, SHOWN_NAME)
        raise _refuse(who, op, shown, role, f"{shown} or a folder above it")


def check_through_file(who: Identity, header: dict[str, Any], op: str) -> str:
    """The file through which ``who`` reads a chunk or a page (``op``): the request's field
    ``name``, which ``who`` must be allowed to read.  :raises Forbidden: no name, or one it may
    not read.  :raises BadRequest: not a valid name."""
    from .wire.fields import check_name

    name = header.get("name")
    if not isinstance(name, str):
        raise Forbidden(
            f"forbidden: {who.name!r} may read a chunk only through a file it belongs to "
            f"(field 'name'); fms.Client sends it"
        )
    name = check_name(name)
    check(who, op, name)
    return name


def check_folder(who: Identity, op: str, folder: str, role: str | None = None) -> None:
    """That ``who`` may do ``op`` on every name under ``folder/`` (rm -r).  :raises Forbidden:"""
    if who.all:
        return
    role = role or OP_ROLE[op]
    if not who.may_folder(role, folder):
        shown = quoted(normalise_prefix(folder) + "/", SHOWN_NAME)
        raise _refuse(who, op, f"under {shown}", role, f"{shown} or a folder above it")


def check_op(who: Identity, op: str) -> None:
    """That ``who`` may do an op that names no file: ``have`` and ``put_chunk`` need write on
    some prefix, the store's own ops admin on the whole store, a gateway's look-ups the gateway
    flag.  Ops that touch names are checked per name (:func:`check`).  :raises Forbidden:"""
    if who.all:
        return
    need = OP_ROLE.get(op)
    if need == ANYONE:
        return
    if need == ANYWHERE:
        if who.may_anywhere(WRITE):
            return
        raise _refuse(who, op, "chunks", WRITE, "some prefix (uploads need a write grant)")
    if need == GATEWAY and who.gateway:
        return
    raise _refuse(who, op, "in this store", ADMIN, "the whole store")


def scans(who: Identity, role: str, prefix: str) -> Scans | None:
    """The parts of the name index under ``prefix`` that ``who`` may see with ``role``.

    :return: None when it may see everything under ``prefix``; else a sorted list of disjoint
        ``("name", NAME)`` (one name) and ``("prefix", P)`` (every name starting with ``P``)
        items, in name order, so a listing is their ranges read one after another.
    """
    if who.all:
        return None
    granted = sorted({g.prefix for g in who.grants if _RANK[g.role] >= _RANK[role]})
    if STORE in granted:
        return None
    # Only the outermost grants: one under another adds nothing and would overlap.
    outer = [g for g in granted if not any(h != g and covers(h, g) for h in granted)]
    out: Scans = []
    for g in outer:
        if g.startswith(prefix):
            out.append(("name", g))
        subtree = g + "/"
        if subtree.startswith(prefix):
            out.append(("prefix", subtree))
        elif prefix.startswith(subtree):
            out.append(("prefix", prefix))
    return sorted(out, key=lambda item: item[1])
