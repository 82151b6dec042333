"""Benchmarks: fms side by side with peers in the same run, reported as ratios (the machine is
shared and noisy: an absolute time alone says little).

    python -m benchmarks.bench [SCENARIO ...] [--size 512M] [--rss-size 2G] [--names 200000]
                        [--out bench-results]

Scenarios (default: all but curve and profile; ``meta`` stands for ``ls putr gc``):

- ``large``  PUT, cold GET (every chunk a cache miss) and warm GET (every chunk a hit) of one
  large file to a file on disk, against ``cp`` + ``sync`` of the copy (PUT) and ``curl`` from
  nginx (GET).  Each round writes new content and fsyncs it before either clock starts, and
  PUT and cp take turns going first.
- ``small``  4 KiB GETs: one client's sequential latency p50/p99 against redis-py GET, and the
  same round trip through a bare pyzmq proxy and echo process (the topology's floor in Python);
  16 concurrent connections' requests/s against nginx under ``wrk -t2 -c16``, driven the way wrk
  drives nginx (two load processes, one request in flight per connection, every reply
  verified), and again with 16 processes each using :class:`fms.Client`.
- ``many``   ``get -r`` of 1000 x 4 KiB files through the CLI, five trees of new content, each
  right after its upload (the cache as the upload's commits filled it), then with a cold cache
  (the cache worker started again on an empty folder, outside the clocks), then warm, against
  one ``curl`` fetching the same 1000 files sequentially over one keep-alive connection from
  nginx (which serves them from the page cache their writing filled), the cold, warm and curl
  runs taking turns (medians of 5).
- ``ls``     ``Client.ls`` of a 200-name folder (p500/, in the middle of the key space) and
  ``Client.usage`` (the ``stats`` figures), warm, median of 20, with 2,000 names stored over
  1,000 folders, then in the same store grown to 200,000 (``--names``) with pipelined commits
  of one tiny content (dedup: only metadata is written).  Ratio: time among 200,000 / time
  among 2,000.  Filling stops after 5 minutes; the row then says how many names it reached.
- ``putr``   ``put -r`` of 1000 x 4 KiB files through the CLI against one ``curl -K`` uploading
  the same files (``upload-file``, WebDAV ``PUT``) to nginx over one keep-alive connection,
  median of 3.  curl as typed sends ``Expect: 100-continue`` and waits for nginx's 100 before
  each body; a second row has it drop that (``-H 'Expect:'``, about 1.5x faster): the
  strongest peer.  Every round writes new content (fsync'd before any clock) into a fresh
  prefix and folder on the same disk, and starts with a different side.  Ratio: curl time /
  fms time.
- ``gc``     space given back: a 1.5 MiB file kept throughout, then 20 overwrites of a 3 MiB
  file with new content, ``rm``, ``client.py gc --grace 0``; ``du -sb`` of the storage's
  ``chunks/`` and of its whole data directory (``meta.db`` included), the bytes of the chunk
  files alone, and ``Client.usage()["chunk_bytes"]`` after each step.  Target: after gc, the
  chunk bytes are what they were before the overwrites, and the kept file reads back whole.
- ``rss``    peak RSS of every process while a 2 GiB file is put, fetched cold and warm.
- ``scale``  cache-miss GET throughput with 1, 2 and 4 storage workers and how evenly requests
  spread; then storage workers added and removed under load, counting failed requests.
- ``curve``  the throughput cost of CurveZMQ: the large-file flows, plaintext against CURVE.
- ``profile`` where the time goes under the 16-connection 4 KiB GET load: CPU time per
  request of the broker, the cache and the load processes, then py-spy samples broker and cache
  and the heaviest frames are printed (``pip install py-spy``).

Peers (nginx, redis-server, wrk, curl) are started on random loopback ports from a temporary
folder; one that is missing is named with the package to install and its rows are skipped
(the benchmark installs nothing).  Results go to ``OUT/bench-DATE.json`` and ``OUT/bench-DATE.md``.
"""

import argparse
import contextlib
import datetime
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from harness import ROOT, Cluster

from fms import wire as p
from fms.cli import parse_size
from fms.client import Client
from fms.errors import FmsError

SMALL = 4 * p.KiB
LOAD_SECONDS = 5.0  # length of each concurrent-load run
SMALL_SAMPLES = 2000  # sequential GETs for the latency percentiles
SMALL_BLOCKS = 10  # ... taken in turns with the floor's, in this many blocks
MANY_FILES = 1000
SCALE_FILES = 48  # files of SCALE_FILE bytes fetched cold per storage-worker count
SCALE_FILE = 4 * p.MiB
SCALE_CLIENTS = 4
PEER_START = 10.0  # seconds for a peer to start listening
LS_SMALL = 2_000  # names in the store for the first listing ...
LS_LARGE = 200_000  # ... and for the second (--names)
LS_FOLDERS = 1000  # folders p000 .. p999 the names spread over
LS_LISTED = "p500/"  # the folder listed: LS_FOLDER names, in the middle of the key space
LS_FOLDER = 200
LS_BATCH = 5000  # names per put_many while filling the store
LS_FILL_SECONDS = 300.0  # filling stops after this long; the rows say how many names it reached
LS_SAMPLES = 20  # warm ls / usage calls timed at each size (fewer if one is slow)
LS_SAMPLE_SECONDS = 30.0  # ... at most about this long per measurement
GC_OVERWRITES = 20
GC_FILE = 3 * p.MiB
GC_BASE = 3 * p.MiB // 2  # a file kept throughout: gc must leave its chunks alone
CLIENT_PY = os.path.join(ROOT, "client.py")


# --- peers ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + PEER_START
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def ensure_tool(binary: str, package: str) -> bool:
    """True if ``binary`` is on PATH; if not, says which package to install and returns False
    (the benchmark installs nothing itself)."""
    if shutil.which(binary):
        return True
    print(
        f"bench: {binary} not found, skipping its comparisons (install it, e.g. "
        f"`apt-get install {package}`)",
        file=sys.stderr,
    )
    return False


class Nginx:
    """nginx serving ``root`` on a random loopback port."""

    def __init__(self, root: str, folder: str, dav: bool = False):
        """:param dav: also accept WebDAV ``PUT`` under ``root`` (ngx_http_dav_module, built
        into Debian's nginx-light): each upload goes to a temp file, then is renamed into
        place, creating folders as needed; nothing is fsync'd."""
        self.port = free_port()
        conf = os.path.join(folder, "nginx.conf")
        put = (
            f"location / {{ dav_methods PUT; create_full_put_path on; "
            f"client_body_temp_path {folder}/body; client_max_body_size 0; }}"
            if dav
            else ""
        )
        with open(conf, "w") as f:
            f.write(f"""user root; worker_processes 2; daemon off; pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{self.port}; root {root}; {put} }} }}
""")
        self.proc = subprocess.Popen(
            ["nginx", "-c", conf, "-p", folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.proc, "nginx")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def stop(self):
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Redis:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.proc, "redis-server")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


