"""The web console at ``/console``: one static page (``index.html``) that is an S3 client in
the browser (it signs its requests with SigV4 in JavaScript), and the one thing S3 lacks that
it needs: a folder downloaded as one zip, streamed (``GET /BUCKET?x-fms-zip&prefix=P``,
signed like any S3 request; a presigned URL lets the browser download it)."""

import asyncio
import os
import time
import zipfile

from aiohttp import web

from ..errors import S3Error
from ..store import Stopped, ThreadPipe

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")
ZIP_QUEUE = 8  # pieces of zip output held between the thread that writes it and the response
MAX_ZIP_FILES = 100_000  # files in one zip download


async def serve(request: web.Request, raw_path: str) -> web.StreamResponse:
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


class _PipeWriter:
    """A write-only stream whose bytes go to a :class:`ThreadPipe` (zipfile writes into it
    from a pool thread; the response reads from the pipe)."""

    def __init__(self, pipe: ThreadPipe):
        self.pipe = pipe
        self.offset = 0

    def write(self, data) -> int:
        self.pipe.put(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self):
        pass


async def zip_response(gateway, request, bucket: str, prefix: str) -> web.StreamResponse:
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
    pipe = ThreadPipe(asyncio.get_running_loop(), ZIP_QUEUE)

    def build(client):
        try:
            with zipfile.ZipFile(_PipeWriter(pipe), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for n, entry in enumerate(client.iter_ls(base + prefix)):
                    if n >= MAX_ZIP_FILES:
                        break
                    arcname = entry["name"][len(base) + len(prefix) :].lstrip("/") or "file"
                    info = zipfile.ZipInfo(arcname, time.gmtime(entry["mtime"])[:6])
                    info.compress_type = zipfile.ZIP_STORED
                    with zf.open(info, "w", force_zip64=entry["size"] > 2**31) as member:
                        client.get_to(entry["name"], member)
            pipe.put(None)
        except Stopped:
            pass
        except Exception as exc:  # handed to the response, which is cut short
            pipe.put(exc)

    asyncio.get_running_loop().run_in_executor(
        gateway.store.pool, lambda: build(gateway.store.client())
    )
    try:
        while True:
            item = await pipe.get()
            if item is None:
                break
            if isinstance(item, Exception):
                raise ConnectionResetError(f"zip failed: {item}")  # the client sees it cut
            await response.write(item)
    finally:
        pipe.close()
    await response.write_eof()
    return response


def _ascii(name: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
