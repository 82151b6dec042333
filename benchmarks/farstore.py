"""Storage far away (issue 23, point 5): PostgreSQL and S3 behind a delay, against the same
servers on loopback, in the same run.

    python -m benchmarks.farstore [--size 256M] [--delay-ms 5] [--rounds 3] [--out bench-results]

Starts one PostgreSQL and one SeaweedFS S3 server (tests/servers.py) and two clusters (a broker,
a cache, two storage workers each): *local* reaches the servers directly, *far* through a TCP
proxy that delays every byte by ``--delay-ms`` each way (tests/delayproxy.py: the kernel's netem
is not available here), each with its own database and bucket.  Each round puts a file of new
content into both, then GETs it cold from each (every chunk a cache miss: storage reads it from
S3), the two taking turns going first, then warm from the far one.  Reported: MiB/s, and the
ratio far / local of the cold GETs (the target: at least 0.5x).  ``OUT/farstore-DATE.{md,json}``.
"""

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile

from delayproxy import DelayProxy
from harness import Cluster
from servers import PostgresServer, SeaweedS3

from fms import wire as p

from .bench import make_file, timed, write_report
from .datapath import parse_size


def far_cluster(folder: str, meta: str, bucket: str, s3_env: dict) -> Cluster:
    """A cluster whose two storage workers keep the store in ``meta`` and ``bucket``."""
    os.makedirs(folder)
    cluster = Cluster(folder)
    saved = {k: os.environ.get(k) for k in s3_env}
    os.environ.update(s3_env)  # inherited by the storage workers
    try:
        cluster.start_broker()
        cluster.start_cache_with(["--max-file", "4G"], max_bytes="4G")
        for i in (1, 2):
            scratch = os.path.join(folder, f"scratch-{i}")
            os.makedirs(scratch)
            extra = ["--meta", meta, "--chunks", f"s3://{bucket}/chunks"]
            cluster.start_storage(data=scratch, wid=f"storage-{i}", extra=extra)
        cluster.wait_workers(storage=2, cache=1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return cluster


def run(size: int, delay: float, rounds: int, folder: str) -> dict:
    mib = size / p.MiB
    pg, s3 = PostgresServer(), SeaweedS3()
    proxies, clusters = [], {}
    rates = {"local": [], "far": [], "far_warm": []}
    try:
        pg.launch()
        s3.launch()
        pg_proxy = DelayProxy(f"{pg.host}:{pg.port}", delay)
        s3_proxy = DelayProxy(f"127.0.0.1:{s3.port}", delay)
        proxies += [pg_proxy, s3_proxy]
        for side in ("local", "far"):
            url = pg.new_database()
            env = s3.env()
            if side == "far":
                url = url.replace(f"{pg.host}:{pg.port}", pg_proxy.address)
                env["AWS_ENDPOINT_URL"] = f"http://{s3_proxy.address}"
            clusters[side] = far_cluster(os.path.join(folder, side), url, s3.make_bucket(), env)
        src = os.path.join(folder, "src.bin")
        out = os.path.join(folder, "out.bin")
        for r in range(rounds):
            make_file(src, size)
            for cluster in clusters.values():
                with cluster.client(timeout=60.0) as c:
                    c.put(src, f"big/{r}")
            order = ("local", "far") if r % 2 == 0 else ("far", "local")
            for side in order:
                with clusters[side].client(timeout=60.0) as c:
                    rates[side].append(mib / timed(lambda c=c: c.get(f"big/{r}", out)))
            with clusters["far"].client(timeout=60.0) as c:
                rates["far_warm"].append(mib / timed(lambda c=c: c.get(f"big/{r}", out)))
            print(
                f"round {r + 1}: cold local {rates['local'][-1]:.0f}, cold far "
                f"{rates['far'][-1]:.0f}, warm far {rates['far_warm'][-1]:.0f} MiB/s",
                flush=True,
            )
    finally:
        for cluster in clusters.values():
            cluster.stop()
        for proxy in proxies:
            proxy.stop()
        s3.cleanup()
        pg.cleanup()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "size": size,
        "delay_ms": delay * 1000,
        "rounds": rounds,
        "rates": rates,
        "median": med,
        "ratio": med["far"] / med["local"],
        "load": os.getloadavg(),
    }


def markdown(report: dict) -> str:
    med = report["median"]
    return (
        f"# Storage far away: PostgreSQL and S3 {report['delay_ms']:.0f} ms away (each way), "
        f"{report['size'] / p.MiB:.0f} MiB\n\n"
        f"{platform.machine()}, {os.cpu_count()} cores, load {report['load'][0]:.1f}\n\n"
        "| measurement | far | local (same run) | ratio | target | met |\n"
        "|---|---:|---:|---:|---|---|\n"
        f"| cold GET (MiB/s, median of {report['rounds']}) | {med['far']:.0f} | "
        f"{med['local']:.0f} | {report['ratio']:.2f}x | >= 0.5x | "
        f"{'yes' if report['ratio'] >= 0.5 else '**no**'} |\n"
        f"| warm GET, far (MiB/s) | {med['far_warm']:.0f} | | | | |\n\n"
        "Rounds (MiB/s): "
        + "; ".join(
            f"{k} {' / '.join(f'{v:.0f}' for v in vs)}" for k, vs in report["rates"].items()
        )
        + "\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="file size (%(default)s)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="each way (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="fms-farstore-")
    try:
        report = run(parse_size(args.size), args.delay_ms / 1000, args.rounds, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    stem = "farstore-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_report(report, markdown(report), args.out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
