"""``fms sync SRC DST``: make one side hold what the other holds, as ``rclone sync`` and
``aws s3 sync`` do.  Each side is a local folder or ``fms:PREFIX``; from one prefix to another,
the copies are the server's (metadata only).

A file is sent when the other side lacks it or holds other content: sizes are compared first,
and only files of equal size are hashed to compare their digest with the stored one (in the
stored file's chunk size: its digest is derived from its chunks'; two stored files compare their
digests at no cost).  ``--include`` / ``--exclude`` choose the files on both
sides (:mod:`.filters`); what they leave out is neither sent nor deleted.  With ``--delete``
what the destination holds beyond the source is removed (a mirror); with ``--dry-run`` the plan
is printed and nothing changes.

Safety, decided where the tools differ: everything is planned, and every download checked for
clashes (a path that would be a file and a folder, a name too long for a local file), before
anything is written; ``--delete`` is refused when the source holds nothing (a typo in its name
would otherwise empty the destination) unless ``--force``; on a terminal, ``--delete`` asks
before it removes more than :data:`ASK_ABOVE` files (``--force``: no question).
"""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict

from ..client.upload import plan_file
from ..errors import FmsError, NotFound
from . import local
from .commands import files, human, move_tree, open_client, say
from .filters import selector
from .main import EXIT_ERROR

if TYPE_CHECKING:
    from ..client.api import Client

REMOTE = "fms:"
ASK_ABOVE = 5  # files --delete removes without asking, on a terminal

Wanted = Callable[[str], bool] | None  # the filters (:func:`.filters.selector`), or None: all


class Plan(TypedDict):
    """What a sync does, decided before anything changes."""

    send: list[tuple[str, str, int]]  # (from, to, size) of each file to send
    same: int  # files the destination holds already
    extra: list[str]  # what only the destination holds (removed with --delete)
    sources: int  # files at the source that the filters let through


def cmd_sync(args: Namespace) -> int | None:
    src_remote, dst_remote = args.src.startswith(REMOTE), args.dst.startswith(REMOTE)
    if not (src_remote or dst_remote):
        raise FmsError(
            "sync needs fms:PREFIX on at least one side, e.g. "
            "sync ./photos fms:photos/  or  sync fms:photos/ ./restore"
        )
    wanted = selector(args.filters)
    with open_client(args) as client:
        if src_remote and dst_remote:
            plan = _remote_plan(client, _prefix(args.src), _prefix(args.dst), wanted)
        elif dst_remote:
            plan = _upload_plan(client, args.src, _prefix(args.dst), wanted)
        else:
            plan = _download_plan(client, _prefix(args.src), args.dst, wanted)
        if src_remote and not plan["sources"]:
            _not_a_file(client, _prefix(args.src), args.dst)
        if args.delete and plan["extra"] and not plan["sources"] and not args.force:
            raise FmsError(
                f"{args.src} holds nothing{' the filters let through' if wanted else ''}, so "
                f"--delete would remove {_all(len(plan['extra']))} from {args.dst}; "
                f"check the source's name, or add --force to empty {args.dst}; nothing was changed"
            )
        if not (dst_remote or args.dry_run):
            _make_folder(args.dst)  # the destination is a folder, as the plan prints it
        _report(args, plan)
        if args.dry_run:
            _summary(args, plan)
            return None
        if args.delete and not _confirmed(args, plan):
            print("sync: stopped; nothing was changed", file=sys.stderr)
            return EXIT_ERROR
        kind = "remote" if src_remote and dst_remote else "up" if dst_remote else "down"
        _carry_out(client, plan, kind, delete=args.delete)
    _summary(args, plan)
    return None


def _not_a_file(client: Client, prefix: str, dst: str) -> None:
    """Raise if the source folder ``prefix``, which holds nothing, names a stored file."""
    file = prefix.rstrip("/")
    if not file:
        return
    try:
        client.stat(file)
    except FmsError:
        return
    base = file.rsplit("/", 1)[-1]
    if dst.startswith(REMOTE):
        copy = f"cp {file} {_prefix(dst)}{base}"
    else:
        copy = f"get {file} {os.path.join(dst, base)}"
    raise NotFound(
        f"{file!r} is a file, not a folder, and sync copies folders; to copy the file: {copy}; "
        "nothing was changed"
    )


