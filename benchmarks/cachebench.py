"""Does the cache pay for itself?  Issue 16, point 4, measured on a real cluster.

    python -m benchmarks.cachebench [--s3] [--far MS] [--caches 1] [--clients 4] [--gets 1000]
                                    [--rounds 3] [--traces] [--cache-bytes 64M]
                                    [--out bench-results]

Stores the 2,000 files of the Zipf trace (benchmarks/traces.py: 411 MiB, most 4-64 KiB, some up
to 8 MiB) in a cluster of one broker, two storage workers (SQLite + a local chunk directory, or
with ``--s3`` the chunks in a real SeaweedFS on loopback, tests/servers.py; with ``--far MS``
also the metadata in PostgreSQL and the chunks in SeaweedFS, both behind a proxy that delays
every byte by MS milliseconds each way, tests/delayproxy.py) and ``--caches`` cache workers
sharing ``--cache-bytes`` (64 MiB: a sixth of the trace's bytes).  Then:

- **warm reads**: the cache is warmed with the trace's 20,000 Zipf 0.9 GETs; then ``--clients``
  processes each replay ``--gets`` further GETs of the same popularity, in rounds that alternate
  *through the cache* with *no cache* (the same reads sent to storage, as when no cache worker
  is connected: ``fresh``, so the warm cache stays as it is for the next round).  Reported:
  GETs/s of each side and their ratio (medians over the rounds), and the CPU per GET of each
  process: a hit must cost the cache less than the read costs storage.
- **hit ratios** (``--traces``): for Zipf 0.7, 0.9 and 1.1, an empty cache replays the trace's
  20,000 GETs through 4 clients; the broker's per-GET figures (``get_hits`` ...) beside the
  policies simulated on the same trace (benchmarks/cachesim.py).

Results go to ``OUT/cachebench-DATE.{md,json}``.
"""

import argparse
import datetime
import multiprocessing
import os
import platform
import random
import resource
import signal
import statistics
import sys
import tempfile
import time

from harness import Cluster

from fms.cli import parse_size

from . import cachesim
from . import traces as t
from .bench import _cpu_seconds, write_report

WARM_GETS = t.GETS
CACHE_BYTES = t.CACHE_BYTES  # shared by the cache workers (--cache-bytes)
CLIENT_TIMEOUT = 30.0


def content(f: int, size: int) -> bytes:
    return random.Random(f).randbytes(size)


def name_of(f: int) -> str:
    return f"trace/{f:05d}"


def store_files(cluster: Cluster, sizes: list):
    """Every file of the trace, its content seeded by its id."""
    with cluster.client(timeout=CLIENT_TIMEOUT) as c:
        for f, size in enumerate(sizes):
            c.put_bytes(content(f, size), name_of(f))


def _replay(frontend: str, files: list, cache: bool, barrier, results):
    """One client process: GET each file, verified; report (GETs, seconds, CPU, errors)."""
    import fms

    errors = 0
    with fms.Client(frontend, timeout=CLIENT_TIMEOUT, cache=cache) as c:
        barrier.wait()
        start, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        for f in files:
            try:
                c.get_bytes(name_of(f))
            except fms.FmsError:
                errors += 1
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        results.put(
            (
                len(files),
                start,
                time.monotonic(),
                cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
                errors,
            )
        )


