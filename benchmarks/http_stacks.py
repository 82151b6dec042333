"""The measurement the S3 gateway's HTTP stack was chosen by: the same three endpoints on
uvicorn + starlette, uvicorn with a bare ASGI app, granian + starlette, granian with a bare ASGI
app, and aiohttp; a 256 MiB GET and a 256 MiB PUT (streamed, by curl) and 4 KiB GETs from 8
keep-alive connections (a Python client).  Prints seconds and requests per second per stack.

    .venv/bin/pip install uvicorn starlette granian httptools uvloop   # measurement only
    .venv/bin/python -m benchmarks.http_stacks
"""

import http.client
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

BIG = 256 << 20
APPS = textwrap.dedent(
    """
    BIG = 256 << 20
    PIECE = bytes(1 << 20)
    SMALL = b"x" * 4096
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def big(request):
        if request.method == "PUT":
            n = 0
            async for part in request.stream():
                n += len(part)
            return Response(str(n))
        async def gen():
            for _ in range(BIG >> 20):
                yield PIECE
        return StreamingResponse(gen(), headers={"content-length": str(BIG)})

    async def small(request):
        return Response(SMALL, media_type="application/octet-stream")

    star = Starlette(routes=[Route("/big", big, methods=["GET", "PUT"]), Route("/small", small)])

    async def raw(scope, receive, send):
        if scope["type"] != "http":
            return
        def start(n):
            return {"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(n).encode())]}
        if scope["path"] == "/small":
            await send(start(4096))
            await send({"type": "http.response.body", "body": SMALL})
        elif scope["method"] == "PUT":
            n = 0
            while True:
                m = await receive()
                n += len(m.get("body", b""))
                if not m.get("more_body"):
                    break
            await send(start(len(str(n))))
            await send({"type": "http.response.body", "body": str(n).encode()})
        else:
            await send(start(BIG))
            for _ in range(BIG >> 20):
                await send({"type": "http.response.body", "body": PIECE, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    def aiohttp_main(port):
        from aiohttp import web
        async def big_aio(request):
            if request.method == "PUT":
                n = 0
                async for part in request.content.iter_any():
                    n += len(part)
                return web.Response(text=str(n))
            resp = web.StreamResponse(headers={"content-length": str(BIG)})
            await resp.prepare(request)
            for _ in range(BIG >> 20):
                await resp.write(PIECE)
            await resp.write_eof()
            return resp
        async def small_aio(request):
            return web.Response(body=SMALL)
        app = web.Application()
        app.router.add_route("*", "/big", big_aio)
        app.router.add_get("/small", small_aio)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)

    if __name__ == "__main__":
        import sys
        aiohttp_main(int(sys.argv[1]))
    """
)


def small_load(port: int, n: int = 2000, threads: int = 8) -> float:
    def run():
        c = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(n):
            c.request("GET", "/small")
            c.getresponse().read()

    ts = [threading.Thread(target=run) for _ in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return n * threads / (time.perf_counter() - start)


def timed(cmd) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    folder = tempfile.mkdtemp(prefix="fms-stacks-")
    with open(os.path.join(folder, "apps.py"), "w") as f:
        f.write(APPS)
    big = os.path.join(folder, "big.bin")
    with open(big, "wb") as f:
        f.truncate(BIG)
    bindir = os.path.dirname(sys.executable)
    uv = [os.path.join(bindir, "uvicorn"), "--log-level", "warning", "--no-access-log"]
    uv += ["--loop", "uvloop", "--http", "httptools"]
    gr = [os.path.join(bindir, "granian"), "--interface", "asgi", "--log-level", "warning"]
    stacks = {
        "uvicorn + starlette": [*uv, "apps:star", "--port"],
        "uvicorn, bare ASGI": [*uv, "apps:raw", "--port"],
        "granian + starlette": [*gr, "--no-ws", "apps:star", "--port"],
        "granian, bare ASGI": [*gr, "--no-ws", "apps:raw", "--port"],
        "aiohttp": [sys.executable, "apps.py"],
    }
    for i, (name, cmd) in enumerate(stacks.items()):
        port = 21001 + i
        proc = subprocess.Popen([*cmd, str(port)], cwd=folder, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    http.client.HTTPConnection("127.0.0.1", port).request("GET", "/small")
                    break
                except OSError:
                    time.sleep(0.1)
            url = f"http://127.0.0.1:{port}/big"
            get = timed(["curl", "-s", "-o", "/dev/null", url])
            put = timed(["curl", "-s", "-o", "/dev/null", "-T", big, url])
            rate = small_load(port)
            print(
                f"{name:22} GET 256 MiB {get:.2f} s  PUT 256 MiB {put:.2f} s  "
                f"4 KiB x 8 conns {rate:,.0f} req/s",
                flush=True,
            )
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
