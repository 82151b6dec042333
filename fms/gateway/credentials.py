"""Who may sign requests to the gateway, and who each request then acts for.

A request's access key id resolves to its secret (to check the SigV4 signature with) and a
:class:`Caller`: the identity the gateway then sends the request to the store for (the field
``as``), so storage and the cache decide it by that identity's grants.

- :class:`StoreKeys`: the store's identities and their S3 access keys (``fms id add NAME --s3``),
  looked up with the ``s3_key`` op (the gateway's own identity needs the gateway flag, or admin
  on the whole store) and kept :data:`KEY_TTL` seconds;
- :class:`StaticKeys`: keys from a JSON file or the command line, for a store whose users are
  not its identities: such a key acts as the gateway itself (no ``as``).

``prepare(key_id)`` (a coroutine) does any look-up before the signature is checked;
``resolve(key_id)`` then answers from memory, so signature checking stays synchronous.
"""

import asyncio
import collections
import json
import logging
import os
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .. import policy
from ..errors import Forbidden
from .errors import S3Error

log = logging.getLogger("fms.gateway")

ENV_KEY = "FMS_S3_ACCESS_KEY"
ENV_SECRET = "FMS_S3_SECRET_KEY"
KEY_ID_CHARS = string.ascii_uppercase + string.digits
KEY_TTL = 30.0  # seconds a key's look-up in the store is used (a removed key works this long)
UNKNOWN_TTL = 2.0  # seconds an unknown key's answer is kept (a new key works within this)
KEYS_KEPT = 10_000  # look-ups kept at most (the oldest go first)

# lookup(access key id) -> {"identity", "secret", "grants"} or None: the store's s3_key op
Lookup = Callable[[str], Awaitable[dict[str, Any] | None]]


class Caller:
    """Who signed a request: ``name``, its grants (``ident``, a :class:`fms.policy.Identity`)
    and ``acting``, the identity the gateway's requests to the store act for (None: the
    gateway's own identity, for a key of :class:`StaticKeys`)."""

    __slots__ = ("acting", "ident", "name")

    def __init__(self, name: str, ident: policy.Identity, acting: str | None) -> None:
        self.name = name
        self.ident = ident
        self.acting = acting

    def __repr__(self) -> str:
        return f"Caller({self.name!r})"


def _unknown() -> S3Error:
    return S3Error(
        "InvalidAccessKeyId", "the access key id you provided does not exist in our records"
    )


class StaticKeys:
    """Access keys held in memory: ``{key_id: secret}``, each acting as the gateway itself
    (everything the gateway's own identity may do; on a cluster without CURVE, everything)."""

    def __init__(self, keys: dict[str, tuple[str, Caller]]) -> None:
        self.keys = keys

    async def prepare(self, key_id: str) -> None:
        return None

    def resolve(self, key_id: str) -> tuple[str, Caller]:
        try:
            return self.keys[key_id]
        except KeyError:
            raise _unknown() from None

    @staticmethod
    def caller(name: str) -> Caller:
        return Caller(name, policy.Identity(name, superuser=True), None)

    @classmethod
    def from_file(cls, path: str) -> "StaticKeys":
        """A JSON file: ``[{"access_key": ..., "secret_key": ..., "identity": ...}, ...]``."""
        try:
            with open(path, encoding="utf-8") as f:
                items = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the key file {path}: {exc}") from None
        keys: dict[str, tuple[str, Caller]] = {}
        for item in items if isinstance(items, list) else []:
            try:
                keys[str(item["access_key"])] = (
                    str(item["secret_key"]),
                    cls.caller(str(item.get("identity", item["access_key"]))),
                )
            except (KeyError, TypeError):
                raise ValueError(
                    f"{path}: each key needs access_key and secret_key (and an optional identity)"
                ) from None
        if not keys:
            raise ValueError(f"{path} holds no key: a JSON list of access_key and secret_key")
        return cls(keys)


