"""The client's commands: each takes the parsed arguments, opens a :class:`fms.Client`, runs,
prints, and returns an exit code (None for success)."""

import contextlib
import datetime
import json
import os
import sys

from .. import wire as p
from ..errors import FmsError, NotFound

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

PROGRESS_MIN = 1 * p.MiB  # transfers larger than this get a progress bar on a terminal


def open_client(args):
    from ..client import Client
    from ..logutil import setup_logging

    setup_logging(getattr(args, "log_level", "WARNING"))
    progress = None
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        progress = _ProgressBars()
    from ..security import client_keys

    curve = client_keys(getattr(args, "curve_secret", None), getattr(args, "server_key", None))
    return Client(
        getattr(args, "broker", None),
        timeout=getattr(args, "timeout", 5.0),
        progress=progress,
        curve=curve,
        fsync=getattr(args, "fsync", False),
        cache=not getattr(args, "no_cache", False),
    )


class _ProgressBars:
    """Progress on stderr, drawn by tqdm (percent, rate, ETA): for one file over PROGRESS_MIN,
    a bar through its sha256 being computed (before an upload, ``hashing``) and then its
    chunks moving, on one line; for a tree (between ``tree`` and ``close``), one bar of all its
    bytes with the files done beside it."""

    def __init__(self):
        self.bar = None
        self.name = None
        self.files = None  # in a tree: [done, of], and the bytes of files done
        self.base = 0

    def hashing(self, name: str, done: int, total: int):
        if self.files is None:
            self._file(name, done, total, f"{name} (sha256)")
            if done >= total and self.bar is not None:
                self.bar.refresh()  # drawn at 100% before the upload takes the line

    def __call__(self, name: str, done: int, total: int):
        if self.files is not None:
            self.bar.update(self.base + min(done, total) - self.bar.n)
            return
        self._file(name, done, total, name)
        if done >= total:
            self.close()

    def _file(self, name: str, done: int, total: int, desc: str):
        if total <= PROGRESS_MIN:
            return
        if self.bar is None or self.name != name:
            self.close()
            self.bar = _bar(total, desc)
            self.name = name
        elif self.bar.desc != desc:  # hashed: the same line goes on with the upload
            self.bar.reset(total)
            self.bar.set_description(desc, refresh=False)
        self.bar.update(done - self.bar.n)

    def tree(self, files: int, nbytes: int, verb: str):
        """A tree of ``files`` files and ``nbytes`` bytes starts moving."""
        self.close()
        self.bar = _bar(nbytes, verb)
        self.files, self.base = [0, files], 0
        self.bar.set_postfix_str(f"files 0/{files:,}")

    def files_done(self, count: int, nbytes: int):
        self.files[0] += count
        self.base += nbytes
        self.bar.update(self.base - self.bar.n)
        self.bar.set_postfix_str(f"files {self.files[0]:,}/{self.files[1]:,}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.files = None


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        leave=True,
    )


TREE_SLICE = 256  # files moved between two updates of a tree's progress bar


def _move_tree(client, move, items: list, sizes: list, verb: str) -> list:
    """``move(items)`` (``client.put_many`` or ``get_many``) a slice at a time, drawing one bar
    for the whole tree when progress is drawn; :return: the results, in order."""
    bars = client.progress
    if not isinstance(bars, _ProgressBars) or len(items) < 2:
        return move(items)
    bars.tree(len(items), sum(sizes), verb)
    results = []
    try:
        for start in range(0, len(items), TREE_SLICE):
            results += move(items[start : start + TREE_SLICE])
            bars.files_done(len(results) - bars.files[0], sum(sizes[bars.files[0] : len(results)]))
    finally:
        bars.close()
    return results


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


def _say(args, text: str):
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def cmd_put(args):
    items = _put_items(args.local, args.recursive)
    with open_client(args) as client:
        results = _move_tree(
            client, client.put_many, items, [_local_size(path) for path, _name in items], "put"
        )
    if args.json:
        print(json.dumps(results, indent=1))
    elif len(results) == 1 and not args.recursive:
        r = results[0]
        _say(args, f"uploaded {shown(r['name'])} ({_human(r['size'])}, version {r['version']})")
    else:
        _say(args, f"uploaded {len(results)} files, {_human(sum(r['size'] for r in results))}")


