"""``fms mount`` against its peers, in one run (issue 25's speed points).

    python -m benchmarks.mount [--size 1G] [--files 1000] [--rounds 3] [--rows ROW,...]
                               [--before CHECKOUT] [--out bench-results]

One cluster (broker, cache of 2 GiB, two storage workers) and one mount of it, and the floor: a
file system in memory on mfusepy with the mount's FUSE options (benchmarks/toyfs.py), the best a
Python FUSE mount can do here.  For ``--rounds`` rounds, each pair in turns (the order
alternates):

- sequential read of a ``--size`` file: ``fms get NAME FILE`` against ``cp MOUNT/NAME FILE``
  (both to tmpfs, after the kernel's caches are dropped, through a warm cache worker);
- sequential write of a new ``--size`` file (fresh random bytes each time, so nothing is
  deduplicated): ``fms put FILE NAME`` against ``cp FILE MOUNT/NAME`` (from tmpfs);
- ``ls -l`` of a folder of ``--files`` files, with warm caches (listed once just before):
  the mount against a local ext4 folder;
- ``tar -xf`` of a ``--files``-file source tree into a new folder: the mount against local ext4,
  and a second mount of the same store with ``--writeback`` against local ext4 again;
- the floor: the same write (``cp FILE TOY/NAME`` against ``fms put``) and the same untar (into
  the toy against local ext4).  A floor under a bar means no Python mount reaches that bar here;
- with ``--before CHECKOUT``: the two untars again into mounts run from that checkout's code
  (main's, say), so a change is measured before and after in one run.

Reported: the median seconds of each, and mount / peer as a speed ratio (peer time / mount
time: 1 is as fast, above 1 faster), beside the issue's bar.  The machine is shared: only the
ratios mean much.
"""

import argparse
import datetime
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from harness import ROOT, Cluster, wait_for
from mounts import Mount

from fms.cli import parse_size

SHM = "/dev/shm"
BARS = {
    "read": 0.8,
    "write": 0.8,
    "write toy": 0.8,
    "ls -l": 0.5,
    "untar": 0.3,
    "untar wb": 0.3,
    "untar toy": 0.3,
    "untar before": 0.3,
    "untar wb before": 0.3,
}
BEFORE_ROWS = ("untar before", "untar wb before")  # only with --before
MOUNT_TIMEOUT = 15.0  # seconds for the toy to be mounted


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the rows are warmer for both sides alike


def timed(cmd: list, **kw) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, **kw)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{cmd} failed: {done.stderr.decode(errors='replace')}")
    return elapsed


