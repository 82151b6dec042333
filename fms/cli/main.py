"""Command-line entry points: ``fms`` (every command), ``client.py`` (the client commands) and
the daemon scripts.

Each command parses its arguments, builds the object, runs it and sets the exit code:
0 success, 1 an fms error (printed as one line), 2 bad usage, 3 a worker refused by the broker,
130 interrupted.
"""

import importlib
import sys
from argparse import ArgumentParser, Namespace
from collections.abc import Callable

from ..errors import FmsError
from .parser import Parser, build_parser, command_in, command_parser, lists_commands

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Each command's handler, as "module:function" in fms.cli: imported only when it runs, so
# `fms ls` does not import the daemons, the storage engine or the shell.
HANDLERS = {
    "put": "commands:cmd_put",
    "get": "commands:cmd_get",
    "ls": "commands:cmd_ls",
    "stat": "commands:cmd_stat",
    "cat": "commands:cmd_cat",
    "rm": "remote:cmd_rm",
    "stats": "commands:cmd_stats",
    "mv": "remote:cmd_mv",
    "cp": "remote:cmd_cp",
    "du": "commands:cmd_du",
    "find": "commands:cmd_find",
    "versions": "commands:cmd_versions",
    "restore": "commands:cmd_restore",
    "sync": "sync:cmd_sync",
    "gc": "commands:cmd_gc",
    "fsck": "commands:cmd_fsck",
    "keygen": "commands:cmd_keygen",
    "mount": "commands:cmd_mount",
    "broker": "daemons:cmd_broker",
    "storage": "daemons:cmd_storage",
    "cache": "daemons:cmd_cache",
    "up": "up:cmd_up",
    "s3": "daemons:cmd_s3",
    # users and permissions (fms.policy)
    "whoami": "admin:run",
    "id": "admin:run",
    "grant": "admin:run",
    "revoke": "admin:run",
    "purge": "admin:run",
    "audit": "admin:run",
}


def handler(command: str) -> Callable[[Namespace], int | None]:
    """The function that runs ``command``."""
    module, function = HANDLERS[command].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def main(argv: list[str] | None = None) -> int:
    """The ``fms`` console script."""
    return _run("fms", False, sys.argv[1:] if argv is None else argv)


def client_main(argv: list[str] | None = None) -> int:
    """``python client.py``."""
    return _run("client.py", True, sys.argv[1:] if argv is None else argv)


def daemon_main(kind: str, argv: list[str] | None = None) -> int:
    """``python broker.py`` / ``storage_worker.py`` / ``cache_worker.py``."""
    prog = f"{kind}.py" if kind == "broker" else f"{kind}_worker.py"
    parser = command_parser(kind, prog)
    args = parser.parse_args(argv)
    args.command = kind
    return dispatch(args, parser)


def _run(prog: str, client_only: bool, argv: list[str]) -> int:
    # Only the arguments of the command about to run are built (all of them for the shell),
    # and the other commands are listed only where the help or an error may show them.
    parser = build_parser(
        prog, client_only, only=command_in(argv) or "", listed=lists_commands(argv)
    )
    args = parse(parser, argv)
    if not args.command:
        from .shell import run_shell

        return run_shell(args, prog)
    return dispatch(args, parser)


def parse(parser: Parser, argv: list[str]) -> Namespace:
    """``parser.parse_args(argv)``, but an option the command does not know is reported by
    that command's parser (its usage, not the whole program's)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        where = parser.commands.get(args.command) if getattr(args, "command", None) else None
        (where or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def dispatch(args: Namespace, parser: ArgumentParser) -> int:
    """Run the command ``args`` holds; :return: its exit status.  An fms error is printed as
    one line; so is an OS error the command did not foresee (a path it cannot read or write),
    never a traceback."""
    try:
        return handler(args.command)(args) or EXIT_OK
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
    except OSError as exc:
        print(f"{parser.prog}: error: {os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR


def os_error(exc: OSError) -> str:
    """An OS error as one line: what failed, on which path."""
    what = exc.strerror or str(exc)
    paths = [f for f in (exc.filename, exc.filename2) if f is not None]
    return f"{what}: {' -> '.join(map(str, paths))}" if paths else what
