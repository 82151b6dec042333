"""The cache worker's CPU per 4 KiB chunk, in one process: what a cache worker does for

- ``fill``: a small file's commit handed to it (the broker's ``inv`` with a ``fill`` and the
  commit's data frame: what each 4 KiB S3 PUT costs the cache);
- ``fills``: a ``put -r``'s ``commit_many`` of 128 small files handed to it (one ``inv`` with
  ``fills`` and ``offsets`` and the request's data frame);
- ``hit``: a ``get`` of a small file whose manifest and content it holds (a 4 KiB S3 GET after
  its PUT);
- ``many``: a cold ``get -r``: ``get_many`` batches of 128 names that all miss, and storage's
  reply to each (its results and one data frame of the contents), verified and cached.

    .venv/bin/python -m benchmarks.cachecpu [--paths fill,fills,hit,many] [--files 2000]
        [--rounds 5]
        [--profile PATH]

The messages go through the worker's own path (:func:`fms.worker._dispatch` of the broker's
frames, as zmq.Frame objects, :class:`~fms.cache.service.CacheService`, its replies and
requests encoded as :class:`~fms.worker.BrokerLink` encodes them, not sent) over a
:class:`~fms.cache.chunks.ChunkCache` in a scratch directory.  Reported per path: CPU µs per
file (the process's CPU time, the write-behind thread's included: each round ends when the
writer is done), the median over ``--rounds`` rounds of ``--files`` new files each.  No
ZeroMQ socket, no broker: a floor under what the cache costs in a cluster
(``benchmarks.profile_s3small --no-spy`` measures that).
"""

import argparse
import cProfile
import logging
import os
import pstats
import shutil
import statistics
import tempfile
import time
from typing import Any

import zmq
from storage_helpers import manifest_of, use_digest

from fms import wire as p
from fms import worker
from fms.cache import CacheService, ChunkCache
from fms.cli import parse_size
from fms.worker import reply_frames

SIZE = 4096
BATCH = 128  # names per get_many (fms.client.api.GET_BATCH)
CACHE_BYTES = 1 << 30  # fms up's default
CLIENTS = 8  # benchmarks.s3gw's client processes
log = logging.getLogger("benchmarks.cachecpu")


class EncodingLink:
    """Encodes every reply and request as :class:`fms.worker.BrokerLink` does, sends nothing;
    keeps the requests (the fetches to storage) for the benchmark to answer."""

    def __init__(self) -> None:
        self.replies = 0
        self.requests: list[dict[str, Any]] = []

    def reply(self, route: dict[str, Any], header: dict[str, Any], *args, **kwargs) -> None:
        if not header.get("ok"):
            raise AssertionError(f"refused: {header}")
        reply_frames(route, header, *args, **kwargs)
        self.replies += 1

    def request(self, service: str, header: dict[str, Any], data: Any = None) -> None:
        p.encode({"t": "req", "svc": service})
        p.encode(header)
        self.requests.append(header)


def frames(*parts: bytes) -> list[zmq.Frame]:
    return [zmq.Frame(part) for part in parts]


class Files:
    """``count`` 4 KiB files per round: their names, contents, wire manifests.  New names of
    new contents; with ``s3gw``, as benchmarks.s3gw's PUTs make them: the same names every
    round (``small/CLIENT/I``, 8 clients), each client's files of one new content a round."""

    def __init__(self, tag: str, count: int, s3gw: bool = False) -> None:
        if s3gw:
            bodies = [os.urandom(SIZE) for _ in range(CLIENTS)]
            self.names = [f"small/{i % CLIENTS}/{i // CLIENTS}" for i in range(count)]
            self.contents = [bodies[i % CLIENTS] for i in range(count)]
        else:
            self.names = [f"{tag}/f{i:06d}" for i in range(count)]
            self.contents = [os.urandom(SIZE) for _ in range(count)]
        self.manifests = [
            manifest_of(name, content)
            for name, content in zip(self.names, self.contents, strict=True)
        ]


