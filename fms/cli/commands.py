"""The client's commands: each takes the parsed arguments, opens a :class:`fms.Client`, runs,
prints, and returns an exit code (None for success).  Commands that change many stored names
(``rm``, ``cp -r``, ``mv -r``) are in :mod:`.remote`, ``sync`` in :mod:`.sync`; the local
paths they read and write are checked by :mod:`.local`."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import sys
from argparse import Namespace
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol, TypedDict, TypeVar, cast

from .. import wire as p
from ..errors import FmsError, NotFound
from . import local
from .main import EXIT_ERROR, EXIT_OK

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..client.api import Client
    from ..client.download import RemoteFile
    from ..client.upload import Done

PROGRESS_MIN = 1 * p.MiB  # transfers larger than this get a progress bar on a terminal
CURVE_ENV = ("FMS_CURVE_SECRET", "FMS_SERVER_KEY")


def cmd_mount(args: Namespace) -> int | None:
    from functools import partial

    from .. import mount

    with open_client(args) as client:  # the options of every client command, for each thread
        factory = partial(type(client), client.broker, timeout=client.session.timeout)
        factory = partial(factory, curve=client.session.curve)
    return mount.run(
        args.mountpoint,
        factory,
        prefix=args.prefix,
        read_only=args.read_only,
        daemon=args.daemon,
        allow_other=args.allow_other,
        cache_time=args.cache_time,
        spool=args.spool,
        spool_bytes=args.spool_size,
        chunk_size=args.chunk_size,
        writeback=args.writeback,
    )


@contextlib.contextmanager
def open_client(args: Namespace) -> Iterator[Client]:
    """The :class:`fms.Client` a command runs on: the shell's own (``args.shell_client``),
    or a new one, closed at the end."""
    shared = getattr(args, "shell_client", None)
    progress = None
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        progress = _ProgressBars()
    if shared is not None:
        shared.progress = progress
        shared.fsync = getattr(args, "fsync", False)
        shared.cache = not getattr(args, "no_cache", False)
        yield shared
        return
    from ..client import Client

    if hasattr(args, "log_level"):  # else nothing to configure: the client logs no INFO
        from ..logutil import setup_logging

        setup_logging(args.log_level)
    curve = None
    secret, server = getattr(args, "curve_secret", None), getattr(args, "server_key", None)
    if secret or server or any(os.environ.get(name) for name in CURVE_ENV):
        from ..security import client_keys  # only with keys: it imports zmq.auth and more

        curve = client_keys(secret, server)
    with Client(
        getattr(args, "broker", None),
        timeout=getattr(args, "timeout", 5.0),
        progress=progress,
        curve=curve,
        fsync=getattr(args, "fsync", False),
        cache=not getattr(args, "no_cache", False),
    ) as client:
        yield client


class _ProgressBars:
    """Progress on stderr, drawn by tqdm (percent, rate, ETA): for one file over PROGRESS_MIN,
    a bar of its digests being computed (before an upload, ``hashing``), then on the same line a
    new bar of its chunks moving; for a tree (between ``tree`` and ``close``), one bar of all
    its bytes with the files done beside it, moved as each file is done."""

    def __init__(self) -> None:
        self.bar: tqdm[NoReturn] | None = None
        self.key: tuple[str, str] | None = None  # (name, phase) the bar draws
        self.files: list[int] | None = None  # in a tree: [done, of]
        self.base = 0  # in a tree: the bytes of the files done

    def hashing(self, name: str, done: int, total: int) -> None:
        if self.files is None:
            self._file((name, "hashing"), done, total, f"{name} (hashing)")

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if self.files is not None and self.bar is not None:
            self.bar.update(self.base + min(done, total or done) - self.bar.n)
            return
        self._file((name, "move"), done, total, name)
        if total is not None and done >= total:
            self.close()

    def _file(self, key: tuple[str, str], done: int, total: int | None, desc: str) -> None:
        if total is not None and total <= PROGRESS_MIN:
            return
        bar = self.bar
        if self.key != key or bar is None:
            # A fresh bar for each phase: a bar reset to 0 keeps its rate and its pace of
            # redrawing, which the hashing set (the upload's bar sat at 0 %, then showed TB/s).
            self.close(keep=False)
            bar = self.bar = _bar(total, desc, leave=key[1] != "hashing")
            self.key = key
        bar.update(done - bar.n)
        if key[1] == "hashing" and total is not None and done >= total:
            bar.refresh()  # drawn at 100 % before the upload takes the line

    def tree(self, files: int, nbytes: int, verb: str) -> None:
        """A tree of ``files`` files and ``nbytes`` bytes starts moving."""
        self.close()
        self.bar = _bar(nbytes, verb)
        self.files, self.base = [0, files], 0
        self.bar.set_postfix_str(f"files 0/{files:,}")

    def file_done(self, nbytes: int, done: int) -> None:
        """The tree's ``done``-th file (of ``nbytes`` bytes) is done."""
        assert self.bar is not None, "tree() comes first"
        self.base += nbytes
        self.bar.update(self.base - self.bar.n)
        self.count(done)

    def count(self, done: int) -> None:
        """Show ``done`` files done (also after a Ctrl-C that struck between a file's end and
        its drawing, so that the bar's last count is the one the command reports)."""
        if self.files is not None and self.bar is not None:
            self.files[0] = done
            self.bar.set_postfix_str(f"files {done:,}/{self.files[1]:,}", refresh=False)

    def close(self, keep: bool = True) -> None:
        if self.bar is not None:
            if self.files is not None:  # the count as it is now, even if a signal cut in
                self.bar.set_postfix_str(f"files {self.files[0]:,}/{self.files[1]:,}", False)
            if keep:
                self.bar.refresh()  # the last counts, whatever tqdm's pace of redrawing
            self.bar.close()
            self.bar = None
        self.files = None
        self.key = None


