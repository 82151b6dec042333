"""Throughput of S3 client libraries on 1 MiB objects against a local SeaweedFS (issue 12).

Starts the tests' SeaweedFS fixture server (tests/servers.py: ``weed server`` on loopback),
then, for each thread count, each library PUTs the same N objects of 1 MiB (distinct random
payloads, the same for every library) under its own prefix and GETs them back (verified),
in one process, in rounds whose library order rotates. Reports MiB/s, client CPU seconds per
MiB and each library's ratio to boto3, and the server's CPU per MiB in the same windows.

    .venv/bin/pip install boto3 obstore minio      # obstore/minio: measurement only
    .venv/bin/python benchmarks/s3_clients.py [--objects 200] [--threads 1,4] [--rounds 2]

Server and client share this machine's cores, so the figures are relative, not absolute.
"""

import argparse
import io
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

MiB = 1 << 20


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Boto3Client:
    name = "boto3"

    def __init__(self, server, bucket, threads, **checksums):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.c = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name=server.region,
            config=Config(
                s3={"addressing_style": "path"}, max_pool_connections=threads + 2, **checksums
            ),
        )

    def put(self, key, data):
        self.c.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key) -> bytes:
        return self.c.get_object(Bucket=self.bucket, Key=key)["Body"].read()


class Boto3NoChecksum(Boto3Client):
    """boto3 with the flexible checksums (CRC32 by default since botocore 1.36) only where an
    operation requires them."""

    name = "boto3-nocrc"

    def __init__(self, server, bucket, threads):
        super().__init__(
            server,
            bucket,
            threads,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )


class ObstoreClient:
    name = "obstore"

    def __init__(self, server, bucket, threads):
        import obstore
        from obstore.store import S3Store

        self.obstore = obstore
        self.store = S3Store(
            bucket,
            endpoint=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            region=server.region,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    def put(self, key, data):
        self.obstore.put(self.store, key, data)

    def get(self, key) -> bytes:
        return self.obstore.get(self.store, key).bytes()


class MinioClient:
    name = "minio"

    def __init__(self, server, bucket, threads):
        from minio import Minio

        self.bucket = bucket
        host = server.endpoint_url.split("://", 1)[1]
        self.c = Minio(
            host,
            access_key=server.access_key,
            secret_key=server.secret_key,
            secure=False,
            region=server.region,
        )

    def put(self, key, data):
        self.c.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def get(self, key) -> bytes:
        r = self.c.get_object(self.bucket, key)
        try:
            return r.read()
        finally:
            r.close()
            r.release_conn()


CLIENTS = [Boto3Client, Boto3NoChecksum, ObstoreClient, MinioClient]


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (the server)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn, items, threads, server_pid):
    c0, s0, t0 = cpu_seconds(), proc_cpu_seconds(server_pid), time.perf_counter()
    if threads == 1:
        for it in items:
            fn(it)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, items))
    return (time.perf_counter() - t0, cpu_seconds() - c0, proc_cpu_seconds(server_pid) - s0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default=",".join(c.name for c in CLIENTS))
    args = ap.parse_args()
    threads_list = [int(t) for t in args.threads.split(",")]
    wanted = args.clients.split(",")
    clients = [c for c in CLIENTS if c.name in wanted]

    import boto3
    import botocore
    import minio
    import obstore
    from servers import SeaweedS3

    print(
        f"python {sys.version.split()[0]}; boto3 {boto3.__version__} (botocore "
        f"{botocore.__version__}), obstore {obstore.__version__}, minio {minio.__version__}; "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    payloads = [os.urandom(MiB) for _ in range(args.objects)]
    server = SeaweedS3()
    try:
        server.launch()
        print(
            f"SeaweedFS {server.endpoint_url} started in {server.start_seconds:.1f} s; "
            f"{args.objects} objects of 1 MiB, rounds {args.rounds}"
        )
        bucket = server.make_bucket()
        results = {}  # (client, threads, op) -> [(MiB/s, cpu s per MiB)]
        for threads in threads_list:
            for rnd in range(args.rounds):
                order = clients[rnd % len(clients) :] + clients[: rnd % len(clients)]
                for cls in order:
                    cl = cls(server, bucket, threads)
                    keys = [f"{cls.name}/t{threads}/r{rnd}/{i:05d}" for i in range(args.objects)]
                    cl.put(keys[0] + "-warm", payloads[0])  # connection set-up off the clock
                    cl.get(keys[0] + "-warm")
                    wall, cpu, scpu = timed(
                        lambda i: cl.put(keys[i], payloads[i]),
                        range(args.objects),
                        threads,
                        server.proc.pid,
                    )
                    results.setdefault((cls.name, threads, "PUT"), []).append(
                        (args.objects / wall, cpu / args.objects, scpu / args.objects)
                    )

                    def get_check(i):
                        if cl.get(keys[i]) != payloads[i]:
                            raise AssertionError(f"{cls.name}: {keys[i]} read back differs")

                    wall, cpu, scpu = timed(
                        get_check, range(args.objects), threads, server.proc.pid
                    )
                    results.setdefault((cls.name, threads, "GET"), []).append(
                        (args.objects / wall, cpu / args.objects, scpu / args.objects)
                    )
        print()
        print(
            f"{'op':4} {'threads':>7} {'client':12} {'MiB/s':>8} {'(rounds)':>18} "
            f"{'ratio':>6} {'client CPU ms/MiB':>17} {'server CPU ms/MiB':>17}"
        )
        for op in ("PUT", "GET"):
            for threads in threads_list:
                base = (
                    statistics.mean(r[0] for r in results[("boto3", threads, op)])
                    if ("boto3", threads, op) in results
                    else None
                )
                for cls in clients:
                    rs = results[(cls.name, threads, op)]
                    mean = statistics.mean(r[0] for r in rs)
                    cpu = statistics.mean(r[1] for r in rs) * 1000
                    scpu = statistics.mean(r[2] for r in rs) * 1000
                    per = "/".join(f"{r[0]:.0f}" for r in rs)
                    ratio = f"{mean / base:.2f}" if base else "-"
                    print(
                        f"{op:4} {threads:>7} {cls.name:12} {mean:8.1f} {per:>18} "
                        f"{ratio:>6} {cpu:17.2f} {scpu:17.2f}"
                    )
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
