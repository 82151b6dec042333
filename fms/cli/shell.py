"""The interactive shell: ``fms`` with no command, like an sftp session.

Every store command is parsed by the shell's parser (the command line's, without the connection
options: the shell is connected already) and run by the same handler on the shell's one
connection, so arguments, output and errors are the command line's.  Beside them, as in sftp:
``cd`` and ``pwd`` (a remote working folder that relative names are read against; ``/NAME`` is
from the top), ``lcd``, ``lpwd`` and ``lls`` (the local side), ``!COMMAND`` (a local shell
command), ``help [COMMAND]``, and ``quit``, ``exit`` or Ctrl-D.

On a terminal: a prompt, tab completion of remote names (and of local paths where a command
takes one), quoted as the shell will read them back, and a history kept in ``$FMS_HISTORY``
(default ``~/.fms_history``; set it empty to keep none).  An error is printed and the shell
goes on.  Read from a pipe or a file, it is a batch, as ``sftp -b``: no prompt, and the first
command that fails ends it with that command's exit status (a line starting with ``-`` may
fail without ending it).
"""

from __future__ import annotations

import cmd
import glob
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, TextIO

from ..errors import FmsError

if TYPE_CHECKING:
    from ..client.api import Client
    from .parser import Parser

HISTORY_ENV = "FMS_HISTORY"
HISTORY_DEFAULT = "~/.fms_history"
HISTORY_LENGTH = 1000
COMPLETION_TTL = 5.0  # seconds a listing is reused for completion
COMPLETION_MAX = 1000  # names listed for one completion
LOCAL_COMMANDS = ("cd", "pwd", "lcd", "lpwd", "lls", "!", "help", "quit")

# Which parsed arguments of each command are remote names, read against the working folder.
REMOTE_ARGS = {
    "get": ("name",),
    "cat": ("names",),
    "ls": ("prefix",),
    "stat": ("name",),
    "rm": ("names",),
    "mv": ("src", "dst"),
    "cp": ("src", "dst"),
    "versions": ("name",),
    "restore": ("name",),
    "du": ("prefix",),
    "find": ("prefix",),
}
# Where completion offers local paths: (command, argument index) -> True; the rest is remote.
LOCAL_ARGS = {("put", 1), ("get", 2), ("lcd", 1), ("lls", 1), ("keygen", 1)}


def history_file() -> str | None:
    """Where the history is kept: ``$FMS_HISTORY``, else ``~/.fms_history``; None (empty
    ``$FMS_HISTORY``): nowhere."""
    path = os.environ.get(HISTORY_ENV, HISTORY_DEFAULT)
    return os.path.expanduser(path) if path else None


def resolve(cwd: str, name: str) -> str:
    """``name`` read against the working folder ``cwd`` ('' or ending in '/'): ``/NAME`` is
    from the top; ``.`` and ``..`` parts are walked (never above the top); a trailing '/'
    stays."""
    joined = name if name.startswith("/") else "/" + cwd + name
    folder = joined.endswith("/") or joined.endswith("/.") or joined.endswith("/..")
    parts: list[str] = []
    for part in joined.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    out = "/".join(parts)
    return out + "/" if folder and out else out


