"""Two brokers side by side in one run: the same cluster (cache, storage) under each, in turns.

    python -m benchmarks.brokers --before PATH [--after PATH] [--rounds 5] [--size 256M]
                                 [--out bench-results]

``PATH`` is a source tree holding ``broker.py`` (a checkout of an earlier commit, e.g.
``git worktree add /tmp/before COMMIT``); ``--after`` defaults to this tree.  Each side gets
a cluster of its own (its broker from its tree, cache and storage workers from this one), with
a 4 KiB file and a ``--size`` file stored and read twice (warm) before any clock starts.  Then,
for ``--rounds`` rounds, the sides take turns (the order alternates) at:

- 4 KiB GET latency, one client, sequential (p50 and p99 of ``SAMPLES``);
- 4 KiB GETs/s with 16 connections shared by two load processes (as wrk -t2 -c16), where the
  broker's routing is the bottleneck;
- warm GET of the large file to a file on disk, MiB/s.

Reported: each side's median over the rounds, and after / before (for latency, before / after,
so above 1 is better on every row).  The machine is shared: only the ratio means much.
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

from harness import SCRIPTS, Cluster

from fms.cli import parse_size

from .bench import latencies, percentile, run_load, write_report

SAMPLES = 600  # sequential 4 KiB GETs per round and side
LOAD_SECONDS = 4.0


def _start(folder: str, root: str, side: str) -> Cluster:
    SCRIPTS[f"broker@{side}"] = os.path.join(os.path.abspath(root), "broker.py")
    os.makedirs(folder, exist_ok=True)
    cluster = Cluster(folder)
    cluster.start_broker(kind=f"broker@{side}")
    cluster.start_cache_with([], max_bytes="1G")
    for i in (1, 2):
        cluster.start_storage(wid=f"storage-{i}")
    cluster.wait_workers(storage=2, cache=1)
    return cluster


def _round(cluster: Cluster, large: int, out: str) -> dict:
    with cluster.client() as c:
        lat = latencies(lambda: c.get_bytes("small.bin"), SAMPLES)
        start = time.perf_counter()
        c.get("large.bin", out)
        warm = large / (time.perf_counter() - start) / 2**20
    rate, failed, _ = run_load(cluster.frontend, "small.bin", 16, LOAD_SECONDS, processes=2)
    os.unlink(out)
    return {
        "p50 ms": percentile(lat, 0.5) * 1000,
        "p99 ms": percentile(lat, 0.99) * 1000,
        "GET/s, 16 connections": rate,
        "warm GET MiB/s": warm,
        "failed": failed,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.brokers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--before", required=True, help="source tree of the first broker")
    parser.add_argument("--after", default=here, help="source tree of the second (this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=parse_size, default="256M")
    parser.add_argument("--out", default="bench-results", help="results folder (%(default)s)")
    args = parser.parse_args(argv)
    for root in (args.before, args.after):
        if not os.path.exists(os.path.join(root, "broker.py")):
            parser.error(f"{root} holds no broker.py")
    sides = {"before": args.before, "after": args.after}
    runs = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="fms-brokers-") as folder:
        large = os.path.join(folder, "large.bin")
        with open(large, "wb") as f:
            for _ in range(args.size // 2**20):
                f.write(os.urandom(2**20))
        clusters = {}
        try:
            for side, root in sides.items():
                clusters[side] = cluster = _start(os.path.join(folder, side), root, side)
                with cluster.client() as c:
                    c.put_bytes(os.urandom(4096), "small.bin")
                    c.put(large, "large.bin")
                    for _ in range(2):  # warm: manifest and chunks in the cache
                        c.get_bytes("small.bin")
                        c.get("large.bin", os.path.join(folder, "warm.bin"))
            for i in range(args.rounds):
                order = list(sides) if i % 2 == 0 else list(reversed(sides))
                for side in order:
                    print(f"brokers: round {i + 1}, {side}", file=sys.stderr, flush=True)
                    got = _round(clusters[side], args.size, os.path.join(folder, "out.bin"))
                    runs[side].append(got)
                    print(f"brokers: {got}", file=sys.stderr, flush=True)
        finally:
            for cluster in clusters.values():
                cluster.stop()
    rows = []
    for metric in ("p50 ms", "p99 ms", "GET/s, 16 connections", "warm GET MiB/s"):
        before = statistics.median(r[metric] for r in runs["before"])
        after = statistics.median(r[metric] for r in runs["after"])
        num, den = (before, after) if metric.endswith("ms") else (after, before)
        better = num / den if den else float("nan")
        rows.append((metric, before, after, better))
    failed = sum(r["failed"] for side in runs.values() for r in side)
    lines = [
        f"# Brokers side by side, {datetime.date.today().isoformat()}",
        "",
        f"before: `{args.before}`; after: `{args.after}`; {args.rounds} rounds, medians; "
        f"large file {args.size // 2**20} MiB; failed requests: {failed}",
        "",
        "| metric | before | after | after vs before (>1 is better) |",
        "|---|---|---|---|",
        *(f"| {m} | {b:.3f} | {a:.3f} | {r:.2f}x |" for m, b, a, r in rows),
    ]
    report = {"date": datetime.date.today().isoformat(), "sides": sides, "runs": runs}
    write_report(report, "\n".join(lines) + "\n", args.out, f"brokers-{report['date']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