def random_file(path: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(rng.randbytes(n))
            left -= n


def source_tree(folder: str, files: int) -> None:
    """A source tree of ``files`` text files (1 to 16 KiB) in 40 folders, two deep."""
    rng = random.Random(7)
    words = [b"def", b"return", b"self", b"import", b"class", b"value", b"for", b"in", b"if"]
    for i in range(files):
        sub = os.path.join(folder, f"pkg{i % 8}", f"mod{i % 40 // 8}")
        os.makedirs(sub, exist_ok=True)
        size = rng.randint(1024, 16384)
        text = b" ".join(rng.choice(words) for _ in range(size // 5))[:size]
        with open(os.path.join(sub, f"file{i}.py"), "wb") as f:
            f.write(text + b"\n")


def one_run(row, side, r, args, mount, writeback, toy, cli, shm, work, before) -> float:
    """Seconds of one side (0: the mount or the toy, 1: its peer) of ``row`` in round ``r``."""
    if row == "read":
        out = os.path.join(shm, f"read-{r}-{side}")
        drop_caches()
        cmd = ["cp", mount.p("big"), out] if side == 0 else [*cli, "get", "big", out]
        elapsed = timed(cmd)
        os.unlink(out)
        return elapsed
    if row in ("write", "write toy"):
        src = os.path.join(shm, "src")
        toy_row = row == "write toy"
        random_file(src, args.size, 1000 + 4 * r + 2 * toy_row + side)  # never seen: no dedup
        os.sync()
        name = f"w{r}-{side}" if row == "write" else f"t{r}-{side}"
        into = mount if row == "write" else toy
        cmd = ["cp", src, into.p(name)] if side == 0 else [*cli, "put", src, name]
        elapsed = timed(cmd)
        os.unlink(src)
        if row == "write toy" and side == 0:
            os.unlink(toy.p(name))  # its memory back
        return elapsed
    if row == "ls -l":
        folder = mount.p("lsdir") if side == 0 else os.path.join(work, "local-ls")
        subprocess.run(["ls", "-l", folder], capture_output=True, check=True)  # warm
        return statistics.median(timed(["ls", "-l", folder]) for _ in range(5))
    into = {"untar": mount, "untar wb": writeback, "untar toy": toy, **before}[row]
    name = f"{row.replace(' ', '-')}{r}"
    dest = into.p(name) if side == 0 else os.path.join(work, name)
    os.mkdir(dest)
    os.sync()
    return timed(["tar", "-xf", os.path.join(shm, "tree.tar"), "-C", dest])


class Toy:
    """benchmarks/toyfs.py mounted on ``path``, in a process of its own as the mount is."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.toyfs", path],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: os.path.ismount(path) or self.proc.poll() is not None, MOUNT_TIMEOUT, "toy"
        )
        if not os.path.ismount(path):
            raise SystemExit("the toy file system did not mount (python -m benchmarks.toyfs)")

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", self.path], capture_output=True)
        try:
            self.proc.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default="1G")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rows",
        default=",".join(r for r in BARS if r not in BEFORE_ROWS),
        help=f"the rows to time, of: {', '.join(BARS)}",
    )
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="also untar into mounts run from another checkout of fms (e.g. main's worktree), "
        "in the same run: the rows 'untar before' and 'untar wb before'",
    )
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    rows = [row.strip() for row in args.rows.split(",")]
    if args.before and args.rows == parser.get_default("rows"):
        rows += BEFORE_ROWS
    elif not args.before:
        rows = [row for row in rows if row not in BEFORE_ROWS]
    unknown = [row for row in rows if row not in BARS]
    if unknown:
        parser.error(f"no such rows: {', '.join(unknown)}; the rows are: {', '.join(BARS)}")
    work = tempfile.mkdtemp(prefix="fms-mount-bench-", dir=tempfile.gettempdir())
    shm = tempfile.mkdtemp(prefix="fms-mount-bench-", dir=SHM)
    cluster = Cluster(os.path.join(work, "cluster"))
    os.makedirs(cluster.tmp, exist_ok=True)
    mount = writeback = toy = None
    before: dict = {}  # "untar before" / "untar wb before" -> a mount of the other checkout
    times = {row: ([], []) for row in rows}  # row -> (mount seconds, peer seconds)
    cli = [sys.executable, os.path.join(ROOT, "client.py")]
    try:
        cluster.start_all(storage=2, cache_bytes="2G")
        mount = Mount(cluster, os.path.join(work, "mnt"))
        writeback = Mount(cluster, os.path.join(work, "mnt-wb"), "--writeback")
        toy = Toy(os.path.join(work, "toy"))
        if args.before:
            old = os.path.abspath(args.before)
            before["untar before"] = Mount(cluster, os.path.join(work, "mnt-b"), root=old)
            before["untar wb before"] = Mount(
                cluster, os.path.join(work, "mnt-bwb"), "--writeback", root=old
            )
        cli += ["--broker", cluster.frontend, "--quiet"]
        big = os.path.join(shm, "big")
        random_file(big, args.size, 0)
        subprocess.run([*cli, "put", big, "big"], check=True, capture_output=True)
        for _ in range(2):  # the cache worker holds it: both sides read it warm
            subprocess.run([*cli, "get", "big", os.path.join(shm, "warm")], check=True)
        os.unlink(os.path.join(shm, "warm"))
        local_ls = os.path.join(work, "local-ls")
        os.mkdir(local_ls)
        with cluster.client() as c:
            items = []
            for i in range(args.files):
                path = os.path.join(local_ls, f"f{i:04d}.txt")
                with open(path, "wb") as f:
                    f.write(b"x" * (i % 100))
                items.append((path, f"lsdir/f{i:04d}.txt"))
            c.put_many(items)
        tree = os.path.join(work, "tree")
        source_tree(tree, args.files)
        tarball = os.path.join(shm, "tree.tar")
        subprocess.run(["tar", "-cf", tarball, "-C", tree, "."], check=True)
        for r in range(args.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for row in rows:
                for side in order:  # 0: the mount (or the toy), 1: the peer
                    times[row][side].append(
                        one_run(row, side, r, args, mount, writeback, toy, cli, shm, work, before)
                    )
            uptime = open("/proc/loadavg").read().split()[:3]
            print(f"round {r + 1}/{args.rounds} done, load {' '.join(uptime)}", file=sys.stderr)
    finally:
        for m in (mount, writeback, toy, *before.values()):
            if m is not None:
                m.unmount()
        cluster.stop()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    peers = {"read": "fms get", "write": "fms put", "write toy": "fms put", "ls -l": "local ext4"}
    peers.update({"untar": "local ext4", "untar wb": "local ext4", "untar toy": "local ext4"})
    peers.update({row: "local ext4" for row in BEFORE_ROWS})
    size = f"{args.size / (1 << 30):g} GiB" if args.size >= 1 << 30 else f"{args.size >> 20} MiB"
    what = {
        "read": f"sequential read, {size}",
        "write": f"sequential write, {size}",
        "write toy": f"sequential write, {size}, into the toy (the floor)",
        "ls -l": f"ls -l of {args.files} files, warm",
        "untar": f"untar of {args.files} files",
        "untar wb": f"untar of {args.files} files, --writeback",
        "untar toy": f"untar of {args.files} files into the toy (the floor)",
        "untar before": f"untar of {args.files} files, {args.before}'s mount",
        "untar wb before": f"untar of {args.files} files, --writeback, {args.before}'s mount",
    }
    load = open("/proc/loadavg").read().split()[:3]
    lines = [
        f"fms mount, {datetime.date.today()}, {args.rounds} rounds (median seconds), "
        f"load average at the end {' '.join(load)}",
        "",
        "| what | mount | peer | peer's time | mount / peer | bar |",
        "|---|---|---|---|---|---|",
    ]
    for row, (mine, theirs) in times.items():
        m, t = statistics.median(mine), statistics.median(theirs)
        lines.append(
            f"| {what[row]} | {m:.3f} s | {peers[row]} | {t:.3f} s | {t / m:.2f}x | "
            f">= {BARS[row]}x |"
        )
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"mount-{datetime.date.today()}.md"), "w") as f:
        f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
