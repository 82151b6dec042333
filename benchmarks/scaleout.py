"""Scale-out of storage workers over PostgreSQL + S3 (issue 12, point 7).

Starts the tests' real PostgreSQL and SeaweedFS servers once (tests/servers.py), then for 1, 2
and 4 storage workers, each with its own empty scratch ``--data`` and all pointing at a fresh
database and a fresh bucket (so every worker count starts from an empty store):

- PUT: ``--put-clients`` client processes upload ``--files`` distinct 4 MiB files between them;
- cold GET: ``--get-clients`` client processes fetch those files back.  PUTs go straight to
  storage and never fill the cache, so every GET is a cache miss served by a storage worker
  through the cache worker (checked: the cache's hit count is reported and must stay 0).

The same run on the default store (SQLite + a local chunk directory shared by the workers) with
2 workers is the reference row.  For each run: aggregate MiB/s, wall time, and the CPU seconds
per request (one 4 MiB file) of the broker, the cache, each storage worker, PostgreSQL (the
postmaster and every backend), SeaweedFS and the client processes (their own CPU in the timed
window), read from /proc; "busy" is a process's CPU seconds over the wall time (1.0 = one core).
From these, the report projects the throughput of a machine with more cores.

    .venv/bin/python -m benchmarks.scaleout [--files 64] [--put-clients 8] [--get-clients 16]
                                            [--workers 1,2,4] [--out bench-results]

Everything listens on loopback; servers, workers and temp folders are removed at the end, also
on failure or SIGTERM.  Takes about a minute on 2 cores.
"""

import argparse
import datetime
import multiprocessing
import os
import platform
import resource
import signal
import sys
import tempfile
import time

from harness import Cluster

from benchmarks.bench import _add_counts, _cpu_seconds, _sub, write_report
from fms import wire as p
from fms.client import Client
from fms.errors import FmsError

FILE = 4 * p.MiB
CLIENT_TIMEOUT = 30.0  # seconds per request: 16 clients share 2 cores with every server


def start_store_cluster(cluster: Cluster, workers: int, store_args: list):
    """A broker, a 1 GiB cache and ``workers`` storage workers that get ``store_args``
    (``--meta``, ``--chunks``) and a scratch ``--data`` each; without them they share one SQLite
    store."""
    cluster.start_broker()
    cluster.start_cache(max_bytes="1G")
    for i in range(1, workers + 1):
        data = str(cluster.tmp / f"scratch-{i}") if store_args else None
        cluster.start_storage(data=data, wid=f"storage-{i}", extra=store_args)
    cluster.wait_workers(storage=workers, cache=1)


# --- load ---


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _client(ready, frontend: str, op: str, names: list, cpu, errors):
    """A client process: put (distinct random content) or get each name in turn; adds its own
    CPU seconds between the start signal and its last reply to ``cpu``."""
    blobs = {name: os.urandom(FILE) for name in names} if op == "put" else {}
    failed = 0
    with Client(frontend, timeout=CLIENT_TIMEOUT) as c:
        ready.wait(timeout=60)
        start = _own_cpu()
        for name in names:
            try:
                if op == "put":
                    c.put_bytes(blobs[name], name)
                else:
                    c.get_bytes(name)  # verifies every chunk and the whole file
            except FmsError:
                failed += 1
        used = _own_cpu() - start
    _add_counts(cpu, used, errors, failed)


# --- CPU accounting from /proc ---


