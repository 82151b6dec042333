"""``fms sync SRC DST``: make one side hold what the other holds, as ``rclone sync`` and
``aws s3 sync`` do.  One side is a local folder, the other ``fms:PREFIX``.

A file is sent when the other side lacks it or holds other content: sizes are compared first,
and only files of equal size are hashed to compare their digest with the stored one (in the
stored file's chunk size, its digest being derived from its chunks').  With
``--delete`` what the destination holds beyond the source is removed (a mirror); with
``--dry-run`` the plan is printed and nothing changes.
"""

import hashlib
import json
import os

from .. import wire as p
from ..client.upload import plan_file
from ..errors import FmsError
from ..wire import DIGEST_CONTENT
from .commands import _human, _inside, _local_tree, _say, open_client

REMOTE = "fms:"


def cmd_sync(args):
    src_remote, dst_remote = args.src.startswith(REMOTE), args.dst.startswith(REMOTE)
    if src_remote == dst_remote:
        raise FmsError(
            "sync needs one local folder and one fms:PREFIX, e.g. "
            "sync ./photos fms:photos/  or  sync fms:photos/ ./restore"
        )
    with open_client(args) as client:
        if dst_remote:
            plan = _upload_plan(client, args.src, _prefix(args.dst))
        else:
            plan = _download_plan(client, _prefix(args.src), args.dst)
        _report(args, plan)
        if not args.dry_run:
            _carry_out(client, plan, upload=dst_remote, delete=args.delete)
    if not args.json:
        verb = "would send" if args.dry_run else "sent"
        deleted = (
            f", {'would delete' if args.dry_run else 'deleted'} {len(plan['extra'])}"
            if args.delete
            else f", {len(plan['extra'])} only at the destination (kept)"
        )
        _say(
            args,
            f"sync: {verb} {len(plan['send'])} files "
            f"({_human(sum(size for *_, size in plan['send']))}), {plan['same']} "
            f"unchanged{deleted}",
        )


def _prefix(remote: str) -> str:
    """``fms:photos`` and ``fms:photos/`` are the folder ``photos/``; ``fms:`` the store."""
    prefix = remote[len(REMOTE) :].strip("/")
    return prefix + "/" if prefix else ""


def _same(path: str, stat: dict, chunk_size: int) -> bool:
    return (
        os.path.getsize(path) == stat["size"] and _digest(path, stat, chunk_size) == stat["digest"]
    )


def _digest(path: str, stat: dict, chunk_size: int) -> str:
    """The digest of a local file as the stored one's was made (hex): of its content (kind
    ``content``), else from its chunk digests in the stored file's chunk size."""
    if stat["digest_kind"] == DIGEST_CONTENT:
        whole = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(p.MiB):
                whole.update(piece)
        return whole.hexdigest()
    return plan_file(path, stat.get("chunk_size") or chunk_size).digest.hex()


def _upload_plan(client, folder: str, prefix: str) -> dict:
    if not os.path.isdir(folder):
        raise FmsError(f"{folder} is not a folder")
    local = _local_tree(folder, prefix.rstrip("/"), allow_empty=True)
    stored = {e["name"]: e for e in client.iter_ls(prefix)}
    send, same = [], 0
    for path, name in local:
        stat = stored.pop(name, None)
        if stat is not None and _same(path, stat, client.chunk_size):
            same += 1
        else:
            send.append((path, name, os.path.getsize(path)))
    return {"send": send, "same": same, "extra": sorted(stored)}


def _download_plan(client, prefix: str, folder: str) -> dict:
    send, same, wanted = [], 0, set()
    for e in client.iter_ls(prefix):
        path = _inside(folder, e["name"][len(prefix) :])
        wanted.add(path)
        if os.path.isfile(path) and _same(path, e, client.chunk_size):
            same += 1
        else:
            send.append((e["name"], path, e["size"]))
    extra = []
    if os.path.isdir(folder):
        extra = sorted(
            path
            for path, _name in _local_tree(folder, "", allow_empty=True)
            if os.path.abspath(path) not in wanted
        )
    return {"send": send, "same": same, "extra": extra}


def _report(args, plan: dict):
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


def _carry_out(client, plan: dict, upload: bool, delete: bool):
    if upload:
        if plan["send"]:
            client.put_many([(path, name) for path, name, _n in plan["send"]])
        if delete:
            for name in plan["extra"]:
                client.rm(name)
        return
    if plan["send"]:
        client.get_many([(name, path) for name, path, _n in plan["send"]])
    if delete:
        for path in plan["extra"]:
            os.remove(path)
