"""Running the command line on a pseudo-terminal, as a user at a terminal does: for the tests of
what is drawn (progress bars) and asked (the shell, sync --delete)."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from harness import ROOT

READ_TIMEOUT = 60.0  # seconds a shell on a terminal may take to finish its input


def run_on_a_pty(args: list, typed: str, cwd, env=None) -> tuple:
    """Run client.py with stdin, stdout and stderr on a pseudo-terminal, type ``typed`` into
    it and read until it exits; :return: (exit status, what it drew)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "client.py"), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env={**os.environ, "TERM": "dumb", "HOME": str(cwd), **(env or {})},
        close_fds=True,
    )
    os.close(slave)
    for line in typed.splitlines(keepends=True):
        os.write(master, line.encode())
    out, deadline = [], time.monotonic() + READ_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the shell closed the terminal
            break
        if not data:
            break
        out.append(data)
    code = proc.wait(10)
    os.close(master)
    return code, b"".join(out).decode("utf-8", "replace").replace("\r\n", "\n")


def run_on_a_terminal(args, cwd, status: int = 0) -> str:
    """Run client.py with stderr on a pseudo-terminal; return what it drew there (its exit
    status checked to be ``status``)."""
    master, slave = pty.openpty()
    fcntl.ioctl(
        slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0)
    )  # 40x120, as a terminal has
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "client.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(60)
    os.close(master)
    assert proc.returncode == status, b"".join(chunks)
    return b"".join(chunks).decode("utf-8", "replace")
