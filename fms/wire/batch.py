"""The batched read, ``get_many``: many names in one message, answered in one.

Storage builds the reply from its store, the cache from its hits plus one storage fetch of its
misses, and the client reads it; all three use this module, so the layout has one home:

- request: ``names``, 1 to ``MAX_BATCH_FILES`` names;
- reply: ``results``, one map per name in the same order, either
  ``{manifest: MANIFEST, inline: BOOL}`` or ``{error: CODE, message: TEXT}`` (a manifest is at
  most ``MANIFEST_MAX`` bytes: a long chunk list is not in it, the client reads its pages);
  and, if any result has ``inline: true``, one data frame holding those files' content back to
  back, in order (each ``manifest.size`` bytes).  Content travels only for files that travel
  inline (:func:`~fms.wire.fields.travels_inline`), and only while the frame stays within
  ``MAX_BATCH_BYTES``; a file left out is fetched like a large one (``get``, ``chunk``).
"""

from collections.abc import Mapping
from typing import Any

from ..errors import BadRequest
from ..limits import BytesLike
from .codec import DATA_PREFIX_LEN, data_buffer, unpack_data
from .digests import Hasher
from .fields import check_name, need, travels_inline
from .manifest import check_manifest, manifest_hasher
from .messages import MAX_BATCH_BYTES, MAX_BATCH_FILES

__all__ = ["BatchReply", "inline_ok", "need_names", "read_batch"]


def need_names(header: Mapping[str, Any]) -> list[str]:
    """The checked ``names`` of a ``get_many`` request.  :raises BadRequest:"""
    names = need(header, "names", list)
    if not 1 <= len(names) <= MAX_BATCH_FILES:
        raise BadRequest(f"get_many takes 1 to {MAX_BATCH_FILES} names, got {len(names)}")
    return [check_name(name) for name in names]


def inline_ok(
    manifest: Mapping[str, Any], payload: BytesLike | None, hash_fn: Hasher | None = None
) -> bool:
    """Whether ``payload`` is the whole, verified content of a file that travels inline;
    ``hash_fn``: the manifest's (:func:`manifest_hasher`), if the caller has it at hand."""
    return (
        payload is not None
        and len(payload) == manifest["size"]
        and (hash_fn or manifest_hasher(manifest))(payload) == manifest["chunks"][0]
    )


class BatchReply:
    """A ``get_many`` reply under construction, in request order."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self._parts: list[BytesLike] = []
        self._bytes = 0

    def manifest(self, manifest: dict[str, Any], payload: BytesLike | None = None) -> None:
        """One name's manifest, with its content if it travels inline and still fits."""
        inline = False
        if (
            payload is not None
            and travels_inline(manifest["size"], manifest["count"])
            and self._bytes + len(payload) <= MAX_BATCH_BYTES
        ):
            self._parts.append(payload)
            self._bytes += len(payload)
            inline = True
        self.results.append({"manifest": manifest, "inline": inline})

    def error(self, code: str, message: str) -> None:
        self.results.append({"error": code, "message": message})

    def frame(self) -> bytearray | None:
        """The data frame (one copy of each payload into it), or None if nothing is inline."""
        if not self._parts:
            return None
        buf = data_buffer(self._bytes)
        view, at = memoryview(buf), DATA_PREFIX_LEN
        for part in self._parts:
            view[at : at + len(part)] = part
            at += len(part)
        return buf


def read_batch(
    header: Mapping[str, Any], data: BytesLike | None, names: list[str]
) -> list[tuple[dict[str, Any], memoryview | None]]:
    """The results of a ``get_many`` reply for ``names`` (checked names, as :func:`need_names`
    gives them), as ``(result, payload)`` pairs:
    ``payload`` is a memoryview over the data frame for an inline result, else None.  Payloads
    are not verified here (:func:`inline_ok`).

    :raises BadRequest: the reply's results or its data frame do not add up.
    """
    results = need(header, "results", list)
    if len(results) != len(names):
        raise BadRequest(f"get_many: {len(results)} results for {len(names)} names")
    payload = unpack_data(data) if data is not None else memoryview(b"")
    out: list[tuple[dict[str, Any], memoryview | None]] = []
    at = 0
    for name, result in zip(names, results, strict=False):
        if not isinstance(result, dict):
            raise BadRequest("get_many: a result is not a map")
        if "error" in result:
            out.append((result, None))
            continue
        manifest = check_manifest(need(result, "manifest", dict), name)
        if manifest["name"] != name:
            raise BadRequest("get_many: a manifest is for another name")
        inline = result.get("inline")
        if inline is True or (inline is not False and need(result, "inline", bool)):
            end = at + manifest["size"]
            if end > len(payload):
                raise BadRequest("get_many: the data frame is shorter than its results say")
            out.append((result, payload[at:end]))
            at = end
        else:
            out.append((result, None))
    if at != len(payload):
        raise BadRequest("get_many: the data frame is longer than its results say")
    return out