def _tree_cpu(pid: int, parents: dict) -> float:
    """CPU seconds of ``pid``, of its children it has reaped and of its live descendants
    (PostgreSQL forks a backend per connection)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = _cpu_seconds(pid) + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # exited between the listing and the read
    return total + sum(
        _tree_cpu(child, parents) for child, parent in parents.items() if parent == pid
    )


def _parents() -> dict:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def _sample(pids: dict) -> dict:
    parents = _parents()
    return {name: _tree_cpu(pid, parents) for name, pid in pids.items()}


def _machine() -> tuple:
    """CPU seconds the whole machine has spent busy (every tenant's processes) and in iowait."""
    with open("/proc/stat") as f:
        t = [int(x) / os.sysconf("SC_CLK_TCK") for x in f.readline().split()[1:9]]
    return sum(t) - t[3] - t[4], t[4]


def measure(cluster: Cluster, servers: dict, op: str, names: list, clients: int) -> dict:
    """One timed phase: ``clients`` processes ``op`` the ``names`` between them; CPU is counted
    from the moment all are connected and ready (as in benchmarks.bench._run_processes) to the
    end."""
    pids = {proc.name: proc.pid for proc in cluster.procs}
    pids.update({name: server.proc.pid for name, server in servers.items()})
    with cluster.client() as c:
        served = {w["id"]: w["served"] for w in c.status()["workers"]}
    ctx = multiprocessing.get_context("spawn")
    cpu, errors, ready = ctx.Value("d", 0.0), ctx.Value("q", 0), ctx.Barrier(clients + 1)
    procs = [
        ctx.Process(
            target=_client, args=(ready, cluster.frontend, op, names[k::clients], cpu, errors)
        )
        for k in range(clients)
    ]
    for proc in procs:
        proc.start()
    ready.wait(timeout=60)
    before, machine, start = _sample(pids), _machine(), time.perf_counter()
    for proc in procs:
        proc.join()
    seconds = time.perf_counter() - start
    after, machine = _sample(pids), [b - a for a, b in zip(machine, _machine(), strict=False)]
    with cluster.client() as c:
        served = {
            w: n - served.get(w, 0)
            for w, n in ((w["id"], w["served"]) for w in c.status()["workers"])
            if w.startswith("stor")
        }
    used = {name: after[name] - before[name] for name in pids}
    used["clients"] = cpu.value
    mib = len(names) * FILE / p.MiB
    return {
        "op": op,
        "files": len(names),
        "clients": clients,
        "seconds": seconds,
        "mib_s": mib / seconds,
        "failed": errors.value,
        "served": served,
        "cpu_s": used,
        "cpu_ms_per_request": {k: 1000 * v / len(names) for k, v in used.items()},
        "busy": {k: v / seconds for k, v in used.items()},
        "machine_busy_cores": machine[0] / seconds,
        "machine_iowait": machine[1] / seconds,
        "ours_busy_cores": sum(used.values()) / seconds,
    }


def run(label: str, folder: str, workers: int, store_args, servers: dict, args) -> list:
    cluster = Cluster(folder)
    names = [f"scaleout/{i:03d}" for i in range(args.files)]
    try:
        start_store_cluster(cluster, workers, list(store_args))
        put = measure(cluster, servers, "put", names, args.put_clients)
        with cluster.client() as c:
            cached = c.cache_stats()["entries"]
        get = measure(cluster, servers, "get", names, args.get_clients)
        with cluster.client() as c:
            cache = c.cache_stats()
    finally:
        cluster.stop()
    get.update(cache_entries_before=cached, cache_hits=cache["hits"], cache_misses=cache["misses"])
    for r in (put, get):
        r.update(store=label, workers=workers)
        print(
            f"scaleout: {label}, {workers} worker(s), {r['op']}: {r['mib_s']:.1f} MiB/s, "
            f"{r['failed']} failed",
            file=sys.stderr,
            flush=True,
        )
    return [put, get]


# --- report ---

SERVER_PARTS = ("broker", "cache", "storage", "postgresql", "seaweedfs")


def _grouped(r: dict, key: str) -> dict:
    """The per-process figures with the storage workers summed."""
    out = {k: v for k, v in r[key].items() if not k.startswith("storage-")}
    out["storage"] = sum(v for k, v in r[key].items() if k.startswith("storage-"))
    return out


def projection(r: dict) -> dict:
    """MiB/s ceilings from CPU seconds per MiB: a single-threaded process (broker, cache) gives at
    most one core; the storage workers one core each; all server processes together at most the
    machine's cores (clients on other machines)."""
    mib = r["files"] * FILE / p.MiB
    cpu = _grouped(r, "cpu_s")
    server = sum(cpu.get(k, 0.0) for k in SERVER_PARTS)
    ceil = {
        "broker (1 core)": mib / cpu["broker"] if cpu["broker"] else None,
        "cache (1 core)": mib / cpu["cache"] if r["op"] == "get" else None,
        f"storage ({r['workers']} x 1 core)": r["workers"] * mib / cpu["storage"],
    }
    return {
        "server_cpu_ms_per_mib": 1000 * server / mib,
        "server_mib_s_per_core": mib / server,
        "ceilings_mib_s": ceil,
        "projected_mib_s": {
            cores: min([cores * mib / server] + [v for v in ceil.values() if v])
            for cores in (2, 4, 8, 16)
        },
    }


def markdown(report: dict) -> str:
    rows = report["runs"]
    lines = [
        f"fms scale-out, {report['date']}, {report['machine']}; {report['files']} files of "
        f"4 MiB; PUT by {report['put_clients']} clients, cold GET by "
        f"{report['get_clients']} clients",
        "",
        "CPU ms per request (one 4 MiB file), busy = CPU s / wall s (1.0 = one core):",
        "",
        "| store | workers | op | MiB/s | wall s | failed | requests per worker | broker | "
        "cache | storage (sum) | postgresql | seaweedfs | clients | all | busy: broker / "
        "cache / storage / pg / weed / clients | cores busy: ours / whole machine "
        "(iowait) |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ms, busy = _grouped(r, "cpu_ms_per_request"), _grouped(r, "busy")
        cell = lambda d, k: f"{d[k]:.0f}" if k in d else "-"  # noqa: E731
        lines.append(
            f"| {r['store']} | {r['workers']} | {r['op']} | {r['mib_s']:.1f} | {r['seconds']:.1f} "
            f"| {r['failed']} | {'/'.join(str(v) for v in r['served'].values())} | "
            + " | ".join(cell(ms, k) for k in (*SERVER_PARTS, "clients"))
            + f" | {sum(ms.values()):.0f} | "
            + " / ".join(f"{busy[k]:.2f}" if k in busy else "-" for k in (*SERVER_PARTS, "clients"))
            + f" | {r['ours_busy_cores']:.2f} / {r['machine_busy_cores']:.2f} "
            f"({r['machine_iowait']:.2f}) |"
        )
    lines += [
        "",
        "Cold GET check: cache hits during the GET phase (must be 0): "
        + ", ".join(
            f"{r['store']} x{r['workers']}: {r['cache_hits']} hits / {r['cache_misses']} misses"
            for r in rows
            if r["op"] == "get"
        ),
        "",
        "Projection (clients elsewhere): server CPU per MiB, and the MiB/s ceilings "
        "of the single-threaded parts:",
        "",
        "| store | workers | op | server CPU ms/MiB | MiB/s per core | broker ceiling | "
        "cache ceiling | storage ceiling | 2 cores | 4 | 8 | 16 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pr = r["projection"]
        ceil = list(pr["ceilings_mib_s"].values())
        lines.append(
            f"| {r['store']} | {r['workers']} | {r['op']} | "
            f"{pr['server_cpu_ms_per_mib']:.1f} | {pr['server_mib_s_per_core']:.0f} | "
            + " | ".join(f"{v:.0f}" if v else "-" for v in ceil)
            + " | "
            + " | ".join(f"{v:.0f}" for v in pr["projected_mib_s"].values())
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=64, help="4 MiB files per run (%(default)s)")
    ap.add_argument("--put-clients", type=int, default=8)
    ap.add_argument("--get-clients", type=int, default=16)
    ap.add_argument("--workers", default="1,2,4", help="storage worker counts (%(default)s)")
    ap.add_argument(
        "--reference",
        type=int,
        default=2,
        help="storage workers of the SQLite + local dir reference run (0: none)",
    )
    ap.add_argument("--out", default="bench-results", help="results folder (%(default)s)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    from servers import PostgresServer, SeaweedS3

    pg, s3 = PostgresServer(), SeaweedS3()
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="fms-scaleout-") as folder:
            pg.launch()
            s3.launch()
            os.environ.update(s3.env())  # inherited by the storage workers
            servers = {"postgresql": pg, "seaweedfs": s3}
            print(
                f"scaleout: PostgreSQL {pg.url}, SeaweedFS {s3.endpoint_url}",
                file=sys.stderr,
                flush=True,
            )
            for n in (int(w) for w in args.workers.split(",")):
                db, bucket = pg.new_database(), s3.make_bucket()
                try:
                    runs += run(
                        "postgresql+s3",
                        _sub(folder, f"pg-s3-{n}"),
                        n,
                        ["--meta", db, "--chunks", f"s3://{bucket}/chunks"],
                        servers,
                        args,
                    )
                finally:
                    pg.drop_database(db)
                    s3.delete_bucket(bucket)
            if args.reference:
                runs += run("sqlite+localdir", _sub(folder, "sqlite"), args.reference, [], {}, args)
    finally:
        s3.cleanup()
        pg.cleanup()
    for r in runs:
        r["projection"] = projection(r)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}",
        "files": args.files,
        "put_clients": args.put_clients,
        "get_clients": args.get_clients,
        "runs": runs,
    }
    write_report(report, markdown(report), args.out, f"scaleout-{report['date'][:10]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
