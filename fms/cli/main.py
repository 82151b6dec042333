"""Command-line entry points: ``fms`` (every command), ``client.py`` (the client commands) and
the daemon scripts.

Each command parses its arguments, builds the object, runs it and sets the exit code:
0 success, 1 an fms error (printed as one line), 2 bad usage, 3 a worker refused by the broker,
130 interrupted.
"""

import importlib
import os
import sys
from argparse import ArgumentParser, Namespace
from collections.abc import Callable

from ..errors import FmsError
from .parser import Parser, build_parser, command_in, command_parser, lists_commands

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Commands whose work is done when they return: run as the program (not called from Python),
# they end the process as soon as their output is flushed, without the interpreter's teardown
# (ZeroMQ's context, the garbage collector, every module's clean-up: 5 to 9 ms, more than an
# `ls` does, 7 % of a `get -r` of 1000 small files). Their files are written and closed, their
# thread pools joined and every change acknowledged before they return; not the shell, `up`,
# `mount` or the servers, which run until stopped.
ONE_SHOT = frozenset(
    {
        "put", "get", "ls", "stat", "cat", "rm", "stats", "mv", "cp", "du", "find", "versions",
        "restore", "sync", "gc", "fsck", "keygen", "whoami", "id", "grant", "revoke", "purge",
        "audit",
    }
)  # fmt: skip

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
    """The ``fms`` console script (``argv`` None: the process's own, which a one-shot
    command may then end, see :data:`ONE_SHOT`)."""
    return _run("fms", False, sys.argv[1:] if argv is None else argv, argv is None)


def client_main(argv: list[str] | None = None) -> int:
    """``python client.py`` (``argv`` None: as :func:`main`)."""
    return _run("client.py", True, sys.argv[1:] if argv is None else argv, argv is None)


def daemon_main(kind: str, argv: list[str] | None = None) -> int:
    """``python broker.py`` / ``storage_worker.py`` / ``cache_worker.py``."""
    prog = f"{kind}.py" if kind == "broker" else f"{kind}_worker.py"
    parser = command_parser(kind, prog)
    args = parser.parse_args(argv)
    args.command = kind
    return dispatch(args, parser)


def _run(prog: str, client_only: bool, argv: list[str], owns_process: bool = False) -> int:
    # Only the arguments of the command about to run are built (all of them for the shell),
    # and the other commands are listed only where the help or an error may show them.
    parser = build_parser(
        prog, client_only, only=command_in(argv) or "", listed=lists_commands(argv)
    )
    args = parse(parser, argv)
    if not args.command:
        from .shell import run_shell

        return run_shell(args, prog)
    status = dispatch(args, parser)
    if owns_process and args.command in ONE_SHOT:
        exit_now(status)
    return status


def exit_now(status: int) -> None:
    """End the process with ``status`` once stdout and stderr are flushed, skipping the
    interpreter's teardown.  The command has closed its client (its socket with linger 0:
    nothing is left to send), and logging, if configured, is shut down as at exit.  If the
    output cannot be flushed (a reader gone), or a thread that the interpreter's exit would
    wait for still runs (not a daemon: a pool cut short by Ctrl-C), return: the interpreter's
    own exit waits for it and reports what it reports, as it always has.  Daemon threads (the
    progress bars' monitor, pyzmq's collector of zero-copy frames, which a large upload starts)
    end with the process either way."""
    threading = sys.modules.get("threading")  # not imported: no thread was started
    if threading is not None and any(
        not thread.daemon
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
    ):
        return
    if "logging" in sys.modules:
        import logging

        logging.shutdown()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # ValueError: closed (dispatch closes stderr on EPIPE)
        return
    os._exit(status)


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