# --- helpers ---


def make_file(path: str, size: int):
    """``size`` random bytes at ``path``, fsync'd: a source left dirty would be flushed by
    whichever side's clock runs first (a peer's ``sync`` would pay for writing it)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * p.MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def make_small_files(folder: str, count: int, size: int = SMALL) -> str:
    """``count`` files of ``size`` new random bytes in ``folder`` (f0000, f0001, ...), fsync'd
    (see :func:`make_file`).  :return: ``folder``."""
    for i in range(count):
        with open(os.path.join(folder, f"f{i:04d}"), "wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
    return folder


# As on a user's machine, compiled modules are cached (.pyc): a sandbox that sets
# PYTHONDONTWRITEBYTECODE would have every CLI run compile fms's modules again (about 30 ms).
CLI_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_cli(frontend: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """``client.py --broker FRONTEND --quiet ARGS`` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, CLIENT_PY, "--broker", frontend, "--quiet", *args],
        env=CLI_ENV,
        **kwargs,
    )


CREATE_PROBE = 50  # files created in each probe folder to time this file system's creates
CREATE_PROBE_FOLDERS = 8  # ... whose inodes may fall in different groups (one may be clean)
SLOW_CREATE = 0.3e-3  # seconds per create past which the file system has not settled
SETTLE_MAX = 420.0  # seconds waited for it at most
SETTLE_STEP = 30.0  # seconds between probes
RECENTLY_FREED = 360.0  # seconds an inode freed with its table block dirty is stepped over
MANY_FREED = 5000  # inodes a deletion frees past which the next run waits for them to age
# Touched when a run of this benchmark deletes many files, so that the next run waits.
CLEANED_MARK = os.path.join(tempfile.gettempdir(), "fms-bench-cleaned")


def remove_tree(path: str) -> None:
    """Delete a scenario's files, and say when, if they were many (:data:`CLEANED_MARK`,
    :func:`settled_disk`): a few large files free too few inodes to slow anyone down."""
    freed = sum(len(dirs) + len(files) for _root, dirs, files in os.walk(path))
    shutil.rmtree(path, ignore_errors=True)
    if freed >= MANY_FREED:
        with open(CLEANED_MARK, "w"):  # its time is the mark
            pass


