"""Command-line entry points: ``fms`` (every command) and ``client.py`` (the client commands).

Each command parses its arguments, builds the object, runs it and sets the exit code:
0 success, 1 an fms error (printed as one line), 2 bad usage, 130 interrupted.
"""

import argparse
import datetime
import json
import os
import re
import signal
import sys
import time

from . import __version__
from . import wire as p
from .errors import FmsError, NotFound

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
DEFAULT_DATA = "./fms-data"
DEFAULT_CACHE_BYTES = "1G"
UP_STOP_TIMEOUT = 8.0      # seconds `fms up` waits for its processes to stop before killing them

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512M"`` -> 536870912.  Units are binary (K = 1024); a bare number is bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 4096, 512M or 2G")
    number, unit = match.groups()
    scale = {"": 1, "k": p.KiB, "m": p.MiB, "g": p.GiB, "t": 1024 * p.GiB}[unit.lower()]
    return int(float(number) * scale)


# --- the parser ---

class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser(prog: str = "fms", client_only: bool = False) -> argparse.ArgumentParser:
    common = _client_options()
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=_Formatter, parents=[common],
        description="fms: a file store with a cache tier, over ZeroMQ.",
        epilog="examples:\n"
               f"  {prog} put report.pdf docs/report.pdf\n"
               f"  {prog} get docs/report.pdf ./report.pdf\n"
               f"  {prog} ls docs/\n"
               + ("" if client_only else f"  {prog} up            # a local cluster\n"))
    parser.add_argument("--version", action="version", version=f"fms {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    cmd = _sub(sub, "put", "upload a file, or a folder tree with -r", common,
               f"{prog} put photo.jpg            # stored as 'photo.jpg'\n"
               f"{prog} put photo.jpg trips/1.jpg\n"
               f"{prog} put -r ./album trips      # trips/<every file under ./album>")
    cmd.add_argument("-r", "--recursive", action="store_true", help="upload a folder tree")
    cmd.add_argument("local", metavar="LOCAL", help="local file (or folder with -r)")
    cmd.add_argument("name", metavar="NAME", nargs="?",
                     help="name to store under (default: the base name); with -r, a prefix")

    cmd = _sub(sub, "get", "download a file, or every file under a prefix with -r", common,
               f"{prog} get trips/1.jpg             # to ./1.jpg\n"
               f"{prog} get trips/1.jpg /tmp/a.jpg\n"
               f"{prog} get trips/1.jpg - | wc -c   # to stdout\n"
               f"{prog} get -r trips ./restore      # keeps the tree")
    cmd.add_argument("-r", "--recursive", action="store_true", help="download a prefix as a tree")
    cmd.add_argument("--no-cache", action="store_true",
                     help="read from storage, not through the cache (a one-time read, e.g. a "
                          "backup, that should not displace what others read often)")
    cmd.add_argument("--fsync", action="store_true",
                     help="flush downloads to disk before renaming them into place (survives a "
                          "power loss; slower)")
    cmd.add_argument("name", metavar="NAME", help="stored name (a prefix with -r)")
    cmd.add_argument("dest", metavar="DEST", nargs="?",
                     help="destination file or folder, '-' for stdout (default: ./<base name>)")

    cmd = _sub(sub, "ls", "list stored names", common, f"{prog} ls\n{prog} ls trips/ --json")
    cmd.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="only names starting so")
    cmd.add_argument("--json", action="store_true", help="print a JSON list of objects")

    cmd = _sub(sub, "stat", "show a stored file's size, sha256, mtime, version", common,
               f"{prog} stat trips/1.jpg --json")
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(sub, "rm", "remove a stored name", common, f"{prog} rm trips/1.jpg")
    cmd.add_argument("name", metavar="NAME")

    cmd = _sub(sub, "stats", "show the live workers and the cache's counters", common,
               f"{prog} stats --json")
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(sub, "gc", "collect garbage now: free chunks no stored file uses", common,
               f"{prog} gc --dry-run\n{prog} gc --grace 0      # everything unreferenced, now")
    cmd.add_argument("--grace", type=_seconds, metavar="SECONDS",
                     help="collect chunks unreferenced for longer than this (default: the "
                          "storage workers' --gc-grace; 0 also removes the chunks of uploads in "
                          "progress, which then fail: at your own risk)")
    cmd.add_argument("--dry-run", action="store_true", help="count what would be freed")
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(sub, "fsck", "check that every stored file's chunks exist and match their hash",
               common, f"{prog} fsck\n{prog} fsck --json")
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(sub, "keygen", "make a CURVE keypair: DIR/NAME.key (public), "
               "DIR/NAME.key_secret (private, mode 0600)", argparse.ArgumentParser(add_help=False),
               f"{prog} keygen ./keys alice     # then give alice.key to the broker's operator")
    cmd.add_argument("dir", metavar="DIR")
    cmd.add_argument("name", metavar="NAME")

    if not client_only:
        _daemon_parsers(sub)
    return parser


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the subcommand's default.
    common.add_argument("--broker", metavar="ENDPOINT", default=argparse.SUPPRESS,
                        help="broker frontend (default: $FMS_BROKER, else tcp://127.0.0.1:5555)")
    common.add_argument("--timeout", type=float, metavar="SECONDS", default=argparse.SUPPRESS,
                        help="seconds to wait for each reply (default: 5)")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help="print only errors")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log the client's own events at this level (default: WARNING)")
    common.add_argument("--curve-secret", metavar="FILE", default=argparse.SUPPRESS,
                        help="this client's .key_secret, for a broker that requires CURVE "
                             "(default: $FMS_CURVE_SECRET)")
    common.add_argument("--server-key", metavar="FILE", default=argparse.SUPPRESS,
                        help="the broker's public .key (default: $FMS_SERVER_KEY)")
    return common


