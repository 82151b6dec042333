"""The command line's one parser: every command, its options, its help with examples.  The
``fms`` script offers every command, ``client.py`` the client's, and each daemon script its own
command's options (see :func:`command_parser`)."""

import argparse
import os
import re

from .. import __version__
from .. import wire as p

DEFAULT_DATA = "./fms-data"
DEFAULT_CACHE_BYTES = "1G"

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
        prog=prog,
        formatter_class=_Formatter,
        parents=[common],
        description="fms: a file store with a cache tier, over ZeroMQ.",
        epilog="examples:\n"
        f"  {prog} put report.pdf docs/report.pdf\n"
        f"  {prog} get docs/report.pdf ./report.pdf\n"
        f"  {prog} ls docs/\n"
        + ("" if client_only else f"  {prog} up            # a local cluster\n"),
    )
    parser.add_argument("--version", action="version", version=f"fms {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices  # name -> its subparser (see command_parser)

    cmd = _sub(
        sub,
        "put",
        "upload a file, several into a folder, or a folder tree with -r",
        common,
        f"{prog} put photo.jpg            # stored as 'photo.jpg'\n"
        f"{prog} put photo.jpg trips/1.jpg\n"
        f"{prog} put a.jpg b.jpg trips/   # trips/a.jpg, trips/b.jpg (as cp does)\n"
        f"{prog} put -r ./album trips      # trips/<every file under ./album>",
    )
    cmd.add_argument("-r", "--recursive", action="store_true", help="upload folder trees")
    cmd.add_argument(
        "local",
        metavar="LOCAL",
        nargs="+",
        help="local file(s) (or folders with -r), then optionally the NAME to store "
        "under (default: the base name); with -r, a prefix; a NAME ending in "
        "'/', or several LOCALs, is a folder they go into",
    )
    _json_arg(cmd)

    cmd = _sub(
        sub,
        "get",
        "download a file, or every file under a prefix with -r",
        common,
        f"{prog} get trips/1.jpg             # to ./1.jpg\n"
        f"{prog} get trips/1.jpg /tmp/a.jpg\n"
        f"{prog} get trips/1.jpg - | wc -c   # to stdout\n"
        f"{prog} get big.bin - --range 1048576-1049599   # 1 KiB from 1 MiB on\n"
        f"{prog} get -r trips ./restore      # keeps the tree",
    )
    cmd.add_argument("-r", "--recursive", action="store_true", help="download a prefix as a tree")
    cmd.add_argument(
        "--no-cache",
        action="store_true",
        help="read from storage, not through the cache (a one-time read, e.g. a "
        "backup, that should not displace what others read often)",
    )
    cmd.add_argument(
        "--fsync",
        action="store_true",
        help="flush downloads to disk before renaming them into place (survives a "
        "power loss; slower)",
    )
    cmd.add_argument(
        "--version",
        type=int,
        metavar="V",
        dest="version_number",
        help="read version V, current or retained (see: versions NAME)",
    )
    cmd.add_argument(
        "--range",
        type=parse_range,
        metavar="START-END",
        help="only bytes START to END (inclusive, from 0; START- to the end), "
        "fetching only the chunks that hold them",
    )
    cmd.add_argument("name", metavar="NAME", help="stored name (a prefix with -r)")
    cmd.add_argument(
        "dest",
        metavar="DEST",
        nargs="?",
        help="destination file or folder, '-' for stdout (default: ./<base name>)",
    )
    _json_arg(cmd)

    cmd = _sub(
        sub,
        "ls",
        "list one level under a prefix (folders collapsed), or every name with -r",
        common,
        f"{prog} ls                 # top level: files and folders/\n"
        f"{prog} ls trips/ -lh\n{prog} ls -r trips/ --json",
        add_help=False,
    )
    cmd.add_argument(
        "prefix",
        metavar="PREFIX",
        nargs="?",
        default="",
        help="only names starting so (a folder: end it with '/')",
    )
    cmd.add_argument(
        "-r", "--recursive", action="store_true", help="every name under PREFIX, not one level"
    )
    cmd.add_argument("-l", "--long", action="store_true", help="also version and sha256")
    cmd.add_argument("-h", "--human", dest="human", action="store_true", help="sizes as 1.5 MiB")
    _json_arg(cmd, "print a JSON list of objects (folders as {name, folder: true})")

    cmd = _sub(
        sub,
        "stat",
        "show a stored file's size, sha256, mtime, version",
        common,
        f"{prog} stat trips/1.jpg --json",
    )
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(
        sub,
        "rm",
        "remove a stored name, or every name under a prefix with -r",
        common,
        f"{prog} rm trips/1.jpg\n{prog} rm -r trips/       # one request per 1000 names",
    )
    cmd.add_argument(
        "-r", "--recursive", action="store_true", help="remove every name under the prefix NAME/"
    )
    cmd.add_argument("name", metavar="NAME")
    _json_arg(cmd)

    for name, summary, example in (
        (
            "mv",
            "rename a stored file (atomic, no data moves)",
            f"{prog} mv draft.txt final.txt\n{prog} mv a.txt docs/     # docs/a.txt",
        ),
        (
            "cp",
            "copy a stored file on the server (metadata only: instant at any size)",
            f"{prog} cp big.iso backup/big.iso",
        ),
    ):
        cmd = _sub(sub, name, summary, common, example)
        cmd.add_argument("src", metavar="SRC")
        cmd.add_argument(
            "dst", metavar="DST", help=f"new name; ending in '/': a folder to {name} into"
        )
        _json_arg(cmd)

    cmd = _sub(
        sub,
        "versions",
        "list a name's current and retained versions",
        common,
        f"{prog} versions notes.txt\n{prog} versions notes.txt --json",
    )
    cmd.add_argument("name", metavar="NAME")
    _json_arg(cmd)

    cmd = _sub(
        sub,
        "restore",
        "make a retained version current again (also after rm)",
        common,
        f"{prog} restore notes.txt             # the newest retained version\n"
        f"{prog} restore notes.txt --version 3",
    )
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument(
        "--version",
        type=int,
        metavar="V",
        dest="version_number",
        help="which version (see: versions NAME); default the newest retained",
    )
    _json_arg(cmd)

    cmd = _sub(
        sub,
        "du",
        "count the files and bytes under a prefix (from the store's index)",
        common,
        f"{prog} du\n{prog} du trips/ --json",
    )
    cmd.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    _json_arg(cmd)

    cmd = _sub(
        sub,
        "find",
        "list names under a prefix matching a pattern or newer than a time",
        common,
        f"{prog} find trips/ --name '*.jpg'\n"
        f"{prog} find '' --newer 2d       # changed in the last two days\n"
        f"{prog} find logs/ --newer 2026-11-01 --json",
    )
    cmd.add_argument("prefix", metavar="PREFIX", help="where to look ('' for everywhere)")
    cmd.add_argument(
        "--name",
        metavar="GLOB",
        help="the last part of the name matches this shell pattern (* ? [..])",
    )
    cmd.add_argument(
        "--newer",
        metavar="WHEN",
        type=parse_when,
        help="mtime after WHEN: a date (2026-11-01, 2026-11-01T08:30) or an age "
        "(90s, 30m, 12h, 7d)",
    )
    _json_arg(cmd)

    cmd = _sub(
        sub,
        "sync",
        "make DST hold what SRC holds, sending only files that differ",
        common,
        f"{prog} sync ./photos fms:photos/           # upload\n"
        f"{prog} sync fms:photos/ ./restore          # download\n"
        f"{prog} sync ./photos fms:photos/ --delete --dry-run",
    )
    cmd.add_argument("src", metavar="SRC", help="a local folder, or fms:PREFIX")
    cmd.add_argument("dst", metavar="DST", help="fms:PREFIX, or a local folder")
    cmd.add_argument(
        "--delete",
        action="store_true",
        help="also remove from DST what SRC does not hold (a mirror)",
    )
    cmd.add_argument(
        "--dry-run", "-n", action="store_true", help="print what would be done, do nothing"
    )
    _json_arg(cmd)

    cmd = _sub(
        sub,
        "stats",
        "show the live workers and the cache's counters",
        common,
        f"{prog} stats --json",
    )
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(
        sub,
        "gc",
        "collect garbage now: free chunks no stored file uses",
        common,
        f"{prog} gc --dry-run\n{prog} gc --grace 0      # everything unreferenced, now",
    )
    cmd.add_argument(
        "--grace",
        type=_seconds,
        metavar="SECONDS",
        help="collect chunks unreferenced for longer than this (default: the "
        "storage workers' --gc-grace; 0 also removes the chunks of uploads in "
        "progress, which then fail: at your own risk)",
    )
    cmd.add_argument("--dry-run", action="store_true", help="count what would be freed")
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(
        sub,
        "fsck",
        "check that every stored file's chunks exist and match their hash",
        common,
        f"{prog} fsck\n{prog} fsck --json",
    )
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = _sub(
        sub,
        "keygen",
        "make a CURVE keypair: DIR/NAME.key (public), DIR/NAME.key_secret (private, mode 0600)",
        argparse.ArgumentParser(add_help=False),
        f"{prog} keygen ./keys alice     # then give alice.key to the broker's operator",
    )
    cmd.add_argument("dir", metavar="DIR")
    cmd.add_argument("name", metavar="NAME")

    from .admin import add_parsers

    add_parsers(sub, common, _sub, prog)  # users and permissions
    if not client_only:
        _daemon_parsers(sub)
    return parser


def _json_arg(cmd, text: str = "print the result as JSON"):
    cmd.add_argument("--json", action="store_true", help=text)


def parse_range(text: str) -> tuple:
    """``--range``: ``"100-199"`` -> (100, 200); ``"100-"`` -> (100, None)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d*)\s*", text)
    if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte range; write START-END (inclusive, e.g. 0-1023) or START-"
        )
    return int(match.group(1)), int(match.group(2)) + 1 if match.group(2) else None


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_when(text: str) -> float:
    """``--newer``: an ISO date or date and time (local time), or an age such as ``7d``, as
    seconds since the epoch."""
    import time
    from datetime import datetime

    match = _AGE.match(text)
    if match:
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
        return time.time() - float(match.group(1)) * scale
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a date (2026-11-01, 2026-11-01T08:30) nor an age (30m, 12h, 7d)"
        ) from None


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the subcommand's default.
    common.add_argument(
        "--broker",
        metavar="ENDPOINT",
        default=argparse.SUPPRESS,
        help="broker frontend (default: $FMS_BROKER, else tcp://127.0.0.1:5555)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="seconds to wait for each reply (default: 5)",
    )
    common.add_argument(
        "--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="print only errors"
    )
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log the client's own events at this level (default: WARNING)",
    )
    common.add_argument(
        "--curve-secret",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="this client's .key_secret, for a broker that requires CURVE "
        "(default: $FMS_CURVE_SECRET)",
    )
    common.add_argument(
        "--server-key",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the broker's public .key (default: $FMS_SERVER_KEY)",
    )
    return common


def _sub(sub, name: str, summary: str, parent, examples: str, parents=True, add_help=True):
    cmd = sub.add_parser(
        name,
        help=summary,
        description=summary,
        formatter_class=_Formatter,
        parents=[parent] if parents else [],
        add_help=add_help,
        epilog="examples:\n  " + examples.replace("\n", "\n  "),
    )
    if not add_help:  # -h means something else here (ls -h: human sizes, as ls(1))
        cmd.add_argument("--help", action="help", help="show this help message and exit")
    return cmd


def command_parser(parser: argparse.ArgumentParser, command: str, prog: str):
    """The subparser of ``command`` in ``parser``, renamed ``prog``: what a daemon's own script
    (``python broker.py``) parses, so its options and help are the ``fms`` command's."""
    cmd = parser.commands[command]
    cmd.prog = prog
    cmd.epilog = cmd.epilog.replace(f"fms {command}", f"python {prog}")
    return cmd


def _daemon_parsers(sub):
    empty = argparse.ArgumentParser(add_help=False)
    empty.add_argument("--version", action="version", version=f"fms {__version__}")
    cmd = _sub(
        sub,
        "broker",
        "run the broker",
        empty,
        "fms broker --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556",
    )
    _broker_args(cmd)
    cmd = _sub(
        sub,
        "storage",
        "run a storage worker (start more to scale out)",
        empty,
        "fms storage --data ./fms-data/storage",
    )
    _storage_args(cmd)
    cmd = _sub(
        sub,
        "cache",
        "run the cache worker",
        empty,
        "fms cache --dir ./fms-data/cache --max-bytes 2G",
    )
    _cache_args(cmd)
    cmd = _sub(
        sub,
        "up",
        "run a whole local cluster in the foreground (Ctrl-C stops it)",
        empty,
        "fms up --storage 3 --cache-bytes 4G",
    )
    cmd.add_argument("--frontend", default=p.DEFAULT_FRONTEND, help="client endpoint (%(default)s)")
    cmd.add_argument("--backend", default=p.DEFAULT_BACKEND, help="worker endpoint (%(default)s)")
    cmd.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="data folder: DATA/storage and DATA/cache (%(default)s)",
    )
    cmd.add_argument(
        "--storage", type=int, default=2, metavar="N", help="storage workers to start (%(default)s)"
    )
    cmd.add_argument(
        "--cache-bytes",
        type=parse_size,
        default=DEFAULT_CACHE_BYTES,
        metavar="SIZE",
        help="cache bound, e.g. 512M or 2G, shared by the cache workers (%(default)s)",
    )
    cmd.add_argument(
        "--caches",
        type=int,
        default=1,
        metavar="N",
        help="cache workers to start; they share the names and chunks by "
        "rendezvous hashing (%(default)s)",
    )
    cmd.add_argument(
        "--curve",
        action="store_true",
        help="require CURVE: make keys in DATA/keys (once) and use them",
    )
    cmd.add_argument(
        "--insecure", action="store_true", help="allow non-loopback endpoints without CURVE"
    )
    _backend_args(cmd)
    _gc_grace_arg(cmd)
    _keep_versions_arg(cmd)
    _keep_for_arg(cmd)
    _log_arg(cmd)


