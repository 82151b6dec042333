"""The command line's one parser: every command, its options, its help with examples.

Each command is a function registered with :func:`command` (its name, one-line summary and
examples) that adds the command's own arguments.  :func:`build_parser` builds from them the
``fms`` parser (every command), ``client.py``'s (the client's commands) or the shell's (the
client's commands without the connection options: the shell is connected already).  Told which
command is about to run (``only``), it adds only that command's arguments: a parser of every
command costs more than ``fms stat`` takes to run.  A new command is a registered function here
and a handler in :data:`fms.cli.main.HANDLERS`.
"""

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import __version__
from .. import wire as p
from ..lazyre import compiled_on_use

DEFAULT_DATA = "./fms-data"
DEFAULT_CACHE_BYTES = "1G"
MAX_TIMEOUT = 24 * 3600.0  # seconds: the longest --timeout taken (a day per try)

_SIZE = compiled_on_use(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512M"`` -> 536870912.  Units are binary (K = 1024); a bare number is bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 4096, 512M or 2G")
    number, unit = match.groups()
    scale = {"": 1, "k": p.KiB, "m": p.MiB, "g": p.GiB, "t": 1024 * p.GiB}[unit.lower()]
    return int(float(number) * scale)


def parse_range(text: str) -> tuple[int, int | None]:
    """``--range``, as HTTP's Range header: ``"100-199"`` -> (100, 200), ``"100-"`` -> (100,
    None): from 100 to the end; ``"-100"`` -> (-100, None): the last 100 bytes."""
    suffix = re.fullmatch(r"\s*-\s*(\d+)\s*", text)
    if suffix:
        if int(suffix.group(1)) == 0:
            raise argparse.ArgumentTypeError("--range -0 asks for no bytes; give -N with N > 0")
        return -int(suffix.group(1)), None
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d*)\s*", text)
    if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte range; write START-END (inclusive, e.g. 0-1023), START- "
            f"(to the end) or -N (the last N bytes)"
        )
    return int(match.group(1)), int(match.group(2)) + 1 if match.group(2) else None


