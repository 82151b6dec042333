"""The commands of users and permissions: ``whoami``, ``id add/ls/rm/key``, ``grant``,
``revoke``, ``purge`` and ``audit`` (see :mod:`fms.policy`; their arguments are in parser.py)."""

import json
import time
from argparse import Namespace
from typing import TYPE_CHECKING, Any

from .commands import open_client, shown

if TYPE_CHECKING:
    from ..client import Client


def _public_key(path: str) -> str:
    from ..security import load_public

    return load_public(path).decode()


def run(args: Namespace) -> None:
    """Run ``whoami``, ``id``, ``grant``, ``revoke``, ``purge`` or ``audit``."""
    with open_client(args) as client:
        if args.command == "whoami":
            me = client.whoami()
            _print(
                args,
                me,
                f"{shown(me['identity'])}: {_grants(me['grants'])}"
                + (" (gateway)" if me["gateway"] else ""),
            )
        elif args.command == "id":
            _id(args, client)
        elif args.command == "grant":
            ident = client.grant(args.name, args.role, args.prefix)
            _print(args, ident, f"{shown(ident['name'])}: {_grants(ident['grants'])}")
        elif args.command == "revoke":
            ident = client.revoke(args.name, args.prefix)
            _print(args, ident, f"{shown(ident['name'])}: {_grants(ident['grants'])}")
        elif args.command == "purge":
            purged = client.purge(args.name, args.version_number, args.all_versions)
            _print(
                args,
                {"name": args.name, "purged": purged},
                f"purged {shown(args.name)}: version(s) {', '.join(map(str, purged)) or 'none'}; "
                f"their chunks are freed by the next gc (now: gc --grace 0)",
            )
        elif args.command == "audit":
            _audit(args, client)


def _id(args: Namespace, client: "Client") -> None:
    action = args.id_command
    if action == "ls":
        found = client.id_ls()
        if args.json:
            print(json.dumps(found, indent=1))
            return
        for ident in found:
            keys = ", ".join(f"{k['kind']}:{k['key'][:12]}…" for k in ident["keys"]) or "no keys"
            print(
                f"{shown(ident['name'])}{' (gateway)' if ident['gateway'] else ''}: "
                f"{_grants(ident['grants'])}; {keys}"
            )
        return
    if action == "rm":
        client.id_rm(args.name)
        _print(args, {"removed": args.name}, f"removed identity {shown(args.name)}")
        return
    if action == "add":
        made = client.id_add(args.name, [_public_key(f) for f in args.key], args.s3, args.gateway)
    else:
        made = client.id_key(
            args.name,
            curve=_public_key(args.add) if args.add else None,
            s3=args.s3,
            remove=args.remove,
        )
    ident = made["identity"]
    text = f"{shown(ident['name'])}: {_grants(ident['grants'])}; " + (
        ", ".join(f"{k['kind']}:{k['key']}" for k in ident["keys"]) or "no keys"
    )
    if "s3" in made:
        text += (
            f"\nS3 access key id: {made['s3']['access_key']}\nS3 secret access key: "
            f"{made['s3']['secret']}  (shown once: keep it)"
        )
    _print(args, made, text)


def _audit(args: Namespace, client: "Client") -> None:
    entries = client.audit(args.since or 0.0)
    if args.json:
        print("[", end="")
        for i, entry in enumerate(entries):
            print(("," if i else "") + "\n" + json.dumps(entry, ensure_ascii=False), end="")
        print("\n]")
        return
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
        if "identity_name" in entry:  # a change to identities or grants
            what = " ".join(
                str(entry[k]) for k in ("identity_name", "role", "prefix", "key") if k in entry
            )
        else:
            what = entry.get("names") or entry.get("prefix") or ""
            what = " ".join(what) if isinstance(what, list) else what
        versions = entry.get("versions")
        print(
            f"{when}  {shown(entry['identity']):<12} {entry['op']:<10} {entry['result']:<9} "
            f"{shown(str(what))}{'  v' + ','.join(map(str, versions)) if versions else ''}"
        )


def _grants(grants: list[dict[str, Any]]) -> str:
    if not grants:
        return "no grants"
    return ", ".join(
        f"{g['role']} on {shown(g['prefix']) if g['prefix'] else 'the whole store'}" for g in grants
    )


def _print(args: Namespace, result: object, text: str) -> None:
    if args.json:
        print(json.dumps(result, indent=1))
    elif not getattr(args, "quiet", False):
        print(text)
