"""fms as an fsspec filesystem: ``fms://HOST:PORT/NAME`` for pandas, pyarrow, dask and every
library that opens files through fsspec.

::

    import fsspec, pandas
    df = pandas.read_csv("fms://127.0.0.1:5555/data/table.csv")
    df.to_parquet("fms://127.0.0.1:5555/data/table.parquet")
    fs = fsspec.filesystem("fms", host="127.0.0.1", port=5555)
    fs.ls("data/")

``HOST:PORT`` is the broker's frontend (``fms:///NAME``, with no host, uses ``$FMS_BROKER``).
Registered for the ``fms`` protocol by the ``fsspec.specs`` entry point (``pip install
'fms-store[fsspec]'``).  Folders are implied by the names under them, as in an object store; an
empty folder exists only while its marker does (``NAME/``, made by ``fms mount``'s ``mkdir``),
and this ``mkdir`` does nothing.

**Reads are ranged.** A file opened for reading is a :class:`fms.client.download.RemoteFile`:
``seek`` then ``read`` fetches only the chunks that hold the bytes asked for (and prefetches the
following ones while reading on), each verified against its digest.

**Writes stream in bounded memory.** A file opened for writing holds at most one chunk: each
full chunk is hashed and sent to storage as it fills, and ``close`` commits the file (a file of
one small chunk travels with its commit).  Nothing is visible under the name before ``close``,
and a writer that fails leaves the old content in place.
"""

import datetime
import io
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, overload

from fsspec import AbstractFileSystem
from fsspec.utils import infer_storage_options

from .. import wire as p
from ..errors import NotFound
from .api import Client
from .download import RemoteFile
from .upload import Plan, commit_plan

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

PROTOCOL = "fms"


