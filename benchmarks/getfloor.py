"""The floor of fms's GET path in Python on this machine, measured beside fms by
benchmarks/datapath.py: the same three processes and hops with nothing but the unavoidable work.
A worker preads 1 MiB chunks of a page-cached file and sends them (copy=False); a Python
ROUTER/ROUTER broker decodes each msgpack header and forwards the frames; a client keeps 8
chunks in flight, verifies each chunk's sha256 on a pool of 2 threads and pwrites it at its
offset into a new file (no fsync, as curl -o does not either).  The cold floor adds the miss
path: the broker sends the client's request to a cache process, which fetches the chunk from
the storage process through the broker, verifies its sha256, writes it to a disk tier (one file
per chunk) and answers the client.  The PUT floor sends the other way: the client preads and
hashes each chunk and keeps 8 in flight, the broker forwards them to two storage processes in
turn, each of which verifies the chunk and writes it to a file of its own, and one sync of the
file system ends the commit.  The floor keeps sha256 on purpose: it is the yardstick.

    python -m benchmarks.getfloor [SIZE_MB] [tcp|ipc]

prints the best of 3 runs in MiB/s: warm with and without hashing, cold, and the PUT floor.
"""

import hashlib
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import zmq

CHUNK = 1 << 20
WINDOW = 8


def worker(back, path):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send_multipart([msgpack.packb({"op": "ready"})])
    fd = os.open(path, os.O_RDONLY)
    while True:
        route, hdr = s.recv_multipart()[:2]
        h = msgpack.unpackb(hdr)
        if h["op"] == "stop":
            return
        data = os.pread(fd, CHUNK, h["i"] * CHUNK)
        s.send_multipart([route, msgpack.packb({"ok": True, "id": h["id"]}), data], copy=False)


def broker(front, back):
    ctx = zmq.Context()
    f = ctx.socket(zmq.ROUTER)
    f.bind(front)
    b = ctx.socket(zmq.ROUTER)
    b.bind(back)
    w = b.recv_multipart()[0]
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    while True:
        for s, _ in poller.poll():
            if s is f:
                cid, hdr = f.recv_multipart(copy=False)
                h = msgpack.unpackb(hdr.buffer)
                b.send_multipart([w, cid.bytes, hdr], copy=False)
                if h["op"] == "stop":
                    return
            else:
                m = b.recv_multipart(copy=False)
                msgpack.unpackb(m[2].buffer)
                f.send_multipart(m[1:], copy=False)


def client(front, size, dst, digests, verify=True):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(front)
    n = (size + CHUNK - 1) // CHUNK
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pool = ThreadPoolExecutor(2)

    def check_write(i, frame):
        buf = frame.buffer
        if verify and hashlib.sha256(buf).digest() != digests[i]:
            raise SystemExit("bad chunk")
        os.pwrite(fd, buf, i * CHUNK)

    t = time.perf_counter()
    sent = got = 0
    futs = []
    while sent < min(WINDOW, n):
        s.send_multipart([msgpack.packb({"op": "get", "id": sent, "i": sent})])
        sent += 1
    while got < n:
        hdr, data = s.recv_multipart(copy=False)
        i = msgpack.unpackb(hdr.buffer)["id"]
        got += 1
        futs.append(pool.submit(check_write, i, data))
        if sent < n:
            s.send_multipart([msgpack.packb({"op": "get", "id": sent, "i": sent})])
            sent += 1
    for f in futs:
        f.result()
    os.close(fd)
    dt = time.perf_counter() - t
    s.send_multipart([msgpack.packb({"op": "stop", "id": -1})])
    return size / dt / 2**20


def run_floor(src, size, tr, verify, tag):
    base = f"/tmp/getfloor-{os.getpid()}"
    front, back = (
        (f"ipc://{base}-f", f"ipc://{base}-b")
        if tr == "ipc"
        else ("tcp://127.0.0.1:47311", "tcp://127.0.0.1:47312")
    )
    digests = []
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            digests.append(hashlib.sha256(chunk).digest())
    pb = mp.Process(target=broker, args=(front, back))
    pb.start()
    time.sleep(0.2)
    pw = mp.Process(target=worker, args=(back, src))
    pw.start()
    time.sleep(0.3)
    r = client(front, size, src + f".{tag}", digests, verify)
    pb.join(5)
    pw.terminate()
    pw.join()
    os.unlink(src + f".{tag}")
    return r