def _log_arg(cmd):
    cmd.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(%(default)s)",
    )


def _broker_args(cmd):
    cmd.add_argument(
        "--frontend", default=p.DEFAULT_FRONTEND, help="endpoint to bind for clients (%(default)s)"
    )
    cmd.add_argument(
        "--backend", default=p.DEFAULT_BACKEND, help="endpoint to bind for workers (%(default)s)"
    )
    cmd.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics",
    )
    cmd.add_argument(
        "--curve-secret",
        metavar="FILE",
        help="the broker's .key_secret: require CURVE on both sockets",
    )
    cmd.add_argument(
        "--allow",
        metavar="DIR",
        help="public .key files of clients that may do everything, as before identities "
        "(re-read live; logged); other clients are the store's identities: client.py id add",
    )
    cmd.add_argument(
        "--allow-workers",
        metavar="DIR",
        help="public .key files of the workers let in on the backend (re-read "
        "live); kept apart from --allow so a client key cannot act as a worker",
    )
    cmd.add_argument(
        "--store",
        metavar="ID",
        help="the store id storage workers must serve (print it with: "
        "storage_worker.py --print-store-id); required when the backend is "
        "reachable from other hosts; without it, the first storage worker's "
        "store is served",
    )
    cmd.add_argument(
        "--insecure", action="store_true", help="allow binding a non-loopback address without CURVE"
    )
    _log_arg(cmd)