class FmsFileSystem(AbstractFileSystem):
    """An fms cluster as an fsspec filesystem.

    :param host: the broker's frontend host (with ``port``); default ``$FMS_BROKER``.
    :param port: its port.
    :param broker: the frontend endpoint instead (``tcp://HOST:PORT``).
    :param client_options: passed to :class:`fms.Client` (``timeout``, ``curve``, ...).
    """

    protocol = PROTOCOL
    root_marker = ""
    cachable = True

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        broker: str | None = None,
        client_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if broker is None and host:
            broker = f"tcp://{host}:{port or p.DEFAULT_FRONTEND.rsplit(':', 1)[1]}"
        self.client = Client(broker, **(client_options or {}))

    # --- paths ---

    @overload
    @classmethod
    def _strip_protocol(cls, path: list[str]) -> list[str]: ...
    @overload
    @classmethod
    def _strip_protocol(cls, path: str | os.PathLike[str]) -> str: ...
    @classmethod
    def _strip_protocol(cls, path: str | os.PathLike[str] | list[str]) -> str | list[str]:
        if isinstance(path, list):
            return [cls._strip_protocol(x) for x in path]
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3 :]
            path = path.split("/", 1)[1] if "/" in path else ""  # drop HOST:PORT
        elif path.startswith(f"{PROTOCOL}:"):
            path = path[len(PROTOCOL) + 1 :]
        return path.strip("/")

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        options = infer_storage_options(path)
        out: dict[str, Any] = {}
        if options.get("host"):
            out["host"] = options["host"]
        if options.get("port"):
            out["port"] = int(options["port"])
        return out

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self.client.broker.split('://', 1)[-1]}/{name}"

    # --- listing ---

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[dict[str, Any]] | list[str]:
        path = self._strip_protocol(path)
        prefix = f"{path}/" if path else ""
        out = [_info(e) for e in self.client.iter_folder(prefix)]
        if not out and path:
            out = [self.info(path)]  # a file lists as itself; nothing: not found
        return out if detail else [e["name"] for e in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if not path:
            return {"name": "", "size": 0, "type": "directory"}
        try:
            return _info(self.client.stat(path))
        except NotFound:
            pass
        if next(iter(self.client.iter_ls(f"{path}/", page=1, markers=True)), None) is not None:
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> dict[str, dict[str, Any]] | list[str]:
        if maxdepth is not None or withdirs:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        path = self._strip_protocol(path)
        found: dict[str, dict[str, Any]] = {}
        try:
            if self.info(path)["type"] == "file":
                found[path] = self.info(path)
        except FileNotFoundError:
            pass
        found.update((e["name"], _info(e)) for e in self.client.iter_ls(f"{path}/" if path else ""))
        return found if detail else sorted(found)

    def modified(self, path: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], datetime.UTC)

    # --- changes ---

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        pass  # folders are implied by the names under them

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def rmdir(self, path: str) -> None:
        pass

    def _rm(self, path: str) -> None:
        try:
            self.client.rm(self._strip_protocol(path))
        except NotFound:
            pass  # gone already, or an implied folder that went with its last file

    def rm(
        self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None
    ) -> None:
        """With ``recursive``, each folder goes a page of names per request (``rm -r``)."""
        paths = path if isinstance(path, list) else [path]
        if (
            not recursive
            or maxdepth is not None
            or any(glob in str(x) for x in paths for glob in "*?[")
        ):
            super().rm(path, recursive=recursive, maxdepth=maxdepth)
            self.invalidate_cache()
            return
        for one in paths:
            name = self._strip_protocol(one)
            found = False
            if name:
                try:
                    self.client.rm(name)
                    found = True
                except NotFound:
                    pass
            if name:
                removed = [page for page in self.client.rm_prefix(f"{name}/") if page]
                found = found or bool(removed)
            if not found:
                raise FileNotFoundError(one)
        self.invalidate_cache()

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Server-side: metadata only, no data moves."""
        self._copy(path1, path2, self.client.cp)

    def mv(
        self,
        path1: str | list[str],
        path2: str | list[str],
        recursive: bool = False,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        if (
            not recursive
            and isinstance(path1, str)
            and isinstance(path2, str)
            and self.isfile(path1)
        ):
            self._copy(path1, path2, self.client.mv)  # atomic, metadata only
            return
        super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)

    def _copy(self, path1: str, path2: str, op: Callable[[str, str], object]) -> None:
        try:
            op(self._strip_protocol(path1), self._strip_protocol(path2))
        except NotFound:
            raise FileNotFoundError(path1) from None
        self.invalidate_cache()

    # --- content ---

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "io.BufferedReader[RemoteFile] | StreamWriter":
        path = self._strip_protocol(path)
        if "r" in mode:
            return self._reader(path, block_size)
        if "x" in mode and self.exists(path):
            raise FileExistsError(path)
        return StreamWriter(self.client, path)

    def _reader(self, path: str, block_size: int | None = None) -> "io.BufferedReader[RemoteFile]":
        try:
            return io.BufferedReader(
                self.client.open(path), buffer_size=block_size or io.DEFAULT_BUFFER_SIZE
            )
        except NotFound:
            raise FileNotFoundError(path) from None

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """Bytes ``start`` to ``end`` of a file, fetching only the chunks that hold them."""
        with self._reader(self._strip_protocol(path)) as f:
            size = f.raw.size
            start = 0 if start is None else (start if start >= 0 else max(0, size + start))
            end = size if end is None else (end if end >= 0 else max(0, size + end))
            f.seek(start)
            return f.read(max(0, min(end, size) - start))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if mode == "create" and self.exists(path):
            raise FileExistsError(path)
        self.client.put_bytes(bytes(value), self._strip_protocol(path))
        self.invalidate_cache()


def _info(entry: dict[str, Any]) -> dict[str, Any]:
    """An fsspec info dict of a stat or folder entry (or a folder's marker, ``NAME/``)."""
    if entry.get("folder") or p.is_folder_name(entry["name"]):
        return {"name": entry["name"].rstrip("/"), "size": 0, "type": "directory"}
    return {**entry, "type": "file"}


class StreamWriter(io.RawIOBase):
    """A file being written to fms: one chunk in memory, each full one sent as it fills, the
    file committed on ``close`` (see the module's docstring)."""

    def __init__(self, client: Client, name: str) -> None:
        super().__init__()
        self.client = client
        self.name = p.check_name(name)
        self.chunk_size = client.chunk_size
        self._buf = bytearray()
        self._digests = bytearray()
        self._size = 0
        self._failed = False

    def writable(self) -> bool:
        return True

    def write(self, data: "Buffer") -> int:
        if self.closed:
            raise ValueError("write to a closed file")
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            room = self.chunk_size - len(self._buf)
            self._buf += view[:room]
            view = view[room:]
            if len(self._buf) == self.chunk_size:
                self._send_chunk()
        return n

    def _send_chunk(self) -> None:
        piece = bytes(self._buf)
        digest = self.client.session.hasher()(piece)
        self._size += len(piece)
        self._buf.clear()
        try:
            self.client.call("put_chunk", data=p.pack_data(piece), hash=digest)
        except BaseException:
            self._failed = True
            raise
        self._digests += digest

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._failed:
                self._commit()
        finally:
            super().close()

    def _commit(self) -> None:
        if not self._digests:  # one chunk or none: it travels with its commit
            self.client.put_bytes(bytes(self._buf), self.name, time.time())
            return
        if self._buf:
            self._send_chunk()
        # The chunks went as they were written: the file digest is derived from their digests.
        hash_fn = self.client.session.hasher()
        plan = Plan(self._size, self.chunk_size, self._digests, time.time(), None, hash_fn)
        commit_plan(self.client.session, self.name, plan)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._failed = True  # an exception in the with block: nothing is committed
        self.close()
