"""The shell (`fms` with no command), as an sftp user meets it (issue 26): on a terminal, a
prompt, completion that quotes names, questions before rm -r, a history that can be turned off;
from a pipe, a batch that stops at its first error; cd, pwd, lcd, lpwd, lls, cat and !."""

import io
import shlex

import pytest
from terminal import run_on_a_pty

from fms.cli.parser import build_parser
from fms.cli.shell import Shell, resolve


def test_a_batch_from_a_pipe_prints_no_prompt_and_stops_at_its_first_failure(cluster, tmp_path):
    (tmp_path / "f.txt").write_bytes(b"batch data")
    script = f"put {tmp_path / 'f.txt'} s/f.txt\n-stat nothere\nls s/\nget nope\nls\nrm s/f.txt\n"
    run = cluster.cli(stdin=script.encode())
    out, err = run.stdout.decode(), run.stderr.decode()
    assert "fms> " not in out and "fms shell" not in out  # no prompt, no banner
    assert run.returncode == 1, (out, err)  # the status of `get nope`
    assert "s/f.txt" in out  # `ls s/` ran after the failure marked with '-'
    assert err.count("not found") == 2 and "Traceback" not in err
    with cluster.client() as c:
        assert c.stat("s/f.txt")  # the batch ended at `get nope`: `rm` never ran
    ok = cluster.cli(stdin=b"ls\nstat s/f.txt\n")
    assert ok.returncode == 0 and b"digest:" in ok.stdout


def test_on_a_terminal_it_prompts_survives_errors_and_asks_before_rm_r(cluster, tmp_path):
    with cluster.client() as c:
        c.put_bytes(b"1", "s/a")
    typed = "get nope\nbogus\nrm -r s\nn\nmv s/a s/b\nls -r\nrm -r s/\ny\nls -r\nquit\n"
    code, drawn = run_on_a_pty(["--broker", cluster.frontend], typed, tmp_path)
    assert code == 0, drawn
    assert drawn.count("fms> ") >= 8 and "fms shell, cluster at" in drawn
    assert "not found" in drawn and "unknown command 'bogus'" in drawn
    assert drawn.count("remove every name under /s/? [y/N]") == 2 and "nothing removed" in drawn
    with cluster.client() as c:
        assert c.ls() == []


def test_help_of_a_command_shows_its_own_options_not_the_connection_s(untouched_cluster):
    out = untouched_cluster.cli(stdin=b"help get\nhelp\n").stdout.decode()
    assert "--no-clobber" in out and "--range" in out
    assert "--broker" not in out and "--curve-secret" not in out and "--timeout" not in out
    assert "cd [FOLDER]" in out and "lls [ARGS]" in out  # the local commands, in `help`


def test_a_bad_option_prints_that_command_s_usage_not_the_whole_program_s(untouched_cluster):
    run = untouched_cluster.cli(stdin=b"get --bogus x\n")
    assert run.returncode == 2
    err = run.stderr.decode()
    assert "usage: get " in err and "unrecognized arguments: --bogus" in err
    assert "COMMAND" not in err  # not the top-level usage
    direct = untouched_cluster.cli("get", "--bogus", "x")  # on the command line too
    assert direct.returncode == 2 and b"usage: client.py get " in direct.stderr
    assert b"COMMAND" not in direct.stderr


