"""Where a large PUT and GET spend their time: py-spy samples of every process during a PUT of
new content, a cold GET (every chunk a cache miss) and a warm one (every chunk a hit).

    .venv/bin/python -m benchmarks.profile_get [--size 512M] [--rate 250] [--digest FN]
                                               [--out bench-results]

Starts a cluster (broker, cache, two storage workers; its store made with ``--digest``, so a
sha256 store and a BLAKE3 one can be profiled on the same code), then runs ``client.py put`` of
``--size`` of new content (fsync'd before), ``client.py get`` (cold) and again (warm), each
under ``py-spy record`` while py-spy also samples the broker, the cache and the storage workers.
Prints, per process, the samples it was busy (not idle) and the functions with the most samples
of their own (self time), and writes py-spy's raw (collapsed-stack) files to
``OUT/profile-{put,cold,warm}-DIGEST-PROCESS.txt``. Needs py-spy (``pip install py-spy``) and
the right to trace other processes (root, or
``kernel.yama.ptrace_scope=0``).
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

from harness import Cluster

from benchmarks.bench import CLIENT_PY, _cached, make_file
from fms import wire as p
from fms.cli import parse_size

TOP = 12  # functions shown per process
SPY_START = 1.0  # seconds for py-spy to attach before the GET starts


def _py_spy() -> str:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        sys.exit("profile_get: py-spy not found; install it with: pip install py-spy")
    return spy


def summarize(path: str) -> tuple:
    """``(busy samples, [(function, self samples), ...] heaviest first)`` of a raw py-spy file."""
    own = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaf = stack.split(";")[-1]
            if leaf.startswith("process ") or leaf.startswith("thread "):
                continue
            own[leaf] += int(count)
            total += int(count)
    return total, own.most_common(TOP)


def profile(cluster: Cluster, spy: str, label: str, cli_args: list, out: str, rate: int) -> dict:
    paths, spies = {}, []
    for proc in cluster.procs:
        paths[proc.name] = os.path.join(out, f"profile-{label}-{proc.name}.txt")
        spies.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--output",
                    paths[proc.name],
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(SPY_START)  # py-spy attaches; nothing to wait on but its own start
    paths["client"] = os.path.join(out, f"profile-{label}-client.txt")
    start = time.perf_counter()
    subprocess.run(
        [
            spy,
            "record",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            paths["client"],
            "--",
            sys.executable,
            CLIENT_PY,
            "--broker",
            cluster.frontend,
            "--quiet",
            *cli_args,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - start
    for s in spies:
        s.send_signal(signal.SIGINT)
    for s in spies:
        s.wait(30)
    return {"seconds": seconds, "paths": paths}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_get",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", type=parse_size, default=parse_size("512M"))
    ap.add_argument("--rate", type=int, default=250, help="samples per second (%(default)s)")
    ap.add_argument(
        "--digest",
        choices=p.DIGEST_FUNCTIONS,
        default=p.NEW_STORE_DIGEST,
        help="the store's digest function (%(default)s)",
    )
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    spy = _py_spy()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fms-profile-") as folder:
        cluster = Cluster(folder, digest_fn=args.digest)
        try:
            cluster.start_all(cache_bytes=str(2 * args.size), cache_args=_cached(args.size))
            src, dest = os.path.join(folder, "src.bin"), os.path.join(folder, "out.bin")
            make_file(src, args.size)
            for label, cli_args in (
                ("put", ["put", src, "large"]),
                ("cold", ["get", "large", dest]),
                ("warm", ["get", "large", dest]),
            ):
                tag = f"{label}-{args.digest}"
                run = profile(cluster, spy, tag, cli_args, args.out, args.rate)
                print(
                    f"\n== {label} of {args.size / 2**20:.0f} MiB, {args.digest} store: "
                    f"{run['seconds']:.2f} s "
                    f"(under py-spy; {args.rate} samples/s per process)"
                )
                for proc, path in run["paths"].items():
                    if not os.path.exists(path):
                        print(f"-- {proc}: no samples (py-spy could not attach?)")
                        continue
                    total, top = summarize(path)
                    print(f"-- {proc}: {total} busy samples ({total / args.rate:.2f} s)")
                    for function, count in top:
                        print(f"   {100 * count / max(total, 1):5.1f}%  {function}")
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
