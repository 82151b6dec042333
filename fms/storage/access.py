"""Who a storage request comes from, and the ops that manage identities, grants, purges and the
audit log.

**Resolution.** The broker passes, in the route frame of each client request, the CURVE public
key it authenticated (``u``) and whether that key came from its ``--allow`` folder (``l``); a
request without ``u`` is the local user of a cluster without CURVE, or a worker's own request.
:class:`Access` resolves that in the store's :class:`~fms.policy.Policy` snapshot, which it
reloads when the store's access epoch moves (checked every :data:`REFRESH` seconds, at once
after a change made here, and when a key is not known yet), so every worker of a store, behind
any broker, decides alike.  A header never says who sent it: only a gateway identity may ask to
act for another one (``as``), and the policy decides that too.

**Ops.** ``whoami`` (anyone), ``id_add``, ``id_ls``, ``id_rm``, ``id_key``, ``grant``,
``revoke``, ``audit`` (an admin of the whole store), ``purge`` (an admin of the name), and
``s3_key`` (a gateway: an S3 access key id to its identity, grants and secret).

**The first admin.** :func:`ensure_first_admin` makes, once per store, identity ``admin`` with a
new CURVE keypair whose files it writes into the data directory.
"""

import collections
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from .. import policy
from .. import wire as p
from ..errors import BadRequest, FmsError, Forbidden, NotFound
from ..policy import Grant, Identity, Policy
from .meta.access import CURVE, S3, AccessMeta, audit_entry
from .model import Version

if TYPE_CHECKING:
    import zmq

    from ..worker import Link
    from .engine import Store
    from .meta.base import MetaEngine

Route: TypeAlias = dict[str, Any]  # a request's route frame: its identity is route["who"]
Header: TypeAlias = dict[str, Any]
Handler: TypeAlias = Callable[[Route, Header, "zmq.Frame | None"], None]

REFRESH = 1.0  # seconds between checks of the store's access epoch
BLOBS_KEPT = 8 * p.MiB  # bytes of pages and bodies kept for reads by file (a page: 2 MiB)
UNKNOWN_KEY_REFRESH = 0.25  # seconds: an unknown key makes a check at most this often
AUDIT_PAGE = p.AUDIT_PAGE_MAX  # entries per `audit` reply
FORBIDDEN_KEPT = 100  # refused change attempts written to the audit log per flush; the rest counted
FIRST_ADMIN = "admin"
S3_KEY_ID_LEN = 20  # characters of an S3 access key id, as AWS's
S3_SECRET_BYTES = 30  # random bytes of an S3 secret (40 characters of base64)
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

# Ops that change something: a refusal of one is written to the audit log (named as the CLI says).
CHANGES = frozenset(
    {
        "commit",
        "commit_many",
        "rm",
        "rm_prefix",
        "mv",
        "cp",
        "restore",
        "purge",
        "gc",
        "id_add",
        "id_rm",
        "id_key",
        "grant",
        "revoke",
    }
)

log = logging.getLogger("fms.storage.access")


class Access:
    """The store's policy snapshot on one worker, and who each request comes from."""

    def __init__(self, meta: AccessMeta) -> None:
        self.meta = meta
        self.policy = Policy()
        self._next_check = 0.0
        self._next_unknown = 0.0
        self._refused: list[
            dict[str, Any]
        ] = []  # audit entries of refused changes, written at the next flush
        self._refused_more = 0
        self.reload()

    def reload(self) -> bool:
        """Read the snapshot if the store's epoch moved.  :return: it changed."""
        epoch, identities = self.meta.access_snapshot()
        if epoch == self.policy.epoch and epoch:
            return False
        self.policy = Policy(
            epoch,
            [
                (name, keys, [Grant(role, prefix) for role, prefix in grants], gateway)
                for name, keys, grants, gateway in identities
            ],
        )
        return True

    def refresh(self, now: float) -> bool:
        """Reload if the epoch moved, at most every :data:`REFRESH` seconds.  :return: changed."""
        if now < self._next_check:
            return False
        self._next_check = now + REFRESH
        if self.meta.access_epoch() == self.policy.epoch:
            return False
        return self.reload()

    def resolve(self, route: Route, header: Header) -> Identity:
        """The identity a request comes from (see the module's doc).

        :raises Forbidden: it asks to act for another identity and may not.
        """
        key = route.get("u")
        if key is not None and not isinstance(key, str):
            raise BadRequest("the broker sent a user key that is not a str")
        if key is not None and not route.get("l") and key not in self.policy.by_key:
            now = time.monotonic()
            if now >= self._next_unknown:  # perhaps added a moment ago, behind another broker
                self._next_unknown = now + UNKNOWN_KEY_REFRESH
                self.reload()
        return self.policy.resolve(key, route.get("l") is True, header.get("as"))

    def refused(self, who: Identity, op: str, header: Header, exc: Forbidden) -> None:
        """Note a refused change for the audit log (written at the next :meth:`flush`)."""
        if op not in CHANGES:
            return
        if len(self._refused) >= FORBIDDEN_KEPT:
            self._refused_more += 1
            return
        names = [header[k] for k in ("src", "name", "prefix") if isinstance(header.get(k), str)]
        if isinstance(header.get("names"), list):
            names += [n for n in header["names"][:16] if isinstance(n, str)]
        self._refused.append(
            policy_entry(
                who,
                policy.shown_op(op),
                names=[n[: p.MAX_NAME_BYTES] for n in names],
                result="forbidden",
            )
        )

    def flush(self) -> None:
        """Write the refused changes noted since the last flush (one transaction)."""
        if not self._refused and not self._refused_more:
            return
        entries, self._refused = self._refused, []
        if self._refused_more:
            entries.append(
                policy_entry(
                    Identity("various"), "refused", count=self._refused_more, result="forbidden"
                )
            )
            self._refused_more = 0
        try:
            self.meta.audit_write(entries)
        except FmsError as exc:
            log.warning("event=audit_write_failed entries=%d error=%r", len(entries), str(exc))


