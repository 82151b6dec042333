"""A CLI call imports only what it uses (issue 26, point 4): `--help` no ZeroMQ, msgpack or
OpenSSL; `ls` and `stat` none of hashing, logging, CURVE, the daemons, the storage engine or the
shell.  How long they take is measured by `python -m benchmarks.startup`, not here."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# client.py's own two lines; given its arguments, client_main returns rather than ending the
# process (as a read-only command does when it reads the process's own).
PROBE = """
import json, sys
from fms.cli import client_main
try:
    client_main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""

# Never needed to list or stat: each was imported by every command before.
HEAVY = {
    "hashlib",  # OpenSSL
    "logging",
    "shutil",  # argparse's terminal width, and with it bz2, lzma, zlib
    "zmq.auth",
    "fms.security",
    "fms.cli.daemons",
    "fms.cli.up",
    "fms.cli.sync",
    "fms.cli.shell",
    "fms.storage",
    "fms.cache",
    "fms.broker",
    "concurrent.futures",
    "dataclasses",  # and with it inspect, ast, dis, tokenize
}

# A transfer's modules: fms.Client imports them when it puts or gets, not to list.
TRANSFERS = {"fms.client.upload", "fms.client.download", "fms.client.listing"}


def imported(*argv: str) -> set:
    got = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("FMS_")},
    )
    return set(json.loads(got.stderr.decode().strip().splitlines()[-1]))


def test_help_imports_neither_zeromq_nor_msgpack_nor_openssl():
    modules = imported("--help")
    assert not {"zmq", "msgpack"} & modules
    assert not HEAVY & modules, HEAVY & modules


@pytest.mark.parametrize("argv", [["ls", "{p}"], ["ls", "-r", "-l", "{p}"], ["stat", "{p}f"]])
def test_ls_and_stat_import_only_what_they_use(shared_cluster, prefix, argv):
    with shared_cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}f")
    modules = imported("--broker", shared_cluster.frontend, *[a.format(p=prefix) for a in argv])
    assert "zmq" in modules and "fms.client.session" in modules  # it did run
    assert not (HEAVY | TRANSFERS) & modules, (HEAVY | TRANSFERS) & modules


def test_get_r_of_small_files_imports_neither_logging_nor_concurrent_futures(
    shared_cluster, prefix, tmp_path
):
    """get -r writes small files on threads of its own: concurrent.futures would bring logging
    and traceback (5 to 30 ms of start-up)."""
    with shared_cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}d/f")
        c.put_bytes(b"y", f"{prefix}d/e/g")
    out = str(tmp_path / "out")
    modules = imported("--broker", shared_cluster.frontend, "get", "-r", f"{prefix}d", out)
    assert (tmp_path / "out" / "e" / "g").read_bytes() == b"y"  # it did run
    lighter = HEAVY - {"hashlib"}  # a download verifies what it writes
    assert not lighter & modules, lighter & modules


def _outcome(parser, argv: list) -> tuple:
    """What parsing argv prints and returns, or its exit status."""
    import contextlib
    import io

    from fms.cli.main import parse

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = sorted((k, repr(v)) for k, v in vars(parse(parser, argv)).items())
        except SystemExit as exc:
            result = exc.code
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("prog, client_only", [("fms", False), ("client.py", True)])
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["ls"],
        ["ls", "-r", "-l", "x/"],
        ["-q", "--broker", "h:1", "--timeout=2", "stat", "a"],
        ["-h", "ls"],
        ["-qh", "ls"],
        ["--he", "stat", "a"],
        ["--version", "ls"],
        ["--timeout", "0", "ls"],
        ["--bogus", "ls"],
        ["ls", "--bogus"],
        ["stat"],
        ["stat", "--help"],
        ["ls", "-h", "--help"],
        ["bogus"],
        ["broker", "--help"],
        ["up", "--bogus"],
        ["--log-level", "ls", "ls"],
    ],
)
def test_a_parser_of_one_command_parses_as_the_whole_one(monkeypatch, prog, client_only, argv):
    """`fms ls` builds ls's parser alone, without even listing the other commands, and says
    and returns exactly what the parser of every command would."""
    from fms.cli.parser import build_parser, command_in, lists_commands

    monkeypatch.setenv("COLUMNS", "100")
    whole = build_parser(prog, client_only)
    one = build_parser(prog, client_only, only=command_in(argv) or "", listed=lists_commands(argv))
    assert _outcome(one, argv) == _outcome(whole, argv)
    if argv[:1] == ["ls"]:
        assert list(one.commands) == ["ls"]


def test_a_read_only_command_ends_the_process_with_its_output_and_status(shared_cluster, prefix):
    """ls, stat and the like end the process once their output is flushed (os._exit, no
    teardown): all of a long listing is printed, and the exit status is kept."""
    names = [f"{prefix}{'n' * 60}{i:04d}" for i in range(400)]  # 26 KB of output, past a buffer
    with shared_cluster.client() as c:
        for name in names:
            c.put_bytes(b"", name)
    run = shared_cluster.cli("ls", prefix)
    assert run.returncode == 0, run.stderr
    assert [line.split()[-1] for line in run.stdout.decode().splitlines()] == names
    run = shared_cluster.cli("stat", f"{prefix}nothing")
    assert run.returncode == 1
    assert b"not found" in run.stderr


def test_a_pattern_compiled_on_use_acts_as_the_compiled_one():
    import re

    from fms.lazyre import compiled_on_use

    lazy = compiled_on_use(r"(\d+)([kmg]?)", re.IGNORECASE)
    assert "match" not in vars(lazy)  # not compiled yet
    assert lazy.fullmatch("12K").groups() == ("12", "K")  # type: ignore[union-attr]
    assert lazy.search("x") is None and lazy.flags & re.IGNORECASE
    assert lazy.pattern == r"(\d+)([kmg]?)" and "fullmatch" in vars(lazy)  # kept
    with pytest.raises(AttributeError):
        lazy.nothing  # noqa: B018


# exit_now as a one-shot command reaches it: with a thread still running that the interpreter's
# exit would wait for, it returns; else (no other thread, or only daemon threads) the process
# ends there with the status.
EXIT_PROBE = """
import sys, threading
from fms.cli.main import exit_now
go = threading.Event()
if sys.argv[1] != "alone":
    worker = threading.Thread(
        target=lambda: (go.wait(30), print("thread done", flush=True)),
        daemon=sys.argv[1] == "daemon",
    )
    worker.start()
print("before", flush=True)
exit_now(3)
print("returned", flush=True)
go.set()
"""


@pytest.mark.parametrize("thread", ["alone", "daemon", "thread"])
def test_a_one_shot_command_ends_the_process_only_when_no_thread_of_its_own_runs(thread):
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, thread],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if thread == "thread":  # not a daemon: the interpreter's exit waits for it
        assert done.returncode == 0 and done.stdout.split() == [
            "before",
            "returned",
            "thread",
            "done",
        ]
    else:
        assert done.returncode == 3 and done.stdout.split() == ["before"]
