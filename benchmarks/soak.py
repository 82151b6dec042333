"""Soak test: many clients, mixed put/get/rm, a storage worker killed and restarted mid-run.

    python -m benchmarks.soak [--seconds 60] [--clients 32] [--keep DIR]

It starts its own cluster (broker, cache, two storage workers) on random loopback ports in a
temporary folder.  Each client owns a few names and knows what it last stored under each, so
every read is checked: a wrong or stale byte counts as corrupted, any exception as an error.
A third of the way in, one storage worker is killed with SIGKILL; at half time it is restarted.
Exit status 0 only if there were no errors and no corrupted bytes.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

from harness import Cluster

from fms.client import Client
from fms.errors import FmsError, NotFound

NAMES_PER_CLIENT = 4


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = {}
        self.errors = []
        self.corrupted = 0

    def op(self, kind: str):
        with self.lock:
            self.ops[kind] = self.ops.get(kind, 0) + 1

    def error(self, text: str):
        with self.lock:
            self.errors.append(text)

    def corrupt(self, n: int, text: str):
        with self.lock:
            self.corrupted += n
            self.errors.append(text)


def worker_loop(frontend: str, k: int, stop: threading.Event, tally: Tally, seed: int):
    rng = random.Random(seed * 1000 + k)
    names = [f"soak/c{k}/f{j}" for j in range(NAMES_PER_CLIENT)]
    expected = {name: {None} for name in names}  # name -> acceptable sha256s (None: absent)
    with Client(frontend, timeout=5.0, retries=3) as c:
        while not stop.is_set():
            name = rng.choice(names)
            roll = rng.random()
            try:
                if roll < 0.40:
                    kind = "get"
                    try:
                        data = c.get_bytes(name)
                        digest = hashlib.sha256(data).digest()
                    except NotFound:
                        data, digest = b"", None
                    if digest not in expected[name]:
                        tally.corrupt(
                            len(data) or 1,
                            f"{name}: read a version never written or already replaced",
                        )
                    expected[name] = {digest}
                elif roll < 0.75:
                    kind = "put"
                    size = rng.choice([rng.randint(0, 64 * 1024), rng.randint(1, 3 * 1024 * 1024)])
                    data = rng.randbytes(size)
                    digest = hashlib.sha256(data).digest()
                    expected[name] |= {digest}  # if this fails, either may be there
                    c.put_bytes(data, name)
                    expected[name] = {digest}
                elif roll < 0.90:
                    kind = "rm"
                    expected[name] |= {None}
                    try:
                        c.rm(name)
                    except NotFound:
                        pass
                    expected[name] = {None}
                else:
                    kind = "ls"
                    c.ls(f"soak/c{k}/")
                tally.op(kind)
            except FmsError as exc:
                tally.error(f"{type(exc).__name__}: {exc}")


def run(seconds: float, clients: int, folder: str, seed: int = 1) -> dict:
    cluster = Cluster(folder)
    tally = Tally()
    stop = threading.Event()
    events = []
    try:
        cluster.start_all()
        threads = [
            threading.Thread(target=worker_loop, args=(cluster.frontend, k, stop, tally, seed))
            for k in range(clients)
        ]
        start = time.monotonic()
        for t in threads:
            t.start()
        plan = [(seconds / 3, "kill"), (seconds / 2, "restart")]
        for at, action in plan:
            time.sleep(max(0.0, start + at - time.monotonic()))  # the soak's own schedule
            if action == "kill":
                cluster.proc("storage-1").kill()
            else:
                cluster.start_storage(wid="storage-1")
            events.append(f"{time.monotonic() - start:.1f}s {action} storage-1")
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        cluster.stop()
    return {
        "seconds": round(elapsed, 1),
        "clients": clients,
        "operations": sum(tally.ops.values()),
        "by_op": tally.ops,
        "errors": len(tally.errors),
        "corrupted_bytes": tally.corrupted,
        "first_errors": tally.errors[:10],
        "events": events,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long (%(default)s)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (%(default)s)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep its data and logs")
    args = parser.parse_args(argv)
    folder = args.keep or tempfile.mkdtemp(prefix="fms-soak-")
    os.makedirs(folder, exist_ok=True)
    try:
        report = run(args.seconds, args.clients, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report, indent=1))
    ok = report["errors"] == 0 and report["corrupted_bytes"] == 0
    print(
        f"soak: {report['operations']} operations by {report['clients']} clients in "
        f"{report['seconds']} s, {report['errors']} errors, {report['corrupted_bytes']} "
        f"corrupted bytes: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