def _local_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # put_many says what is wrong with it


def _put_items(paths: list, recursive: bool) -> list:
    """``(local path, name)`` for ``put [-r] LOCAL... [NAME]``, as ``cp`` reads its arguments:
    one LOCAL and a NAME: stored as NAME (with -r, NAME is the prefix); a NAME ending in '/', or
    several LOCALs: each goes into that folder under its base name."""
    sources, dest = (paths, None) if len(paths) == 1 else (paths[:-1], paths[-1])
    into = dest is not None and (dest.endswith("/") or len(sources) > 1)
    items = []
    for local in sources:
        base = os.path.basename(os.path.normpath(os.path.abspath(local)))
        name = f"{dest.strip('/')}/{base}".lstrip("/") if into else dest
        if os.path.isdir(local):
            if not recursive:
                raise FmsError(f"{local} is a folder; upload it with: put -r {local}")
            items += _local_tree(local, name)
        elif not os.path.exists(local):
            raise FmsError(f"no such file: {local}")
        else:
            items.append((local, name if name is not None else base))
    return items


def _local_tree(folder: str, prefix, allow_empty: bool = False) -> list:
    """``(path, name)`` of every regular file under ``folder``, named ``prefix/<relative
    path>`` (``prefix`` None: the folder's base name), in name order."""
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
    if not items and not allow_empty:
        raise FmsError(f"no files under {folder}")
    return items


def cmd_get(args):
    with open_client(args) as client:
        if args.recursive:
            if args.dest is None or args.dest == "-":
                raise FmsError("get -r needs a destination folder: get -r PREFIX DESTDIR")
            prefix = args.name.strip("/")
            entries = client.ls(f"{prefix}/" if prefix else "")
            if not entries:
                raise NotFound(f"not found: no files under {args.name!r}; list names with: ls")
            items = [
                (e["name"], _inside(args.dest, e["name"][len(prefix) + 1 if prefix else 0 :]))
                for e in entries
            ]
            _check_tree(items)
            results = _move_tree(
                client, client.get_many, items, [e["size"] for e in entries], "get"
            )
            _print_result(
                args,
                results,
                f"downloaded {len(results)} files, "
                f"{_human(sum(r['size'] for r in results))} to "
                f"{args.dest}",
            )
            return
        if args.range is not None:
            return _get_range(args, client)
        if args.dest == "-":
            client.get_to(args.name, sys.stdout.buffer, args.version_number)
            sys.stdout.buffer.flush()
            return
        dest = _file_dest(args.dest, args.name)
        result = client.get(args.name, dest, args.version_number)
        _print_result(
            args,
            result,
            f"downloaded {shown(result['name'])} ({_human(result['size'])}) to {dest}",
        )


RANGE_PIECE = 1 * p.MiB  # bytes a ranged get reads and writes at a time