class Reads:
    """How an identity that may not read the whole store reads a chunk or a page of a chunk
    list: through a file it may read (``name``), whose current or retained version lists it: a
    short list itself, a page of a long list as one of its pages (or its body), a chunk of a
    long list by the page that lists it (``page``) and its place there (``at``).  So a digest
    opens nothing by itself: nobody learns whether someone stores a content they guess.  Pages
    and bodies are named by their digest, so the few last read are kept (:data:`BLOBS_KEPT`):
    a file read in order costs one page read per 65,536 chunks."""

    def __init__(self, store: "Store") -> None:
        self.store = store
        self._blobs: collections.OrderedDict[bytes, bytes] = (
            collections.OrderedDict()
        )  # id -> bytes
        self._kept = 0

    def blob(self, ident: bytes) -> bytes:
        """A page or a body by its id (:meth:`~fms.storage.engine.Store.read_list`)."""
        blob = self._blobs.get(ident)
        if blob is not None:
            self._blobs.move_to_end(ident)
            return blob
        blob = self.store.read_list(ident)
        self._blobs[ident] = blob
        self._kept += len(blob)
        while self._kept > BLOBS_KEPT and len(self._blobs) > 1:
            self._kept -= len(self._blobs.popitem(last=False)[1])
        return blob

    def check_chunk(self, who: Identity, header: Header, digest: bytes) -> None:
        """:raises Forbidden: no file named, or one ``who`` may not read.  :raises NotFound:
        no version of it lists the chunk there."""
        name = policy.check_through_file(who, header, "chunk")
        page = p.need_hash(header, "page") if "page" in header else None
        at = p.need_int(header, "at", hi=p.PAGE_CHUNKS - 1, optional=True, default=None)
        for version in self._versions(name):
            chunks, pages = self._lists(version)
            if chunks is not None and digest in chunks:
                return
            if (
                page is not None
                and at is not None
                and pages is not None
                and page in pages
                and self.blob(page)[at * p.HASH_LEN : (at + 1) * p.HASH_LEN] == digest
            ):
                return
        raise NotFound(f"{name!r} lists no such chunk there; read its manifest again")

    def check_page(self, who: Identity, header: Header, ident: bytes) -> None:
        """:raises Forbidden: as :meth:`check_chunk`.  :raises NotFound: no version of the file
        has that page or body."""
        name = policy.check_through_file(who, header, "page")
        for version in self._versions(name):
            if version.body == ident:
                return
            _chunks, pages = self._lists(version)
            if pages is not None and ident in pages:
                return
        raise NotFound(f"{name!r} lists no such page; read its manifest again")

    def _versions(self, name: str) -> list[Version]:
        try:
            return self.store.versions(name)
        except NotFound:
            return []

    def _lists(self, version: Version) -> tuple[Sequence[bytes] | None, Sequence[bytes] | None]:
        """``(chunks or None, page ids or None)`` of a version (its body read if need be)."""
        if version.chunks is not None or version.body is None:
            return version.chunks, None
        if version.pages is not None:
            return None, version.pages
        return None, p.unpack_body(self.blob(version.body))[1]