def _make_folder(folder: str) -> None:
    """``folder`` made, with its parents (``mkdir -p``), before the plan that writes into it
    is printed: a sync into a folder that is not there yet makes it, even when the source
    holds nothing (as rsync does)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise FmsError(
            f"cannot make the folder {folder}: {exc.strerror or exc}; nothing was changed"
        ) from None


def _summary(args: Namespace, plan: Plan) -> None:
    if args.json:
        return None
    verb = "would send" if args.dry_run else "sent"
    deleted = (
        f", {'would delete' if args.dry_run else 'deleted'} {len(plan['extra'])}"
        if args.delete
        else f", {len(plan['extra'])} only at the destination (kept)"
    )
    say(
        args,
        f"sync: {verb} {files(len(plan['send']))} "
        f"({human(sum(size for *_, size in plan['send']))}), {plan['same']} "
        f"unchanged{deleted}",
    )
    return None


def _confirmed(args: Namespace, plan: Plan) -> bool:
    """On a terminal, ask before removing more than ASK_ABOVE files (unless ``--force``)."""
    count = len(plan["extra"])
    if count <= ASK_ABOVE or args.force or not (sys.stdin.isatty() and sys.stderr.isatty()):
        return True
    print(
        f"sync: delete {files(count)} from {args.dst} that {args.src} does not hold? [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _all(n: int) -> str:
    """``"the 1 file"``, ``"all 5 files"``."""
    return "the 1 file" if n == 1 else f"all {files(n)}"


def _prefix(remote: str) -> str:
    """``fms:photos`` and ``fms:photos/`` are the folder ``photos/``; ``fms:`` the store."""
    prefix = remote[len(REMOTE) :].strip("/")
    return prefix + "/" if prefix else ""


def _same(client: Client, path: str, stat: dict[str, Any]) -> bool:
    return os.path.getsize(path) == stat["size"] and _digest(client, path, stat) == stat["digest"]


def _digest(client: Client, path: str, stat: dict[str, Any]) -> str:
    """The digest of a local file as the stored one's was made (hex): of its content (kind
    ``content``, files stored before protocol 2: sha256), else from its chunk digests in the
    stored file's chunk size, with the store's digest function."""
    if stat["digest_kind"] == "content":
        import hashlib

        whole = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                whole.update(piece)
        return whole.hexdigest()
    chunk_size = stat.get("chunk_size") or client.chunk_size
    return plan_file(path, chunk_size, client.session.hasher()).digest.hex()


def _stored(client: Client, prefix: str, wanted: Wanted) -> dict[str, dict[str, Any]]:
    """relative path -> stat of the stored files under ``prefix`` the filters let through."""
    out = {}
    for e in client.iter_ls(prefix):
        rel = e["name"][len(prefix) :]
        if wanted is None or wanted(rel):
            out[rel] = e
    return out


def _upload_plan(client: Client, folder: str, prefix: str, wanted: Wanted) -> Plan:
    if not os.path.isdir(folder):
        raise FmsError(f"{folder} is not a folder")
    files = local.tree(folder, "", wanted, allow_empty=True)
    stored = _stored(client, prefix, wanted)
    send: list[tuple[str, str, int]] = []
    same = 0
    for path, rel in files:
        stat = stored.pop(rel, None)
        if stat is not None and _same(client, path, stat):
            same += 1
        else:
            send.append((path, prefix + rel, os.path.getsize(path)))
    return {
        "send": send,
        "same": same,
        "extra": sorted(s["name"] for s in stored.values()),
        "sources": len(files),
    }


def _download_plan(client: Client, prefix: str, folder: str, wanted: Wanted) -> Plan:
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise FmsError(f"{folder} is not a folder; nothing was changed")
    stored = _stored(client, prefix, wanted)
    items = [(e["name"], local.inside(folder, rel)) for rel, e in stored.items()]
    local.check_tree(items, "changed")  # before anything is written
    send: list[tuple[str, str, int]] = []
    same, wanted_paths = 0, set()
    for (name, path), e in zip(items, stored.values(), strict=True):
        wanted_paths.add(path)
        if os.path.isfile(path) and _same(client, path, e):
            same += 1
        else:
            send.append((name, path, e["size"]))
    extra: list[str] = []
    if os.path.isdir(folder):
        extra = sorted(
            path
            for path, _rel in local.tree(folder, "", wanted, allow_empty=True)
            if os.path.abspath(path) not in wanted_paths
        )
    return {"send": send, "same": same, "extra": extra, "sources": len(stored)}


def _remote_plan(client: Client, src: str, dst: str, wanted: Wanted) -> Plan:
    if not src or dst.startswith(src) or src.startswith(dst):
        raise FmsError(
            f"fms:{src} and fms:{dst} overlap (one holds the other): sync between folders that "
            f"are apart, such as fms:photos/ fms:backup/photos/"
        )
    source, target = _stored(client, src, wanted), _stored(client, dst, wanted)
    send: list[tuple[str, str, int]] = []
    same = 0
    for rel, e in source.items():
        held = target.pop(rel, None)
        if held is not None and (held["size"], held["digest"]) == (e["size"], e["digest"]):
            same += 1
        else:
            send.append((e["name"], dst + rel, e["size"]))
    extra = sorted(e["name"] for e in target.values())
    return {"send": send, "same": same, "extra": extra, "sources": len(source)}


def _report(args: Namespace, plan: Plan) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "send": [{"from": a, "to": b, "size": n} for a, b, n in plan["send"]],
                    "unchanged": plan["same"],
                    "delete": plan["extra"] if args.delete else [],
                    "dry_run": args.dry_run,
                },
                indent=1,
            )
        )
        return
    if getattr(args, "quiet", False):
        return
    for a, b, _n in plan["send"]:
        print(f"{'would send' if args.dry_run else 'send'}  {a} -> {b}")
    if args.delete:
        for x in plan["extra"]:
            print(f"{'would delete' if args.dry_run else 'delete'}  {x}")


def _carry_out(client: Client, plan: Plan, kind: str, delete: bool) -> None:
    pairs = [(a, b) for a, b, _n in plan["send"]]
    sizes = [n for *_, n in plan["send"]]
    if pairs and kind == "up":
        move_tree(client, client.put_many, pairs, sizes, "sync")
    elif pairs and kind == "down":
        move_tree(client, client.get_many, pairs, sizes, "sync")
    elif pairs:
        failed = [r for r in client.copy_many("cp", pairs) if isinstance(r, FmsError)]
        if failed:
            raise failed[0]
    if not delete or not plan["extra"]:
        return
    if kind == "down":
        for path in plan["extra"]:
            os.remove(path)
        return
    failed = [r for r in client.rm_many(plan["extra"]) if isinstance(r, FmsError)]
    if failed:
        raise failed[0]