def replay(cluster: Cluster, slices: list, cache: bool) -> dict:
    """``slices``: one list of file ids per client process, run together.

    :return: GETs/s, and CPU ms per GET of the clients and of each server process.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(slices) + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_replay, args=(cluster.frontend, s, cache, barrier, results))
        for s in slices
    ]
    for proc in procs:
        proc.start()
    live = [p for p in cluster.procs if p.alive()]
    # Cache workers all run under the name "cache": number them.
    servers = {f"{p.name}-{i}" if p.name == "cache" else p.name: p.pid for i, p in enumerate(live)}
    barrier.wait()
    cpu0 = {name: _cpu_seconds(pid) for name, pid in servers.items()}
    got = [results.get(timeout=600) for _ in procs]
    cpu1 = {name: _cpu_seconds(pid) for name, pid in servers.items()}
    for proc in procs:
        proc.join(30)
    gets = sum(g[0] for g in got)
    seconds = max(g[2] for g in got) - min(g[1] for g in got)
    cpu = {name: 1000 * (cpu1[name] - cpu0[name]) / gets for name in servers}
    cpu["clients"] = 1000 * sum(g[3] for g in got) / gets
    return {
        "gets": gets,
        "seconds": seconds,
        "rate": gets / seconds,
        "errors": sum(g[4] for g in got),
        "cpu_ms_per_get": cpu,
    }


def split(gets: list, parts: int) -> list:
    return [gets[i::parts] for i in range(parts)]


def start_cluster(folder: str, caches: int, chunks: list) -> Cluster:
    os.makedirs(folder, exist_ok=True)
    cluster = Cluster(folder)
    cluster.start_broker()
    for i in range(1, caches + 1):
        cluster.start_cache(max_bytes=str(CACHE_BYTES // caches), wid=f"cache-{i}")
    for i in (1, 2):
        cluster.start_storage(wid=f"storage-{i}", extra=chunks)
    cluster.wait_workers(storage=2, cache=caches)
    return cluster


def restart_caches(cluster: Cluster, caches: int):
    """Empty caches: stopped, their folders removed, started again."""
    import shutil

    for proc in [p for p in cluster.procs if p.name == "cache" and p.alive()]:
        proc.stop()
    cluster.wait_workers(storage=2, cache=0)
    for i in range(1, caches + 1):
        wid = f"cache-{i}"
        shutil.rmtree(
            cluster.cache_dir if wid == "cache-1" else str(cluster.tmp / wid), ignore_errors=True
        )
        cluster.start_cache(max_bytes=str(CACHE_BYTES // caches), wid=wid)
    cluster.wait_workers(storage=2, cache=caches)


def tally(cluster: Cluster) -> dict:
    with cluster.client() as c:
        return c.status()["cache"]


def ratio_of(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in ("get_hits", "get_misses", "bytes_hit", "bytes_missed")}
    gets, nbytes = d["get_hits"] + d["get_misses"], d["bytes_hit"] + d["bytes_missed"]
    return {
        "request": d["get_hits"] / gets if gets else 0.0,
        "byte": d["bytes_hit"] / nbytes if nbytes else 0.0,
        "gets": gets,
    }


def warm_reads(cluster: Cluster, args) -> dict:
    trace = t.zipf_trace(0.9, gets=WARM_GETS + 2 * args.rounds * args.clients * args.gets)
    warm, rest = trace.gets[:WARM_GETS], trace.gets[WARM_GETS:]
    before = tally(cluster)
    replay(cluster, split(warm, args.clients), cache=True)
    warmed = ratio_of(before, tally(cluster))
    rounds = []
    per_round = args.clients * args.gets
    for r in range(args.rounds):
        pair = {}
        order = (True, False) if r % 2 == 0 else (False, True)  # either side goes first
        for k, cache in enumerate(order):
            start = (2 * r + k) * per_round
            chunk = rest[start : start + per_round]
            before = tally(cluster)
            result = replay(cluster, split(chunk, args.clients), cache)
            if cache:
                result["hit_ratio"] = ratio_of(before, tally(cluster))
            pair["cache" if cache else "storage"] = result
        pair["ratio"] = pair["cache"]["rate"] / pair["storage"]["rate"]
        rounds.append(pair)
        print(
            f"cachebench: round {r + 1}: through the cache {pair['cache']['rate']:.0f} GETs/s, "
            f"no cache {pair['storage']['rate']:.0f} GETs/s: {pair['ratio']:.2f}x",
            file=sys.stderr,
            flush=True,
        )
    return {
        "warm_up": warmed,
        "rounds": rounds,
        "median_ratio": statistics.median(p["ratio"] for p in rounds),
        "median_cache_rate": statistics.median(p["cache"]["rate"] for p in rounds),
        "median_storage_rate": statistics.median(p["storage"]["rate"] for p in rounds),
    }


def trace_ratios(cluster: Cluster, args) -> dict:
    simulated = cachesim.run()["zipf"]
    out = {}
    for alpha in t.ALPHAS:
        restart_caches(cluster, args.caches)
        trace = t.zipf_trace(alpha)
        before = tally(cluster)
        replay(cluster, split(trace.gets, args.clients), cache=True)
        out[alpha] = {"fms cluster": ratio_of(before, tally(cluster)), **simulated[alpha]}
        print(
            f"cachebench: Zipf {alpha}: {100 * out[alpha]['fms cluster']['request']:.1f} % of "
            f"GETs hit",
            file=sys.stderr,
            flush=True,
        )
    return out


def run(backend: str, folder: str, chunks: list, args) -> dict:
    sizes = t.zipf_trace(0.9).sizes
    cluster = start_cluster(folder, args.caches, chunks)
    try:
        started = time.monotonic()
        store_files(cluster, sizes)
        print(
            f"cachebench [{backend}]: stored {len(sizes)} files, {sum(sizes) / t.MiB:.0f} MiB "
            f"in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        result = {"backend": backend, "warm": warm_reads(cluster, args)}
        if args.traces:
            result["traces"] = trace_ratios(cluster, args)
        return result
    finally:
        cluster.stop()


def far_run(folder: str, args) -> dict:
    """The run with PostgreSQL and S3 ``args.far`` ms away (each way)."""
    from delayproxy import DelayProxy
    from servers import PostgresServer, SeaweedS3

    pg, s3, proxies = PostgresServer(), SeaweedS3(), []
    saved = dict(os.environ)
    try:
        pg.launch()
        s3.launch()
        proxies += [
            DelayProxy(f"{pg.host}:{pg.port}", args.far / 1000),
            DelayProxy(f"127.0.0.1:{s3.port}", args.far / 1000),
        ]
        meta = pg.new_database().replace(f"{pg.host}:{pg.port}", proxies[0].address)
        os.environ.update(s3.env())  # inherited by the storage workers
        bucket = s3.make_bucket()
        os.environ["AWS_ENDPOINT_URL"] = f"http://{proxies[1].address}"
        backend = f"PostgreSQL + SeaweedFS S3, {args.far:g} ms away"
        return run(backend, folder, ["--meta", meta, "--chunks", f"s3://{bucket}/chunks"], args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for proxy in proxies:
            proxy.stop()
        s3.cleanup()
        pg.cleanup()


def markdown(report: dict) -> str:
    lines = [
        f"# Cache benchmark, {report['date']}",
        "",
        report["machine"],
        "",
        f"{report['clients']} clients, {report['caches']} cache worker(s) sharing "
        f"{report['cache_bytes'] / t.MiB:.0f} MiB, "
        f"2 storage workers; Zipf 0.9 trace, warm; medians of {report['rounds']} "
        f"alternated rounds of {report['gets']} GETs per client.",
        "",
        "| chunks | through the cache, GETs/s | no cache, GETs/s | ratio | GET hit ratio | "
        "CPU ms/GET: cache(s) | storage (no cache) | broker (cache / none) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run_ in report["runs"]:
        warm = run_["warm"]
        last = warm["rounds"][-1]
        caches = sum(v for k, v in last["cache"]["cpu_ms_per_get"].items() if k.startswith("cache"))
        storage = sum(
            v for k, v in last["storage"]["cpu_ms_per_get"].items() if k.startswith("storage")
        )
        lines.append(
            f"| {run_['backend']} | {warm['median_cache_rate']:.0f} | "
            f"{warm['median_storage_rate']:.0f} | {warm['median_ratio']:.2f}x | "
            f"{100 * last['cache']['hit_ratio']['request']:.0f} % | {caches:.2f} | "
            f"{storage:.2f} | {last['cache']['cpu_ms_per_get']['broker']:.2f} / "
            f"{last['storage']['cpu_ms_per_get']['broker']:.2f} |"
        )
        for pair in warm["rounds"]:
            lines.append(
                f"|  round | {pair['cache']['rate']:.0f} | {pair['storage']['rate']:.0f}"
                f" | {pair['ratio']:.2f}x | | | | |"
            )
    for run_ in report["runs"]:
        if "traces" not in run_:
            continue
        names = list(cachesim.POLICIES)
        lines += [
            "",
            f"Request / byte hit ratio, % ({run_['backend']}): the cluster beside the "
            f"simulated policies",
            "",
            "| trace | fms cluster | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for alpha, row in run_["traces"].items():
            cells = [row["fms cluster"]] + [row[n] for n in names]
            lines.append(
                f"| Zipf {alpha} | "
                + " | ".join(f"{100 * c['request']:.1f} / {100 * c['byte']:.1f}" for c in cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--s3", action="store_true", help="also with the chunks in SeaweedFS S3")
    ap.add_argument(
        "--far",
        type=float,
        metavar="MS",
        help="also with PostgreSQL and S3 behind a delay of MS milliseconds each way",
    )
    ap.add_argument("--caches", type=int, default=1)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--gets", type=int, default=1000, help="GETs per client per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--traces",
        action="store_true",
        help="also the hit ratios of every trace beside the simulation",
    )
    ap.add_argument(
        "--cache-bytes",
        type=parse_size,
        default=t.CACHE_BYTES,
        help="shared by the cache workers (64M: the trace's, a sixth of its 411 MiB)",
    )
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    global CACHE_BYTES
    CACHE_BYTES = args.cache_bytes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    runs = []
    with tempfile.TemporaryDirectory(prefix="fms-cachebench-") as folder:
        runs.append(run("local directory", os.path.join(folder, "local"), [], args))
        if args.s3:
            from servers import SeaweedS3

            s3 = SeaweedS3()
            try:
                s3.launch()
                os.environ.update(s3.env())  # inherited by the storage workers
                bucket = s3.make_bucket()
                runs.append(
                    run(
                        "SeaweedFS S3",
                        os.path.join(folder, "s3"),
                        ["--chunks", f"s3://{bucket}/chunks"],
                        args,
                    )
                )
            finally:
                s3.cleanup()
        if args.far is not None:
            runs.append(far_run(os.path.join(folder, "far"), args))
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}",
        "clients": args.clients,
        "caches": args.caches,
        "cache_bytes": args.cache_bytes,
        "gets": args.gets,
        "rounds": args.rounds,
        "runs": runs,
    }
    write_report(report, markdown(report), args.out, f"cachebench-{report['date'][:10]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