def _worker_args(cmd, kind: str):
    cmd.add_argument(
        "--broker", default=p.DEFAULT_BACKEND, help="broker backend endpoint (%(default)s)"
    )
    cmd.add_argument("--id", help=f"worker id shown in stats (default: {kind}-HOST-PID)")
    cmd.add_argument(
        "--curve-secret",
        metavar="FILE",
        help="this worker's .key_secret, for a broker that requires CURVE",
    )
    cmd.add_argument("--server-key", metavar="FILE", help="the broker's public .key")
    _log_arg(cmd)


def _storage_args(cmd):
    _worker_args(cmd, "storage")
    cmd.add_argument(
        "--data",
        default=os.path.join(DEFAULT_DATA, "storage"),
        help="data directory; workers sharing it form one store (%(default)s); "
        "scratch only, with both --meta and --chunks",
    )
    _backend_args(cmd)
    _gc_grace_arg(cmd)
    _keep_versions_arg(cmd)
    _keep_for_arg(cmd)
    cmd.add_argument(
        "--print-store-id",
        action="store_true",
        help="print the store's id (for the broker's --store) and exit",
    )


def _backend_args(cmd):
    cmd.add_argument(
        "--meta",
        metavar="URL",
        help="metadata engine: postgresql://USER[:PASSWORD]@HOST:PORT/DB (default: "
        "SQLite in the data directory)",
    )
    cmd.add_argument(
        "--chunks",
        metavar="URL",
        help="chunk store: s3://BUCKET[/PREFIX], configured by AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (default: the "
        "data directory)",
    )