class StoreKeys:
    """The store's S3 access keys, looked up with ``lookup`` and kept ``ttl`` seconds (at most
    :data:`KEYS_KEPT` of them); keys of ``static`` (if any) come first.

    A key removed from the store (``fms id key NAME --remove KEY``, ``fms id rm NAME``) is
    refused once its look-up here is older than ``ttl``; a grant taken away, or an identity
    removed, counts at once, since storage decides each request by the identity's grants as
    they are now.
    """

    def __init__(
        self, lookup: Lookup, ttl: float = KEY_TTL, static: StaticKeys | None = None
    ) -> None:
        self.lookup = lookup
        self.ttl = ttl
        self.static = static
        # key id -> (monotonic time it is good until, (secret, caller) or None: unknown)
        self._kept: collections.OrderedDict[str, tuple[float, tuple[str, Caller] | None]] = (
            collections.OrderedDict()
        )
        self._asking: dict[str, asyncio.Future[None]] = {}  # look-ups under way, shared

    async def prepare(self, key_id: str) -> None:
        """Look ``key_id`` up in the store unless a fresh answer is kept (one look-up at a time
        per key, however many requests wait for it)."""
        if self.static is not None and key_id in self.static.keys:
            return
        kept = self._kept.get(key_id)
        if kept is not None and kept[0] > time.monotonic():
            return
        asking = self._asking.get(key_id)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(key_id))
            self._asking[key_id] = asking
            asking.add_done_callback(lambda _: self._asking.pop(key_id, None))
        await asyncio.shield(asking)

    async def _ask(self, key_id: str) -> None:
        try:
            found = await self.lookup(key_id)
        except Forbidden:
            log.warning(
                "event=s3_key_lookup_refused: this gateway's identity may not look up the "
                "store's S3 keys; give it the gateway flag (fms id add NAME --key KEY "
                "--gateway) or run it with --keys FILE"
            )
            raise S3Error(
                "AccessDenied",
                "this gateway may not look up the store's S3 access keys (its identity needs "
                "the gateway flag); ask its operator",
            ) from None
        now = time.monotonic()
        if found is None:
            self._keep(key_id, now + min(self.ttl, UNKNOWN_TTL), None)
            return
        name = str(found["identity"])
        grants = [policy.Grant(g["role"], g["prefix"]) for g in found.get("grants") or []]
        caller = Caller(name, policy.Identity(name, grants), name)
        self._keep(key_id, now + self.ttl, (str(found["secret"]), caller))

    def _keep(self, key_id: str, until: float, value: tuple[str, Caller] | None) -> None:
        self._kept[key_id] = (until, value)
        self._kept.move_to_end(key_id)
        while len(self._kept) > KEYS_KEPT:
            self._kept.popitem(last=False)

    def resolve(self, key_id: str) -> tuple[str, Caller]:
        """The secret and caller of ``key_id`` (after :meth:`prepare`).  :raises S3Error:
        InvalidAccessKeyId."""
        if self.static is not None and key_id in self.static.keys:
            return self.static.keys[key_id]
        kept = self._kept.get(key_id)
        if kept is None or kept[1] is None:
            raise _unknown()
        return kept[1]


def new_key_pair() -> tuple[str, str]:
    """A fresh access key id (20 characters, as AWS's) and secret (40)."""
    key_id = "FMS" + "".join(secrets.choice(KEY_ID_CHARS) for _ in range(17))
    return key_id, secrets.token_urlsafe(30)[:40]


def from_args(
    keys_file: str | None, access_key: str | None, secret_key: str | None
) -> StaticKeys | None:
    """The static keys the command line gives (a key file, a key pair, or the environment), or
    None: only the store's keys."""
    access_key = access_key or os.environ.get(ENV_KEY)
    secret_key = secret_key or os.environ.get(ENV_SECRET)
    if keys_file:
        return StaticKeys.from_file(keys_file)
    if bool(access_key) != bool(secret_key):
        raise ValueError(
            f"give both --access-key and --secret-key (or ${ENV_KEY} and ${ENV_SECRET}), or "
            f"neither to use only the store's keys"
        )
    if access_key and secret_key:
        return StaticKeys({access_key: (secret_key, StaticKeys.caller(access_key))})
    return None
