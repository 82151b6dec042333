"""The interactive shell: ``python client.py`` with no command, like an sftp session.

Every command is parsed by the same argparse subparser as on the command line and run by the same
handler, so arguments, output and errors are identical.  An error is printed and the shell goes
on; ``quit``, ``exit`` or Ctrl-D leave.  On a terminal: tab completion of remote names (and of
local paths for ``put``) and a history kept in ``~/.fms_history``.
"""

import cmd
import glob
import os
import shlex
import sys
import time

from ..errors import FmsError

HISTORY_FILE = os.path.expanduser("~/.fms_history")
HISTORY_LENGTH = 1000
COMPLETION_TTL = 5.0  # seconds a listing is reused for completion
COMMANDS = (
    "put",
    "get",
    "ls",
    "stat",
    "rm",
    "mv",
    "cp",
    "du",
    "find",
    "sync",
    "versions",
    "restore",
    "stats",
    "gc",
    "fsck",
)


class Shell(cmd.Cmd):
    """:param run: ``callable(argv) -> exit code`` that runs one CLI command.
    :param client: a connected :class:`fms.Client`, used for completion only.
    """

    prompt = "fms> "

    def __init__(self, run, client, parser, broker: str, stdin=None, stdout=None):
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = stdin is None
        self._run = run
        self._client = client
        self._parser = parser
        self._names = (0.0, "", [])  # (when, prefix, names): the last completion listing
        self.intro = (
            f"fms shell, cluster at {broker}\n"
            f"commands: {', '.join(COMMANDS)}, help [COMMAND], quit\n"
            f"example: put ./photo.jpg trips/1.jpg   then: get trips/1.jpg\n"
        )

    # --- commands ---

    def _command(self, name: str, line: str):
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            self._print(f"{name}: {exc}")
            return
        try:
            self._run([name, *argv])
        except SystemExit:
            pass  # argparse already printed the usage error; the shell goes on
        self._names = (0.0, "", [])  # the store may have changed

    def do_put(self, line):
        """put LOCAL [NAME] | put LOCAL... FOLDER/ | put -r DIR [PREFIX]: upload."""
        self._command("put", line)

    def do_get(self, line):
        """get NAME [DEST | -] | get -r PREFIX DESTDIR: download."""
        self._command("get", line)

    def do_ls(self, line):
        """ls [PREFIX] [-r] [-l] [-h] [--json]: one level (folders collapsed), or all with -r."""
        self._command("ls", line)

    def do_stat(self, line):
        """stat NAME [--json]: size, sha256, mtime, version."""
        self._command("stat", line)

    def do_rm(self, line):
        """rm NAME | rm -r PREFIX: remove a name, or every name under a prefix (asks first)."""
        words = line.split()
        if {"-r", "--recursive"} & set(words):
            prefix = next((w for w in words if not w.startswith("-")), "")
            self.stdout.write(f"remove every name under {prefix.strip('/')}/? [y/N] ")
            self.stdout.flush()
            answer = self.stdin.readline() if not self.use_rawinput else input()
            if answer.strip().lower() not in ("y", "yes"):
                self._print("nothing removed")
                return
        self._command("rm", line)

    def do_mv(self, line):
        """mv SRC DST: rename a stored file (atomic, no data moves)."""
        self._command("mv", line)

    def do_cp(self, line):
        """cp SRC DST: copy a stored file on the server (no data moves)."""
        self._command("cp", line)

    def do_versions(self, line):
        """versions NAME [--json]: current and retained versions."""
        self._command("versions", line)

    def do_restore(self, line):
        """restore NAME [--version V]: make a retained version current again."""
        self._command("restore", line)

    def do_du(self, line):
        """du [PREFIX] [--json]: files and bytes under a prefix."""
        self._command("du", line)

    def do_find(self, line):
        """find PREFIX [--name GLOB] [--newer WHEN] [--json]: matching names."""
        self._command("find", line)

    def do_sync(self, line):
        """sync SRC DST [--delete] [--dry-run]: ./folder <-> fms:PREFIX, sending what differs."""
        self._command("sync", line)

    def do_stats(self, line):
        """stats [--json]: workers and cache counters."""
        self._command("stats", line)

    def do_gc(self, line):
        """gc [--grace SECONDS] [--dry-run]: free chunks no stored file uses."""
        self._command("gc", line)

    def do_fsck(self, line):
        """fsck [--json]: check every stored file's chunks."""
        self._command("fsck", line)

    def do_help(self, line):
        """help [COMMAND]: list commands, or show one command's options and examples."""
        name = line.strip()
        if name in COMMANDS:
            self._command(name, "--help")
        elif name:
            self._print(f"no command {name!r}; commands: {', '.join(COMMANDS)}, quit")
        else:
            for command in (*COMMANDS, "help", "quit"):
                doc = getattr(self, f"do_{command}").__doc__
                self._print(f"  {doc}")

    def do_quit(self, line):
        """quit (or exit, or Ctrl-D): leave the shell."""
        return True

    do_exit = do_quit

    def do_EOF(self, line):
        self._print("")
        return True

    def emptyline(self):
        pass  # cmd.Cmd would repeat the last command: surprising for `rm`

    def default(self, line):
        self._print(f"unknown command {line.split()[0]!r}; type help for the list")

    def _print(self, text: str):
        print(text, file=self.stdout)

    # --- completion ---

    def _remote(self, text: str) -> list:
        when, prefix, names = self._names
        if not (text.startswith(prefix) and time.monotonic() - when < COMPLETION_TTL):
            try:
                names = [e["name"] for e in self._client.ls(text)]
            except FmsError:
                names = []
            self._names = (time.monotonic(), text, names)
        return [n for n in names if n.startswith(text)]

    def completenames(self, text, *ignored):
        return [c + " " for c in (*COMMANDS, "help", "quit") if c.startswith(text)]

    def complete_get(self, text, line, begidx, endidx):
        return self._remote(text) if _arg_index(line, begidx) == 1 else _local(text)

    complete_stat = complete_rm = complete_ls = complete_du = complete_find = complete_get
    complete_versions = complete_restore = complete_get

    def complete_mv(self, text, line, begidx, endidx):
        return self._remote(text)

    complete_cp = complete_mv

    def complete_put(self, text, line, begidx, endidx):
        return _local(text) if _arg_index(line, begidx) == 1 else self._remote(text)


def _arg_index(line: str, begidx: int) -> int:
    """Which argument (1 = first after the command, options not counted) is being completed."""
    words = [w for w in line[:begidx].split() if not w.startswith("-")]
    return len(words)


def _local(text: str) -> list:
    return [path + ("/" if os.path.isdir(path) else "") for path in glob.glob(text + "*")]


def run_shell(run, client, parser, broker: str) -> int:
    """Run the shell on the terminal (or on piped stdin) until quit; :return: 0."""
    interactive = sys.stdin.isatty()
    readline = None
    if interactive:
        try:
            import readline

            readline.set_completer_delims(" \t\n")  # names hold '/' and '-'
            readline.set_history_length(HISTORY_LENGTH)
            if os.path.exists(HISTORY_FILE):
                readline.read_history_file(HISTORY_FILE)
        except (ImportError, OSError):
            readline = None
    shell = Shell(run, client, parser, broker)
    try:
        while True:
            try:
                shell.cmdloop()
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                print("^C (quit or Ctrl-D leaves)")
                shell.intro = None
    finally:
        if readline is not None:
            try:
                readline.write_history_file(HISTORY_FILE)
            except OSError:
                pass
    return 0
