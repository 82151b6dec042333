"""The fms exception tree.

::

    FmsError                     base of everything fms raises on purpose
    ├── RemoteError              the cluster answered {ok: false}; .code is the wire code
    │   ├── NotFound             not_found
    │   ├── BadRequest           bad_request (also raised locally for bad names)
    │   ├── IntegrityError       integrity: a chunk or file did not match its digest
    │   ├── MissingChunks        missing_chunks: a commit names chunks storage lacks; upload them
    │   ├── Unavailable          unavailable: no worker right now; retried by the client
    │   │   └── Busy             busy: too many slow operations (fsck, gc, ...) at once; retried
    │   ├── NoSpace              no_space: a disk is full; not retried
    │   ├── Refused              refused: this client's key is not (or no longer) allowed
    │   ├── Forbidden            forbidden: the identity's grants do not allow this op here
    │   ├── TooLarge             too_large
    │   └── Conflict             conflict: a folder renamed onto one that holds files
    └── TransportError           the broker could not be reached or did not answer
        └── Timeout              a request got no reply in time

Socket and OS errors are translated into these at the boundary (the client library), so the CLI
only ever catches :class:`FmsError`.
"""

from collections.abc import Iterable
from typing import Any


class FmsError(Exception):
    """Base class of every error fms raises on purpose."""


class RemoteError(FmsError):
    """An error reply from the cluster."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(RemoteError):
    code = "not_found"


class BadRequest(RemoteError):
    code = "bad_request"


class IntegrityError(RemoteError):
    code = "integrity"


class MissingChunks(RemoteError):
    """A commit named chunks that storage does not hold (never uploaded, or collected since).

    ``missing`` lists their digests; the reply carries them, so the client uploads exactly those
    and commits again.
    """

    code = "missing_chunks"

    def __init__(
        self, message: str, code: str | None = None, missing: Iterable[bytes] = ()
    ) -> None:
        super().__init__(message, code)
        self.missing = list(missing)

    @classmethod
    def absent(cls, name: str, digests: Iterable[bytes]) -> "MissingChunks":
        """The commit of ``name`` names ``digests``, which storage does not hold."""
        digests = list(dict.fromkeys(digests))
        return cls(
            f"{len(digests)} chunk(s) of {name!r} are not in the store (never uploaded, "
            f"or collected since); upload them and commit again",
            missing=digests,
        )

    def reply_fields(self) -> dict[str, list[bytes]]:
        return {"missing": self.missing}


class Unavailable(RemoteError):
    code = "unavailable"


class Busy(Unavailable):
    """Too many slow operations (fsck, gc, du, usage, rm -r, deep listings) are in flight, the
    client's own or everyone's: retried after a backoff, as ``unavailable``."""

    code = "busy"


class NoSpace(RemoteError):
    code = "no_space"


class Refused(RemoteError):
    code = "refused"


class Forbidden(RemoteError):
    """The request's identity may not do this op on this name or prefix (:mod:`fms.policy`);
    the message names the op, the name or prefix, and the identity's grants."""

    code = "forbidden"


class TooLarge(RemoteError):
    code = "too_large"


class Conflict(RemoteError):
    """The request does not fit what is stored now (a folder renamed onto one that holds
    files)."""

    code = "conflict"


class TransportError(FmsError):
    """The broker could not be reached."""


class Timeout(TransportError):
    """A request got no reply within its deadline."""


_BY_CODE = {
    cls.code: cls
    for cls in (
        NotFound,
        BadRequest,
        IntegrityError,
        MissingChunks,
        Unavailable,
        Busy,
        NoSpace,
        Refused,
        Forbidden,
        TooLarge,
        Conflict,
    )
}


def from_reply(code: str, message: str, header: dict[str, Any] | None = None) -> RemoteError:
    """Build the exception that matches an error reply's code."""
    if code == MissingChunks.code:
        missing = (header or {}).get("missing")
        return MissingChunks(message, code, missing if isinstance(missing, list) else ())
    return _BY_CODE.get(code, RemoteError)(message, code)
