"""The digest functions a store may use, one small helper each.

A store records its digest function when it is created (:data:`NEW_STORE_DIGEST` unless told
otherwise); stores made before the choice existed use :data:`SHA256`.  Every digest of a store
is made with its function: its chunks' (a chunk is stored under the digest of its bytes), its
pages' and bodies' ids, and so its file digests (derived from them, :mod:`.manifest`).  Storage,
the cache and the client learn the function when they connect (docs/PROTOCOL.md, *Digest
functions*) and check every byte with it.

Both give 32 bytes.  BLAKE3 hashes 4-5x faster than sha256 on one core here (and both release
the GIL, so chunks are hashed side by side on threads).
"""

import functools
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias

from ..errors import BadRequest
from ..limits import BytesLike

if TYPE_CHECKING:
    from blake3 import blake3 as Blake3  # imported on first use at run time, as hashlib is

__all__ = [
    "BLAKE3",
    "DIGEST_FUNCTIONS",
    "NEW_STORE_DIGEST",
    "OLD_STORE_DIGEST",
    "SHA256",
    "Hasher",
    "blake3",
    "hasher",
    "sha256",
]

BLAKE3 = "blake3"  # BLAKE3-256 (the `blake3` package)
SHA256 = "sha256"
DIGEST_FUNCTIONS = (BLAKE3, SHA256)
NEW_STORE_DIGEST = BLAKE3  # what a new store records unless told otherwise
OLD_STORE_DIGEST = SHA256  # what a store made before the choice existed uses

Hasher: TypeAlias = Callable[[BytesLike], bytes]  # bytes-like in, 32-byte digest out


def sha256(data: BytesLike) -> bytes:
    return _hashlib().sha256(data).digest()


def blake3(data: BytesLike) -> bytes:
    return _blake3()(data).digest()


def hasher(name: object) -> Hasher:
    """The helper of the digest function called ``name``.

    :raises BadRequest: not one fms knows."""
    if name == BLAKE3:
        return blake3
    if name == SHA256:
        return sha256
    raise BadRequest(f"unknown digest function {name!r}; fms knows {', '.join(DIGEST_FUNCTIONS)}")


# Imported on first use: hashlib loads OpenSSL, which `ls` and `stat` never need.
@functools.cache
def _hashlib() -> ModuleType:
    import hashlib

    return hashlib


@functools.cache
def _blake3() -> type["Blake3"]:
    from blake3 import blake3 as impl

    return impl