def _get_range(args, client):
    """``get NAME [DEST] --range START-END``: a ranged read (only the chunks that hold the
    bytes are fetched), to stdout or to a file written whole or not at all."""
    from ..client.download import atomic_file

    start, end = args.range
    with client.open(args.name) as src:
        end = src.size if end is None else min(end, src.size)
        src.seek(start)

        def copy(out):
            left = max(0, end - start)
            while left:
                piece = src.read(min(left, RANGE_PIECE))
                if not piece:
                    break
                out.write(piece)
                left -= len(piece)

        if args.dest == "-":
            copy(sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        dest = _file_dest(args.dest, args.name)
        with atomic_file(dest, src.manifest) as out:
            copy(out)
    _say(args, f"downloaded bytes {start}-{max(start, end) - 1} of {args.name} to {dest}")


def _file_dest(dest: str | None, name: str) -> str:
    """Where ``get NAME [DEST]`` writes, as ``cp`` decides it: into a folder under the base
    name; a folder that does not exist is an error (``cp`` does not make it either)."""
    base = os.path.basename(name)
    if dest is None:
        return base
    if os.path.isdir(dest):
        return os.path.join(dest, base)
    folder = os.path.dirname(dest) if not dest.endswith("/") else dest
    if folder and not os.path.isdir(folder):
        raise FmsError(
            f"no folder {folder}: create it first (mkdir -p {folder}), or name another destination"
        )
    return dest


def _check_tree(items: list):
    """Refuse, before anything is written, a download tree in which a path would be both a
    file and a folder: stored names like ``a`` and ``a/b``, or a local folder (file) where a
    file (folder) is to go."""
    dests = {dest for _name, dest in items}
    for name, dest in items:
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise FmsError(
                f"{dest} is a folder, so {name!r} cannot be written there; move it "
                f"away or choose another destination; nothing was downloaded"
            )
    folders = {}
    for name, dest in items:
        folder = os.path.dirname(dest)
        while folder not in folders:
            folders[folder] = name
            folder = os.path.dirname(folder)
    for folder, name in folders.items():
        if folder in dests:
            clash = next(n for n, d in items if d == folder)
            raise FmsError(
                f"{clash!r} and {name!r} are both stored: {clash!r} would be a file "
                f"and a folder at once; fetch them one by one (get NAME DEST); "
                f"nothing was downloaded"
            )
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise FmsError(
                f"{folder} is a file, so {name!r} cannot be written under it; "
                f"move it away or choose another destination; nothing was "
                f"downloaded"
            )


def _inside(folder: str, rel: str) -> str:
    """``folder/rel``, refusing anything that would land outside ``folder``."""
    base = os.path.abspath(folder)
    path = os.path.abspath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base or path == base:
        raise FmsError(f"refusing to write {rel!r} outside {folder}")
    return path


def cmd_ls(args):
    # Printed page by page as they come: a listing of any length holds one page in memory.
    # -r lists a folder, as rm -r, du and find mean it: `album` is album/..., never albumX.
    with open_client(args) as client:
        entries = (
            client.iter_ls(p.check_folder(args.prefix))
            if args.recursive
            else client.iter_folder(args.prefix)
        )
        if args.json:
            print("[", end="")
            for i, e in enumerate(entries):
                print(("," if i else "") + "\n" + json.dumps(e), end="")
            print("\n]")
            return
        for e in entries:
            print(_ls_line(e, args.long, args.human))


def _ls_line(e: dict, long: bool, human: bool) -> str:
    """One line of ``ls``: size, mtime, name (``-l``: and version, sha256); a folder as
    ``aws s3 ls`` shows it, ``PRE``."""
    if e.get("folder"):
        size, when, extra = "PRE", "", "" if not long else f"{'':>6}  {'':12}  "
    else:
        size = _human(e["size"]) if human else f"{e['size']:,}"
        when = _when(e["mtime"])
        extra = f"{'v' + str(e['version']):>6}  {e['sha256'][:12]}  " if long else ""
    return f"{size:>14}  {when:<19}  {extra}{shown(e['name'])}"


def cmd_du(args):
    folder = p.check_folder(args.prefix)  # `album`: album/..., never albumX
    with open_client(args) as client:
        du = client.du(folder)
    if args.json:
        print(json.dumps({"prefix": folder, **du}))
    else:
        print(f"{du['files']:>10,} files  {_human(du['bytes']):>10}  {shown(folder) or '(all)'}")


def cmd_find(args):
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


def cmd_versions(args):
    with open_client(args) as client:
        found = client.versions(args.name)
    if args.json:
        print(json.dumps(found, indent=1))
        return
    for v in found:
        print(
            f"{'v' + str(v['version']):>6}  {v['size']:>14,}  {_when(v['mtime'])}  "
            f"{v['sha256'][:12]}  {'current' if v['current'] else 'retained'}"
        )


def cmd_restore(args):
    with open_client(args) as client:
        stat = client.restore(args.name, args.version_number)
    _print_result(
        args,
        stat,
        f"restored {shown(stat['name'])} as version {stat['version']} ({_human(stat['size'])})",
    )


def _into(src: str, dst: str) -> str:
    """``dst``, or ``dst/<base name of src>`` when ``dst`` ends in '/' (a folder)."""
    return dst + src.rsplit("/", 1)[-1] if dst.endswith("/") else dst


def cmd_mv(args):
    with open_client(args) as client:
        stat = client.mv(args.src, _into(args.src, args.dst))
    _print_result(args, stat, f"moved {shown(args.src)} to {shown(stat['name'])}")


def cmd_cp(args):
    with open_client(args) as client:
        stat = client.cp(args.src, _into(args.src, args.dst))
    _print_result(
        args,
        stat,
        f"copied {shown(args.src)} to {shown(stat['name'])} ({_human(stat['size'])}, "
        f"no data moved)",
    )


def _print_result(args, result, text: str):
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _say(args, text)


def cmd_gc(args):
    with open_client(args) as client:
        freed = client.gc(args.grace, args.dry_run)
    if args.json:
        print(json.dumps(freed, indent=1))
        return
    verb = "would free" if args.dry_run else "freed"
    print(
        f"gc: {verb} {freed['chunks']:,} chunks, {_human(freed['bytes'])} "
        f"({freed['orphans']:,} orphans); dropped {freed['pruned']:,} old tombstones "
        f"and commit ids"
    )


def cmd_fsck(args):
    totals = {
        "names": 0,
        "chunks": 0,
        "bytes": 0,
        "damaged": [],
        "orphans": 0,
        "refcount_errors": 0,
    }
    with open_client(args) as client:
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
        print(
            f"fsck: {totals['names']:,} files, {totals['chunks']:,} chunks "
            f"({_human(totals['bytes'])}) checked; {len(totals['damaged'])} damaged or missing; "
            f"{totals['orphans']:,} orphan chunks (collected by gc after the grace period); "
            f"{totals['refcount_errors']} reference counts wrong"
        )
        if bad:
            print(
                "fsck: files above cannot be read whole; upload them again to repair them",
                file=sys.stderr,
            )
    return EXIT_ERROR if bad else EXIT_OK


def cmd_stat(args):
    with open_client(args) as client:
        info = client.stat(args.name)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key in ("name", "size", "sha256", "mtime", "version", "chunks", "chunk_size"):
        value = _when(info[key]) if key == "mtime" else info[key]
        value = shown(value) if isinstance(value, str) else value
        print(f"{key + ':':<12}{value}")


def cmd_rm(args):
    with open_client(args) as client:
        if not args.recursive:
            old = client.rm(args.name)
            _print_result(args, old, f"removed {shown(old['name'])}")
            return
        prefix = args.name.strip("/") + "/"
        if prefix == "/":
            raise FmsError("rm -r needs a prefix, such as: rm -r photos/")
        removed = 0
        for page in client.rm_prefix(prefix):
            removed += len(page)
    if not removed:
        raise NotFound(f"not found: no files under {prefix!r}; list names with: ls")
    _print_result(
        args,
        {"prefix": prefix, "removed": removed},
        f"removed {removed:,} files under {shown(prefix)}",
    )


def cmd_stats(args):
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
            f"hit_ratio={ratio} bytes_hit={_human(cache['bytes_hit'])} "
            f"bytes_missed={_human(cache['bytes_missed'])} "
            f"evictions={cache['evictions']} refused={cache['admissions_refused']}"
        )
        print(
            f"cache   (one worker) bytes={_human(cache['bytes'])}/"
            f"{_human(cache['max_bytes'])} entries={cache['entries']} "
            f"lookups: hits={cache['hits']} misses={cache['misses']}"
        )
    if store is None:
        print("store   no storage worker connected")
    else:
        stored = (
            f" stored={_human(store['chunk_bytes'])} (after dedup)"
            if "chunk_bytes" in store
            else ""
        )
        print(f"store   files={store['files']} bytes={_human(store['bytes'])}{stored}")


def cmd_keygen(args):
    from ..security import keygen

    public, secret = keygen(args.dir, args.name)
    print(
        f"wrote {public} (public: give it to the broker's operator for its --allow folder)\n"
        f"wrote {secret} (secret, mode 0600: keep it on this machine only)"
    )


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