_AGE = compiled_on_use(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _timeout(text: str) -> float:
    """``--timeout``: more than 0 seconds (a try that may take no time would never be answered)
    and at most :data:`MAX_TIMEOUT`."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a timeout; give the seconds to wait for each reply, more than 0 "
            f"and at most {MAX_TIMEOUT:.0f} (e.g. 5 or 0.5)"
        )
    return value


def _version_number(text: str) -> int:
    """``--version V``: a version of a name, numbered from 1 as ``versions NAME`` shows them."""
    value = int(text.strip()) if re.fullmatch(r"\s*\d+\s*", text) else 0
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a version; versions are numbered from 1 (see: versions NAME)"
        )
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, minus its import of shutil (and through it bz2, lzma, zlib) to
    learn the terminal's width: every parser builds one, so every command paid for it."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            try:
                width = os.get_terminal_size(sys.stdout.fileno()).columns
            except (OSError, ValueError):
                width = int(os.environ.get("COLUMNS", 80))
            width -= 2  # as argparse does
        super().__init__(prog, indent_increment, max_help_position, width)


class _Filter(argparse.Action):
    """``--include`` / ``--exclude``: appended to one list in the order given, as
    ``("+" or "-", PATTERN)``, since the first rule that matches a path decides (rclone's
    filters; see :mod:`fms.cli.filters`)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        rules = list(getattr(namespace, self.dest, None) or [])
        rules.append(("+" if option_string == "--include" else "-", values))
        setattr(namespace, self.dest, rules)


class Parser(argparse.ArgumentParser):
    """An argparse parser that knows its commands' parsers (set by :func:`build_parser`)."""

    commands: dict[str, argparse.ArgumentParser]  # name -> its subparser


# --- the registry ---

AddArguments = Callable[[argparse.ArgumentParser], None]  # adds a command's own arguments


class Command(NamedTuple):
    """A command of the parser: ``add`` adds its arguments to its subparser.  (A NamedTuple,
    not a dataclass: dataclasses imports inspect, a fifth of a command's start-up.)"""

    name: str
    summary: str
    examples: str  # one per line; "{prog}" stands for the program's name
    add: AddArguments
    client: bool = True  # False: a daemon (fms broker, storage, cache, up)
    add_help: bool = True  # False: -h means something else (ls -h: human sizes, as ls(1))


COMMANDS: dict[str, Command] = {}  # name -> Command, in the order `fms --help` lists them


def command(
    name: str, summary: str, examples: str, client: bool = True, add_help: bool = True
) -> Callable[[AddArguments], AddArguments]:
    """Register the decorated ``add(subparser)`` as the command ``name``."""

    def register(add: AddArguments) -> AddArguments:
        COMMANDS[name] = Command(name, summary, examples, add, client, add_help)
        return add

    return register


# Options of the top-level parser that take a value: skipped when looking for the command.
_VALUED = {"--broker", "--timeout", "--log-level", "--curve-secret", "--server-key"}


def command_in(argv: list[str]) -> str | None:
    """The command ``argv`` asks for (the first word that is not an option or an option's
    value), or None if it names none of :data:`COMMANDS`."""
    words = iter(argv)
    for word in words:
        if word == "--":
            break
        if word.startswith("-"):
            if word in _VALUED:
                next(words, None)
            continue
        return word if word in COMMANDS else None
    return None


# Options of the top-level parser that print neither its help nor its list of commands.
_QUIET = {"-q", "--quiet", "--version"}


def lists_commands(argv: list[str]) -> bool:
    """Whether parsing ``argv`` may print the list of commands: it names no command, or
    something before its command is not plainly one of the connection options (``-h``,
    ``--help``, an abbreviation, ``-qh``, an unknown option).  If not, the parser need not
    list the commands it does not run."""
    command = command_in(argv)
    if command is None:
        return True
    words = iter(argv)
    for word in words:
        if word == command:
            return False
        if word in _VALUED:
            next(words, None)
        elif word not in _QUIET and word.split("=", 1)[0] not in _VALUED:
            return True
    return True


def build_parser(
    prog: str = "fms",
    client_only: bool = False,
    shell: bool = False,
    only: str | None = None,
    listed: bool = True,
) -> Parser:
    """The parser of ``fms`` (every command), of ``client.py`` (``client_only``: the client's
    commands) or of the shell (``shell``: the client's commands, no connection options, each
    command's usage without a program name).  ``only``: add the arguments of that command
    alone (the others are listed, not parseable); and with ``listed`` False, not even list
    the others (see :func:`lists_commands`), unless ``only`` is not one of this parser's."""
    common = _client_options()
    parser = Parser(
        prog=prog,
        formatter_class=_Formatter,
        parents=[] if shell else [common],
        description="fms: a file store with a cache tier, over ZeroMQ.",
        epilog="examples:\n"
        f"  {prog} put report.pdf docs/report.pdf\n"
        f"  {prog} get docs/report.pdf ./report.pdf\n"
        f"  {prog} ls docs/\n"
        + ("" if client_only or shell else f"  {prog} up            # a local cluster\n"),
    )
    if not shell:
        parser.add_argument("--version", action="version", version=f"fms {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=argparse.ArgumentParser
    )
    parser.commands = sub.choices  # name -> its subparser
    if only not in COMMANDS or not (COMMANDS[only].client or not (client_only or shell)):
        listed = True  # not a command of this parser: the error lists its commands
    for cmd in COMMANDS.values():
        if not cmd.client and (client_only or shell):
            continue
        if only is not None and cmd.name != only:
            if listed:
                sub.add_parser(cmd.name, help=cmd.summary, add_help=False)
            continue
        parents = ([] if shell else [common]) if cmd.client else [_daemon_options()]
        examples = cmd.examples.format(prog=prog if not shell else "").strip("\n")
        if shell:
            examples = "\n".join(line.strip() for line in examples.splitlines())
        sub_parser = sub.add_parser(
            cmd.name,
            prog=cmd.name if shell else None,
            help=cmd.summary,
            description=cmd.summary,
            formatter_class=_Formatter,
            parents=parents,
            add_help=cmd.add_help,
            epilog="examples:\n  " + examples.replace("\n", "\n  "),
        )
        if not cmd.add_help:
            sub_parser.add_argument("--help", action="help", help="show this help message and exit")
        cmd.add(sub_parser)
    return parser


def command_parser(command: str, prog: str) -> argparse.ArgumentParser:
    """The parser of a daemon's own script (``python broker.py``): the ``fms`` command's
    options and help, under the script's name."""
    cmd = build_parser("fms", only=command, listed=False).commands[command]
    cmd.prog = prog
    cmd.epilog = (cmd.epilog or "").replace(f"fms {command}", f"python {prog}")
    return cmd


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    # SUPPRESS: an option given before the command is not reset by the subcommand's default.
    common.add_argument(
        "--broker",
        metavar="ENDPOINT",
        default=argparse.SUPPRESS,
        help="broker frontend, tcp://HOST:PORT or HOST:PORT (default: $FMS_BROKER, else "
        "tcp://127.0.0.1:5555)",
    )
    common.add_argument(
        "--timeout",
        type=_timeout,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="seconds to wait for each reply, more than 0 (default: 5)",
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


def _daemon_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    parent.add_argument("--version", action="version", version=f"fms {__version__}")
    return parent


def _json(cmd: argparse.ArgumentParser, text: str = "print the result as JSON") -> None:
    cmd.add_argument("--json", action="store_true", help=text)


def _filters(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--include",
        action=_Filter,
        dest="filters",
        metavar="PATTERN",
        help="only paths matching PATTERN (relative to the tree; * and ? stop at '/', ** "
        "does not; a pattern without '/' matches the last part; repeatable: the first "
        "--include or --exclude that matches decides, and with any --include, what matches "
        "none is left out)",
    )
    cmd.add_argument(
        "--exclude",
        action=_Filter,
        dest="filters",
        metavar="PATTERN",
        help="leave out paths matching PATTERN (as --include)",
    )
    cmd.set_defaults(filters=[])


def _no_cache(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--no-cache",
        action="store_true",
        help="read from storage, not through the cache (a one-time read, e.g. a "
        "backup, that should not displace what others read often)",
    )


def _version_of(cmd: argparse.ArgumentParser, text: str) -> None:
    cmd.add_argument(
        "--version", type=_version_number, metavar="V", dest="version_number", help=text
    )


def _byte_range(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--range",
        type=parse_range,
        metavar="RANGE",
        help="only bytes START-END (inclusive, from 0), START- (to the end) or -N (the last "
        "N bytes), fetching only the chunks that hold them",
    )


# --- the client's commands ---


@command(
    "put",
    "upload a file, stdin, several files into a folder, or a folder tree with -r",
    """
{prog} put photo.jpg            # stored as 'photo.jpg'
{prog} put photo.jpg trips/1.jpg
{prog} put a.jpg b.jpg trips/   # trips/a.jpg, trips/b.jpg (as cp does)
{prog} put -r ./album trips      # trips/<every file under ./album>
{prog} put -r ./album trips --exclude '*.tmp'
tar c ./album | {prog} put - backups/album.tar   # from stdin""",
)
def _put(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-r", "--recursive", action="store_true", help="upload folder trees")
    cmd.add_argument(
        "local",
        metavar="LOCAL",
        nargs="+",
        help="local file(s) ('-': stdin; pipes and devices are read as streams), or folders "
        "with -r; then optionally the NAME to store under (default: the base name); with "
        "-r, a prefix; a NAME ending in '/', or several LOCALs, is a folder they go into",
    )
    _filters(cmd)
    _json(cmd)


@command(
    "get",
    "download a file, or every file under a prefix with -r",
    """
{prog} get trips/1.jpg             # to ./1.jpg
{prog} get trips/1.jpg /tmp/a.jpg
{prog} get trips/1.jpg - | wc -c   # to stdout
{prog} get big.bin - --range 1048576-1049599   # 1 KiB from 1 MiB on
{prog} get log.txt - --range -100   # its last 100 bytes
{prog} get -r trips ./restore      # keeps the tree
{prog} get -r trips ./restore --no-clobber --include '*.jpg'""",
)
def _get(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-r", "--recursive", action="store_true", help="download a prefix as a tree")
    cmd.add_argument(
        "-n",
        "--no-clobber",
        action="store_true",
        help="do not overwrite a local file that exists (as cp -n): skip it and say so",
    )
    _no_cache(cmd)
    cmd.add_argument(
        "--fsync",
        action="store_true",
        help="flush downloads to disk before renaming them into place (survives a "
        "power loss; slower)",
    )
    _version_of(cmd, "read version V, current or retained (see: versions NAME)")
    _byte_range(cmd)
    cmd.add_argument("name", metavar="NAME", help="stored name (a prefix with -r)")
    cmd.add_argument(
        "dest",
        metavar="DEST",
        nargs="?",
        help="destination file or folder, '-' for stdout (default: ./<base name>)",
    )
    _filters(cmd)
    _json(cmd)


@command(
    "cat",
    "write stored files to stdout, one after another",
    """
{prog} cat notes/todo.txt
{prog} cat logs/a.log logs/b.log | grep ERROR
{prog} cat logs/a.log --range -1000   # its last 1000 bytes""",
)
def _cat(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("names", metavar="NAME", nargs="+")
    _version_of(cmd, "read version V of the (one) NAME, current or retained")
    _byte_range(cmd)
    _no_cache(cmd)


@command(
    "ls",
    "list one level under a prefix (folders collapsed), or every name with -r",
    """
{prog} ls                 # top level: files and folders/
{prog} ls trips/ -lh
{prog} ls -r trips/ --json""",
    add_help=False,
)
def _ls(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "prefix",
        metavar="PREFIX",
        nargs="?",
        default="",
        help="only names starting so (a folder: end it with '/'); nothing there is an error",
    )
    cmd.add_argument(
        "-r", "--recursive", action="store_true", help="every name under PREFIX, not one level"
    )
    cmd.add_argument("-l", "--long", action="store_true", help="also version and digest")
    cmd.add_argument("-h", "--human", action="store_true", help="sizes as 1.5 MiB")
    _json(cmd, "print a JSON list of objects (folders as {name, folder: true})")


@command(
    "stat", "show a stored file's size, digest, mtime, version", "{prog} stat trips/1.jpg --json"
)
def _stat(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("name", metavar="NAME")
    _json(cmd, "print a JSON object")


@command(
    "rm",
    "remove stored names, names matching a pattern, or every name under a prefix with -r",
    """
{prog} rm trips/1.jpg trips/2.jpg
{prog} rm 'trips/*.tmp'             # * and ? stop at '/', ** does not
{prog} rm -r trips/                 # one request per 1000 names
{prog} rm -r trips/ --dry-run       # list what would go""",
)
def _rm(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "-r", "--recursive", action="store_true", help="remove every name under each prefix NAME/"
    )
    cmd.add_argument(
        "-n", "--dry-run", action="store_true", help="print what would be removed, remove nothing"
    )
    cmd.add_argument(
        "names",
        metavar="NAME",
        nargs="+",
        help="a name, or a pattern (* ? [..]) that names must match whole",
    )
    _json(cmd)


def _copy_args(cmd: argparse.ArgumentParser, verb: str) -> None:
    cmd.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help=f"{verb} every name under the prefix SRC/ to DST/<the rest of the name>",
    )
    cmd.add_argument("src", metavar="SRC")
    cmd.add_argument("dst", metavar="DST", help=f"new name; ending in '/': a folder to {verb} into")
    _json(cmd)


@command(
    "mv",
    "rename a stored file (atomic, no data moves), or a folder with -r",
    """
{prog} mv draft.txt final.txt
{prog} mv a.txt docs/     # docs/a.txt
{prog} mv -r old/ archive/2024   # archive/2024/<what was under old/>""",
)
def _mv(cmd: argparse.ArgumentParser) -> None:
    _copy_args(cmd, "mv")


@command(
    "cp",
    "copy a stored file on the server (metadata only: instant at any size), or a folder with -r",
    """
{prog} cp big.iso backup/big.iso
{prog} cp -r photos/ backup/      # backup/photos/...""",
)
def _cp(cmd: argparse.ArgumentParser) -> None:
    _copy_args(cmd, "cp")


@command(
    "versions",
    "list a name's current and retained versions",
    "{prog} versions notes.txt\n{prog} versions notes.txt --json",
)
def _versions(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("name", metavar="NAME")
    _json(cmd)


@command(
    "restore",
    "make a retained version current again (also after rm)",
    """
{prog} restore notes.txt             # the newest retained version
{prog} restore notes.txt --version 3""",
)
def _restore(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("name", metavar="NAME")
    _version_of(cmd, "which version (see: versions NAME); default the newest retained")
    _json(cmd)


@command(
    "du",
    "count the files and bytes under a prefix (from the store's index)",
    "{prog} du\n{prog} du trips/ -h\n{prog} du trips/ --json",
    add_help=False,
)
def _du(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    cmd.add_argument("-h", "--human", action="store_true", help="bytes as 1.5 MiB")
    _json(cmd)


@command(
    "find",
    "list names under a prefix matching a pattern or newer than a time",
    """
{prog} find --name '*.jpg'          # everywhere
{prog} find trips/ --name '*.jpg'
{prog} find --newer 2d              # changed in the last two days
{prog} find logs/ --newer 2026-11-01 --json""",
)
def _find(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "prefix",
        metavar="PREFIX",
        nargs="?",
        default="",
        help="where to look (default: everywhere)",
    )
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
    _json(cmd)


@command(
    "sync",
    "make DST hold what SRC holds, sending only files that differ",
    """
{prog} sync ./photos fms:photos/           # upload
{prog} sync fms:photos/ ./restore          # download
{prog} sync fms:photos/ fms:backup/photos/ # on the server: no data moves
{prog} sync ./photos fms:photos/ --delete --dry-run
{prog} sync ./photos fms:photos/ --exclude '*.tmp' --exclude 'cache/**'""",
)
def _sync(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("src", metavar="SRC", help="a local folder, or fms:PREFIX")
    cmd.add_argument("dst", metavar="DST", help="fms:PREFIX, or a local folder")
    cmd.add_argument(
        "--delete",
        action="store_true",
        help="also remove from DST what SRC does not hold (a mirror); refused when SRC holds "
        "nothing, and asked on a terminal before removing more than a few files",
    )
    cmd.add_argument(
        "--force",
        action="store_true",
        help="with --delete: delete even when SRC holds nothing, and do not ask",
    )
    cmd.add_argument(
        "--dry-run", "-n", action="store_true", help="print what would be done, do nothing"
    )
    _no_cache(cmd)
    _filters(cmd)
    _json(cmd)


@command(
    "stats",
    "show the live workers and the cache's counters",
    "{prog} stats --json",
)
def _stats(cmd: argparse.ArgumentParser) -> None:
    _json(cmd, "print a JSON object")


@command(
    "gc",
    "collect garbage now: free chunks no stored file uses",
    "{prog} gc --dry-run\n{prog} gc --grace 0      # everything unreferenced, now",
)
def _gc(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--grace",
        type=_seconds,
        metavar="SECONDS",
        help="collect chunks unreferenced for longer than this (default: the "
        "storage workers' --gc-grace; 0 also removes the chunks of uploads in "
        "progress, which then fail: at your own risk)",
    )
    cmd.add_argument("--dry-run", action="store_true", help="count what would be freed")
    _json(cmd, "print a JSON object")


@command(
    "fsck",
    "check that every stored file's chunks exist and match their hash",
    "{prog} fsck\n{prog} fsck --json",
)
def _fsck(cmd: argparse.ArgumentParser) -> None:
    _json(cmd, "print a JSON object")


@command(
    "mount",
    "mount the store (or a folder of it) as a local folder, over FUSE",
    "{prog} mount /mnt/fms                  # until Ctrl-C or fusermount -u /mnt/fms\n"
    "{prog} mount /mnt/photos --prefix photos --read-only --daemon",
)
def _mount(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty folder")
    cmd.add_argument("--prefix", default="", metavar="P", help="show only the folder P")
    cmd.add_argument("--read-only", action="store_true", help="refuse every change (EROFS)")
    cmd.add_argument(
        "--daemon", "-d", action="store_true", help="serve in the background once mounted"
    )
    cmd.add_argument(
        "--allow-other", action="store_true", help="let other users in (mode bits still apply)"
    )
    cmd.add_argument(
        "--cache-time",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="keep attributes and folder entries this long (default: 1)",
    )
    cmd.add_argument(
        "--spool",
        metavar="DIR",
        help="where written chunks wait for their commit (default: ~/.cache/fms/spool)",
    )
    cmd.add_argument(
        "--spool-size",
        type=parse_size,
        default="1G",
        metavar="SIZE",
        help="written bytes held there at most, all files together; past it whole chunks "
        "are uploaded early (default: 1G)",
    )
    cmd.add_argument(
        "--chunk-size",
        type=parse_size,
        default=str(p.DEFAULT_CHUNK_SIZE),
        metavar="SIZE",
        help="chunk size of the files made here (default: 1M; a file keeps the chunks it has)",
    )
    cmd.add_argument(
        "--writeback",
        action="store_true",
        help="commit small files in the background after close returns (faster for many "
        "small files; a failure after close is logged, not returned: see MOUNT.md)",
    )


@command(
    "keygen",
    "make a CURVE keypair: DIR/NAME.key (public), DIR/NAME.key_secret (private, mode 0600)",
    "{prog} keygen ./keys alice     # then give alice.key to the broker's operator",
)
def _keygen(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("dir", metavar="DIR")
    cmd.add_argument("name", metavar="NAME")
    _json(cmd, 'print the paths written as JSON: {"public": ..., "secret": ...}')


# --- users and permissions (fms.policy; handlers in admin.py) ---


@command("whoami", "show which identity this client's key is, and its grants", "{prog} whoami")
def _whoami(cmd: argparse.ArgumentParser) -> None:
    _json(cmd)


@command(
    "id",
    "manage identities: add, ls, rm, key (an admin of the whole store)",
    "{prog} id add alice --key alice.key\n"
    "{prog} id add s3gw --key gw.key --gateway   # the S3 gateway: acts for its users\n"
    "{prog} id add bob --s3                       # an S3 access key: shown once\n"
    "{prog} id ls\n{prog} id key alice --add laptop.key\n{prog} id rm bob",
)
def _id(cmd: argparse.ArgumentParser) -> None:
    actions = cmd.add_subparsers(dest="id_command", metavar="ACTION", required=True)

    def action(name: str, summary: str) -> argparse.ArgumentParser:
        return actions.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=_Formatter,
            parents=[_client_options()],
        )

    add = action("add", "create an identity")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="FILE",
        help="a CURVE public key file (.key) of it; repeat for more",
    )
    add.add_argument("--s3", action="store_true", help="make an S3 access key for it")
    add.add_argument(
        "--gateway",
        action="store_true",
        help="it may act for other identities (the S3 gateway's key)",
    )
    _json(add)
    _json(action("ls", "list identities, their keys and grants"))
    remove = action("rm", "remove an identity (its keys and grants; not its files)")
    remove.add_argument("name", metavar="NAME")
    _json(remove)
    key = action("key", "add or remove a key of an identity")
    key.add_argument("name", metavar="NAME")
    which = key.add_mutually_exclusive_group(required=True)
    which.add_argument("--add", metavar="FILE", help="a CURVE public key file (.key)")
    which.add_argument("--s3", action="store_true", help="make an S3 access key")
    which.add_argument("--remove", metavar="KEY", help="a CURVE key or an S3 access key id")
    _json(key)


@command(
    "grant",
    "give an identity a role (read, write, admin) on a prefix",
    "{prog} grant alice write alice\n{prog} grant bob read shared/photos\n"
    "{prog} grant root admin ''    # the whole store",
)
def _grant(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument(
        "role",
        metavar="ROLE",
        choices=("read", "write", "admin"),
        help="read: get, ls, stat, versions; write: also put, rm, mv, cp, restore; admin: "
        "everything under the prefix, also purge",
    )
    cmd.add_argument(
        "prefix",
        metavar="PREFIX",
        help="a folder: 'album' covers album and album/..., never albumX; '' is the whole store",
    )
    _json(cmd)


@command("revoke", "take an identity's grant on a prefix away", "{prog} revoke bob shared/photos")
def _revoke(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("prefix", metavar="PREFIX")
    _json(cmd)


@command(
    "purge",
    "remove a version, or every version, of a name for good (an admin's)",
    "{prog} purge shadow --all-versions   # then: gc --grace 0\n{prog} purge notes.txt --version 3",
)
def _purge(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("name", metavar="NAME")
    which = cmd.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--version",
        type=_version_number,
        metavar="V",
        dest="version_number",
        help="this version, current or retained (see: versions NAME)",
    )
    which.add_argument(
        "--all-versions", action="store_true", help="every version, and the name itself"
    )
    _json(cmd)


@command(
    "audit",
    "print the audit log: every change, who made it, when (an admin of the whole store)",
    "{prog} audit --since 1d\n{prog} audit --since 2026-11-01 --json",
)
def _audit(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--since",
        metavar="WHEN",
        type=parse_when,
        help="only entries after WHEN: a date (2026-11-01, 2026-11-01T08:30) or an age "
        "(90s, 30m, 12h, 7d)",
    )
    _json(cmd)


# --- the daemons ---


@command(
    "broker",
    "run the broker",
    "fms broker --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556",
    client=False,
)
def _broker(cmd: argparse.ArgumentParser) -> None:
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


@command(
    "storage",
    "run a storage worker (start more to scale out)",
    "fms storage --data ./fms-data/storage",
    client=False,
)
def _storage(cmd: argparse.ArgumentParser) -> None:
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
        "--digest",
        choices=p.DIGEST_FUNCTIONS,
        default=None,
        help="the digest function a new store records: blake3 (the default, several times "
        "faster) or sha256 (what stores made before the choice use); an existing store keeps "
        "its own, and naming another is refused",
    )
    cmd.add_argument(
        "--print-store-id",
        action="store_true",
        help="print the store's id (for the broker's --store) and exit",
    )


@command(
    "cache",
    "run the cache worker",
    "fms cache --dir ./fms-data/cache --max-bytes 2G",
    client=False,
)
def _cache(cmd: argparse.ArgumentParser) -> None:
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
        "the smaller of 48M and half of --max-bytes; 0: none)",
    )
    cmd.add_argument(
        "--max-file",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="files larger than this are read from storage, not cached (default: "
        "a quarter of --max-bytes)",
    )


@command(
    "up",
    "run a whole local cluster in the foreground (Ctrl-C stops it)",
    "fms up --storage 3 --cache-bytes 4G",
    client=False,
)
def _up(cmd: argparse.ArgumentParser) -> None:
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
    cmd.add_argument(
        "--s3",
        type=int,
        metavar="PORT",
        help="also run the S3 gateway and its console on http://127.0.0.1:PORT (keys in "
        "DATA/s3-keys.json, made once; needs the s3gw extra: pip install 'fms-store[s3gw]')",
    )
    _backend_args(cmd)
    _gc_grace_arg(cmd)
    _keep_versions_arg(cmd)
    _keep_for_arg(cmd)
    _log_arg(cmd)


@command(
    "s3",
    "run the S3 gateway and its web console (a client of the broker)",
    "fms s3 --port 9000                  # the store's identities' keys (fms id add NAME --s3)\n"
    "fms s3 --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem --curve-secret gw.key_secret "
    "--server-key broker.key",
    client=False,
)
def _s3(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--broker",
        metavar="ENDPOINT",
        help="broker frontend (default: $FMS_BROKER, else tcp://127.0.0.1:5555)",
    )
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    cmd.add_argument("--port", type=int, default=9000, help="port to listen on (%(default)s)")
    cmd.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    cmd.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    cmd.add_argument(
        "--keys",
        metavar="FILE",
        help="access keys besides the store's, acting as the gateway itself: a JSON list of "
        '{"access_key", "secret_key", "identity"}',
    )
    cmd.add_argument(
        "--access-key",
        metavar="ID",
        help="one such access key id (default: $FMS_S3_ACCESS_KEY)",
    )
    cmd.add_argument(
        "--secret-key", metavar="SECRET", help="its secret (default: $FMS_S3_SECRET_KEY)"
    )
    cmd.add_argument(
        "--key-cache",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a key looked up in the store is used before it is looked up again: a "
        "key removed from the store works this long at most (%(default)s)",
    )
    cmd.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without TLS (keys and data would cross the "
        "network in the clear)",
    )
    cmd.add_argument(
        "--curve-secret",
        metavar="FILE",
        help="the gateway's .key_secret, for a broker that requires CURVE",
    )
    cmd.add_argument("--server-key", metavar="FILE", help="the broker's public .key")
    _log_arg(cmd)


def _log_arg(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(%(default)s)",
    )


def _worker_args(cmd: argparse.ArgumentParser, kind: str) -> None:
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


def _backend_args(cmd: argparse.ArgumentParser) -> None:
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


def _keep_versions_arg(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--keep-versions",
        type=_count,
        default=0,
        metavar="N",
        help="keep the N newest versions an overwrite or rm replaces, per name, "
        "for `versions`, `get --version` and `restore` (%(default)s: none); "
        "their chunks stay until they drop out",
    )


def _keep_for_arg(cmd: argparse.ArgumentParser) -> None:
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


_DURATION = compiled_on_use(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """``--keep-for``: ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or bare seconds, as seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write it like 3600, 90m, 12h, 7d or 2w"
        )
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
    return float(match.group(1)) * scale


def _gc_grace_arg(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--gc-grace",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="keep an unreferenced chunk this long before collecting it (%(default)s)",
    )