def policy_entry(who: Identity, op: str, **fields: Any) -> dict[str, Any]:
    return audit_entry(time.time(), who.name, op, **fields)


class AccessOps:
    """The handlers of the access ops; each replies through ``link``.

    :param on_change: called after a change to identities or grants, with the new
        :class:`Policy` (the service passes it on to the broker).
    """

    def __init__(
        self,
        store: "Store",
        access: Access,
        link_of: Callable[[], "Link"],
        on_change: Callable[[Policy], None] = lambda policy: None,
    ) -> None:
        self.store = store
        self.meta = store.meta
        self.access = access
        self.link_of = link_of  # a callable: the service's link (set after construction)
        self.on_change = on_change

    def handlers(self) -> dict[str, Handler]:
        return {
            "whoami": self.op_whoami,
            "id_add": self.op_id_add,
            "id_ls": self.op_id_ls,
            "id_rm": self.op_id_rm,
            "id_key": self.op_id_key,
            "grant": self.op_grant,
            "revoke": self.op_revoke,
            "s3_key": self.op_s3_key,
            "audit": self.op_audit,
        }

    def _reply(self, route: Route, header: Header, **fields: Any) -> None:
        self.link_of().reply(route, p.ok_reply(header["id"], **fields))

    def _changed(self) -> None:
        self.access.reload()
        self.on_change(self.access.policy)

    # --- anyone ---

    def op_whoami(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        who = route["who"]
        self._reply(
            route,
            header,
            identity=who.name,
            grants=[{"role": g.role, "prefix": g.prefix} for g in who.grants]
            if not who.all or who.grants
            else [{"role": policy.ADMIN, "prefix": policy.STORE}],
            gateway=who.gateway,
        )

    # --- a store admin ---

    def op_id_ls(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        policy.check_op(route["who"], "id_ls")
        self._reply(route, header, identities=self.meta.identities())

    def op_id_add(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        who = route["who"]
        policy.check_op(who, "id_add")
        name = _identity_name(header)
        keys = [_z85(k) for k in p.need(header, "keys", list, optional=True, default=[])]
        s3 = new_s3_key() if p.need(header, "s3", bool, optional=True, default=False) else None
        gateway = p.need(header, "gateway", bool, optional=True, default=False)
        made = self.meta.add_identity(
            name, time.time(), who.name, gateway, keys, s3, _commit(header)
        )
        self._changed()
        self._reply(route, header, identity=_one_identity(self.meta, name), **made)

    def op_id_rm(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        who = route["who"]
        policy.check_op(who, "id_rm")
        name = _identity_name(header, existing=True)
        self.meta.remove_identity(name, time.time(), who.name, _commit(header))
        self._changed()
        self._reply(route, header, removed=name)

    def op_id_key(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        """Add a CURVE key (``curve``), make an S3 access key (``s3``) or remove a key
        (``remove``: a CURVE key or an access key id) of an identity."""
        who = route["who"]
        policy.check_op(who, "id_key")
        name = _identity_name(header, existing=True)
        curve = p.need(header, "curve", str, optional=True, default=None)
        s3 = p.need(header, "s3", bool, optional=True, default=False)
        remove = p.need(header, "remove", str, optional=True, default=None)
        if (curve is not None) + s3 + (remove is not None) != 1:
            raise BadRequest("id_key takes one of 'curve' (a key to add), 's3' or 'remove'")
        now, commit = time.time(), _commit(header)
        made: dict[str, Any] = {}
        if curve is not None:
            self.meta.add_credential(name, CURVE, _z85(curve), now, who.name, commit=commit)
        elif s3:
            access_key, secret = new_s3_key()
            made = self.meta.add_credential(
                name, S3, access_key, now, who.name, secret=secret, commit=commit
            )
        else:
            assert remove is not None  # one of the three, checked above
            self.meta.remove_credential(name, remove, now, who.name, commit)
        self._changed()
        self._reply(route, header, identity=_one_identity(self.meta, name), **made)

    def op_grant(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        who = route["who"]
        policy.check_op(who, "grant")
        name = _identity_name(header, existing=True)
        role = p.need(header, "role", str)
        if role not in policy.ROLES:
            raise BadRequest(f"role {role!r} is not one of {', '.join(policy.ROLES)}")
        prefix = _grant_prefix(header)
        self.meta.set_grant(name, role, prefix, time.time(), who.name, _commit(header))
        self._changed()
        self._reply(route, header, identity=_one_identity(self.meta, name))

    def op_revoke(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        who = route["who"]
        policy.check_op(who, "revoke")
        name = _identity_name(header, existing=True)
        self.meta.revoke(name, _grant_prefix(header), time.time(), who.name, _commit(header))
        self._changed()
        self._reply(route, header, identity=_one_identity(self.meta, name))

    def op_audit(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        policy.check_op(route["who"], "audit")
        since = p.need(header, "since", (int, float), optional=True, default=0)
        after = p.need_int(header, "seq", optional=True, default=0)
        limit = p.need_int(header, "limit", lo=1, hi=AUDIT_PAGE, optional=True, default=AUDIT_PAGE)
        entries = self.meta.audit_read(float(since), after, limit)
        self._reply(
            route,
            header,
            entries=entries,
            next=entries[-1]["seq"] if len(entries) == limit else None,
        )

    # --- a gateway ---

    def op_s3_key(self, route: Route, header: Header, data: "zmq.Frame | None") -> None:
        """An S3 access key id -> its identity, grants and secret (the gateway checks SigV4
        with the secret, then acts for the identity with ``as``)."""
        policy.check_op(route["who"], "s3_key")
        access_key = p.need(header, "access_key", str)
        found = self.meta.s3_credential(access_key)
        if found is None:
            self._reply(route, header, identity=None)
            return
        name, secret = found
        ident = self.access.policy.by_name.get(name)
        grants = (
            [] if ident is None else [{"role": g.role, "prefix": g.prefix} for g in ident.grants]
        )
        self._reply(route, header, identity=name, secret=secret, grants=grants)


def new_s3_key() -> tuple[str, str]:
    """``(access key id, secret)``: ``FMS`` + 17 base32 characters, as AWS's are 20; a secret
    of 240 random bits."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    access_key = "FMS" + "".join(secrets.choice(alphabet) for _ in range(S3_KEY_ID_LEN - 3))
    return access_key, secrets.token_urlsafe(S3_SECRET_BYTES)


def _commit(header: Header) -> str | None:
    """The request's id for storage (a repeat returns the first answer), if it sent one."""
    commit = p.need(header, "commit", str, optional=True, default=None)
    if commit is not None and not 1 <= len(commit) <= p.MAX_COMMIT_ID:
        raise BadRequest(f"field 'commit' must be 1 to {p.MAX_COMMIT_ID} characters")
    return commit


def _identity_name(header: Header, existing: bool = False) -> str:
    name = p.need(header, "name", str)
    if not policy.NAME_RE.fullmatch(name):
        raise BadRequest(
            f"identity name {name[:80]!r} must be 1 to 64 letters, digits and . _ @ + - "
            f"(starting with a letter or digit)"
        )
    if not existing and name in policy.RESERVED_NAMES:
        raise BadRequest(f"{name!r} is a name fms uses itself; choose another")
    return name


def _grant_prefix(header: Header) -> str:
    prefix = policy.normalise_prefix(p.check_prefix(p.need(header, "prefix", str)))
    return p.check_name(prefix) if prefix else prefix


def _z85(key: object) -> str:
    if not isinstance(key, str) or not _Z85.fullmatch(key):
        raise BadRequest(
            "a CURVE public key is 40 characters of Z85 (the public-key line of a .key file "
            "made by: fms keygen DIR NAME)"
        )
    return key


def _one_identity(meta: AccessMeta, name: str) -> dict[str, Any]:
    return next((i for i in meta.identities() if i["name"] == name), {"name": name})


def ensure_first_admin(meta: "MetaEngine", folder: str) -> str | None:
    """Once per store: identity ``admin`` (admin on the whole store) with a new CURVE keypair,
    whose files ``folder/admin.key`` and ``folder/admin.key_secret`` (mode 0600) are written
    only if this call made it.

    :return: the secret key file's path if it was made now, else None.
    """
    from ..security import keygen, load_public

    if meta.setting("first_admin") is not None:
        return None
    tmp = os.path.join(folder, f".first-admin-{os.getpid()}")
    public_path, secret_path = keygen(tmp, FIRST_ADMIN)
    try:
        public = load_public(public_path).decode()
        if not meta.first_admin(FIRST_ADMIN, public, time.time()):
            return None
        suffix = ""
        while os.path.exists(os.path.join(folder, f"{FIRST_ADMIN}{suffix}.key_secret")):
            suffix = f"-{meta.store_id[:8]}" if not suffix else suffix + "-1"
        final = os.path.join(folder, f"{FIRST_ADMIN}{suffix}.key_secret")
        os.replace(public_path, os.path.join(folder, f"{FIRST_ADMIN}{suffix}.key"))
        os.replace(secret_path, final)
        return final
    finally:
        for path in (public_path, secret_path):
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(tmp)