def settled_disk(folder: str) -> float:
    """Wait until creating files in ``folder`` runs at its usual speed again (at most
    SETTLE_MAX), and return the seconds per create last timed (the slowest probe folder's).

    ext4 without a journal (as on this project's test machine) does not reuse an inode freed
    less than 60 s ago (360 s while its inode table block is dirty): each create steps over
    every such inode of its group, reading the table block of each (the kernel's
    ``recently_deleted``).  Minutes after a large deletion (a test suite, an earlier benchmark's
    clean-up) a create costs 0.6-0.8 ms of system time instead of 0.013-0.07 (seen): a run
    then times the file system, for fms and curl alike, which squeezes their ratio toward 1 and
    hides what either does.  So: past RECENTLY_FREED since this benchmark last deleted many
    files (:data:`CLEANED_MARK`), and creates in several new folders (their inodes may fall in
    different groups, some clean) each under SLOW_CREATE of the process's CPU.  The probes'
    files stay (deleting them would add to the wait)."""
    waited, attempt = 0.0, 0
    while True:
        try:
            since = time.time() - os.stat(CLEANED_MARK).st_mtime
        except FileNotFoundError:
            since = math.inf
        per = 0.0
        for k in range(CREATE_PROBE_FOLDERS):
            probe = _sub(folder, f"create-probe-{attempt}-{k}")
            start = time.process_time()  # the kernel's work, not a busy machine's wait for a CPU
            for i in range(CREATE_PROBE):
                os.close(os.open(os.path.join(probe, str(i)), os.O_CREAT | os.O_WRONLY, 0o644))
            per = max(per, (time.process_time() - start) / CREATE_PROBE)
        attempt += 1
        if (per < SLOW_CREATE and since >= RECENTLY_FREED) or waited >= SETTLE_MAX:
            if per >= SLOW_CREATE:
                print(
                    f"bench: creates still take {per * 1000:.2f} ms each; the figures that "
                    f"follow time the file system",
                    file=sys.stderr,
                    flush=True,
                )
            return per
        why = (
            f"a file create takes {per * 1000:.2f} ms (usual: under {SLOW_CREATE * 1000:.1f})"
            if per >= SLOW_CREATE
            else f"a run of this benchmark deleted many files {since:.0f} s ago"
        )
        print(
            f"bench: {why}: recently freed inodes slow every create; waiting {SETTLE_STEP:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(SETTLE_STEP)
        waited += SETTLE_STEP


def timed(fn) -> float:
    """Seconds ``fn`` takes, starting with no dirty pages: the kernel's write-back of earlier
    runs' data would otherwise throttle whichever side runs next (seen: 400 vs 4000 MiB/s for
    the same writes), which is noise, not a difference between fms and its peer."""
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latencies(fn, samples: int) -> list:
    """Seconds each of ``samples`` sequential calls of ``fn`` takes."""
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def row(
    name: str,
    fms_value: float,
    peer_value,
    peer: str,
    unit: str,
    target: str,
    higher_is_better: bool = True,
    met=None,
) -> dict:
    """One comparison; ``ratio`` is fms / peer (a scenario may redefine it, and its target says
    how to read it)."""
    ratio = None
    if peer_value:
        ratio = fms_value / peer_value
    return {
        "name": name,
        "fms": fms_value,
        "peer": peer_value,
        "peer_name": peer,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- scenarios ---


def bench_large(folder: str, size: int, rounds: int = 3) -> list:
    src = os.path.join(folder, "large.bin")
    out = os.path.join(folder, "out.bin")
    mib = size / p.MiB
    rates = {k: [] for k in ("put", "cp", "cold", "warm", "curl")}
    cluster = Cluster(_sub(folder, "large-cluster"))
    nginx = Nginx(folder, _sub(folder, "nginx")) if ensure_tool("nginx", "nginx-light") else None
    has_curl = ensure_tool("curl", "curl")
    try:
        cluster.start_all(cache_bytes=str(3 * size), cache_args=_cached(size))
        with cluster.client(timeout=30.0) as c:
            for r in range(rounds):
                # New content (a real upload, a real cold get), on disk before either clock.
                make_file(src, size)
                dst = os.path.join(folder, "cp-copy.bin")
                # sync of the copy only (fsync), as fms syncs only what it writes: a global sync
                # would also pay for whatever other processes on the machine left dirty.  Each
                # round starts with the other side: the disk is slower just after a big write.
                sides = [
                    ("put", lambda: c.put(src, f"large/{r}")),
                    (
                        "cp",
                        lambda: subprocess.run(
                            ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", src, dst], check=True
                        ),
                    ),
                ]
                for side, fn in sides[r % 2 :] + sides[: r % 2]:
                    rates[side].append(mib / timed(fn))
                os.unlink(dst)
                rates["cold"].append(mib / timed(lambda: c.get(f"large/{r}", out)))
                rates["warm"].append(mib / timed(lambda: c.get(f"large/{r}", out)))
                if nginx and has_curl:
                    rates["curl"].append(
                        mib
                        / timed(
                            lambda: subprocess.run(
                                ["curl", "-sf", "-o", out, nginx.url("large.bin")], check=True
                            )
                        )
                    )
    finally:
        cluster.stop()
        if nginx:
            nginx.stop()
    med = {k: statistics.median(v) if v else None for k, v in rates.items()}
    rows = [
        _rate_row(f"PUT {mib:.0f} MiB", med["put"], med["cp"], "cp + sync", 0.8),
        _rate_row(f"cold GET {mib:.0f} MiB", med["cold"], med["curl"], "curl from nginx", 0.5),
        _rate_row(f"warm GET {mib:.0f} MiB", med["warm"], med["curl"], "curl from nginx", 0.75),
    ]
    for r_, (side, peer) in zip(
        rows, (("put", "cp"), ("cold", "curl"), ("warm", "curl")), strict=False
    ):
        r_["detail"] = "rounds (MiB/s): " + "; ".join(
            f"{k} {' / '.join(f'{v:.0f}' for v in rates[k])}" for k in (side, peer) if rates[k]
        )
    return rows


def _cached(size: int) -> list:
    """Cache worker options that let it hold a file of ``size`` bytes (by default it leaves
    out files over a quarter of its bytes), so a warm GET is a cache hit."""
    return ["--max-file", str(size)]


def _rate_row(name, fms_rate, peer_rate, peer, target):
    r = row(name, fms_rate, peer_rate, peer, "MiB/s", f">= {target}x")
    if r["ratio"] is not None:
        r["met"] = r["ratio"] >= target
    return r


def _add_counts(counter, done: int, errors, failed: int):
    """Add a load process's totals to the counters shared with the benchmark process."""
    for shared, value in ((counter, done), (errors, failed)):
        if shared is not None:
            with shared.get_lock():
                shared.value += value


def _get_loop(ready, frontend: str, name: str, seconds: float, counter, errors):
    """A load process: GET ``name`` for ``seconds``; add to the shared counters."""
    done = failed = 0
    with Client(frontend, timeout=10.0) as c:
        ready.wait(timeout=60)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                c.get_bytes(name)
                done += 1
            except FmsError:
                failed += 1
    _add_counts(counter, done, errors, failed)


def _connection_loop(
    ready, frontend: str, name: str, connections: int, seconds: float, counter, errors
):
    """A load process shaped like one of wrk's threads: ``connections`` DEALER sockets, each
    with one GET in flight at a time (a new one as soon as the last is answered).  Every reply
    is checked: ok, and the content's digest as in the manifest."""
    import zmq

    ctx = zmq.Context()
    poller = zmq.Poller()
    ids = iter(range(1, 1 << 62))
    socks = []
    for _ in range(connections):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(frontend)
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)

    def send(sock):
        sock.send(p.encode({"v": p.PROTOCOL_VERSION, "op": "get", "id": next(ids), "name": name}))

    done = failed = 0
    ready.wait(timeout=60)
    end = time.monotonic() + seconds
    for sock in socks:
        send(sock)
    while time.monotonic() < end:
        events = poller.poll(1000)
        if not events:
            failed += 1  # a request unanswered for a second counts as failed; resend
            for sock in socks:
                send(sock)
            continue
        for sock, _ in events:
            frames = sock.recv_multipart(copy=False)
            header = p.decode(frames[0].buffer)
            manifest = header.get("manifest") or {}
            if header.get("ok") and len(frames) == 2 and _small_ok(manifest, frames[1]):
                done += 1
            else:
                failed += 1
            send(sock)
    ctx.destroy(linger=0)
    _add_counts(counter, done, errors, failed)


def _small_ok(manifest: dict, frame) -> bool:
    """Whether a small file's inline content is the one its manifest names: its one chunk's
    digest, and the chunk list giving the file digest."""
    chunks = manifest.get("chunks") or []
    if len(chunks) != 1:
        return False
    hash_fn = p.manifest_hasher(p.check_manifest(manifest))  # the store's digest function
    extents = p.unpack_extents(manifest["extents"])
    return (
        p.inline_ok(manifest, p.unpack_data(frame.buffer))
        and p.inline_digest(extents, chunks, hash_fn) == manifest["digest"]
    )


def _run_processes(ctx, target, arg_lists) -> float:
    """Start one process per argument tuple and wait for all.  Each is called with a barrier
    as its first argument and waits on it once it is ready, so process start-up is not timed.

    :return: seconds from the moment all were ready to the end of the last.
    """
    barrier = ctx.Barrier(len(arg_lists) + 1)
    procs = [ctx.Process(target=target, args=(barrier, *args)) for args in arg_lists]
    for proc in procs:
        proc.start()
    barrier.wait(timeout=60)
    start = time.perf_counter()
    for proc in procs:
        proc.join()
    return time.perf_counter() - start


def run_load(
    frontend: str, name: str, clients: int, seconds: float, processes: int | None = None
) -> tuple:
    """GET ``name`` from ``clients`` concurrent clients for ``seconds``.

    With ``processes`` None, each client is a process of its own using :class:`Client`; else
    the clients are connections shared out among that many wrk-like load processes.

    :return: (requests/s, failed requests, seconds timed).
    """
    ctx = multiprocessing.get_context("spawn")
    counter, errors = ctx.Value("q", 0), ctx.Value("q", 0)
    if processes is None:
        args = [(frontend, name, seconds, counter, errors)] * clients
        elapsed = _run_processes(ctx, _get_loop, args)
    else:
        args = [
            (
                frontend,
                name,
                clients // processes + (i < clients % processes),
                seconds,
                counter,
                errors,
            )
            for i in range(processes)
        ]
        elapsed = _run_processes(ctx, _connection_loop, args)
    return counter.value / elapsed, errors.value, elapsed


def bench_small(folder: str) -> list:
    data = os.urandom(SMALL)
    root = _sub(folder, "small-www")
    with open(os.path.join(root, "small.bin"), "wb") as f:
        f.write(data)
    cluster = Cluster(_sub(folder, "small-cluster"))
    rows = []
    try:
        cluster.start_all()
        with cluster.client() as c:
            c.put_bytes(data, "small.bin")
            c.get_bytes("small.bin")  # warm the cache
            # fms and the floor take turns, a block each, so the machine's load hits both alike.
            lat, floor = [], []
            with floor_round_trip() as floor_trip:
                for _ in range(SMALL_BLOCKS):
                    lat += latencies(
                        lambda: c.get_bytes("small.bin"), SMALL_SAMPLES // SMALL_BLOCKS
                    )
                    floor += latencies(floor_trip, SMALL_SAMPLES // SMALL_BLOCKS)
        redis_lat = None
        if ensure_tool("redis-server", "redis-server") and _has_redis_py():
            import redis

            server = Redis()
            try:
                r = redis.Redis(port=server.port)
                r.set("small", data)
                r.get("small")
                redis_lat = latencies(lambda: r.get("small"), SMALL_SAMPLES)
            finally:
                server.stop()
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            fms_ms = percentile(lat, q) * 1000
            peer_ms = percentile(redis_lat, q) * 1000 if redis_lat else None
            r_ = row(
                f"4 KiB GET latency {label}, 1 client",
                fms_ms,
                peer_ms,
                "redis-py GET",
                "ms",
                "p50 <= 3x" if label == "p50" else "(reported)",
            )
            if label == "p50" and peer_ms:
                r_["met"] = r_["ratio"] <= 3.0
            rows.append(r_)
        rows.append(
            row(
                "same round trip through a bare pyzmq proxy + echo process, p50 (the "
                "topology's floor in Python)",
                percentile(floor, 0.5) * 1000,
                percentile(redis_lat, 0.5) * 1000 if redis_lat else None,
                "redis-py GET",
                "ms",
                "(reported)",
            )
        )
        for q, label, target in ((0.5, "p50", 1.3), (0.99, "p99", 2.0)):
            r_ = row(
                f"4 KiB GET latency {label}, 1 client, against the floor",
                percentile(lat, q) * 1000,
                percentile(floor, q) * 1000,
                f"bare pyzmq proxy + echo {label}",
                "ms",
                f"<= {target}x",
            )
            r_["met"] = r_["ratio"] <= target
            rows.append(r_)
        # Like wrk -t2 -c16: two load processes, 16 connections, one request in flight on each.
        fms_rps, failed, _ = run_load(cluster.frontend, "small.bin", 16, LOAD_SECONDS, processes=2)
        # The same with 16 processes using the client library: its own cost on the same cores.
        lib_rps, lib_failed, _ = run_load(cluster.frontend, "small.bin", 16, LOAD_SECONDS)
    finally:
        cluster.stop()
    nginx_rps = None
    if ensure_tool("nginx", "nginx-light") and ensure_tool("wrk", "wrk"):
        nginx = Nginx(root, _sub(folder, "nginx-small"))
        try:
            out = subprocess.run(
                ["wrk", "-t2", "-c16", f"-d{LOAD_SECONDS:.0f}s", nginx.url("small.bin")],
                capture_output=True,
                text=True,
            ).stdout
            nginx_rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        finally:
            nginx.stop()
    r_ = row(
        "4 KiB GET, 16 concurrent connections (2 load processes, like wrk -t2 -c16)",
        fms_rps,
        nginx_rps,
        "nginx under wrk -t2 -c16",
        "req/s",
        ">= 0.25x",
    )
    r_["failed"] = failed
    if nginx_rps:
        r_["met"] = r_["ratio"] >= 0.25 and failed == 0
    rows.append(r_)
    r_ = row(
        "4 KiB GET, 16 client processes (fms.Client each)",
        lib_rps,
        nginx_rps,
        "nginx under wrk -t2 -c16",
        "req/s",
        "(reported)",
    )
    r_["failed"] = lib_failed
    rows.append(r_)
    return rows


# --- the floor: what the topology costs in Python with no fms logic at all ---


def _floor_proxy(frontend: str, backend: str):
    """A bare ROUTER-ROUTER proxy to the first worker that says hello: no decoding, no state."""
    import zmq

    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(frontend)
    back.bind(backend)
    worker = back.recv_multipart()[0]
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if front in events:
            back.send_multipart([worker, *front.recv_multipart(copy=False)], copy=False)
        if back in events:
            front.send_multipart(back.recv_multipart(copy=False)[1:], copy=False)


def _floor_echo(backend: str):
    """A worker that sends every message back as it came."""
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(backend)
    sock.send(b"hello")
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


@contextlib.contextmanager
def floor_round_trip():
    """A function that makes one round trip of a small header and a 4 KiB frame through
    :func:`_floor_proxy` to :func:`_floor_echo`: two hops each way through two Python
    processes, as a cache hit takes through the broker and the cache, minus everything fms
    does."""
    import zmq

    ctx = multiprocessing.get_context("spawn")
    frontend, backend = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    procs = [
        ctx.Process(target=_floor_proxy, args=(frontend, backend), daemon=True),
        ctx.Process(target=_floor_echo, args=(backend,), daemon=True),
    ]
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    try:
        for proc in procs:
            proc.start()
        sock.connect(frontend)
        header = {"v": p.PROTOCOL_VERSION, "op": "get", "id": 1, "name": "small.bin"}
        message = [p.encode(header), p.pack_data(os.urandom(SMALL))]

        def round_trip():
            sock.send_multipart(message)
            sock.recv_multipart()

        latencies(round_trip, 200)  # warm-up
        yield round_trip
    finally:
        sock.close()
        zctx.term()
        for proc in procs:
            proc.terminate()
            proc.join(5)


def _has_redis_py() -> bool:
    try:
        import redis  # noqa: F401

        return True
    except ImportError:
        print(
            "bench: redis-py not installed (pip install redis); skipping the redis peer",
            file=sys.stderr,
        )
        return False


def bench_many(folder: str, rounds: int = 5) -> list:
    """``get -r`` of MANY_FILES small files through the CLI, each run into a fresh folder:
    ``rounds`` times a tree of new content right after its upload (``put_many``, whose commits
    hand the files to the cache), with a cold cache (the cache worker started again on an empty
    folder: every file a miss), then warm, and curl fetching the same tree from nginx: the last
    three take turns, so the machine's load hits all alike."""
    root = _sub(folder, "many-www")
    cluster = Cluster(_sub(folder, "many-cluster"))
    nginx = None
    if ensure_tool("nginx", "nginx-light") and ensure_tool("curl", "curl"):
        nginx = Nginx(root, _sub(folder, "nginx-many"))
    after_s, cold_s, warm_s, curl_runs, floor_s = [], [], [], [], []
    try:
        cluster.start_all()
        create = settled_disk(folder)
        for k in range(rounds):
            src = make_small_files(_sub(root, f"many{k}"), MANY_FILES)
            with cluster.client() as c:
                c.put_many(
                    [(os.path.join(src, n), f"many{k}/{n}") for n in sorted(os.listdir(src))]
                )

            def fms_get(how: str, k: int = k):
                dest = os.path.join(folder, f"many-out-{k}-{how}")
                run_cli(cluster.frontend, "get", "-r", f"many{k}", dest, check=True)

            def floor(k: int = k):
                dest = os.path.join(folder, f"many-floor-{k}")
                subprocess.run(
                    [sys.executable, "-c", MANY_FLOOR, dest, str(MANY_FILES)], check=True
                )

            runs = [
                (cold_s, lambda: fms_get("cold")),
                (warm_s, lambda: fms_get("warm")),
                (floor_s, floor),
            ]
            if nginx:
                out = _sub(folder, f"curl-out-{k}")
                config = _curl_config(
                    os.path.join(folder, f"curl-{k}.cfg"),
                    (
                        ("output", f"{out}/{name}", nginx.url(f"many{k}/" + name))
                        for name in sorted(os.listdir(src))
                    ),
                )
                runs.insert(
                    k % 3,  # curl first, second or third: the machine's load hits all alike
                    (
                        curl_runs,
                        lambda c=config: subprocess.run(["curl", "-sf", "-K", c], check=True),
                    ),
                )
            after_s.append(timed(lambda: fms_get("after-put")))
            _empty_cache(cluster, _sub(folder, f"many-cache-{k}"))
            for times, fn in runs:
                times.append(timed(fn))
    finally:
        cluster.stop()
        if nginx:
            nginx.stop()
    curl_s = statistics.median(curl_runs) if curl_runs else None
    rows = []
    # Here fms should be faster: ratio = curl time / fms time.
    for label, runs, target in (
        ("right after the upload", after_s, 1.0),
        ("cold cache", cold_s, 1.0),
        ("warm cache", warm_s, 1.0),
    ):
        seconds = statistics.median(runs)
        r_ = row(
            f"get -r of {MANY_FILES} x 4 KiB, {label}, median of {rounds}",
            seconds,
            curl_s,
            "sequential curl, keep-alive",
            "s",
            f">= {target}x (curl time / fms time)",
        )
        r_["detail"] = (
            "rounds (s): "
            + " / ".join(f"{v:.3f}" for v in runs)
            + "; curl "
            + " / ".join(f"{v:.3f}" for v in curl_runs)
        )
        if curl_s:
            r_["ratio"] = curl_s / seconds
            r_["met"] = r_["ratio"] >= target
        rows.append(r_)
    floor_med = statistics.median(floor_s)
    r_ = row(
        f"the floor of a Python CLI: start, import zmq and msgpack, write {MANY_FILES} x 4 KiB "
        f"from memory (open, write, close), median of {rounds}",
        floor_med,
        curl_s,
        "sequential curl, keep-alive",
        "s",
        "(reported: what no Python client can beat here)",
    )
    r_["detail"] = "rounds (s): " + " / ".join(f"{v:.3f}" for v in floor_s)
    r_["detail"] += f"; one file create before the rounds: {create * 1000:.3f} ms"
    if curl_s:
        r_["ratio"] = curl_s / floor_med
    rows.append(r_)
    return rows


def _empty_cache(cluster: Cluster, folder: str) -> None:
    """Start ``cluster``'s cache worker again, on the empty ``folder``: a cache holding
    nothing."""
    cluster.proc("cache").stop()
    cluster.wait_workers(storage=2, cache=0)
    cluster.start_cache(max_bytes="256M", directory=folder)
    cluster.wait_workers(storage=2, cache=1)


# The floor beside get -r: the interpreter's start-up with the two libraries every fms command
# imports, then the files written with nothing else (no network, no check, no mtime).
MANY_FLOOR = """
import os, sys, zmq, msgpack
out, count = sys.argv[1], int(sys.argv[2])
os.makedirs(out)
for i in range(count):
    with open(os.path.join(out, "f%05d" % i), "wb") as f:
        f.write(os.urandom(4096))
"""


# --- the store as it grows: listing, usage, small uploads, space given back ---


def ls_names(total: int):
    """``total`` names: the listed folder (:data:`LS_LISTED`, :data:`LS_FOLDER` names) first,
    then the others one per folder per pass over p000 .. p999, so the first 2,000 spread over
    every folder as evenly as the first 200,000 do, and p500/ sits in the middle."""
    yield from (f"{LS_LISTED}f{i:03d}" for i in range(min(total, LS_FOLDER)))
    others = (
        f"p{j:03d}/f{i:04d}"
        for i in range(1 << 30)
        for j in range(LS_FOLDERS)
        if f"p{j:03d}/" != LS_LISTED
    )
    yield from itertools.islice(others, max(0, total - LS_FOLDER))


def _fill(client: Client, tiny: str, names, deadline: float) -> int:
    """Store every name in ``names`` with the content of the file ``tiny`` (identical content:
    dedup makes it cost nothing but the metadata), :data:`LS_BATCH` pipelined commits at a time,
    until ``deadline``.  :return: names stored."""
    stored = 0
    while time.monotonic() < deadline:
        batch = list(itertools.islice(names, LS_BATCH))
        if not batch:
            break
        stored += len(client.put_many([(tiny, name) for name in batch]))
    return stored


def _median_ms(fn) -> float:
    """Median ms of up to :data:`LS_SAMPLES` warm calls of ``fn`` (after one untimed call; fewer
    samples, at least 3, when one takes so long that they would last over LS_SAMPLE_SECONDS)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    samples = max(3, min(LS_SAMPLES, int(LS_SAMPLE_SECONDS / max(first, 1e-6))))
    return statistics.median(latencies(fn, samples)) * 1000


def bench_ls(folder: str, large: int = LS_LARGE) -> list:
    """``Client.ls`` of a 200-name folder and ``Client.usage`` with LS_SMALL names stored, then
    in the same store grown to ``large`` names (or as many as LS_FILL_SECONDS allowed)."""
    tiny = os.path.join(folder, "tiny")
    with open(tiny, "wb") as f:
        f.write(b"fms bench\n")
    cluster = Cluster(_sub(folder, "ls-cluster"))
    names = ls_names(large)
    ms, stored, wrong = {}, 0, 0
    try:
        cluster.start_all()
        with cluster.client(timeout=60.0) as c:
            for target in (LS_SMALL, large):
                start = time.monotonic()
                stored += _fill(
                    c, tiny, itertools.islice(names, target - stored), start + LS_FILL_SECONDS
                )
                fill_s = time.monotonic() - start
                print(
                    f"bench: ls: {stored:,} names stored ({fill_s:.0f} s for this step)",
                    file=sys.stderr,
                    flush=True,
                )
                listing = c.ls(LS_LISTED)
                usage = c.usage()
                wrong += len(listing) != LS_FOLDER or usage["files"] != stored
                ms[target] = (
                    stored,
                    fill_s,
                    _median_ms(lambda: c.ls(LS_LISTED)),
                    _median_ms(c.usage),
                    _du(cluster.storage_dir),
                )
    finally:
        cluster.stop()
    (
        (n_small, _, ls_small, usage_small, du_small),
        (n_large, fill_s, ls_large, usage_large, du_large),
    ) = ms[LS_SMALL], ms[large]
    r_ls = row(
        f"ls of a {LS_FOLDER}-name folder, Python API, warm, median: among {n_large:,} "
        f"names (filled at {(n_large - n_small) / fill_s:,.0f} names/s) vs among "
        f"{n_small:,}",
        ls_large,
        ls_small,
        f"same among {n_small:,}",
        "ms",
        "<= 1.5x and < 20 ms",
    )
    r_ls["met"] = r_ls["ratio"] <= 1.5 and ls_large < 20
    r_usage = row(
        f"usage (stats) among {n_large:,} names vs among {n_small:,}",
        usage_large,
        usage_small,
        f"same among {n_small:,}",
        "ms",
        "<= 1.5x (as fast)",
    )
    r_usage["met"] = r_usage["ratio"] <= 1.5
    r_ls["detail"] = (
        f"data dir (du -sb) {du_small / p.MiB:.1f} MiB at {n_small:,} names, "
        f"{du_large / p.MiB:.1f} MiB at {n_large:,}"
    )
    for r_ in (r_ls, r_usage):
        r_["failed"] = wrong  # listings or counts that came back wrong
        r_["met"] = r_["met"] and not wrong
    return [r_ls, r_usage]


def _curl_config(path: str, pairs) -> str:
    """A curl ``-K`` file with one ``upload-file`` (or ``output``) and ``url`` per pair: one
    curl process, one keep-alive connection for them all."""
    with open(path, "w") as f:
        for key, local, url in pairs:
            f.write(f'{key} = "{local}"\nurl = "{url}"\n')
    return path


CURL_PUTS = {
    "curl -T": [],  # as typed: 4 KiB bodies wait for 100
    "curl -T -H 'Expect:'": ["-H", "Expect:"],
}  # ... or not (the strongest peer)


def bench_putr(folder: str, rounds: int = 3) -> list:
    """``put -r`` of MANY_FILES small files through the CLI against one curl uploading the same
    files with WebDAV PUT to nginx over one keep-alive connection (as typed, and without the
    ``Expect: 100-continue`` round trip), each round in a new order; new content every round (no
    dedup), each into a fresh prefix/folder on the same disk."""
    src = _sub(folder, "putr-src")
    www = _sub(folder, "putr-www")
    cluster = Cluster(_sub(folder, "putr-cluster"))
    nginx = None
    if ensure_tool("nginx", "nginx-light") and ensure_tool("curl", "curl"):
        nginx = Nginx(www, _sub(folder, "nginx-putr"), dav=True)
    seconds, wrong = {"fms": [], **{peer: [] for peer in CURL_PUTS}}, 0
    try:
        cluster.start_all()
        create = settled_disk(folder)
        for k in range(rounds):
            make_small_files(src, MANY_FILES)
            files = sorted(os.listdir(src))
            runs = [
                (
                    "fms",
                    f"putr-{k}",
                    lambda: run_cli(cluster.frontend, "put", "-r", src, f"putr-{k}", check=True),
                )
            ]
            for j, (peer, options) in enumerate(CURL_PUTS.items() if nginx else ()):
                config = _curl_config(
                    os.path.join(folder, f"curl-put-{k}-{j}.cfg"),
                    (
                        ("upload-file", os.path.join(src, n), nginx.url(f"putr-{k}-{j}/{n}"))
                        for n in files
                    ),
                )
                runs.append(
                    (
                        peer,
                        f"putr-{k}-{j}",
                        lambda o=options, c=config: subprocess.run(
                            ["curl", "-sf", *o, "-K", c], stdout=subprocess.DEVNULL, check=True
                        ),
                    )
                )
            for who, _, fn in runs[k % len(runs) :] + runs[: k % len(runs)]:
                seconds[who].append(timed(fn))
            with cluster.client() as c:
                wrong += len(c.ls(f"putr-{k}/")) != MANY_FILES
            wrong += sum(
                sorted(os.listdir(os.path.join(www, dest))) != files
                for who, dest, _ in runs
                if who != "fms"
            )
    finally:
        cluster.stop()
        if nginx:
            nginx.stop()
    fms_med = statistics.median(seconds["fms"])
    rows = []
    for peer in CURL_PUTS:
        peer_med = statistics.median(seconds[peer]) if seconds[peer] else None
        target = ">= 1.0x (curl time / fms time)" if not rows else "(reported)"
        # Here fms should be at least as fast: ratio = curl time / fms time.
        r_ = row(
            f"put -r of {MANY_FILES} x 4 KiB, new content, median of {rounds}",
            fms_med,
            peer_med,
            f"{peer} to nginx WebDAV, keep-alive",
            "s",
            target,
        )
        if peer_med:
            r_["ratio"] = peer_med / fms_med
            if not rows:
                r_["met"] = r_["ratio"] >= 1.0 and not wrong
        r_["failed"] = wrong
        r_["detail"] = f"one file create before the rounds: {create * 1000:.3f} ms"
        rows.append(r_)
    return rows


def _du(path: str) -> int:
    """``du -sb PATH`` (apparent bytes, directories included); 0 if it does not exist."""
    if not os.path.exists(path):
        return 0
    return int(
        subprocess.run(
            ["du", "-sb", path], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )


def _file_bytes(path: str) -> int:
    """Bytes in the regular files under ``path`` (no directory entries)."""
    return sum(
        os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names
    )


def bench_gc(folder: str) -> list:
    """Space given back: a kept file, then GC_OVERWRITES overwrites of a GC_FILE file with new
    content, ``rm``, ``client.py gc --grace 0``; the store's size measured after each step."""
    cluster = Cluster(_sub(folder, "gc-cluster"))
    data = cluster.storage_dir
    chunks = os.path.join(data, "chunks")
    measures = {
        "du -sb chunks/": lambda c: _du(chunks),
        "chunk file bytes under chunks/": lambda c: _file_bytes(chunks),
        "usage() chunk_bytes": lambda c: c.usage()["chunk_bytes"],
        "du -sb data dir (meta.db included)": lambda c: _du(data),
    }
    stages = {}
    gc_said = None
    kept = os.urandom(GC_BASE)
    try:
        cluster.start_all()
        with cluster.client(timeout=60.0) as c:

            def measure(stage):
                stages[stage] = {what: fn(c) for what, fn in measures.items()}

            c.put_bytes(kept, "gc/kept")
            measure("before")
            for _ in range(GC_OVERWRITES):
                c.put_bytes(os.urandom(GC_FILE), "gc/big")
            measure(f"{GC_OVERWRITES} overwrites")
            c.rm("gc/big")
            measure("rm")
            out = run_cli(cluster.frontend, "gc", "--grace", "0", capture_output=True, text=True)
            gc_said = ((out.stdout + out.stderr).strip().splitlines() or [""])[-1][:160]
            available = out.returncode == 0
            measure("gc" if available else "gc unavailable")
            kept_ok = c.get_bytes("gc/kept") == kept
            empty = sum(1 for root, dirs, names in os.walk(chunks) if not dirs and not names)
    finally:
        cluster.stop()
    rows = []
    for what in measures:
        before, last = stages["before"][what], list(stages.values())[-1][what]
        r_ = row(
            f"{what}: after {GC_OVERWRITES} overwrites of {GC_FILE // p.MiB} MiB, rm, gc --grace 0",
            last / p.MiB,
            before / p.MiB,
            "before",
            "MiB",
            "== before" if what != "du -sb data dir (meta.db included)" else "(reported)",
        )
        r_["detail"] = (
            "bytes "
            + ", ".join(f"{stage} {s[what]:,}" for stage, s in stages.items())
            + f"; kept file {'intact' if kept_ok else '**damaged**'}"
        )
        if r_["target"] == "== before":
            r_["met"] = (last == before and kept_ok) if available else None
        rows.append(r_)
    rows[0]["detail"] += f"; {empty} empty folders left under chunks/; gc said: {gc_said}"
    return rows


def bench_rss(folder: str, size: int) -> list:
    import resource

    src = os.path.join(folder, "rss.bin")
    make_file(src, size)
    cluster = Cluster(_sub(folder, "rss-cluster"))
    try:
        cluster.start_all(cache_bytes=str(size + size // 2), cache_args=_cached(size))
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        for args in (
            ["put", src, "rss"],
            ["get", "rss", os.path.join(folder, "rss-cold")],
            ["get", "rss", os.path.join(folder, "rss-warm")],
        ):
            run_cli(cluster.frontend, *args, check=True)
        peaks = cluster.peak_rss()
        peaks["client"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    finally:
        cluster.stop()
    gib = size / p.GiB
    return [
        dict(
            row(
                f"peak RSS, {name}, {gib:.0f} GiB put + cold + warm get",
                rss / p.MiB,
                None,
                "",
                "MiB",
                "< 150 MiB",
            ),
            met=rss < 150 * p.MiB,
        )
        for name, rss in peaks.items()
    ]


def _cold_gets(ready, frontend: str, names: list, errors):
    failed = 0
    with Client(frontend, timeout=10.0) as c:
        ready.wait(timeout=60)
        for name in names:
            try:
                c.get_bytes(name)
            except FmsError:
                failed += 1
    _add_counts(None, 0, errors, failed)


def bench_scale(folder: str) -> list:
    rows = []
    rates = {}
    ctx = multiprocessing.get_context("spawn")
    for n in (1, 2, 4):
        cluster = Cluster(_sub(folder, f"scale-{n}"))
        try:
            cluster.start_all(storage=n, cache_bytes="2G")
            names = [f"scale/{i}" for i in range(SCALE_FILES)]
            with cluster.client() as c:
                for name in names:
                    c.put_bytes(os.urandom(SCALE_FILE), name)
                before = {w["id"]: w["served"] for w in c.status()["workers"]}
            errors = ctx.Value("q", 0)
            seconds = _run_processes(
                ctx,
                _cold_gets,
                [(cluster.frontend, names[k::SCALE_CLIENTS], errors) for k in range(SCALE_CLIENTS)],
            )
            with cluster.client() as c:
                after = {w["id"]: w["served"] for w in c.status()["workers"]}
        finally:
            cluster.stop()
        served = [after[w] - before.get(w, 0) for w in after if w.startswith("storage")]
        mean = statistics.mean(served)
        spread = max(abs(s - mean) / mean for s in served) if mean else 0.0
        rates[n] = SCALE_FILES * SCALE_FILE / p.MiB / seconds
        r_ = row(
            f"cache-miss GET, {n} storage worker{'s' if n > 1 else ''}",
            rates[n],
            rates[1],
            "1 storage worker",
            "MiB/s",
            "spread within +-20%",
        )
        r_["spread"] = spread
        r_["served"] = served
        r_["failed"] = errors.value
        r_["met"] = spread <= 0.2 and errors.value == 0
        rows.append(r_)
    rows.append(_churn(folder))
    return rows


def _mixed_loop(frontend: str, seconds: float, counter, errors):
    """A load process for the churn run: put, get back and compare, stat; all reach storage."""
    done = failed = 0
    me = os.getpid()
    with Client(frontend, timeout=10.0) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            name = f"churn/{me}/{done % 8}"
            data = os.urandom(SMALL)
            try:
                c.put_bytes(data, name)
                if c.get_bytes(name) != data or c.stat(name)["size"] != SMALL:
                    failed += 1
                done += 3
            except FmsError:
                failed += 1
    _add_counts(counter, done, errors, failed)


def _churn(folder: str) -> dict:
    """Storage workers added and removed under load: every request must still succeed."""
    cluster = Cluster(_sub(folder, "churn"))
    ctx = multiprocessing.get_context("spawn")
    try:
        cluster.start_all(storage=2)
        counter, errors = ctx.Value("q", 0), ctx.Value("q", 0)
        procs = [
            ctx.Process(
                target=_mixed_loop, args=(cluster.frontend, 3 * LOAD_SECONDS, counter, errors)
            )
            for _ in range(4)
        ]
        for proc in procs:
            proc.start()
        time.sleep(LOAD_SECONDS)  # the benchmark's own schedule
        cluster.start_storage(wid="storage-3")  # added
        time.sleep(LOAD_SECONDS / 2)
        cluster.proc("storage-1").stop()  # removed cleanly (SIGTERM)
        time.sleep(LOAD_SECONDS / 2)
        cluster.proc("storage-2").kill()  # removed by kill -9
        for proc in procs:
            proc.join()
    finally:
        cluster.stop()
    r_ = row(
        "storage workers added and removed under load (put/get/stat)",
        counter.value,
        None,
        "",
        "requests",
        "0 failed",
    )
    r_["failed"] = errors.value
    r_["met"] = errors.value == 0
    return r_


def bench_curve(folder: str, size: int, rounds: int = 3) -> list:
    src = os.path.join(folder, "curve.bin")
    out = os.path.join(folder, "curve-out.bin")
    ops = ("put", "cold get", "warm get")
    samples = {mode: {op: [] for op in ops} for mode in ("plaintext", "curve")}
    clusters = {}
    try:
        for mode in samples:
            clusters[mode] = Cluster(_sub(folder, f"curve-{mode}"), curve=(mode == "curve"))
            clusters[mode].start_all(cache_bytes=str(4 * size), cache_args=_cached(size))
        for r in range(rounds):
            make_file(src, size)  # new content: a real upload and a real cache miss
            for mode, cluster in clusters.items():  # alternate, so drift hits both alike
                with cluster.client(timeout=30.0) as c:
                    samples[mode]["put"].append(timed(lambda: c.put(src, f"c{r}")))
                    samples[mode]["cold get"].append(timed(lambda: c.get(f"c{r}", out)))
                    samples[mode]["warm get"].append(timed(lambda: c.get(f"c{r}", out)))
    finally:
        for cluster in clusters.values():
            cluster.stop()
    mib = size / p.MiB
    return [
        row(
            f"CURVE {op} {mib:.0f} MiB",
            mib / statistics.median(samples["curve"][op]),
            mib / statistics.median(samples["plaintext"][op]),
            "plaintext fms",
            "MiB/s",
            "(cost, reported)",
        )
        for op in ops
    ]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_profile(folder: str, seconds: float = LOAD_SECONDS) -> list:
    """Under the 16-connection small-GET load: CPU time per request of the broker, the cache and
    the load processes (what bounds requests/s on two cores); then py-spy on broker and cache."""
    import collections
    import resource

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    cluster = Cluster(_sub(folder, "profile-cluster"))
    rows = []
    try:
        cluster.start_all()
        with cluster.client() as c:
            c.put_bytes(os.urandom(SMALL), "small.bin")
            c.get_bytes("small.bin")
        pids = {name: cluster.proc(name).pid for name in ("broker", "cache")}
        before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Counted over the timed window only, not the load processes' start-up.
        rps, _, timed_seconds = run_load(cluster.frontend, "small.bin", 16, seconds, processes=2)
        requests = rps * timed_seconds
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = {name: _cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        cpu["load processes (with their start-up)"] = (
            after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        )
        for name, used in cpu.items():
            rows.append(
                row(
                    f"{name}: CPU per request at {rps:.0f} req/s (16 connections)",
                    1e6 * used / max(requests, 1),
                    None,
                    "",
                    "us",
                    "(profile, reported)",
                )
            )
        if not os.path.exists(spy):
            print(
                "bench: py-spy not installed (pip install py-spy); skipping the py-spy part",
                file=sys.stderr,
            )
            return rows
        spies = {
            name: subprocess.Popen(
                [
                    spy,
                    "record",
                    "-f",
                    "raw",
                    "-r",
                    "300",
                    "-d",
                    str(int(seconds)),
                    "-o",
                    os.path.join(folder, f"{name}.txt"),
                    "-p",
                    str(pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        }
        rps, _, _ = run_load(cluster.frontend, "small.bin", 16, seconds, processes=2)
        for proc in spies.values():
            proc.wait(60)
    finally:
        cluster.stop()
    for name in pids:
        own, total = collections.Counter(), 0
        with open(os.path.join(folder, f"{name}.txt")) as f:
            for line in f:
                stack, _, count = line.rpartition(" ")
                own[stack.split(";")[-1]] += int(count)
                total += int(count)
        print(f"\n{name}: {total} samples at {rps:.0f} req/s; heaviest frames (own time):")
        for frame, count in own.most_common(8):
            print(f"  {100 * count / total:5.1f}%  {frame}")
        idle = sum(c for f, c in own.items() if "poll" in f.lower())
        rows.append(
            row(
                f"{name} time waiting in poll, 16 connections",
                100 * idle / max(total, 1),
                None,
                "",
                "%",
                "(profile, reported)",
            )
        )
    return rows


def _sub(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    return path


# --- report ---


def markdown(report: dict) -> str:
    lines = [
        f"fms benchmark, {report['date']}, {report['machine']}",
        "",
        "| measurement | fms | peer | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        peer = f"{r['peer']:.3g} ({r['peer_name']})" if r["peer"] else (r["peer_name"] or "")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        extra = ""
        if "spread" in r:
            extra = f"; spread {r['spread'] * 100:.0f}%, failed {r['failed']}"
        elif "failed" in r:
            extra = f"; failed {r['failed']}"
        if r.get("detail"):
            extra += f"; {r['detail']}"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(
            f"| {r['name']} | {r['fms']:.3g} {r['unit']} | {peer} | {ratio} | "
            f"{r['target']}{extra} | {met} |"
        )
    return "\n".join(lines) + "\n"


SCENARIOS = ("large", "small", "many", "ls", "putr", "gc", "rss", "scale", "curve", "profile")
ALIASES = {"meta": ("ls", "putr", "gc")}  # the storage engine's scenarios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)}, or meta for "
        f"{' '.join(ALIASES['meta'])} (default: all but curve and profile)",
    )
    parser.add_argument(
        "--size", type=parse_size, default="512M", help="large file size (%(default)s)"
    )
    parser.add_argument(
        "--rss-size",
        type=parse_size,
        default="2G",
        help="file size for the RSS scenario (%(default)s)",
    )
    parser.add_argument(
        "--names",
        type=int,
        default=LS_LARGE,
        help=f"names in the large store of the ls scenario (%(default)s; the "
        f"small one has {LS_SMALL})",
    )
    parser.add_argument(
        "--many-rounds",
        type=int,
        default=5,
        help="rounds of get -r, curl and the floor taking turns, for many (%(default)s)",
    )
    parser.add_argument(
        "--putr-rounds",
        type=int,
        default=3,
        help="rounds of put -r and the curl uploads taking turns, for putr (%(default)s)",
    )
    parser.add_argument("--out", default="bench-results", help="results folder (%(default)s)")
    args = parser.parse_args(argv)
    args.scenarios = [s for name in args.scenarios for s in ALIASES.get(name, (name,))]
    if args.names <= LS_SMALL:
        parser.error(f"--names must be more than {LS_SMALL}")
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(
            f"unknown scenario {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}"
        )
    chosen = args.scenarios or [s for s in SCENARIOS if s not in ("curve", "profile")]
    runners = {
        "large": lambda f: bench_large(f, args.size),
        "small": bench_small,
        "many": lambda f: bench_many(f, args.many_rounds),
        "ls": lambda f: bench_ls(f, args.names),
        "putr": lambda f: bench_putr(f, args.putr_rounds),
        "gc": bench_gc,
        "rss": lambda f: bench_rss(f, args.rss_size),
        "scale": bench_scale,
        "curve": lambda f: bench_curve(f, min(args.size, 256 * p.MiB)),
        "profile": bench_profile,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="fms-bench-") as folder:
        for name in chosen:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            scenario_folder = _sub(folder, name)
            rows += runners[name](scenario_folder)
            remove_tree(scenario_folder)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "scenarios": chosen,
        "rows": rows,
    }
    write_report(report, markdown(report), args.out, f"bench-{report['date']}")
    return 0


def write_report(report: dict, text: str, out: str, stem: str):
    """Write ``OUT/STEM.json`` (the report) and ``OUT/STEM.md`` (``text``), print the text."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, stem)
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"written: {path}.json, {path}.md")


if __name__ == "__main__":
    sys.exit(main())