def _keep_versions_arg(cmd):
    cmd.add_argument(
        "--keep-versions",
        type=_count,
        default=0,
        metavar="N",
        help="keep the N newest versions an overwrite or rm replaces, per name, "
        "for `versions`, `get --version` and `restore` (%(default)s: none); "
        "their chunks stay until they drop out",
    )


def _keep_for_arg(cmd):
    cmd.add_argument(
        "--keep-for",
        type=parse_duration,
        default=0.0,
        metavar="DURATION",
        help="hold each version an overwrite or rm replaces for this long (90m, 12h, 7d, 2w, "
        "or seconds): no change by any key pushes it out before, even past --keep-versions; "
        "only an admin's purge removes it (%(default)s: no hold)",
    )
    cmd.add_argument(
        "--audit-days",
        type=float,
        default=90.0,
        metavar="DAYS",
        help="keep audit log entries this many days (%(default)s)",
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """``--keep-for``: ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or bare seconds, as seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write it like 3600, 90m, 12h, 7d or 2w"
        )
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
    return float(match.group(1)) * scale


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


def _gc_grace_arg(cmd):
    cmd.add_argument(
        "--gc-grace",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="keep an unreferenced chunk this long before collecting it (%(default)s)",
    )


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
    cmd.add_argument(
        "--dir", default=os.path.join(DEFAULT_DATA, "cache"), help="cache directory (%(default)s)"
    )
    cmd.add_argument(
        "--max-bytes",
        type=parse_size,
        default=DEFAULT_CACHE_BYTES,
        metavar="SIZE",
        help="cache bound, e.g. 512M or 2G (%(default)s)",
    )
    cmd.add_argument(
        "--memory-bytes",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="chunks also kept in memory, answered without a disk read (default: "
        "the smaller of 64M and half of --max-bytes; 0: none)",
    )
    cmd.add_argument(
        "--max-file",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="files larger than this are read from storage, not cached (default: "
        "a quarter of --max-bytes)",
    )
