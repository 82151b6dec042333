"""Where a 4 KiB S3 request spends its time: py-spy samples of every fms process (gateway,
broker, cache, storage workers) while 8 boto3 client processes GET (or PUT) 4 KiB objects
through fms's gateway, as ``benchmarks.s3gw`` times them.

    .venv/bin/python -m benchmarks.profile_s3small [--op get|put] [--small 4000] [--rate 200]
        [--out bench-results]

Each GET pass reads objects just written (as s3gw does: a PUT pass before each GET pass).
Prints per process the CPU-seconds per request, the busy samples, the functions with the most
samples of their own and those with the most samples under them; writes py-spy's raw files to
``OUT/profile-s3small-OP-PROCESS.txt``.  Needs py-spy and the right to trace (root).
"""

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.profile_get import _py_spy, summarize
from benchmarks.s3gw import SMALL_CLIENTS, Target, small

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def inclusive(path: str, top: int = 15) -> list:
    """The functions with the most samples on the stack (each counted once per sample)."""
    under = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [s for s in stack.split(";") if not s.startswith(("process ", "thread "))]
            for fn in set(frames):
                under[fn] += int(count)
    return under.most_common(top)


def main(argv=None) -> int:
    from harness import Cluster
    from s3gw import Gateway

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("get", "put"), default="get")
    ap.add_argument("--small", type=int, default=4000)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--procs", default="", help="comma list of processes to sample (all)")
    ap.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    ap.add_argument("--no-spy", action="store_true", help="only the CPU-seconds per request")
    args = ap.parse_args(argv)
    spy = None if args.no_spy else _py_spy()
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="fms-s3prof-")
    cluster = Cluster(tmp)
    try:
        cluster.start_all(storage=2, cache_bytes="1G")
        gw = Gateway(cluster, tmp)
        pids = {p.name: p.pid for p in cluster.procs}
        t = Target("fms", gw.url, gw.key_id, gw.secret, pids)
        t.client().create_bucket(Bucket="prof")
        per = args.small // SMALL_CLIENTS
        small(t, "prof", per, "put")
        if args.op == "get":
            small(t, "prof", per, "put")  # the GETs read what was just written, as s3gw's do
        spies, paths = [], {}
        chosen = set(filter(None, args.procs.split(","))) or set(pids)
        for name, pid in [] if spy is None else pids.items():
            if name not in chosen:
                continue
            paths[name] = os.path.join(args.out, f"profile-s3small-{args.op}-{name}.txt")
            spies.append(
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        str(args.rate),
                        "--threads",
                        "--format",
                        "raw",
                        "--output",
                        paths[name],
                        *(["--gil"] if args.gil else []),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0 if spies else 0)
        before = t.cpus()
        took = small(t, "prof", per, args.op)
        after = t.cpus()
        for s in spies:
            s.send_signal(signal.SIGINT)
        for s in spies:
            s.wait(30)
        n = per * SMALL_CLIENTS
        print(f"{n} x 4 KiB {args.op.upper()}: {n / took:.0f} obj/s ({took:.2f} s)")
        cpu = {k: (after[k] - before[k]) * 1000 / n for k in after}
        each = ", ".join(f"{k} {v:.3f}" for k, v in cpu.items())
        print(f"CPU ms/req: total {sum(cpu.values()):.3f}: {each}")
        for name, path in paths.items():
            if not os.path.exists(path):
                continue
            total, own = summarize(path)
            print(f"\n-- {name}: {total} busy samples")
            for fn, c in own:
                print(f"   self {100 * c / max(total, 1):5.1f}%  {fn}")
            for fn, c in inclusive(path):
                print(f"   incl {100 * c / max(total, 1):5.1f}%  {fn}")
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
