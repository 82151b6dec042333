"""Who may sign requests to the gateway: ``resolve(access_key_id) -> (secret, identity)``.

:class:`StaticKeys` reads the keys from a JSON file or from the command line; it is the one
source until identities and their S3 keys live in the store's metadata (then a resolver that
asks the store takes its place behind the same call)."""

import json
import os
import secrets
import string

from .errors import S3Error

ENV_KEY = "FMS_S3_ACCESS_KEY"
ENV_SECRET = "FMS_S3_SECRET_KEY"
KEY_ID_CHARS = string.ascii_uppercase + string.digits


class Identity:
    """An authenticated caller: its name and whether it may do everything."""

    __slots__ = ("admin", "name")

    def __init__(self, name: str, admin: bool = True) -> None:
        self.name = name
        self.admin = admin

    def __repr__(self) -> str:
        return f"Identity({self.name!r})"


class StaticKeys:
    """Access keys held in memory: ``{key_id: (secret, Identity)}``."""

    def __init__(self, keys: dict[str, tuple[str, Identity]]) -> None:
        if not keys:
            raise ValueError("no S3 access key: give --access-key/--secret-key or --keys FILE")
        self.keys = keys

    def resolve(self, key_id: str) -> tuple[str, Identity]:
        try:
            return self.keys[key_id]
        except KeyError:
            raise S3Error(
                "InvalidAccessKeyId",
                "the access key id you provided does not exist in our records",
            ) from None

    @classmethod
    def from_file(cls, path: str) -> "StaticKeys":
        """A JSON file: ``[{"access_key": ..., "secret_key": ..., "identity": ...}, ...]``."""
        try:
            with open(path, encoding="utf-8") as f:
                items = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the key file {path}: {exc}") from None
        keys: dict[str, tuple[str, Identity]] = {}
        for item in items if isinstance(items, list) else []:
            try:
                keys[str(item["access_key"])] = (
                    str(item["secret_key"]),
                    Identity(str(item.get("identity", item["access_key"]))),
                )
            except (KeyError, TypeError):
                raise ValueError(
                    f"{path}: each key needs access_key and secret_key (and an optional identity)"
                ) from None
        return cls(keys)


def new_key_pair() -> tuple[str, str]:
    """A fresh access key id (20 characters, as AWS's) and secret (40)."""
    key_id = "FMS" + "".join(secrets.choice(KEY_ID_CHARS) for _ in range(17))
    return key_id, secrets.token_urlsafe(30)[:40]


def from_args(keys_file: str | None, access_key: str | None, secret_key: str | None) -> StaticKeys:
    """The resolver the command line asks for: a key file, a key pair, or the environment."""
    access_key = access_key or os.environ.get(ENV_KEY)
    secret_key = secret_key or os.environ.get(ENV_SECRET)
    if keys_file:
        return StaticKeys.from_file(keys_file)
    if access_key and secret_key:
        return StaticKeys({access_key: (secret_key, Identity(access_key))})
    raise ValueError(
        f"the S3 gateway needs a key: --access-key and --secret-key (or ${ENV_KEY} and "
        f"${ENV_SECRET}), or --keys FILE"
    )