class Bench:
    def __init__(
        self, folder: str, drain: int, gap: float = 0.0, cache_bytes: int = CACHE_BYTES
    ) -> None:
        self.drain = drain  # messages per drain of the worker's loop
        self.gap = gap  # seconds between drains (fill and hit)
        self.cache = ChunkCache(folder, cache_bytes)
        self.link = EncodingLink()
        self.service = CacheService(self.cache, self.link)
        self.service.on_store(p.BLAKE3)
        self.service.on_register(0)
        self.key = 1  # the broker's request keys
        self.fetch_id = 0  # the service's last fetch's id (its fetches are numbered from 1)

    def dispatch(self, message: list[zmq.Frame]) -> None:
        worker._dispatch(self.service, self.link, message, log)  # type: ignore[arg-type]

    def fill_messages(self, files: Files) -> list[list[zmq.Frame]]:
        out = []
        for name, content, manifest in zip(
            files.names, files.contents, files.manifests, strict=True
        ):
            since, self.key = self.key, self.key + 1
            route = {"t": "inv", "names": [name], "at": since, "fill": p.encode(manifest)}
            route["since"] = since
            out.append(frames(p.encode(route), bytes(p.pack_data(content))))
        return out

    def many_fill_messages(self, files: Files) -> list[list[zmq.Frame]]:
        out = []
        for first in range(0, len(files.names), BATCH):
            names = files.names[first : first + BATCH]
            contents = files.contents[first : first + BATCH]
            manifests = files.manifests[first : first + BATCH]
            since, self.key = self.key, self.key + 1
            offsets = [sum(len(c) for c in contents[:i]) for i in range(len(contents))]
            route = {
                "t": "inv",
                "names": names,
                "at": since,
                "since": since,
                "fills": [p.encode(m) for m in manifests],
                "offsets": offsets,
            }
            out.append(frames(p.encode(route), bytes(p.pack_data(b"".join(contents)))))
        return out

    def get_messages(self, files: Files) -> list[list[zmq.Frame]]:
        out = []
        for i, name in enumerate(files.names):
            route = {"t": "req", "k": i, "ttl": 60_000}
            header = {"v": p.PROTOCOL_VERSION, "op": "get", "id": i, "name": name}
            out.append(frames(p.encode(route), p.encode(header)))
        return out

    def many_requests(self, files: Files) -> list[tuple[list[zmq.Frame], list[int]]]:
        out = []
        for first in range(0, len(files.names), BATCH):
            picked = list(range(first, min(first + BATCH, len(files.names))))
            route = {"t": "req", "k": first, "ttl": 60_000}
            header = {
                "v": p.PROTOCOL_VERSION,
                "op": "get_many",
                "id": first,
                "names": [files.names[i] for i in picked],
            }
            out.append((frames(p.encode(route), p.encode(header)), picked))
        return out

    @staticmethod
    def storage_reply(fetch_id: int, files: Files, picked: list[int]) -> list[zmq.Frame]:
        batch = p.BatchReply()
        for i in picked:
            batch.manifest(files.manifests[i], files.contents[i])
        header = p.ok_reply(fetch_id, results=batch.results)
        route = {"t": "rep", "k": 0, "ok": True}
        return frames(p.encode(route), p.encode(header), bytes(batch.frame()))

    def run(self, path: str, files: Files, profile: cProfile.Profile | None) -> tuple[float, float]:
        """CPU seconds for ``path`` over ``files`` (set up untimed): the process's, and the
        loop's thread's alone."""
        todo: list[Any]
        if path == "fill":
            todo = self.fill_messages(files)
        elif path == "fills":
            todo = self.many_fill_messages(files)
        elif path == "hit":
            for message in self.fill_messages(files):  # what the PUTs before made
                self.dispatch(message)
            self.cache.flush()
            todo = self.get_messages(files)
        else:  # storage's replies made beforehand: the fetch ids are the service's next ones
            todo = []
            for request, picked in self.many_requests(files):
                self.fetch_id += 1
                todo.append(
                    (request, self.fetch_id, self.storage_reply(self.fetch_id, files, picked))
                )
        cpu, loop = time.process_time(), time.thread_time()
        if profile is not None:
            profile.enable()
        if path == "many":
            for request, fetch_id, reply in todo:
                self.link.requests.clear()
                self.dispatch(request)
                if [fetch["id"] for fetch in self.link.requests] != [fetch_id]:
                    raise AssertionError("the cache did not fetch as expected")
                self.dispatch(reply)
                worker._flush(self.service, log)  # type: ignore[arg-type]
        else:
            for i, message in enumerate(todo, 1):
                self.dispatch(message)
                if i % self.drain == 0:  # the end of a drain of the worker's loop
                    worker._flush(self.service, log)  # type: ignore[arg-type]
                    if self.gap:
                        time.sleep(self.gap)
            worker._flush(self.service, log)  # type: ignore[arg-type]
        loop = time.thread_time() - loop
        self.cache.flush()
        if profile is not None:
            profile.disable()
        return time.process_time() - cpu, loop

    def close(self) -> None:
        self.cache.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default="fill,fills,hit,many")
    ap.add_argument("--files", type=int, default=2000, help="new files per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--drain",
        type=int,
        default=4,
        help="messages per drain of the worker's loop, after which it calls the service's "
        "flush (1 to 64: from a light to a heavy load)",
    )
    ap.add_argument(
        "--cache-bytes",
        type=parse_size,
        default=CACHE_BYTES,
        help="the cache's bound (1G, fms up's; its window, 1 %%, is where fills wait before "
        "the disk)",
    )
    ap.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="seconds between drains of fill and hit messages (0.002 with --drain 1: 500 "
        "PUTs/s, as a cluster takes them), so the write-behind thread wakes as it does there",
    )
    ap.add_argument(
        "--s3gw",
        action="store_true",
        help="the files of benchmarks.s3gw (s3floor): the same names every round, 8 contents",
    )
    ap.add_argument("--profile", metavar="PATH", help="cProfile the timed loops into PATH")
    args = ap.parse_args(argv)
    use_digest(p.BLAKE3)
    profile = cProfile.Profile() if args.profile else None
    for path in args.paths.split(","):
        scratch = tempfile.mkdtemp(prefix="fms-cachecpu-")
        bench = Bench(scratch, args.drain, args.gap, args.cache_bytes)
        try:
            per_file, loop = [], []
            for r in range(args.rounds + 1):  # the first round warms up
                files = Files(f"{path}{r}", args.files, args.s3gw)
                seconds, in_loop = bench.run(path, files, profile if r else None)
                if r:
                    per_file.append(1e6 * seconds / args.files)
                    loop.append(1e6 * in_loop / args.files)
            print(
                f"cachecpu: {path}{' (s3gw)' if args.s3gw else ''}: "
                f"{statistics.median(per_file):.1f} µs CPU per 4 KiB file "
                f"(median of {args.rounds}; {min(per_file):.1f}-{max(per_file):.1f}), "
                f"of which the loop's thread {statistics.median(loop):.1f}, "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        finally:
            bench.close()
            shutil.rmtree(scratch, ignore_errors=True)
    if profile is not None:
        profile.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