def cache_relay(back, tier_dir):
    """The miss path's cache: asks storage for the chunk (through the broker), verifies its sha256,
    writes it to its disk tier (a file per chunk) and answers the client, as a fill would."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send_multipart([msgpack.packb({"op": "ready", "role": "cache"})])
    waiting = {}
    while True:
        m = s.recv_multipart(copy=False)
        if len(m) == 2:  # a client's request: [client route, header]
            route, hdr = m[0].bytes, msgpack.unpackb(m[1].buffer)
            if hdr["op"] == "stop":
                s.send_multipart([b"", msgpack.packb({"op": "stop", "id": -1})])
                return
            waiting[hdr["id"]] = route
            s.send_multipart([b"", msgpack.packb({"op": "fetch", "id": hdr["id"], "i": hdr["i"]})])
        else:  # storage's reply: [b"", header, data]
            hdr = msgpack.unpackb(m[1].buffer)
            data = m[2]
            hashlib.sha256(data.buffer).digest()
            with open(os.path.join(tier_dir, str(hdr["id"])), "wb") as f:
                f.write(data.buffer)
            s.send_multipart(
                [waiting.pop(hdr["id"]), msgpack.packb({"ok": True, "id": hdr["id"]}), data],
                copy=False,
            )


def storage_for_cache(back, path):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send_multipart([msgpack.packb({"op": "ready", "role": "storage"})])
    fd = os.open(path, os.O_RDONLY)
    while True:
        route, hdr = s.recv_multipart()[:2]
        h = msgpack.unpackb(hdr)
        if h["op"] == "stop":
            return
        data = os.pread(fd, CHUNK, h["i"] * CHUNK)
        s.send_multipart([route, msgpack.packb({"ok": True, "id": h["id"]}), data], copy=False)


def broker2(front, back):
    """Clients' requests go to the cache; the cache's fetches go to storage; replies go back
    by route."""
    ctx = zmq.Context()
    f = ctx.socket(zmq.ROUTER)
    f.bind(front)
    b = ctx.socket(zmq.ROUTER)
    b.bind(back)
    roles = {}
    while len(roles) < 2:
        w, hdr = b.recv_multipart()
        roles[msgpack.unpackb(hdr)["role"]] = w
    cache, storage = roles["cache"], roles["storage"]
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    while True:
        for s, _ in poller.poll():
            if s is f:
                cid, hdr = f.recv_multipart(copy=False)
                msgpack.unpackb(hdr.buffer)
                b.send_multipart([cache, cid.bytes, hdr], copy=False)
            else:
                m = b.recv_multipart(copy=False)
                sender = m[0].bytes
                if sender == cache and m[1].bytes == b"":  # the cache asks storage
                    h = msgpack.unpackb(m[2].buffer)
                    b.send_multipart([storage, cache, m[2]], copy=False)
                    if h["op"] == "stop":
                        return
                elif sender == storage:  # storage answers the cache
                    msgpack.unpackb(m[2].buffer)
                    b.send_multipart([cache, b"", m[2], m[3]], copy=False)
                else:  # the cache answers a client
                    msgpack.unpackb(m[2].buffer)
                    f.send_multipart(m[1:], copy=False)


def run_cold_floor(src, size, tr):
    import shutil
    import tempfile

    base = f"/tmp/getfloor-{os.getpid()}"
    front, back = (
        (f"ipc://{base}-f", f"ipc://{base}-b")
        if tr == "ipc"
        else ("tcp://127.0.0.1:47321", "tcp://127.0.0.1:47322")
    )
    digests = []
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            digests.append(hashlib.sha256(chunk).digest())
    tier = tempfile.mkdtemp(prefix="getfloor-tier-", dir=os.path.dirname(src))
    pb = mp.Process(target=broker2, args=(front, back))
    pb.start()
    time.sleep(0.2)
    pc = mp.Process(target=cache_relay, args=(back, tier))
    pc.start()
    ps = mp.Process(target=storage_for_cache, args=(back, src))
    ps.start()
    time.sleep(0.4)
    r = client(front, size, src + ".c", digests, True)
    pb.join(5)
    pc.join(5)
    ps.terminate()
    ps.join()
    for p in (pb, pc):
        if p.is_alive():
            p.terminate()
            p.join()
    os.unlink(src + ".c")
    shutil.rmtree(tier)
    return r


# --- the PUT floor: the same client, Python broker and storage process, with only the
# unavoidable work of an upload: pread, sha256 in the client, forward, sha256 on receipt (storage
# verifies what it stores), a file per chunk, and one sync of the store at the commit ---


def put_storage(back, store_dir, verify=True):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send_multipart([msgpack.packb({"op": "ready"})])
    while True:
        m = s.recv_multipart(copy=False)
        route, h = m[0].bytes, msgpack.unpackb(m[1].buffer)
        if h["op"] == "stop":
            return
        if h["op"] == "commit":
            fd = os.open(store_dir, os.O_RDONLY)
            os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
            os.close(fd)
        else:  # a chunk: verified, then written to a file of its own
            data = m[2].buffer
            if verify and hashlib.sha256(data).digest() != h["hash"]:
                raise SystemExit("bad chunk")
            with open(os.path.join(store_dir, str(h["i"])), "wb") as f:
                f.write(data)
        s.send_multipart([route, msgpack.packb({"ok": True, "id": h["id"]})])


def put_broker(front, back, workers):
    """Forwards every frame of a client's request (header and data) to the ``workers`` storage
    processes in turn (as the broker spreads PUTs), decoding the header, and their replies
    back."""
    ctx = zmq.Context()
    f = ctx.socket(zmq.ROUTER)
    f.bind(front)
    b = ctx.socket(zmq.ROUTER)
    b.bind(back)
    ws = [b.recv_multipart()[0] for _ in range(workers)]
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    turn = 0
    while True:
        for s, _ in poller.poll():
            if s is f:
                m = f.recv_multipart(copy=False)
                h = msgpack.unpackb(m[1].buffer)
                if h["op"] == "stop":
                    for w in ws:
                        b.send_multipart([w, m[0].bytes, m[1]], copy=False)
                    return
                turn = (turn + 1) % len(ws)
                b.send_multipart([ws[turn], m[0].bytes, *m[1:]], copy=False)
            else:
                m = b.recv_multipart(copy=False)
                msgpack.unpackb(m[2].buffer)
                f.send_multipart(m[1:], copy=False)


def put_client(front, src, size, verify=True):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(front)
    n = (size + CHUNK - 1) // CHUNK
    fd = os.open(src, os.O_RDONLY)
    t = time.perf_counter()

    def send(i):
        data = os.pread(fd, CHUNK, i * CHUNK)
        digest = hashlib.sha256(data).digest() if verify else b""
        hdr = {"op": "put", "id": i, "i": i, "hash": digest}
        s.send_multipart([msgpack.packb(hdr), data], copy=False)

    sent = got = 0
    while sent < min(WINDOW, n):
        send(sent)
        sent += 1
    while got < n:
        s.recv_multipart()
        got += 1
        if sent < n:
            send(sent)
            sent += 1
    s.send_multipart([msgpack.packb({"op": "commit", "id": -2})])
    s.recv_multipart()
    dt = time.perf_counter() - t
    os.close(fd)
    s.send_multipart([msgpack.packb({"op": "stop", "id": -1})])
    return size / dt / 2**20


def run_put_floor(src, size, tr, verify=True, workers=2):
    """MiB/s of the PUT floor: ``src`` (``size`` bytes) stored by ``workers`` storage processes
    (as many as datapath's cluster has) as files of CHUNK bytes in a new folder beside it,
    synced; ``verify=False``: no hashing at either end (the topology's limit)."""
    import shutil
    import tempfile

    base = f"/tmp/putfloor-{os.getpid()}"
    front, back = (
        (f"ipc://{base}-f", f"ipc://{base}-b")
        if tr == "ipc"
        else ("tcp://127.0.0.1:47331", "tcp://127.0.0.1:47332")
    )
    store = tempfile.mkdtemp(prefix="putfloor-store-", dir=os.path.dirname(src))
    pb = mp.Process(target=put_broker, args=(front, back, workers))
    pb.start()
    time.sleep(0.2)
    ps = [mp.Process(target=put_storage, args=(back, store, verify)) for _ in range(workers)]
    for proc in ps:
        proc.start()
    time.sleep(0.3)
    try:
        return put_client(front, src, size, verify)
    finally:
        for proc in (pb, *ps):
            proc.join(5)
        for proc in (pb, *ps):
            if proc.is_alive():
                proc.terminate()
                proc.join()
        shutil.rmtree(store)


if __name__ == "__main__":
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    tr = sys.argv[2] if len(sys.argv) > 2 else "tcp"
    d = "/tmp/getfloor-data"
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "big")
    if not os.path.exists(src) or os.path.getsize(src) != size_mb << 20:
        with open(src, "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(CHUNK))
    size = size_mb << 20
    with open(src, "rb") as f:  # page cache warm
        while f.read(8 << 20):
            pass

    def best(fn):
        return max(fn() for _ in range(3))

    warm = best(lambda: run_floor(src, size, tr, True, "v"))
    bare = best(lambda: run_floor(src, size, tr, False, "n"))
    cold = best(lambda: run_cold_floor(src, size, tr))
    print(f"floor ({tr}, sha256 + pwrite): {warm:,.0f} MiB/s")
    print(f"floor ({tr}, no hashing):      {bare:,.0f} MiB/s")
    print(f"cold floor ({tr}, a miss through a cache that verifies and fills): {cold:,.0f} MiB/s")
    put = best(lambda: run_put_floor(src, size, tr))
    print(f"PUT floor ({tr}, sha256 both ends, a file per chunk, one sync): {put:,.0f} MiB/s")
    put_bare = best(lambda: run_put_floor(src, size, tr, False))
    print(f"PUT floor ({tr}, no hashing): {put_bare:,.0f} MiB/s")