def _sub(sub, name: str, summary: str, parent, examples: str, parents=True):
    return sub.add_parser(name, help=summary, description=summary, formatter_class=_Formatter,
                          parents=[parent] if parents else [],
                          epilog="examples:\n  " + examples.replace("\n", "\n  "))


def _daemon_parsers(sub):
    empty = argparse.ArgumentParser(add_help=False)
    cmd = _sub(sub, "broker", "run the broker", empty,
               "fms broker --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556")
    _broker_args(cmd)
    cmd = _sub(sub, "storage", "run a storage worker (start more to scale out)", empty,
               "fms storage --data ./fms-data/storage")
    _storage_args(cmd)
    cmd = _sub(sub, "cache", "run the cache worker", empty,
               "fms cache --dir ./fms-data/cache --max-bytes 2G")
    _cache_args(cmd)
    cmd = _sub(sub, "up", "run a whole local cluster in the foreground (Ctrl-C stops it)", empty,
               "fms up --storage 3 --cache-bytes 4G")
    cmd.add_argument("--frontend", default=DEFAULT_FRONTEND, help="client endpoint (%(default)s)")
    cmd.add_argument("--backend", default=DEFAULT_BACKEND, help="worker endpoint (%(default)s)")
    cmd.add_argument("--data", default=DEFAULT_DATA,
                     help="data folder: DATA/storage and DATA/cache (%(default)s)")
    cmd.add_argument("--storage", type=int, default=2, metavar="N",
                     help="storage workers to start (%(default)s)")
    cmd.add_argument("--cache-bytes", type=parse_size, default=DEFAULT_CACHE_BYTES, metavar="SIZE",
                     help="cache bound, e.g. 512M or 2G, shared by the cache workers "
                          "(%(default)s)")
    cmd.add_argument("--caches", type=int, default=1, metavar="N",
                     help="cache workers to start; they share the names and chunks by "
                          "rendezvous hashing (%(default)s)")
    cmd.add_argument("--curve", action="store_true",
                     help="require CURVE: make keys in DATA/keys (once) and use them")
    cmd.add_argument("--insecure", action="store_true",
                     help="allow non-loopback endpoints without CURVE")
    _backend_args(cmd)
    _gc_grace_arg(cmd)
    _log_arg(cmd)


