"""Cold, warm and no-cache GETs of new files on one cluster, round after round: what a change to
the read path buys, run from each checkout in turns (before/after).

    python -m benchmarks.getrounds [--rounds 2] [--size 256M] [--window 8 ...]

Each round stores a new file of random bytes, then GETs it through the cache while the cache
has none of it (cold: every chunk a miss), again (warm: every chunk a hit), and from storage
with no cache (``Client(cache=False)``), each starting from a synced disk; prints MiB/s.

A cold GET writes the file twice (the cache's disk tier and the destination): on this VM's
disk, rounds after the first ~800 MiB cached run at about half the pace, both writers blocked
in ``write()`` by the kernel's dirty-page throttling, so compare the same rounds of each side.
"""

import argparse
import os
import shutil
import tempfile
import time

from harness import Cluster

from benchmarks.bench import make_file
from fms.cli import parse_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--window", type=int, nargs="+", default=[8], help="chunks in flight")
    args = ap.parse_args()
    size, mib = args.size, args.size / 2**20
    folder = tempfile.mkdtemp(prefix="fms-getrounds-")
    cluster = Cluster(os.path.join(folder, "cluster"))
    os.makedirs(os.path.join(folder, "cluster"))
    src, out = os.path.join(folder, "src"), os.path.join(folder, "out")

    def timed_get(client, name: str) -> float:
        os.sync()
        start = time.perf_counter()
        client.get(name, out)
        return mib / (time.perf_counter() - start)

    try:
        cluster.start_all(cache_bytes="3G", cache_args=["--max-file", str(size)])
        with cluster.client(timeout=60.0) as writer:
            for r in range(args.rounds):
                for w in args.window:
                    make_file(src, size)
                    name = f"r{r}-w{w}"
                    writer.put(src, name)
                    with cluster.client(timeout=60.0, window=w) as c:
                        cold, warm = timed_get(c, name), timed_get(c, name)
                    with cluster.client(timeout=60.0, window=w, cache=False) as c:
                        direct = timed_get(c, name)
                    print(
                        f"round {r + 1} window {w}: cold {cold:.0f}, warm {warm:.0f}, "
                        f"no cache {direct:.0f} MiB/s (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
