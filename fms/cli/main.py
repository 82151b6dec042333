"""Command-line entry points: ``fms`` (every command), ``client.py`` (the client commands) and
the daemon scripts.

Each command parses its arguments, builds the object, runs it and sets the exit code:
0 success, 1 an fms error (printed as one line), 2 bad usage, 3 a worker refused by the broker,
130 interrupted.
"""

import sys

from ..errors import FmsError
from . import admin, commands, daemons, sync, up
from .commands import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from .parser import build_parser, command_parser


def main(argv=None) -> int:
    """The ``fms`` console script."""
    return _run(build_parser("fms"), argv)


def client_main(argv=None) -> int:
    """``python client.py``."""
    return _run(build_parser("client.py", client_only=True), argv)


def daemon_main(kind: str, argv=None) -> int:
    """``python broker.py`` / ``storage_worker.py`` / ``cache_worker.py``."""
    prog = f"{kind}.py" if kind == "broker" else f"{kind}_worker.py"
    parser = command_parser(build_parser("fms"), kind, prog)
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

    with commands.open_client(args) as client:
        return run_shell(run, client, parser, client.broker)


def _dispatch(args, parser) -> int:
    handlers = {
        "put": commands.cmd_put,
        "get": commands.cmd_get,
        "ls": commands.cmd_ls,
        "stat": commands.cmd_stat,
        "rm": commands.cmd_rm,
        "stats": commands.cmd_stats,
        "mv": commands.cmd_mv,
        "cp": commands.cmd_cp,
        "du": commands.cmd_du,
        "find": commands.cmd_find,
        "versions": commands.cmd_versions,
        "restore": commands.cmd_restore,
        "sync": sync.cmd_sync,
        "gc": commands.cmd_gc,
        "fsck": commands.cmd_fsck,
        "keygen": commands.cmd_keygen,
        "broker": daemons.cmd_broker,
        "storage": daemons.cmd_storage,
        "cache": daemons.cmd_cache,
        "up": up.cmd_up,
        **dict.fromkeys(admin.HANDLED, admin.run),
    }
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