def _log_arg(cmd):
    cmd.add_argument("--log-level", default="INFO",
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(%(default)s)")


def _broker_args(cmd):
    cmd.add_argument("--frontend", default=DEFAULT_FRONTEND,
                     help="endpoint to bind for clients (%(default)s)")
    cmd.add_argument("--backend", default=DEFAULT_BACKEND,
                     help="endpoint to bind for workers (%(default)s)")
    cmd.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")
    cmd.add_argument("--curve-secret", metavar="FILE",
                     help="the broker's .key_secret: require CURVE on both sockets")
    cmd.add_argument("--allow", metavar="DIR",
                     help="public .key files of the clients let in (re-read live)")
    cmd.add_argument("--allow-workers", metavar="DIR",
                     help="public .key files of the workers let in on the backend (re-read "
                          "live); kept apart from --allow so a client key cannot act as a worker")
    cmd.add_argument("--store", metavar="ID",
                     help="the store id storage workers must serve (from the data directory); "
                          "without it, the first storage worker's store is served")
    cmd.add_argument("--insecure", action="store_true",
                     help="allow binding a non-loopback address without CURVE")
    _log_arg(cmd)


def _worker_args(cmd, kind: str):
    cmd.add_argument("--broker", default=DEFAULT_BACKEND,
                     help="broker backend endpoint (%(default)s)")
    cmd.add_argument("--id", help=f"worker id shown in stats (default: {kind}-HOST-PID)")
    cmd.add_argument("--curve-secret", metavar="FILE",
                     help="this worker's .key_secret, for a broker that requires CURVE")
    cmd.add_argument("--server-key", metavar="FILE", help="the broker's public .key")
    _log_arg(cmd)


def _storage_args(cmd):
    _worker_args(cmd, "storage")
    cmd.add_argument("--data", default=os.path.join(DEFAULT_DATA, "storage"),
                     help="data directory; workers sharing it form one store (%(default)s); "
                          "scratch only, with both --meta and --chunks")
    _backend_args(cmd)
    _gc_grace_arg(cmd)
    cmd.add_argument("--debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests


def _backend_args(cmd):
    cmd.add_argument("--meta", metavar="URL",
                     help="metadata engine: postgresql://USER[:PASSWORD]@HOST:PORT/DB (default: "
                          "SQLite in the data directory)")
    cmd.add_argument("--chunks", metavar="URL",
                     help="chunk store: s3://BUCKET[/PREFIX], configured by AWS_ENDPOINT_URL, "
                          "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (default: the "
                          "data directory)")


def _gc_grace_arg(cmd):
    cmd.add_argument("--gc-grace", type=_seconds, default=3600.0, metavar="SECONDS",
                     help="keep an unreferenced chunk this long before collecting it "
                          "(%(default)s)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _cache_args(cmd):
    _worker_args(cmd, "cache")
    cmd.add_argument("--dir", default=os.path.join(DEFAULT_DATA, "cache"),
                     help="cache directory (%(default)s)")
    cmd.add_argument("--max-bytes", type=parse_size, default=DEFAULT_CACHE_BYTES, metavar="SIZE",
                     help="cache bound, e.g. 512M or 2G (%(default)s)")
    cmd.add_argument("--memory-bytes", type=parse_size, default=None, metavar="SIZE",
                     help="chunks also kept in memory, answered without a disk read (default: "
                          "the smaller of 64M and half of --max-bytes; 0: none)")
    cmd.add_argument("--max-file", type=parse_size, default=None, metavar="SIZE",
                     help="files larger than this are read from storage, not cached (default: "
                          "an eighth of --max-bytes)")


# --- entry points ---

def main(argv=None) -> int:
    """The ``fms`` console script."""
    return _run(build_parser("fms"), argv)


def client_main(argv=None) -> int:
    """``python client.py``."""
    return _run(build_parser("client.py", client_only=True), argv)


def daemon_main(kind: str, argv=None) -> int:
    """``python broker.py`` / ``storage_worker.py`` / ``cache_worker.py``."""
    prog = f"{kind}.py" if kind == "broker" else f"{kind}_worker.py"
    examples = {"broker": "--frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556",
                "storage": "--broker tcp://127.0.0.1:5556 --data ./fms-data/storage",
                "cache": "--broker tcp://127.0.0.1:5556 --dir ./fms-data/cache --max-bytes 2G"}
    parser = argparse.ArgumentParser(prog=prog, description=f"Run the fms {kind}.",
                                     formatter_class=_Formatter,
                                     epilog=f"example:\n  python {prog} {examples[kind]}")
    parser.add_argument("--version", action="version", version=f"fms {__version__}")
    {"broker": _broker_args, "storage": _storage_args, "cache": _cache_args}[kind](parser)
    args = parser.parse_args(argv)
    args.command = kind
    return _dispatch(args, parser)


def _run(parser, argv) -> int:
    args = parser.parse_args(argv)
    if not args.command:
        return _shell(parser, args)
    return _dispatch(args, parser)


def _shell(parser, args) -> int:
    """No command: the interactive shell, keeping the options given before it."""
    from .shell import run_shell
    base = []
    for option in ("broker", "timeout", "curve_secret", "server_key"):
        if hasattr(args, option):
            base += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if getattr(args, "quiet", False):
        base.append("--quiet")

    def run(argv):
        return _dispatch(parser.parse_args([*base, *argv]), parser)

    with _client(args) as client:
        return run_shell(run, client, parser, client.broker)


def _dispatch(args, parser) -> int:
    handlers = {"put": cmd_put, "get": cmd_get, "ls": cmd_ls, "stat": cmd_stat, "rm": cmd_rm,
                "stats": cmd_stats, "gc": cmd_gc, "fsck": cmd_fsck, "keygen": cmd_keygen, "broker": cmd_broker, "storage": cmd_storage,
                "cache": cmd_cache, "up": cmd_up}
    try:
        return handlers[args.command](args) or EXIT_OK
    except FmsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not an error of ours.
        sys.stderr.close()
        return EXIT_OK


# --- client commands ---

PROGRESS_MIN = 1 * p.MiB   # transfers larger than this get a progress bar on a terminal


def _client(args):
    from .client import Client
    from .logutil import setup_logging
    setup_logging(getattr(args, "log_level", "WARNING"))
    progress = None
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        progress = _ProgressBars()
    from .security import client_keys
    curve = client_keys(getattr(args, "curve_secret", None), getattr(args, "server_key", None))
    return Client(getattr(args, "broker", None), timeout=getattr(args, "timeout", 5.0),
                  progress=progress, curve=curve, fsync=getattr(args, "fsync", False),
                  cache=not getattr(args, "no_cache", False))


class _ProgressBars:
    """One tqdm bar (percent, rate, ETA) per file over PROGRESS_MIN, on stderr."""

    def __init__(self):
        self.bar = None
        self.name = None

    def __call__(self, name: str, done: int, total: int):
        if total <= PROGRESS_MIN:
            return
        if self.bar is None or self.name != name:
            from tqdm import tqdm
            self.close()
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=name, file=sys.stderr, leave=True)
            self.name = name
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(args, text: str):
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def cmd_put(args):
    with _client(args) as client:
        if args.recursive:
            items = _local_tree(args.local, args.name)
            results = client.put_many(items)
            _say(args, f"uploaded {len(results)} files, "
                       f"{_human(sum(r['size'] for r in results))}")
        else:
            if os.path.isdir(args.local):
                raise FmsError(f"{args.local} is a folder; upload it with: put -r {args.local}")
            result = client.put(args.local, args.name)
            _say(args, f"uploaded {result['name']} ({_human(result['size'])}, "
                       f"version {result['version']})")


def _local_tree(folder: str, prefix) -> list:
    if not os.path.isdir(folder):
        raise FmsError(f"{folder} is not a folder")
    if prefix is None:
        prefix = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    prefix = prefix.strip("/")
    items = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for fname in sorted(files):
            path = os.path.join(root, fname)
            if not os.path.isfile(path):
                continue  # sockets, fifos, broken links
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            items.append((path, f"{prefix}/{rel}" if prefix else rel))
    if not items:
        raise FmsError(f"no files under {folder}")
    return items


def cmd_get(args):
    with _client(args) as client:
        if args.recursive:
            if args.dest is None or args.dest == "-":
                raise FmsError("get -r needs a destination folder: get -r PREFIX DESTDIR")
            prefix = args.name.strip("/")
            entries = client.ls(f"{prefix}/" if prefix else "")
            if not entries:
                raise NotFound(f"not found: no files under {args.name!r}; list names with: ls")
            items = [(e["name"], _inside(args.dest, e["name"][len(prefix) + 1 if prefix else 0:]))
                     for e in entries]
            results = client.get_many(items)
            _say(args, f"downloaded {len(results)} files, "
                       f"{_human(sum(r['size'] for r in results))} to {args.dest}")
            return
        if args.dest == "-":
            client.get_to(args.name, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        dest = args.dest or os.path.basename(args.name)
        if os.path.isdir(dest):
            dest = os.path.join(dest, os.path.basename(args.name))
        result = client.get(args.name, dest)
        _say(args, f"downloaded {result['name']} ({_human(result['size'])}) to {dest}")


def _inside(folder: str, rel: str) -> str:
    """``folder/rel``, refusing anything that would land outside ``folder``."""
    base = os.path.abspath(folder)
    path = os.path.abspath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base or path == base:
        raise FmsError(f"refusing to write {rel!r} outside {folder}")
    return path


def cmd_ls(args):
    # Printed page by page as they come: a listing of any length holds one page in memory.
    with _client(args) as client:
        entries = client.iter_ls(args.prefix)
        if args.json:
            print("[", end="")
            for i, e in enumerate(entries):
                print(("," if i else "") + "\n" + json.dumps(e), end="")
            print("\n]")
            return
        for e in entries:
            print(f"{e['size']:>14,}  {_when(e['mtime'])}  {e['name']}")


def cmd_gc(args):
    with _client(args) as client:
        freed = client.gc(args.grace, args.dry_run)
    if args.json:
        print(json.dumps(freed, indent=1))
        return
    verb = "would free" if args.dry_run else "freed"
    print(f"gc: {verb} {freed['chunks']:,} chunks, {_human(freed['bytes'])} "
               f"({freed['orphans']:,} orphans); dropped {freed['pruned']:,} old tombstones "
               f"and commit ids")


def cmd_fsck(args):
    totals = {"names": 0, "chunks": 0, "bytes": 0, "damaged": [], "orphans": 0,
              "refcount_errors": 0}
    with _client(args) as client:
        for page in client.fsck():
            for key in ("names", "chunks", "bytes"):
                totals[key] += page[key]
            totals["damaged"] += page["damaged"]
            if not args.json:
                for d in page["damaged"]:
                    print(f"{d['problem']} chunk {d['chunk']}: breaks {', '.join(d['names'])}")
            for key in ("orphans", "refcount_errors"):
                totals[key] = page.get(key, totals[key])
    bad = bool(totals["damaged"]) or totals["refcount_errors"] > 0
    if args.json:
        print(json.dumps({**totals, "ok": not bad}, indent=1))
    else:
        print(f"fsck: {totals['names']:,} files, {totals['chunks']:,} chunks "
              f"({_human(totals['bytes'])}) checked; {len(totals['damaged'])} damaged or missing; "
              f"{totals['orphans']:,} orphan chunks (collected by gc after the grace period); "
              f"{totals['refcount_errors']} reference counts wrong")
        if bad:
            print("fsck: files above cannot be read whole; upload them again to repair them",
                  file=sys.stderr)
    return EXIT_ERROR if bad else EXIT_OK


def cmd_stat(args):
    with _client(args) as client:
        info = client.stat(args.name)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key in ("name", "size", "sha256", "mtime", "version", "chunks", "chunk_size"):
        value = _when(info[key]) if key == "mtime" else info[key]
        print(f"{key + ':':<12}{value}")


def cmd_rm(args):
    with _client(args) as client:
        old = client.rm(args.name)
    _say(args, f"removed {old['name']}")


def cmd_stats(args):
    from .errors import Unavailable
    with _client(args) as client:
        status = client.status()
        try:
            cache = client.cache_stats()
        except Unavailable:
            cache = None
        try:
            store = client.usage()
        except Unavailable:
            store = None
    if cache is not None:
        # One worker's own figures (lookups, bytes held), then the tier's, counted by the
        # broker over every cache worker: GETs whose every piece came from the cache, bytes.
        cache = {**cache, **status.get("cache", {})}
    out = {"workers": status["workers"], "cache": cache, "store": store,
           "broker": status["broker"]}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    fds = out["broker"].get("fds") or {}
    print(f"broker  frontend={out['broker']['frontend']} backend={out['broker']['backend']}"
          f" descriptors={fds.get('open')}/{fds.get('soft')}")
    for w in out["workers"]:
        print(f"worker  {w['service']:<8} {w['id']:<28} {w['state']:<6} "
              f"inflight={w['inflight']} served={w['served']}")
    if cache is None:
        print("cache   none connected (reads go straight to storage)")
    else:
        gets = cache["get_hits"] + cache["get_misses"]
        ratio = f"{cache['get_hits'] / gets:.2f}" if gets else "-"
        print(f"cache   get_hits={cache['get_hits']} get_misses={cache['get_misses']} "
              f"hit_ratio={ratio} bytes_hit={_human(cache['bytes_hit'])} "
              f"bytes_missed={_human(cache['bytes_missed'])} "
              f"evictions={cache['evictions']} refused={cache['admissions_refused']}")
        print(f"cache   (one worker) bytes={_human(cache['bytes'])}/"
              f"{_human(cache['max_bytes'])} entries={cache['entries']} "
              f"lookups: hits={cache['hits']} misses={cache['misses']}")
    if store is None:
        print("store   no storage worker connected")
    else:
        print(f"store   files={store['files']} bytes={_human(store['bytes'])} "
              f"stored={_human(store['chunk_bytes'])} (after dedup)")


def cmd_keygen(args):
    from .security import keygen
    public, secret = keygen(args.dir, args.name)
    print(f"wrote {public} (public: give it to the broker's operator for its --allow folder)\n"
          f"wrote {secret} (secret, mode 0600: keep it on this machine only)")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# --- daemons ---

class _StopFlag:
    """Set by SIGINT/SIGTERM; the loops poll at least once a second and then return."""

    def __init__(self):
        self.stop = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_):
        self.stop = True

    def __call__(self):
        return self.stop


def cmd_broker(args):
    import logging

    from .broker import Broker
    from .logutil import setup_logging
    setup_logging(args.log_level)
    broker = Broker(args.frontend, args.backend, curve=_broker_curve(args), store=args.store)
    try:
        broker.bind()
        if args.metrics_port is not None:
            broker.metrics.serve(args.metrics_port)
            logging.getLogger("fms.broker").info(
                "event=metrics url=http://127.0.0.1:%d/metrics", args.metrics_port)
    except Exception as exc:  # zmq.ZMQError / OSError: address in use, bad endpoint
        raise FmsError(f"cannot bind: {exc}; is another broker running on these ports?") from None
    try:
        broker.run(_StopFlag())
    finally:
        broker.close()


def _broker_curve(args):
    """The broker's CurveServer, or None after checking that plaintext is safe to bind."""
    from .security import CurveServer, SecurityError, is_loopback
    given = [bool(args.curve_secret), bool(args.allow), bool(args.allow_workers)]
    if any(given) and not all(given):
        raise SecurityError("CURVE needs --curve-secret (the broker's .key_secret), --allow (a "
                            "folder of the clients' public .key files) and --allow-workers (a "
                            "folder of the workers' public .key files, apart from the clients' "
                            "so that a client key cannot act as a worker)")
    if args.curve_secret:
        import zmq
        return CurveServer(zmq.Context.instance(), args.curve_secret, args.allow,
                           args.allow_workers)
    exposed = [e for e in (args.frontend, args.backend) if not is_loopback(e)]
    if exposed and not args.insecure:
        raise SecurityError(
            f"refusing to bind {', '.join(exposed)} without encryption: anyone who can reach "
            f"it could read and overwrite every file. Use --curve-secret and --allow (README, "
            f"Security), or --insecure if the network is trusted")
    return None


def _worker_id(args, kind: str) -> str:
    return args.id or f"{kind}-{os.uname().nodename}-{os.getpid()}"


def _run_worker(args, service, ready: dict, log_name: str):
    import logging

    import zmq

    from .worker import BrokerLink, WorkerRefused, serve
    from .security import client_keys
    log = logging.getLogger(log_name)
    curve = client_keys(args.curve_secret, args.server_key)
    link = BrokerLink(zmq.Context.instance(), args.broker, ready, log, curve=curve)
    service.link = link
    try:
        serve(service, link, log, _StopFlag())
    except WorkerRefused as exc:
        log.error("event=refused reason=%r", str(exc))
        print(f"fms {ready['svc']}: refused by the broker: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        link.close()
    return EXIT_OK


def cmd_storage(args):
    from .logutil import setup_logging
    from .storage.engine import open_store
    from .storage.service import StorageService
    setup_logging(args.log_level)
    if args.data == os.path.join(DEFAULT_DATA, "storage"):
        os.makedirs(DEFAULT_DATA, exist_ok=True)  # the default just works; a given path must exist
    store = open_store(args.data, args.meta, args.chunks)
    store.chunks.clean_tmp()
    service = StorageService(store, None, gc_grace=args.gc_grace,
                             maintenance_store=open_store(args.data, args.meta, args.chunks),
                             delay=args.debug_delay)
    try:
        return _run_worker(args, service, {"svc": p.STORAGE, "wid": _worker_id(args, "storage"),
                                           "store": store.store_id}, "fms.storage")
    finally:
        service.close()


def cmd_cache(args):
    from .cache import CacheService, ChunkCache
    from .logutil import setup_logging
    setup_logging(args.log_level)
    try:
        chunks = ChunkCache(args.dir, args.max_bytes, args.memory_bytes)
    except OSError as exc:
        raise FmsError(f"cannot use cache directory {args.dir}: {exc.strerror}") from None
    service = CacheService(chunks, None, max_file=args.max_file)
    try:
        return _run_worker(args, service, {"svc": p.CACHE, "wid": _worker_id(args, "cache")},
                           "fms.cache")
    finally:
        chunks.close()


def cmd_up(args):
    """Start broker, cache and N storage workers as child processes; stop them all on Ctrl-C."""
    import subprocess
    if args.storage < 1:
        raise FmsError("--storage must be at least 1")
    if args.caches < 0:
        raise FmsError("--caches must be 0 or more")
    py = [sys.executable, "-m", "fms"]
    log = ["--log-level", args.log_level]
    os.makedirs(args.data, exist_ok=True)
    server, workers, client = [], [], None
    if args.curve:
        from .security import cluster_keys
        server, workers, client = cluster_keys(os.path.abspath(os.path.join(args.data, "keys")))
    insecure = ["--insecure"] if args.insecure else []
    # The store id comes from the storage directory, so the broker serves that store whichever
    # storage worker (or impostor) registers first.
    store = ["--store", _store_id(os.path.join(args.data, "storage"), args.meta, args.chunks)]
    specs = [("broker", py + ["broker", "--frontend", args.frontend, "--backend", args.backend]
              + server + store + insecure + log)]
    for i in range(args.caches):
        # One cache keeps ./cache as before; several split the bound, each in a folder of its own.
        name = "cache" if args.caches == 1 else f"cache-{i + 1}"
        specs.append((name, py + ["cache", "--broker", args.backend, "--dir",
                                  os.path.join(args.data, name), "--id", name, "--max-bytes",
                                  str(args.cache_bytes // args.caches)] + workers + log))
    for i in range(args.storage):
        specs.append((f"storage-{i + 1}", py + ["storage", "--broker", args.backend, "--data",
                                                os.path.join(args.data, "storage"),
                                                "--id", f"storage-{i + 1}",
                                                "--gc-grace", str(args.gc_grace)]
                      + (["--meta", args.meta] if args.meta else [])
                      + (["--chunks", args.chunks] if args.chunks else [])
                      + workers + log))
    stop = _StopFlag()
    procs = []
    try:
        for name, cmd in specs:
            procs.append((name, subprocess.Popen(cmd)))
        hint = "python client.py put FILE"
        if client:
            hint = (f"python client.py --curve-secret {client[0]} --server-key {client[1]} "
                    f"put FILE")
        print(f"fms up: broker at {args.frontend} (workers on {args.backend}), {args.caches} "
              f"cache and {args.storage} storage workers, data in {os.path.abspath(args.data)}"
              f"{', CURVE on' if args.curve else ''}\n"
              f"fms up: try `{hint}` in another terminal; Ctrl-C stops all",
              file=sys.stderr, flush=True)
        while not stop():
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"fms up: {name} exited with code {proc.returncode}; stopping the "
                          f"cluster", file=sys.stderr)
                    return EXIT_ERROR
            time.sleep(0.2)  # polling child processes; nothing to synchronise with
        return EXIT_OK
    finally:
        _stop_all(procs)


def _store_id(data: str, meta: str | None, chunks: str | None) -> str:
    """The id of the store the storage workers will open (made now if it is new)."""
    from .storage.engine import open_store
    store = open_store(data, meta, chunks)
    try:
        return store.store_id
    finally:
        store.close()


def _stop_all(procs):
    import subprocess
    for _name, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + UP_STOP_TIMEOUT
    for name, proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"fms up: {name} did not stop in time; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
