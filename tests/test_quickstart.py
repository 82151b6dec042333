"""The README's Quick start and tour, and the commands of docs/CLI.md and docs/OPERATIONS.md,
run as written, in order, on a fresh clone (issue 26, points 2 and 6).

The clone gets its own virtual environment the way the Quick start makes it; `fms up` then runs
in a network namespace of its own, so that its default ports (5555, 5556) are its alone, and
every block of the pages runs there with bash from the clone's folder.  Blocks are the pages'
```sh fences: untagged ones run to their end and must succeed; `up` starts a cluster that keeps
running; `stopped` runs after the cluster is stopped (Ctrl-C); `ci` is the test command, which
CI runs (.ci/run), not this test."""

import os
import re
import shutil
import signal
import subprocess

import pytest
from conftest import ROOT, wait_for

PAGES = ("README.md", "docs/CLI.md", "docs/OPERATIONS.md")
INSTALL_TIMEOUT = 300.0  # seconds for the Quick start's pip install (a fresh venv)
UP_TIMEOUT = 60.0


def blocks(page: str) -> list:
    """``(tag, body)`` of each ```sh block of ``page``, in order."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return re.findall(r"^```sh ?([\w-]*)\n(.*?)^```", f.read(), re.M | re.S)


class Machine:
    """The fresh clone, and the namespace its cluster and commands run in."""

    def __init__(self, nets, clone, home):
        self.nets, self.clone = nets, clone
        self.env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
        self.up = None
        self.up_log = clone / "up.log"

    def run(self, body: str, where: str) -> str:
        got = self.nets.run(
            0,
            ["bash", "-c", f"set -e\n{body}"],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            timeout=120,
        )
        out = got.stdout.decode() + got.stderr.decode()
        assert got.returncode == 0, f"{where}:\n{body}\n--- output:\n{out}\n{self.log()}"
        assert "Traceback" not in out, out
        return out

    def start(self, command: str):
        """Start `fms up` and wait until it is ready: its banner printed (which it prints as it
        starts its processes), its broker listening and each of its workers registered, in the
        log of this start (a loaded machine may take seconds between the banner and the broker,
        longer than a command's 3 s to connect)."""
        offset = self.up_log.stat().st_size if self.up_log.exists() else 0
        with open(self.up_log, "ab") as log:
            self.up = self.nets.popen(
                0,
                ["bash", "-c", command],
                cwd=self.clone,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            said = self.up_log.read_bytes()[offset:].decode("utf-8", "replace")
            workers = re.search(r"(\d+) cache workers? and (\d+) storage workers?", said)
            return self.up.poll() is not None or (
                workers is not None
                and "Ctrl-C stops all" in said
                and "proc=fms.broker event=listening" in said
                and said.count(" event=registered ") >= int(workers[1]) + int(workers[2])
            )

        wait_for(ready, UP_TIMEOUT, "fms up to start and its workers to register")
        assert self.up.poll() is None, self.log()

    def stop(self):
        """Ctrl-C, as a user stops `fms up`."""
        os.killpg(self.up.pid, signal.SIGINT)
        assert self.up.wait(30) == 0, self.log()

    def log(self) -> str:
        return self.up_log.read_text()[-4000:] if self.up_log.exists() else ""


@pytest.mark.timeout(600)
def test_the_quick_start_and_the_pages_commands_run_as_written_on_a_fresh_clone(
    make_netns, tmp_path
):
    clone, home = tmp_path / "clone", tmp_path / "home"
    home.mkdir()
    if subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode == 0:
        subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True, timeout=120)
    else:  # a tree without its history (an export): its files are the clone's
        shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".venv*", "__pycache__"))
    machine = Machine(make_netns(1), clone, home)
    (up_tag, install_and_up), *_ = blocks("README.md")
    assert up_tag == "up" and install_and_up.strip().endswith(".venv/bin/fms up")
    # "A && B && C": the install steps (on this machine, which may reach the package index;
    # the namespace has no route out), then `fms up` in the namespace.
    *install, up = [part.strip() for part in install_and_up.strip().split(" && ")]
    got = subprocess.run(
        ["bash", "-c", " && ".join(install)],
        cwd=clone,
        capture_output=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert got.returncode == 0, got.stderr.decode()[-3000:]
    machine.start(up)
    said = {}
    try:
        for page in PAGES:
            for i, (tag, body) in enumerate(blocks(page)):
                where = f"{page}, block {i + 1}"
                if tag in ("ci",) or (page == "README.md" and i == 0):
                    continue
                if tag == "stopped":
                    machine.stop()
                    said[where] = machine.run(body, where)
                elif tag == "up":
                    machine.start(body.strip())
                else:
                    assert tag == "", f"{where}: unknown tag {tag!r}"
                    said[where] = machine.run(body, where)
    finally:
        if machine.up is not None and machine.up.poll() is None:
            machine.stop()
    out = "\n".join(said.values())
    assert (clone / "hello-again.txt").read_text() == "hello, fms\n"  # the Quick start's get
    assert "notes/hello.txt" in out and "photos/2024/" in out  # ls -r, the tour's ls
    assert "would remove trips/a.jpg" in out  # docs/CLI.md's rm --dry-run
    assert (clone / "restored" / "raw" / "b.jpg").read_text() == "b\n"  # its get -r --include
    assert (clone / "backup" / "files" / "notes" / "hello.txt").exists()  # OPERATIONS' sync
    assert "0 damaged or missing" in out and out.rstrip().endswith("hello, fms")  # the restore
