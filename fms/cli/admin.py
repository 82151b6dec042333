"""The commands of users and permissions: ``whoami``, ``id add/ls/rm/key``, ``grant``,
``revoke``, ``purge`` and ``audit`` (see :mod:`fms.policy`); their parsers and handlers."""

import json
import time

from .commands import open_client, shown


def add_parsers(sub, common, sub_command, prog: str):
    """Add the commands to the subparsers ``sub`` (``sub_command`` makes one: parser.py's)."""
    cmd = sub_command(
        sub,
        "whoami",
        "show which identity this client's key is, and its grants",
        common,
        f"{prog} whoami --json",
    )
    _json(cmd)

    cmd = sub_command(
        sub,
        "id",
        "manage identities: add, ls, rm, key (an admin of the whole store)",
        common,
        f"{prog} id add alice --key alice.key\n"
        f"{prog} id add s3gw --key gw.key --gateway   # the S3 gateway\n"
        f"{prog} id add bob --s3                       # an S3 access key: shown once\n"
        f"{prog} id ls\n"
        f"{prog} id key alice --add laptop.key\n"
        f"{prog} id rm bob",
    )
    ids = cmd.add_subparsers(dest="id_command", metavar="ACTION", required=True)
    action = sub_command(
        ids, "add", "create an identity", common, f"{prog} id add alice --key alice.key"
    )
    action.add_argument("name", metavar="NAME")
    action.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="FILE",
        help="a CURVE public key file (.key) of it; repeat for more",
    )
    action.add_argument("--s3", action="store_true", help="make an S3 access key for it")
    action.add_argument(
        "--gateway",
        action="store_true",
        help="it may act for other identities (the S3 gateway's key)",
    )
    _json(action)
    action = sub_command(
        ids, "ls", "list identities, their keys and grants", common, f"{prog} id ls --json"
    )
    _json(action)
    action = sub_command(
        ids,
        "rm",
        "remove an identity (its keys and grants; not its files)",
        common,
        f"{prog} id rm bob",
    )
    action.add_argument("name", metavar="NAME")
    _json(action)
    action = sub_command(
        ids,
        "key",
        "add or remove a key of an identity",
        common,
        f"{prog} id key alice --add laptop.key\n"
        f"{prog} id key alice --s3\n{prog} id key alice --remove FMS3Q...",
    )
    action.add_argument("name", metavar="NAME")
    which = action.add_mutually_exclusive_group(required=True)
    which.add_argument("--add", metavar="FILE", help="a CURVE public key file (.key)")
    which.add_argument("--s3", action="store_true", help="make an S3 access key")
    which.add_argument("--remove", metavar="KEY", help="a CURVE key or an S3 access key id")
    _json(action)

    cmd = sub_command(
        sub,
        "grant",
        "give an identity a role (read, write, admin) on a prefix",
        common,
        f"{prog} grant alice write alice\n{prog} grant bob read shared/photos\n"
        f"{prog} grant root admin ''    # the whole store",
    )
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument(
        "role",
        metavar="ROLE",
        choices=("read", "write", "admin"),
        help="read: get, ls, stat, versions; write: also put, rm, mv, cp, restore; "
        "admin: everything under the prefix, also purge",
    )
    cmd.add_argument(
        "prefix",
        metavar="PREFIX",
        help="a folder: 'album' covers album and album/..., never albumX; '' is the whole store",
    )
    _json(cmd)

    cmd = sub_command(
        sub,
        "revoke",
        "take an identity's grant on a prefix away",
        common,
        f"{prog} revoke bob shared/photos",
    )
    cmd.add_argument("name", metavar="NAME")
    cmd.add_argument("prefix", metavar="PREFIX")
    _json(cmd)

    cmd = sub_command(
        sub,
        "purge",
        "remove a version, or every version, of a name for good (an admin's)",
        common,
        f"{prog} purge shadow --all-versions   # then: gc --grace 0\n"
        f"{prog} purge notes.txt --version 3",
    )
    cmd.add_argument("name", metavar="NAME")
    which = cmd.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--version",
        type=int,
        metavar="V",
        dest="version_number",
        help="this version, current or retained (see: versions NAME)",
    )
    which.add_argument(
        "--all-versions", action="store_true", help="every version, and the name itself"
    )
    _json(cmd)

    cmd = sub_command(
        sub,
        "audit",
        "print the audit log: every change, who made it, when",
        common,
        f"{prog} audit --since 1d\n{prog} audit --since 2026-11-01 --json",
    )
    cmd.add_argument(
        "--since",
        metavar="WHEN",
        type=_when,
        help="only entries after WHEN: a date (2026-11-01, 2026-11-01T08:30) or "
        "an age (90s, 30m, 12h, 7d)",
    )
    _json(cmd)


def _json(cmd):
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")


def _when(text: str) -> float:
    from .parser import parse_when

    return parse_when(text)


def _public_key(path: str) -> str:
    from ..security import load_public

    return load_public(path).decode()


HANDLED = ("whoami", "id", "grant", "revoke", "purge", "audit")


def run(args):
    """Run one of :data:`HANDLED`."""
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


def _id(args, client):
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


def _audit(args, client):
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


def _grants(grants: list) -> str:
    if not grants:
        return "no grants"
    return ", ".join(
        f"{g['role']} on {shown(g['prefix']) if g['prefix'] else 'the whole store'}" for g in grants
    )


def _print(args, result, text: str):
    if args.json:
        print(json.dumps(result, indent=1))
    elif not getattr(args, "quiet", False):
        print(text)
