"""The web console at ``/console``: one static page (``index.html``) that is an S3 client in
the browser (it signs its requests with SigV4 in JavaScript), and the one thing S3 lacks that
it needs: a folder downloaded as one zip, streamed (``GET /BUCKET?x-fms-zip&prefix=P``,
signed like any S3 request; a presigned URL lets the browser download it)."""

import os
import time
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import S3Error

if TYPE_CHECKING:
    from fms import Client
    from fms.wire import BytesLike

    from ..app import Gateway

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")
ZIP_QUEUE = 8  # pieces of zip output held between the thread that writes it and the response
MAX_ZIP_FILES = 100_000  # files in one zip download


async def serve(request: web.BaseRequest, raw_path: str) -> web.StreamResponse:
    """The console's page; anything else under /console is not found."""
    if request.method not in ("GET", "HEAD"):
        raise S3Error("MethodNotAllowed", "the console is read with GET")
    if raw_path in ("/console", "/console/", "/console/index.html"):
        return web.FileResponse(
            PAGE,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Cache-Control": "no-cache",
                # The page talks only to this origin, and runs only its own script.
                "Content-Security-Policy": "default-src 'self' 'unsafe-inline' blob: data:; "
                "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )
    raise S3Error("NoSuchKey", "no such page in the console")


class _Writer:
    """A write-only stream whose bytes go to ``put`` (zipfile writes into it from a pool
    thread; the response reads what it puts)."""

    def __init__(self, put: Callable[[bytes], None]) -> None:
        self.put = put
        self.offset = 0

    def write(self, data: "BytesLike", /) -> int:
        self.put(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the pipe is closed by the response


async def zip_response(
    gateway: "Gateway", request: web.BaseRequest, bucket: str, prefix: str
) -> web.StreamResponse:
    """Every object under ``prefix`` in one zip (stored, not compressed: most files that are
    worth zipping for a download are compressed already), streamed as it is made."""
    await gateway.need_bucket(bucket)
    base = f"{bucket}/"
    folder = prefix.rstrip("/").rsplit("/", 1)[-1] or bucket
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{_ascii(folder)}.zip"',
        }
    )
    await response.prepare(request)

    def build(client: "Client", put: Callable[[bytes], None]) -> None:
        with zipfile.ZipFile(_Writer(put), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for n, entry in enumerate(client.iter_ls(base + prefix)):
                if n >= MAX_ZIP_FILES:
                    break
                arcname = entry["name"][len(base) + len(prefix) :].lstrip("/") or "file"
                info = zipfile.ZipInfo(arcname, time.gmtime(entry["mtime"])[:6])
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, "w", force_zip64=entry["size"] > 2**31) as member:
                    client.get_to(entry["name"], member)

    try:
        async for item in gateway.store.produced(build, ZIP_QUEUE):
            await response.write(item)
    except ConnectionResetError:
        raise  # the client went away
    except Exception as exc:  # the zip's making failed: the client sees the response cut
        raise ConnectionResetError(f"zip failed: {exc}") from None
    await response.write_eof()
    return response


def _ascii(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