def test_cd_pwd_lcd_lpwd_lls_cat_and_a_local_command(cluster, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    (here / "up.txt").write_bytes(b"from here\n")
    with cluster.client() as c:
        c.put_bytes(b"one\n", "photos/2024/one.txt")
        c.put_bytes(b"top\n", "top.txt")
    script = (
        f"cd photos/2024\npwd\ncat one.txt\ncat /top.txt\nlcd {here}\nlpwd\nlls\n"
        f"put up.txt\nls\ncd ..\npwd\nls\ncd /\npwd\n!echo from-a-shell\n"
        f"-cd nowhere\nget photos/2024/up.txt copy.txt\n"
    )
    run = cluster.cli(stdin=script.encode())
    out = run.stdout.decode()
    assert run.returncode == 0, run.stderr
    lines = out.splitlines()
    assert lines[0] == "/photos/2024/" and lines[1:3] == ["one", "top"]
    assert str(here) in lines and "up.txt" in lines  # lpwd, lls
    assert "photos/2024/up.txt" in out  # put into the working folder, listed by ls
    assert "/photos/" in lines and "/" in lines and "from-a-shell" in lines
    assert "no folder '/nowhere'" in run.stderr.decode()
    assert (here / "copy.txt").read_bytes() == b"from here\n"  # get wrote into the lcd folder


def test_the_history_goes_where_fms_history_says_and_nowhere_when_it_is_empty(
    untouched_cluster, tmp_path
):
    cluster = untouched_cluster
    kept = tmp_path / "hist"
    code, _ = run_on_a_pty(
        ["--broker", cluster.frontend], "ls\nquit\n", tmp_path, {"FMS_HISTORY": str(kept)}
    )
    assert code == 0 and "ls" in kept.read_text().split()
    code, _ = run_on_a_pty(
        ["--broker", cluster.frontend], "ls\nquit\n", tmp_path, {"FMS_HISTORY": ""}
    )
    assert code == 0 and not (tmp_path / ".fms_history").exists()
    code, _ = run_on_a_pty(["--broker", cluster.frontend], "ls\nquit\n", tmp_path)
    assert code == 0 and (tmp_path / ".fms_history").exists()  # the default: ~/.fms_history


NAMES = ("docs/a.txt", "docs/b.txt", "pics/c.jpg", "my file é.txt", "it's here/x", "top.txt")


@pytest.fixture
def shell(_shared_clusters, store_digest):
    """A shell on a cluster holding NAMES at its root, and nothing else: the tests only read."""
    cluster = _shared_clusters("shell-names", store_digest)
    with cluster.client() as c:
        for name in NAMES:
            c.put_bytes(b"x", name)
        yield Shell(
            lambda argv, cwd: 0,
            c,
            build_parser("fms", shell=True),
            cluster.frontend,
            stdin=io.StringIO(),
            stdout=io.StringIO(),
        )


def completed(shell, line: str) -> list:
    """The lines a tab at the end of ``line`` can make, as readline makes them: its word
    starts after a blank, and one match gets a space after it."""
    begidx = max(line.rfind(" "), line.rfind("\t")) + 1
    text = line[begidx:]
    found = shell.completedefault(text, line, begidx, len(line))
    return [line[:begidx] + c + (" " if len(found) == 1 else "") for c in found]


@pytest.mark.parametrize("typed", ["get my", "get 'my", 'get "my', "get my\\ fi", "get 'my fi"])
def test_completion_quotes_a_name_so_the_shell_reads_it_back(shell, typed):
    [line] = completed(shell, typed)
    assert shlex.split(line) == ["get", "my file é.txt"]
    assert line.endswith(" ")  # a whole name: the next argument comes


def test_completion_goes_a_level_at_a_time_into_folders_and_quotes_apostrophes(shell):
    # One folder is not offered alone (readline would put a space after it): what it holds is.
    assert completed(shell, "get do") == ["get docs/a.txt", "get docs/b.txt"]
    assert completed(shell, "get docs/") == ["get docs/a.txt", "get docs/b.txt"]
    assert completed(shell, "rm pics/") == ["rm pics/c.jpg "]
    assert completed(shell, "ls ") == [
        "ls docs/",
        "ls it\\'s\\ here/",
        "ls my\\ file\\ é.txt",
        "ls pics/",
        "ls top.txt",
    ]
    [line] = completed(shell, "stat it")
    assert shlex.split(line) == ["stat", "it's here/x"]
    assert shell.completenames("st") == ["stat ", "stats "]


def test_completion_reads_names_against_the_working_folder(shell):
    shell.onecmd("cd docs")
    assert completed(shell, "get ") == ["get a.txt", "get b.txt"]
    assert completed(shell, "get ../p") == ["get ../pics/c.jpg "]
    assert completed(shell, "get /t") == ["get /top.txt "]
    assert completed(shell, "cd /") == ["cd /docs/", "cd /it\\'s\\ here/", "cd /pics/"]


def test_remote_names_are_read_against_the_working_folder():
    assert resolve("", "a") == "a"
    assert resolve("p/q/", "a/b") == "p/q/a/b"
    assert resolve("p/q/", "../a") == "p/a"
    assert resolve("p/q/", "/a") == "a"
    assert resolve("p/", "../../..") == ""
    assert resolve("p/", "x/") == "p/x/"
    assert resolve("p/", "") == "p/"
