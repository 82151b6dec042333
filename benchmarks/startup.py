"""How long a CLI call takes, start to exit, against the floor of importing its two libraries
(issue 26, point 4): whole processes, run again and again, the commands taking turns.

    .venv/bin/python -m benchmarks.startup [--rounds 40] [--json] [--against DIR]

Starts a cluster (the tests' helper) with a few stored names, then runs, round after round and
in a new order each round: ``python -c "import zmq, msgpack"`` (the peer), ``python client.py
--help``, ``python client.py ls``, ``python client.py ls -r`` and ``python client.py stat NAME``
against it, each a fresh process, with compiled modules cached (.pyc) as on a user's machine.
Reports each one's median wall time and the ratio to the peer's median in the same run (target:
at most 1.5x), and the same for CPU time (user + system), which a loaded machine disturbs less.
Taking turns, rather than one command's runs after another's, keeps a shared machine's changing
load out of the ratios.  ``--against DIR``: another checkout's client.py (e.g. main's, extracted
with ``git archive main | tar -x -C DIR``) runs the same commands in the same turns, its rows
named ``before ...``: a change measured before and after in one run, on one cluster.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))

from harness import ROOT, Cluster

TARGET = 1.5  # at most this many times the peer's time


def commands(frontend: str, against: str | None = None) -> dict:
    cmds = {"peer": [sys.executable, "-c", "import zmq, msgpack"]}
    for label, root in [("", ROOT)] + ([("before ", against)] if against else []):
        client = [sys.executable, os.path.join(root, "client.py")]
        cmds[label + "--help"] = [*client, "--help"]
        cmds[label + "ls"] = [*client, "--broker", frontend, "ls"]
        cmds[label + "ls -r"] = [*client, "--broker", frontend, "ls", "-r"]
        cmds[label + "stat"] = [*client, "--broker", frontend, "stat", "notes/hello.txt"]
    return cmds


# As on a user's machine, Python caches compiled modules (.pyc): a process started with
# PYTHONDONTWRITEBYTECODE (some sandboxes set it) compiles fms's modules on every run, while the
# peer's libraries come compiled from their wheels.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_once(argv: list) -> tuple:
    """(wall seconds, CPU seconds: user + system) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=ENV)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(frontend: str, rounds: int, against: str | None = None) -> dict:
    cmds = commands(frontend, against)
    for argv in cmds.values():  # warm the page cache and the .pyc files
        run_once(argv)
    walls, cpus = {name: [] for name in cmds}, {name: [] for name in cmds}
    order = list(cmds)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            wall, cpu = run_once(cmds[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
    peer, peer_cpu = statistics.median(walls["peer"]), statistics.median(cpus["peer"])
    return {
        name: {
            "median_ms": round(statistics.median(walls[name]) * 1000, 1),
            "min_ms": round(min(walls[name]) * 1000, 1),
            "ratio": round(statistics.median(walls[name]) / peer, 2),
            "cpu_ms": round(statistics.median(cpus[name]) * 1000, 1),
            "cpu_ratio": round(statistics.median(cpus[name]) / peer_cpu, 2),
        }
        for name in cmds
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--against", metavar="DIR", help="another checkout, taking turns with this one"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fms-startup-") as folder:
        cluster = Cluster(folder)
        try:
            cluster.start_all()
            with cluster.client() as c:
                c.put_bytes(b"hello, fms\n", "notes/hello.txt")
                for i in range(20):
                    c.put_bytes(b"x" * i, f"photos/{i:02d}.jpg")
            results = measure(cluster.frontend, args.rounds, args.against)
        finally:
            cluster.stop()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(
        f"{'command':<17} {'median ms':>10} {'min ms':>8} {'vs peer':>8}  "
        f"{'CPU ms':>7} {'vs peer':>8}  target <= {TARGET}x"
    )
    for name, r in results.items():
        met = "" if name == "peer" else ("yes" if r["ratio"] <= TARGET else "NO")
        print(
            f"{name:<17} {r['median_ms']:>10} {r['min_ms']:>8} {r['ratio']:>7}x  "
            f"{r['cpu_ms']:>7} {r['cpu_ratio']:>7}x  {met}"
        )
    print(f"(peer: python -c 'import zmq, msgpack'; {args.rounds} rounds, commands in turns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