def _bar(total: int | None, desc: str, leave: bool = True) -> tqdm[NoReturn]:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        leave=leave,
    )


class _Move(Protocol):
    """``client.put_many`` or ``client.get_many``."""

    def __call__(
        self, items: Iterable[tuple[str, str]], done: Done | None = None
    ) -> list[dict[str, Any]]: ...


class _Get(Protocol):
    """``client.get_many``, which runs ``before()`` once before it writes anything."""

    def __call__(
        self,
        items: Iterable[tuple[str, str]],
        done: Done | None = None,
        before: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]: ...


def move_tree(
    client: Client,
    move: _Move,
    items: list[tuple[str, str]],
    sizes: list[int],
    verb: str,
    before: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """``move(items, done=...)`` (``client.put_many`` or ``get_many``), drawing one bar for the
    whole tree when progress is drawn, moved as each file is done.  Interrupted (Ctrl-C), it
    says how many files were done first.  ``before``: checks ``move`` (then ``get_many``) runs
    before it writes anything; the bar is drawn once they pass, so a tree they refuse shows
    only why.  :return: the results, in order."""
    bars = client.progress if isinstance(client.progress, _ProgressBars) else None
    finished: list[int] = []

    def start() -> None:
        if before is not None:
            before()
        if bars is not None and len(items) > 1:
            bars.tree(len(items), sum(sizes), verb)

    def done(i: int, _stat: dict[str, Any]) -> None:
        finished.append(i)
        if bars is not None and bars.files is not None:
            bars.file_done(sizes[i], len(finished))

    if before is None:
        start()
    try:
        if before is not None:
            return cast("_Get", move)(items, done=done, before=start)
        return move(items, done=done)
    except KeyboardInterrupt:
        if bars is not None and bars.bar is not None:
            bars.count(len(finished))
        if len(items) > 1:
            counted = bars.files[0] if bars is not None and bars.files else len(finished)
            # A batch whose reply was on its way may have been committed too: "at least".
            print(
                f"{verb}: interrupted after {counted:,} of {len(items):,} files were done (maybe "
                f"a few more); run it again for the rest",
                file=sys.stderr,
            )
        raise
    finally:
        if bars is not None:
            bars.close()


def shown(name: str) -> str:
    """``name`` as a terminal should show it: each character that is not printable (a control
    or format character, a line separator, a bidi control of a name stored before they were
    refused) as ``\\uXXXX`` (and ``\\`` doubled then), so no name rewrites the line or looks
    like another."""
    if name.isprintable():
        return name
    out = []
    for char in name:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def say(args: Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def print_result(args: Namespace, result: object, text: str) -> None:
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        say(args, text)


def folder_hint(
    client: Client, name: str, command: str, recursive: bool = False
) -> FmsError | None:
    """If ``name`` is a folder (names are stored under ``name/``): the error saying so and
    what to run instead; if it is a file asked for as a folder (``name/``, or ``recursive``:
    ``get -r``), the error saying that; else None."""
    prefix = name.strip("/") + "/"
    if prefix == "/":
        return None
    try:
        held = client.du(prefix)["files"]
    except FmsError:
        return None
    if not held:
        return file_hint(client, name, command) if name.endswith("/") or recursive else None
    folder = prefix.rstrip("/")
    advice = {
        "get": f"get -r {folder} DESTDIR",
        "cat": f"ls -r {folder}/ to list its files",
        "stat": f"du {folder}/, or ls {folder}/",
        "rm": f"rm -r {folder}/",
        "cp": f"cp -r {folder}/ DST",
        "mv": f"mv -r {folder}/ DST",
        "versions": f"ls -r {folder}/",
        "restore": f"ls -r {folder}/",
    }.get(command, f"ls {folder}/")
    return NotFound(f"{folder!r} is a folder ({files(held)} under {prefix}); use: {advice}")


def file_hint(client: Client, name: str, command: str) -> FmsError | None:
    """If ``name`` (``file/``, or the name of ``get -r``) names a stored file, not a folder:
    the error saying so and what to run instead; else None."""
    file = name.rstrip("/")
    if not file:
        return None
    try:
        client.stat(file)
    except FmsError:
        return None
    if command == "get" and not name.endswith("/"):
        return NotFound(f"{file!r} is a file, not a folder; get it without -r: get {file}")
    return NotFound(f"{file!r} is a file, not a folder; drop the trailing slash: {command} {file}")


@contextlib.contextmanager
def hinting(
    client: Client, name: str, command: str, errors: type[FmsError] = NotFound
) -> Iterator[None]:
    """An error of the kinds ``errors`` about ``name`` becomes the folder hint when ``name``
    is a folder (a not found; for get, also a local folder in the way of a remote one)."""
    try:
        yield
    except errors:
        hint = folder_hint(client, name, command)
        if hint is None:
            raise
        raise hint from None


# --- put ---


def cmd_put(args: Namespace) -> None:
    from .filters import selector

    wanted = selector(args.filters)
    if args.filters and not args.recursive:
        raise FmsError("--include and --exclude choose files in a tree: give them with put -r")
    items, streams = _put_items(args.local, args.recursive, wanted)
    with open_client(args) as client:
        results: list[dict[str, Any]] = []
        if items:
            results += move_tree(
                client, client.put_many, items, [_local_size(path) for path, _ in items], "put"
            )
        for stream, name in streams:
            with stream.open() as f:
                results.append(client.put_stream(f, name))
    if args.json:
        print(json.dumps(results, indent=1))
    elif len(results) == 1 and not args.recursive:
        r = results[0]
        say(args, f"uploaded {shown(r['name'])} ({human(r['size'])}, version {r['version']})")
    else:
        say(args, f"uploaded {files(len(results))}, {human(sum(r['size'] for r in results))}")


def _local_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # put_many says what is wrong with it


def _put_items(
    paths: list[str], recursive: bool, wanted: Callable[[str], bool] | None = None
) -> tuple[list[tuple[str, str]], list[tuple[local.Stream, str]]]:
    """``([(local path, name)], [(Stream, name)])`` for ``put [-r] LOCAL... [NAME]``, as
    ``cp`` reads its arguments: one LOCAL and a NAME: stored as NAME (with -r, NAME is the
    prefix); a NAME ending in '/', or several LOCALs: each goes into that folder under its base
    name.  Every source is checked before anything is sent."""
    sources, dest = (paths, None) if len(paths) == 1 else (paths[:-1], paths[-1])
    into = dest is not None and (dest.endswith("/") or len(sources) > 1)
    if sources.count(local.STDIN) > 1:
        raise FmsError("stdin ('-') can be read once: give it once")
    items: list[tuple[str, str]] = []
    streams: list[tuple[local.Stream, str]] = []
    for path in sources:
        kind = local.source(path, recursive)
        base = os.path.basename(os.path.normpath(os.path.abspath(path)))
        if isinstance(kind, local.Stream):
            if dest is None or (into and path == local.STDIN):
                raise FmsError(f"put {path} needs the NAME to store it under: put {path} NAME")
            streams.append((kind, f"{dest.strip('/')}/{base}".lstrip("/") if into else dest))
            continue
        name = f"{dest.strip('/')}/{base}".lstrip("/") if into and dest is not None else dest
        if kind == "folder":
            items += local.tree(path, name, wanted)
        else:
            items.append((path, name if name is not None else base))
    return items, streams


# --- get and cat ---


def cmd_get(args: Namespace) -> None:
    with open_client(args) as client:
        if args.recursive:
            _get_tree(args, client)
            return
        if args.filters:
            raise FmsError("--include and --exclude choose files in a tree: give them with get -r")
        if args.name.endswith("/"):
            raise folder_hint(client, args.name, "get") or NotFound(
                f"not found: no files under {args.name!r}; list names with: ls"
            )
        with hinting(client, args.name, "get", FmsError):
            if args.dest == "-":
                _to_stdout(args, client, args.name)
                return
            dest = local.file_dest(args.dest, args.name)
            if args.no_clobber and local.clobbers(dest):
                _skipped(args, args.name, dest)
                return
            if args.range is not None:
                _get_range(args, client, args.name, dest)
                return
            result = client.get(args.name, dest, args.version_number)
    print_result(
        args, result, f"downloaded {shown(result['name'])} ({human(result['size'])}) to {dest}"
    )


def _skipped(args: Namespace, name: str, dest: str) -> None:
    print_result(
        args,
        {"name": name, "dest": dest, "skipped": True},
        f"skipped {shown(name)}: {dest} exists (--no-clobber)",
    )


def _get_tree(args: Namespace, client: Client) -> None:
    from .filters import selector

    if args.dest is None or args.dest == "-":
        raise FmsError("get -r needs a destination folder: get -r PREFIX DESTDIR")
    if args.range is not None or args.version_number is not None:
        raise FmsError("--range and --version read one file: give them without -r")
    wanted = selector(args.filters)
    prefix = args.name.strip("/")
    entries: list[tuple[dict[str, Any], str]] = []  # (stat, local path)
    for e in client.iter_ls(f"{prefix}/" if prefix else ""):
        rel = e["name"][len(prefix) + 1 if prefix else 0 :]
        if wanted is None or wanted(rel):
            entries.append((e, local.inside(args.dest, rel)))
    if not entries:
        if wanted is not None:
            raise NotFound(f"no files under {args.name!r} that the filters let through")
        raise folder_hint(client, args.name, "get", recursive=True) or NotFound(
            f"not found: no files under {args.name!r}; list names with: ls"
        )
    items = [(e["name"], dest) for e, dest in entries]
    skipped: list[str] = []
    # The destination is checked before anything is written: while the first batches are on
    # their way, or first with --no-clobber (what it skips is then not asked for).
    check = functools.partial(local.check_tree, items)
    if args.no_clobber:
        check()
        skipped = [dest for _name, dest in items if local.clobbers(dest)]
        gone = set(skipped)
        entries = [(e, dest) for e, dest in entries if dest not in gone]
        items = [(name, dest) for name, dest in items if dest not in gone]
    results: list[dict[str, Any]] = []
    if items:
        sizes = [e["size"] for e, _dest in entries]
        before = None if args.no_clobber else check
        results = move_tree(client, client.get_many, items, sizes, "get", before)
    if args.json:
        out = [*results, *({"dest": d, "skipped": True} for d in skipped)]
        print(json.dumps(out, indent=1))
        return
    kept = f", {len(skipped):,} skipped (they exist: --no-clobber)" if skipped else ""
    say(
        args,
        f"downloaded {files(len(results))}, {human(sum(r['size'] for r in results))} to "
        f"{args.dest}{kept}",
    )


RANGE_PIECE = 1 * p.MiB  # bytes a ranged get reads and writes at a time


def _range_of(src: RemoteFile, start: int, end: int | None) -> tuple[int, int]:
    """``--range``'s bytes ``start`` to ``end`` (None: the end; ``start`` < 0: the last -start
    bytes, as HTTP's suffix range) of the open remote file ``src``, as (first byte, byte after
    the last).

    :raises FmsError: ``start`` is past the end of the file (HTTP's 416)."""
    if start < 0:
        start = max(0, src.size + start)
    elif start >= src.size:  # nothing of the file is in the range
        raise FmsError(
            f"--range starts at byte {start:,}, past the end of {shown(src.name)} "
            f"({src.size:,} bytes: 0-{src.size - 1:,})"
            if src.size
            else f"--range starts at byte {start:,}, but {shown(src.name)} is empty"
        )
    end = src.size if end is None else min(end, src.size)
    return start, max(start, end)


def _copy_range(src: RemoteFile, start: int, end: int, out: BinaryIO) -> None:
    """Bytes ``start`` up to ``end`` (from :func:`_range_of`) of the open remote file ``src``
    to the stream ``out``; only the chunks that hold them are fetched."""
    src.seek(start)
    left = end - start
    while left:
        piece = src.read(min(left, RANGE_PIECE))
        if not piece:
            break
        out.write(piece)
        left -= len(piece)


def _get_range(args: Namespace, client: Client, name: str, dest: str | None) -> None:
    """``get NAME [DEST] --range RANGE``: to stdout (``dest`` None), into a destination that is
    not a regular file (a pipe, a device), or to a file written whole or not at all."""
    from ..client.download import atomic_file, destination, in_place

    if args.version_number is not None:
        raise FmsError("--range reads the current version: give --version without it")
    with client.open(name) as src:
        start, end = _range_of(src, *args.range)
        if dest is None:
            _copy_range(src, start, end, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        path, stream = destination(dest)
        with in_place(path) if stream else atomic_file(path, src.manifest) as out:
            _copy_range(src, start, end, out)
    what = f"bytes {start}-{end - 1}" if end > start else "no bytes (it is empty)"
    say(args, f"downloaded {what} of {shown(name)} to {dest}")


def _to_stdout(args: Namespace, client: Client, name: str) -> None:
    if args.range is not None:
        _get_range(args, client, name, None)
        return
    client.get_to(name, sys.stdout.buffer, args.version_number)
    sys.stdout.buffer.flush()


def cmd_cat(args: Namespace) -> None:
    if len(args.names) > 1 and (args.range is not None or args.version_number is not None):
        raise FmsError("--range and --version read one file: give one NAME with them")
    with open_client(args) as client:
        for name in args.names:
            if name.endswith("/"):
                raise folder_hint(client, name, "cat") or NotFound(f"not found: {name!r}")
            with hinting(client, name, "cat"):
                _to_stdout(args, client, name)


# --- listing ---


def cmd_ls(args: Namespace) -> None:
    # Printed page by page as they come: a listing of any length holds one page in memory.
    # -r lists a folder, as rm -r, du and find mean it: `album` is album/..., never albumX.
    with open_client(args) as client:
        entries = (
            client.iter_ls(p.check_folder(args.prefix))
            if args.recursive
            else client.iter_folder(args.prefix)
        )
        first = next(entries, None)
        if first is None and args.prefix:
            hint = file_hint(client, args.prefix, "ls") if args.prefix.endswith("/") else None
            if hint is not None:
                raise hint
            parent = os.path.dirname(args.prefix.rstrip("/"))
            raise NotFound(
                f"nothing is stored under {args.prefix!r}; see what is with: ls"
                + (f" {parent}/" if parent else "")
            )
        if first is None:
            print("[]" if args.json else "", end="\n" if args.json else "")
            return
        entries = _chain(first, entries)
        if args.json:
            print("[", end="")
            for i, e in enumerate(entries):
                print(("," if i else "") + "\n" + json.dumps(e), end="")
            print("\n]")
            return
        for e in entries:
            print(_ls_line(e, args.long, args.human))


T = TypeVar("T")


def _chain(first: T, rest: Iterator[T]) -> Iterator[T]:
    yield first
    yield from rest


def _ls_line(e: dict[str, Any], long: bool, as_human: bool) -> str:
    """One line of ``ls``: size, mtime, name (``-l``: and version, digest); a folder as
    ``aws s3 ls`` shows it, ``PRE``."""
    if e.get("folder"):
        size, at, extra = "PRE", "", "" if not long else f"{'':>6}  {'':12}  "
    else:
        size = human(e["size"]) if as_human else f"{e['size']:,}"
        at = when(e["mtime"])
        extra = f"{'v' + str(e['version']):>6}  {e['digest'][:12]}  " if long else ""
    return f"{size:>14}  {at:<19}  {extra}{shown(e['name'])}"


def cmd_du(args: Namespace) -> None:
    folder = p.check_folder(args.prefix)  # `album`: album/..., never albumX
    with open_client(args) as client:
        du = client.du(folder)
    if args.json:
        print(json.dumps({"prefix": folder, **du}))
        return
    size = human(du["bytes"]) if args.human else f"{du['bytes']:,}"
    print(
        f"{du['files']:>10,} {'file ' if du['files'] == 1 else 'files'}  {size:>14}  "
        f"{shown(folder) or '(all)'}"
    )


def cmd_find(args: Namespace) -> None:
    import fnmatch

    with open_client(args) as client:
        found = (
            e
            for e in client.iter_ls(p.check_folder(args.prefix))
            if (args.name is None or fnmatch.fnmatchcase(e["name"].rsplit("/", 1)[-1], args.name))
            and (args.newer is None or e["mtime"] > args.newer)
        )
        if args.json:
            print(json.dumps(list(found), indent=1))
            return
        for e in found:
            print(shown(e["name"]))


def cmd_stat(args: Namespace) -> None:
    with open_client(args) as client, hinting(client, args.name, "stat"):
        info = client.stat(args.name)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key in ("name", "size", "digest", "mtime", "version", "chunks", "chunk_size"):
        value = when(info[key]) if key == "mtime" else info[key]
        value = shown(value) if isinstance(value, str) else value
        print(f"{key + ':':<12}{value}")


def cmd_versions(args: Namespace) -> None:
    with open_client(args) as client, hinting(client, args.name, "versions"):
        found = client.versions(args.name)
    if args.json:
        print(json.dumps(found, indent=1))
        return
    for v in found:
        print(
            f"{'v' + str(v['version']):>6}  {v['size']:>14,}  {when(v['mtime'])}  "
            f"{v['digest'][:12]}  {'current' if v['current'] else 'retained'}"
        )


def cmd_restore(args: Namespace) -> None:
    with open_client(args) as client, hinting(client, args.name, "restore"):
        stat = client.restore(args.name, args.version_number)
    print_result(
        args,
        stat,
        f"restored {shown(stat['name'])} as version {stat['version']} ({human(stat['size'])})",
    )


# --- the cluster ---


def cmd_gc(args: Namespace) -> None:
    with open_client(args) as client:
        freed = client.gc(args.grace, args.dry_run)
    if args.json:
        print(json.dumps(freed, indent=1))
        return
    verb = "would free" if args.dry_run else "freed"
    print(
        f"gc: {verb} {count(freed['chunks'], 'chunk')}, {human(freed['bytes'])} "
        f"({count(freed['orphans'], 'orphan')}); dropped {freed['pruned']:,} old "
        f"tombstones and commit ids"
    )


class _FsckTotals(TypedDict):
    """fsck's pages added up (the last page says the orphans and wrong counts)."""

    names: int
    chunks: int
    bytes: int
    damaged: list[dict[str, Any]]
    orphans: int
    refcount_errors: int


def cmd_fsck(args: Namespace) -> int:
    totals: _FsckTotals = {
        "names": 0,
        "chunks": 0,
        "bytes": 0,
        "damaged": [],
        "orphans": 0,
        "refcount_errors": 0,
    }
    with open_client(args) as client:
        for page in client.fsck():
            totals["names"] += page["names"]
            totals["chunks"] += page["chunks"]
            totals["bytes"] += page["bytes"]
            totals["damaged"] += page["damaged"]
            if not args.json:
                for d in page["damaged"]:
                    what = d.get("kind", "chunk")
                    names = ", ".join(shown(n) for n in d["names"])
                    print(f"{d['problem']} {what} {d['chunk']}: breaks {names}")
            totals["orphans"] = page.get("orphans", totals["orphans"])
            totals["refcount_errors"] = page.get("refcount_errors", totals["refcount_errors"])
    bad = bool(totals["damaged"]) or totals["refcount_errors"] > 0
    if args.json:
        print(json.dumps({**totals, "ok": not bad}, indent=1))
    else:
        print(
            f"fsck: {files(totals['names'])}, {count(totals['chunks'], 'chunk')} "
            f"({human(totals['bytes'])}) checked; {len(totals['damaged'])} damaged or missing; "
            f"{count(totals['orphans'], 'orphan chunk')} (collected by gc after the grace "
            f"period); {count(totals['refcount_errors'], 'reference count')} wrong"
        )
        if bad:
            print(
                "fsck: files above cannot be read whole; upload them again to repair them",
                file=sys.stderr,
            )
    return EXIT_ERROR if bad else EXIT_OK


def cmd_stats(args: Namespace) -> None:
    from ..errors import Unavailable

    with open_client(args) as client:
        status = client.status()
        # Ask a service only if the broker knows a worker of it: with none, the request would
        # wait out the whole retry budget (storage answers the cache's ops without a cache).
        services = {w["service"] for w in status["workers"]}
        cache = store = None
        with contextlib.suppress(Unavailable):
            if services & {p.CACHE, p.STORAGE}:
                cache = client.cache_stats()
        with contextlib.suppress(Unavailable):
            if p.STORAGE in services:
                store = client.usage()
    if cache is not None:
        # One worker's own figures (lookups, bytes held), then the tier's, counted by the
        # broker over every cache worker: GETs whose every piece came from the cache, bytes.
        cache = {**cache, **status.get("cache", {})}
    out = {"workers": status["workers"], "cache": cache, "store": store, "broker": status["broker"]}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    fds = out["broker"].get("fds") or {}
    print(
        f"broker  frontend={out['broker']['frontend']} backend={out['broker']['backend']}"
        f" descriptors={fds.get('open')}/{fds.get('soft')}"
    )
    if not out["workers"]:
        print("worker  none connected: start storage (and cache) workers, or use fms up")
    for w in out["workers"]:
        print(
            f"worker  {w['service']:<8} {w['id']:<28} {w['state']:<6} "
            f"inflight={w['inflight']} served={w['served']}"
        )
    if cache is None:
        print("cache   none connected (reads go straight to storage)")
    else:
        gets = cache["get_hits"] + cache["get_misses"]
        ratio = f"{cache['get_hits'] / gets:.2f}" if gets else "-"
        print(
            f"cache   get_hits={cache['get_hits']} get_misses={cache['get_misses']} "
            f"hit_ratio={ratio} bytes_hit={human(cache['bytes_hit'])} "
            f"bytes_missed={human(cache['bytes_missed'])} "
            f"evictions={cache['evictions']} refused={cache['admissions_refused']}"
        )
        print(
            f"cache   (one worker) bytes={human(cache['bytes'])}/"
            f"{human(cache['max_bytes'])} entries={cache['entries']} "
            f"lookups: hits={cache['hits']} misses={cache['misses']}"
        )
    if store is None:
        print("store   no storage worker connected")
    else:
        # An identity that may not read the whole store gets its own files' totals only.
        stored = (
            f" stored={human(store['chunk_bytes'])} (after dedup)" if "chunk_bytes" in store else ""
        )
        print(f"store   files={store['files']} bytes={human(store['bytes'])}{stored}")


def cmd_keygen(args: Namespace) -> None:
    from ..security import keygen

    public, secret = keygen(args.dir, args.name)
    if args.json:
        print(json.dumps({"public": public, "secret": secret}, indent=1))
        return
    base = os.path.basename(public)
    print(
        f"wrote {public} (public: give it to the broker's operator, who lets it in)\n"
        f"wrote {secret} (secret, mode 0600: keep it on this machine only)\n"
        f"the broker's operator lets the public key in:\n"
        f"  a user's: as an identity, with its own grants: fms id add {args.name} --key {base}\n"
        f"  a worker's (storage, cache): copied into the broker's {ALLOW_WORKERS} folder "
        f"({ALLOW_WORKERS_DIR}/)\n"
        f"  (a key copied into the broker's {ALLOW_CLIENTS} folder ({ALLOW_CLIENTS_DIR}/) may "
        f"do everything, as an admin; a worker's key never goes there)"
    )


# The broker's two allow folders: its options, and the folders' names in docs/SECURITY.md and
# docs/SEVERAL-MACHINES.md, and in DATA/keys/ of `fms up --curve` (fms.security.cluster_keys)
ALLOW_CLIENTS, ALLOW_CLIENTS_DIR = "--allow", "allow-clients"
ALLOW_WORKERS, ALLOW_WORKERS_DIR = "--allow-workers", "allow-workers"


def count(n: int, one: str, many: str | None = None) -> str:
    """``n`` things, singular or plural: ``"1 chunk"``, ``"2,048 chunks"``."""
    return f"{n:,} {one}" if n == 1 else f"{n:,} {many or one + 's'}"


def files(n: int) -> str:
    """``"1 file"``, ``"2,048 files"``."""
    return count(n, "file")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