class Shell(cmd.Cmd):
    """:param run: ``callable(argv, cwd) -> exit code`` that runs one store command.
    :param client: the shell's :class:`fms.Client`, for completion.
    :param parser: the shell's parser (:func:`fms.cli.parser.build_parser` with ``shell``).
    :param batch: read commands from a pipe or file (no prompt; stop at the first failure).
    """

    def __init__(
        self,
        run: Callable[[list[str], str], int],
        client: Client,
        parser: Parser,
        broker: str,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        batch: bool = False,
    ) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = stdin is None
        self.batch = batch
        self.status = 0  # the exit status of the last command that failed in a batch
        self.cwd = ""  # the remote working folder: '' (the top) or 'a/b/'
        self._run = run
        self._client = client
        self._parser = parser
        self._store_commands = tuple(parser.commands)
        # (when, folder, [(name, is a folder)]): the last completion listing
        self._names: tuple[float, str | None, list[tuple[str, bool]]] = (0.0, None, [])
        self.prompt = "" if batch else "fms> "
        self.intro = (
            None
            if batch
            else f"fms shell, cluster at {broker}\n"
            f"commands: {', '.join(self._store_commands)}; {', '.join(LOCAL_COMMANDS)}\n"
            f"help COMMAND for its options; example: put ./photo.jpg trips/1.jpg"
        )

    # --- running lines ---

    def onecmd(self, line: str) -> bool:
        may_fail = self.batch and line.lstrip().startswith("-")
        if may_fail:
            line = line.lstrip()[1:]
        self.status = 0
        stop = super().onecmd(line)
        if self.status and self.batch and not may_fail:
            return True  # a batch ends at its first failure, with that status
        if may_fail:
            self.status = 0
        return stop

    def default(self, line: str) -> None:
        words = self._split(line)
        if words is None:
            return
        if words[0] in self._store_commands:
            if words[0] == "rm" and not self._rm_confirmed(words[1:]):
                return
            self._store(words[0], words[1:])
            return
        self._fail(f"unknown command {words[0]!r}; type help for the list")

    def _split(self, line: str) -> list[str] | None:
        try:
            return shlex.split(line)
        except ValueError as exc:
            self._fail(f"{line.split()[0]}: {exc}")
            return None

    def _rm_confirmed(self, argv: list[str]) -> bool:
        """On a terminal, ``rm -r`` asks first (a batch does not: it is a script)."""
        options = {w for w in argv if w.startswith("-")}
        if self.batch or not options & {"-r", "--recursive"} or options & {"-n", "--dry-run"}:
            return True
        where = ", ".join(
            "/" + resolve(self.cwd, w.rstrip("/") + "/") for w in argv if not w.startswith("-")
        )
        self.stdout.write(f"remove every name under {where}? [y/N] ")
        self.stdout.flush()
        answer = input() if self.use_rawinput else self.stdin.readline()
        if answer.strip().lower() in ("y", "yes"):
            return True
        self._print("nothing removed")
        return False

    def _store(self, name: str, argv: list[str]) -> None:
        try:
            status = self._run([name, *argv], self.cwd)
        except SystemExit as exc:  # argparse printed a usage error (status 2) or --help (0)
            status = exc.code if isinstance(exc.code, int) else 2
        self.status = status or 0
        self._names = (0.0, None, [])  # the store may have changed

    def _fail(self, text: str, status: int = 1) -> None:
        print(text, file=sys.stderr if self.batch else self.stdout)
        self.status = status

    def emptyline(self) -> bool:
        return False  # cmd.Cmd would repeat the last command: surprising for `rm`

    # --- the local commands ---

    def do_cd(self, line: str) -> None:
        """cd [FOLDER]: the remote working folder that relative names are read against
        (/ or nothing: the top; .. goes up)."""
        words = self._split(line)
        if words is None:
            return
        if len(words) > 1:
            self._fail("cd takes one folder")
            return
        target = resolve(self.cwd, (words[0] if words else "/").rstrip("/") + "/")
        if target and not any(True for _ in itertools.islice(self._client.iter_ls(target), 1)):
            where = "/" + target.rstrip("/")
            self._fail(f"cd: no folder {where!r}: nothing is stored under it")
            return
        self.cwd = target
        if not self.batch:
            self.prompt = f"fms:/{self.cwd}> " if self.cwd else "fms> "

    def do_pwd(self, line: str) -> None:
        """pwd: print the remote working folder."""
        self._print("/" + self.cwd)

    def do_lcd(self, line: str) -> None:
        """lcd [DIR]: change the local working folder (default: home)."""
        words = self._split(line)
        if words is None:
            return
        path = os.path.expanduser(words[0] if words else "~")
        try:
            os.chdir(path)
        except OSError as exc:
            self._fail(f"lcd: {path}: {exc.strerror}")

    def do_lpwd(self, line: str) -> None:
        """lpwd: print the local working folder."""
        self._print(os.getcwd())

    def do_lls(self, line: str) -> None:
        """lls [ARGS]: list local files (runs ls ARGS)."""
        self._run_local(f"ls {line}")

    def do_shell(self, line: str) -> None:
        """!COMMAND: run COMMAND in a local shell (! alone: an interactive one)."""
        self._run_local(line or os.environ.get("SHELL", "/bin/sh"))

    def _run_local(self, command: str) -> None:
        self.stdout.flush()
        code = subprocess.run(command, shell=True).returncode
        if code:
            self.status = code

    def do_help(self, line: str) -> None:
        """help [COMMAND]: list commands, or show one command's options and examples."""
        name = line.strip()
        if name in self._store_commands:
            self._store(name, ["--help"])
        elif name in ("!", "shell"):
            self._print(self.do_shell.__doc__ or "")
        elif name and hasattr(self, f"do_{name}"):
            self._print(" ".join(getattr(self, f"do_{name}").__doc__.split()))
        elif name:
            self._fail(f"no command {name!r}; type help for the list")
        else:
            for command, sub in self._parser.commands.items():
                self._print(f"  {command:<9} {sub.description}")
            for command in ("cd", "pwd", "lcd", "lpwd", "lls", "shell", "quit"):
                doc = " ".join(getattr(self, f"do_{command}").__doc__.split())
                self._print(f"  {doc}")
            self._print("  help COMMAND: its options and examples")

    def do_quit(self, line: str) -> bool:
        """quit (or exit, or Ctrl-D): leave the shell."""
        return True

    do_exit = do_quit

    def do_EOF(self, line: str) -> bool:
        if not self.batch:
            self._print("")
        return True

    def _print(self, text: str) -> None:
        print(text, file=self.stdout)

    # --- completion ---

    def completenames(self, text: str, *ignored: object) -> list[str]:
        names = (*self._store_commands, *LOCAL_COMMANDS[:-3], "help", "quit", "exit")
        return [c + " " for c in names if c.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        words = _words(line[:endidx])
        if not words or words[-1][0] + len(words[-1][1]) < endidx:
            words.append((endidx, "", "", ""))  # completing a new, empty word
        start, _raw, typed, quote = words[-1]
        command = words[0][2]
        position = len([w for w in words[1:-1] if not w[2].startswith("-")]) + 1
        if command in ("pwd", "lpwd", "stats", "gc", "fsck", "quit", "exit", "help"):
            return []
        if command == "sync":
            local = not typed.startswith("fms:")
        elif command == "put":
            local = True  # what to upload; a NAME to store under is mostly new
        elif command in self._store_commands or command == "cd":
            local = (command, position) in LOCAL_ARGS
        else:
            local = True  # lcd, lls, !
        lister: Callable[[str], list[str]]
        if local:
            lister = _local
        elif command == "sync":

            def lister(typed: str) -> list[str]:
                return ["fms:" + n for n in self._remote(typed[len("fms:") :])]
        else:

            def lister(typed: str) -> list[str]:
                return self._remote(typed, folders_only=command == "cd")

        found = lister(typed)
        # readline puts a space after the one match it is given (Python cannot turn that off):
        # so one folder is never given alone, but what it holds, until there is a choice.
        seen = set()
        while len(found) == 1 and found[0].endswith("/") and found[0] not in seen:
            seen.add(found[0])
            found = lister(found[0]) or found
        rendered = [_quoted(f, quote, final=not f.endswith("/")) for f in found]
        typed_raw = line[start:begidx]
        return [r[len(typed_raw) :] for r in rendered if r.startswith(typed_raw)]

    def _remote(self, typed: str, folders_only: bool = False) -> list[str]:
        """Stored names and folders one level below what ``typed`` names (read against the
        working folder), as the user would type them."""
        full = resolve(self.cwd, typed) if typed else self.cwd
        folder = full[: full.rfind("/") + 1]
        when, cached_folder, entries = self._names
        if cached_folder != folder or time.monotonic() - when > COMPLETION_TTL:
            try:
                entries = [
                    (e["name"], bool(e.get("folder")))
                    for e in itertools.islice(self._client.iter_folder(folder), COMPLETION_MAX)
                ]
            except FmsError:
                entries = []
            self._names = (time.monotonic(), folder, entries)
        shown = typed[: typed.rfind("/") + 1]
        return [
            shown + name[len(folder) :]
            for name, is_folder in entries
            if name.startswith(full) and (is_folder or not folders_only)
        ]


def _words(text: str) -> list[tuple[int, str, str, str]]:
    """The words of a command line as a shell reads them: ``(start index, raw text, value
    unquoted, the quote still open at the end: '' or ' or ")`` each; the last may be the word
    being typed."""
    words: list[tuple[int, str, str, str]] = []
    i = 0
    while i < len(text):
        if text[i] in " \t":
            i += 1
            continue
        start, value, quote = i, "", ""
        while i < len(text) and (quote or text[i] not in " \t"):
            ch = text[i]
            if quote:
                if ch == quote:
                    quote = ""
                elif ch == "\\" and quote == '"' and text[i + 1 : i + 2] in ('"', "\\", "$", "`"):
                    i += 1
                    value += text[i]
                else:
                    value += ch
            elif ch in "'\"":
                quote = ch
            elif ch == "\\" and i + 1 < len(text):
                i += 1
                value += text[i]
            else:
                value += ch
            i += 1
        words.append((start, text[start:i], value, quote))
    return words


_SPECIAL = re.compile(r"([\s'\"\\$`!*?&;|<>()\[\]{}#~=%])")


def _quoted(value: str, quote: str, final: bool) -> str:
    """``value`` written as the shell reads it back: in ``quote`` (closed when ``final``),
    else with backslashes before special characters."""
    if quote == "'":
        body = "'" + value.replace("'", "'\\''")
        return body + ("'" if final else "")
    if quote == '"':
        body = '"' + re.sub(r'(["\\$`])', r"\\\1", value)
        return body + ('"' if final else "")
    return _SPECIAL.sub(r"\\\1", value)


def _local(typed: str) -> list[str]:
    found = []
    for path in glob.glob(glob.escape(os.path.expanduser(typed)) + "*"):
        shown = typed + path[len(os.path.expanduser(typed)) :] if typed.startswith("~") else path
        found.append(shown + ("/" if os.path.isdir(path) else ""))
    return sorted(found)


def run_shell(args: Namespace, prog: str) -> int:
    """The shell, on the terminal or reading a batch from stdin, until quit or end of input.
    :return: 0, or in a batch the exit status of the command that ended it."""
    from .commands import open_client
    from .main import dispatch, parse
    from .parser import build_parser

    parser = build_parser(prog, shell=True)
    batch = not sys.stdin.isatty()
    readline: ModuleType | None = None  # the line editor, when there is one
    history = None
    if not batch:
        try:
            import readline as editor

            editor.set_completer_delims(" \t\n")  # names hold '/' and '-'
            editor.set_history_length(HISTORY_LENGTH)
            history = history_file()
            if history and os.path.exists(history):
                editor.read_history_file(history)
            readline = editor
        except (ImportError, OSError):
            readline = None
    with open_client(args) as client:

        def run(argv: list[str], cwd: str) -> int:
            command_args = parse(parser, argv)
            for key in ("broker", "timeout", "quiet", "log_level", "curve_secret", "server_key"):
                if hasattr(args, key):
                    setattr(command_args, key, getattr(args, key))
            for key in REMOTE_ARGS.get(command_args.command, ()):
                setattr(command_args, key, _resolved(cwd, getattr(command_args, key)))
            _resolve_special(command_args, cwd)
            command_args.shell_client = client
            return dispatch(command_args, parser.commands[command_args.command])

        shell = Shell(run, client, parser, client.broker, batch=batch)
        try:
            while True:
                try:
                    shell.cmdloop()
                    break
                except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                    print("^C (quit or Ctrl-D leaves)")
                    shell.intro = None
        finally:
            if readline is not None and history:
                try:
                    readline.write_history_file(history)
                except OSError:
                    pass
    return shell.status if batch else 0


def _resolved(cwd: str, value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list):
        return [resolve(cwd, v) if v or cwd else v for v in value]
    if value is None:
        return None
    return resolve(cwd, value) if value or cwd else value


def _resolve_special(args: Namespace, cwd: str) -> None:
    """The remote arguments that are not plain names: put's NAME (the last LOCAL), sync's
    fms:PREFIX sides."""
    if args.command == "put" and cwd:
        if len(args.local) == 1:
            args.local.append(cwd)  # into the working folder, under its base name
        else:
            args.local[-1] = resolve(cwd, args.local[-1]) + (
                "/" if args.local[-1].endswith("/") else ""
            )
    if args.command == "sync":
        for key in ("src", "dst"):
            value = getattr(args, key)
            if value.startswith("fms:"):
                rest = value[len("fms:") :]
                setattr(args, key, "fms:" + (resolve(cwd, rest + "/") if rest or cwd else ""))
