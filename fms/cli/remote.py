"""Commands that change many stored names at once: ``rm`` of names, patterns or prefixes
(``-r``), and ``cp -r`` / ``mv -r`` of a folder.  Each name is its own transaction on the
server (pipelined, a window of requests in flight); a folder is never copied or moved as one
transaction, so a reader may see part of it moved."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from typing import TYPE_CHECKING

from ..errors import FmsError, NotFound
from .commands import (
    files,
    folder_hint,
    hinting,
    human,
    open_client,
    print_result,
    say,
    shown,
)
from .filters import has_glob, literal_prefix, name_matcher
from .main import EXIT_ERROR

if TYPE_CHECKING:
    from ..client.api import Client


def cmd_rm(args: Namespace) -> int | None:
    with open_client(args) as client:
        if args.recursive:
            return _rm_prefixes(args, client)
        names, missing = [], []
        for arg in args.names:
            if has_glob(arg):
                found = _expand(client, arg)
                if not found:
                    missing.append(arg)
                names += found
            else:
                names.append(arg)
        names = list(dict.fromkeys(names))  # a name given twice is removed once
        if args.dry_run:
            return _rm_dry_run(args, client, names, missing)
        removed, failed = [], []
        for name, result in zip(names, client.rm_many(names) if names else [], strict=True):
            if not isinstance(result, FmsError):
                removed.append(result)
                continue
            hint = folder_hint(client, name, "rm") if isinstance(result, NotFound) else None
            failed.append(hint or result)
    for error in failed:
        print(f"rm: {error}", file=sys.stderr)
    for pattern in missing:
        print(f"rm: no stored name matches {pattern!r}", file=sys.stderr)
    if args.json:
        single = len(args.names) == 1 and not has_glob(args.names[0])
        print(json.dumps(removed[0] if single and removed else removed, indent=1))
    elif len(removed) == 1:
        say(args, f"removed {shown(removed[0]['name'])}")
    elif removed:
        say(args, f"removed {files(len(removed))}")
    return EXIT_ERROR if failed or missing else None


def _expand(client: Client, pattern: str) -> list[str]:
    """The stored names ``pattern`` matches whole, in name order."""
    match = name_matcher(pattern)
    return [e["name"] for e in client.iter_ls(literal_prefix(pattern)) if match(e["name"])]


def _rm_dry_run(
    args: Namespace, client: Client, names: list[str], missing: list[str]
) -> int | None:
    present = []
    for name in names:
        try:
            client.stat(name)
            present.append(name)
        except NotFound:
            missing.append(name)
    _print_dry_run(args, present, missing)
    return EXIT_ERROR if missing else None


def _print_dry_run(args: Namespace, names: list[str], missing: list[str]) -> None:
    if args.json:
        print(json.dumps({"dry_run": True, "remove": names, "missing": missing}, indent=1))
    else:
        for name in names:
            print(f"would remove {shown(name)}")
        say(args, f"rm: would remove {files(len(names))}; nothing was removed")
    for name in missing:
        print(f"rm: not found: {name!r}", file=sys.stderr)


def _prefixes(client: Client, args_names: list[str]) -> list[str]:
    """The prefixes ``rm -r`` removes: each NAME as a folder, or with a pattern, each stored
    folder (or name) the pattern matches."""
    prefixes = []
    for arg in args_names:
        if not has_glob(arg):
            prefix = arg.strip("/") + "/"
            if prefix == "/":
                raise FmsError("rm -r needs a prefix, such as: rm -r photos/")
            prefixes.append(prefix)
            continue
        match = name_matcher(arg.rstrip("/"))
        for e in client.iter_ls(literal_prefix(arg)):
            parts = e["name"].split("/")
            for depth in range(1, len(parts) + 1):
                head = "/".join(parts[:depth])
                if match(head):
                    prefixes.append(head + "/" if depth < len(parts) else head)
                    break
    return list(dict.fromkeys(prefixes))


def _rm_prefixes(args: Namespace, client: Client) -> int | None:
    prefixes = _prefixes(client, args.names)
    if args.dry_run:
        names = [e["name"] for prefix in prefixes for e in client.iter_ls(prefix)]
        missing = [pr for pr in prefixes if not any(n.startswith(pr) for n in names)]
        names = list(dict.fromkeys(names))
        _print_dry_run(args, names, missing + ([] if prefixes else list(args.names)))
        return EXIT_ERROR if missing or not prefixes else None
    counts = {}
    for prefix in prefixes:
        if not prefix.endswith("/"):  # a pattern that matched a name, not a folder
            result = client.rm_many([prefix])[0]
            counts[prefix] = 0 if isinstance(result, FmsError) else 1
            continue
        counts[prefix] = sum(len(page) for page in client.rm_prefix(prefix))
    empty = [pr for pr, n in counts.items() if not n] + ([] if prefixes else list(args.names))
    total = sum(counts.values())
    if args.json:
        out = [{"prefix": pr, "removed": n} for pr, n in counts.items()]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
    elif total or not empty:
        where = ", ".join(counts) if len(counts) <= 3 else f"{len(counts)} prefixes"
        say(args, f"removed {files(total)} under {where}")
    for prefix in empty:
        print(f"rm: not found: no files under {prefix!r}; list names with: ls", file=sys.stderr)
    return EXIT_ERROR if empty else None


# --- cp and mv ---


def cmd_cp(args: Namespace) -> int | None:
    return _copy(args, "cp")


def cmd_mv(args: Namespace) -> int | None:
    return _copy(args, "mv")


def _into(src: str, dst: str) -> str:
    """``dst``, or ``dst/<base name of src>`` when ``dst`` ends in '/' (a folder)."""
    return dst + src.rstrip("/").rsplit("/", 1)[-1] if dst.endswith("/") else dst


def _copy(args: Namespace, op: str) -> int | None:
    verb = {"cp": "copied", "mv": "moved"}[op]
    with open_client(args) as client:
        if not args.recursive:
            with hinting(client, args.src, op):
                stat = getattr(client, op)(args.src, _into(args.src, args.dst))
            extra = f" ({human(stat['size'])}, no data moved)" if op == "cp" else ""
            print_result(args, stat, f"{verb} {shown(args.src)} to {shown(stat['name'])}{extra}")
            return None
        src = args.src.strip("/") + "/"
        dst = _into(args.src, args.dst).strip("/") + "/"
        if src == "/":
            raise FmsError(f"{op} -r needs a folder to {op}, such as: {op} -r photos/ backup/")
        if dst.startswith(src):
            raise FmsError(f"cannot {op} {src} into itself ({dst})")
        pairs = [(e["name"], dst + e["name"][len(src) :]) for e in client.iter_ls(src)]
        if not pairs:
            raise NotFound(f"not found: no files under {src!r}; list names with: ls")
        results = client.copy_many(op, pairs)
    done = [r for r in results if not isinstance(r, FmsError)]
    for (name, _dst), r in zip(pairs, results, strict=True):
        if isinstance(r, FmsError):
            print(f"{op}: {shown(name)}: {r}", file=sys.stderr)
    if args.json:
        print(json.dumps(done, indent=1))
    else:
        say(args, f"{verb} {files(len(done))} from {shown(src)} to {shown(dst)} (no data moved)")
    return EXIT_ERROR if len(done) < len(pairs) else None
