"""Benchmarks, run side by side in one run and reported as ratios (the machine is shared and
noisy: absolute times alone say little).

    python -m fms.bench curve [--size 256M] [--out bench-results]

``curve``: the throughput cost of CurveZMQ.  The same file is uploaded, fetched cold (every chunk
a cache miss) and fetched warm (every chunk a hit) through a plaintext cluster and through a CURVE
cluster, alternating plaintext/CURVE for each round; the report gives MiB/s for each and the ratio
CURVE / plaintext per operation (median of the rounds).

Results go to ``OUT/bench-<scenario>-<date>.json`` and ``.md``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from . import protocol as p
from .cli import parse_size
from .harness import LocalCluster

OPS = ("put", "cold get", "warm get")


def _make_file(path: str, size: int):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * p.MiB)
            f.write(os.urandom(n))
            left -= n


def _round(cluster: LocalCluster, src: str, size: int, name: str, folder: str) -> dict:
    """One put, one cold get and one warm get of ``src``; MiB/s of each."""
    rates = {}
    with cluster.client(timeout=30.0) as c:
        for op in OPS:
            dest = os.path.join(folder, "out.bin")
            start = time.perf_counter()
            if op == "put":
                c.put(src, name)
            else:
                c.get(name, dest)
            rates[op] = size / p.MiB / (time.perf_counter() - start)
            if op != "put":
                os.unlink(dest)
    return rates


def bench_curve(size: int, rounds: int, folder: str) -> dict:
    src = os.path.join(folder, "src.bin")
    _make_file(src, size)
    clusters = {}
    results = {"plaintext": {op: [] for op in OPS}, "curve": {op: [] for op in OPS}}
    try:
        for mode in results:
            os.makedirs(os.path.join(folder, mode))
            clusters[mode] = LocalCluster(os.path.join(folder, mode), curve=(mode == "curve"),
                                          cache_bytes=str(4 * size))
            clusters[mode].start_all()
        for r in range(rounds):
            for mode, cluster in clusters.items():   # alternate, so drift hits both alike
                for op, rate in _round(cluster, src, size, f"bench/{r}", folder).items():
                    results[mode][op].append(rate)
            # Chunks are content-addressed: new content keeps the next round's put a real upload
            # and its first get a real cache miss.
            _make_file(src, size)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    table = {op: {"plaintext_mib_s": statistics.median(results["plaintext"][op]),
                  "curve_mib_s": statistics.median(results["curve"][op])} for op in OPS}
    for row in table.values():
        row["ratio"] = row["curve_mib_s"] / row["plaintext_mib_s"]
    return {"scenario": "curve", "file_mib": size / p.MiB, "rounds": rounds, "results": table,
            "samples": results}


def markdown(report: dict) -> str:
    lines = [f"CURVE cost, {report['file_mib']:.0f} MiB file, median of {report['rounds']} "
             f"rounds, {report['date']} on {report['machine']}", "",
             "| operation | plaintext MiB/s | CURVE MiB/s | CURVE / plaintext |",
             "|---|---:|---:|---:|"]
    for op, row in report["results"].items():
        lines.append(f"| {op} | {row['plaintext_mib_s']:.0f} | {row['curve_mib_s']:.0f} | "
                     f"{row['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fms.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["curve"])
    parser.add_argument("--size", type=parse_size, default="256M", help="file size (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (%(default)s)")
    parser.add_argument("--out", default="bench-results", help="folder for results (%(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fms-bench-") as folder:
        report = bench_curve(args.size, args.rounds, folder)
    report["date"] = datetime.date.today().isoformat()
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench-{report['scenario']}-{report['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
