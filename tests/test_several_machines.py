"""docs/SEVERAL-MACHINES.md followed as written (issue 26, point 6): each machine of the recipe a
network namespace of its own, with its own working folder (its `.venv` this one's), each block
of the page run by bash on the machine its tag names, the servers in the background; only the
example addresses and the database's port are the test's, and the files the page says to copy
between machines are copied here.  PostgreSQL is the tests' own server (the page's commands make
the user and the database in it); SeaweedFS is started by the page's command."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, wait_for

import fms
from fms.security import CurveClient

DOC = os.path.join(ROOT, "docs", "SEVERAL-MACHINES.md")
MACHINES = ("broker", "s3", "storage-a", "storage-b", "user")
UP_TIMEOUT = 60.0  # seconds a server of the recipe may take to come up (SeaweedFS: several)


def recipe() -> dict:
    """The page's shell blocks by tag (```sh TAG)."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    return dict(re.findall(r"^```sh ([\w-]+)\n(.*?)^```", text, re.M | re.S))


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Recipe:
    """The machines and how to run a block on one."""

    def __init__(self, nets, postgres, tmp_path):
        self.nets, self.tmp = nets, tmp_path
        self.blocks = recipe()
        self.addr = dict(zip(MACHINES, nets.addresses, strict=True))
        self.dirs = {}
        for name in MACHINES:
            folder = tmp_path / name
            folder.mkdir()
            os.symlink(sys.prefix, folder / ".venv")  # the clone's venv: this one
            self.dirs[name] = folder
        # The example addresses of step 0, as this test's machines have them.
        self.settings = (
            self.blocks["every-machine"]
            .replace("10.0.0.10", self.addr["broker"])
            .replace("10.0.0.20", postgres.host)
            .replace("DB_PORT=5432", f"DB_PORT={postgres.port}")
            .replace("10.0.0.30", self.addr["s3"])
        )
        self.logs = []

    def env(self, name: str, **extra) -> dict:
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.dirs[name]),
            "LANG": "C.UTF-8",
            **extra,
        }

    def script(self, tag: str) -> list:
        return ["bash", "-c", f"set -e\n{self.settings}\n{self.blocks[tag]}"]

    def run(self, name: str, tag: str, **extra) -> str:
        """Run block ``tag`` on machine ``name`` to its end; :return: its output."""
        got = self.nets.run(
            MACHINES.index(name),
            self.script(tag),
            cwd=self.dirs[name],
            env=self.env(name, **extra),
            capture_output=True,
            timeout=120,
        )
        out = got.stdout.decode() + got.stderr.decode()
        assert got.returncode == 0, f"{tag} on {name}:\n{out}"
        return out

    def serve(self, name: str, tag: str) -> str:
        """Start block ``tag`` on machine ``name`` (it ends in a server that keeps running);
        :return: the path of its log."""
        log = self.tmp / f"{name}-{tag}.log"
        with open(log, "wb") as out:
            self.nets.popen(
                MACHINES.index(name),
                self.script(tag),
                cwd=self.dirs[name],
                env=self.env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.logs.append(log)
        return str(log)

    def copy(self, src: str, dst: str):
        """A file the page says to copy from one machine to another (``machine:path``)."""
        (src_name, src_path), (dst_name, dst_path) = (s.split(":", 1) for s in (src, dst))
        target = self.dirs[dst_name] / dst_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.dirs[src_name] / src_path, target)

    def tail(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log in self.logs)


@pytest.mark.timeout(300)
def test_the_several_machines_recipe_runs_as_written(make_netns, postgres, tmp_path):
    if shutil.which("psql") is None:
        pytest.skip("psql (PostgreSQL's client) is not installed: apt-get install postgresql")
    r = Recipe(make_netns(len(MACHINES)), postgres, tmp_path)
    superuser = postgres.env()
    try:
        # 1. The database: the page's commands, as PostgreSQL's superuser, on its machine.
        got = subprocess.run(
            ["bash", "-c", f"set -e\n{r.settings}\n{r.blocks['db']}"],
            env={**r.env("broker"), **superuser},
            capture_output=True,
            timeout=60,
        )
        assert got.returncode == 0, got.stderr.decode()
        # 2. SeaweedFS and the bucket.
        r.serve("s3", "s3")
        wait_for(lambda: listening(r.addr["s3"], 8333), UP_TIMEOUT, f"SeaweedFS\n{r.tail()}")
        wait_for(
            lambda: (
                subprocess.run(
                    r.nets.argv(0, r.script("s3-bucket")),
                    cwd=r.dirs["broker"],
                    env=r.env("broker"),
                    capture_output=True,
                    timeout=60,
                ).returncode
                == 0
            ),
            UP_TIMEOUT,
            "the bucket to be made (SeaweedFS's S3 gateway answering)",
        )
        # 3. The broker and the cache.
        r.serve("broker", "broker")
        wait_for(lambda: listening(r.addr["broker"], 5555), UP_TIMEOUT, f"the broker\n{r.tail()}")
        r.serve("broker", "cache")
        # 4. Two storage machines: their keys to the broker, the broker's key to them.
        for name in ("storage-a", "storage-b"):
            r.run(name, "storage")
            (key,) = (r.dirs[name] / "keys").glob("storage-*.key")
            r.copy(f"{name}:keys/{key.name}", f"broker:allow-workers/{name}.key")
            r.copy("broker:keys/broker.key", f"{name}:keys/broker.key")
            r.serve(name, "storage-run")
        # 5. A user.
        r.run("user", "user")
        r.copy("user:.fms/alice.key", "broker:alice.key")
        r.copy("broker:keys/broker.key", "user:.fms/broker.key")
        broker = r.dirs["broker"]
        admin = CurveClient(
            str(broker / "fms-scratch" / "admin.key_secret"), str(broker / "keys" / "broker.key")
        )

        def workers() -> list:
            try:
                with fms.Client(f"tcp://{r.addr['broker']}:5555", curve=admin, timeout=2) as c:
                    return sorted(w["service"] for w in c.status()["workers"])
            except fms.FmsError:
                return []

        wait_for(lambda: workers() == ["cache", "storage", "storage"], UP_TIMEOUT, r.tail())
        r.run("broker", "user-add")  # the admin makes her an identity with a folder of her own
        user = r.dirs["user"] / ".fms"
        curve = CurveClient(str(user / "alice.key_secret"), str(user / "broker.key"))
        out = r.run("user", "user-run")
        assert "hello from alice" in out and "uploaded alice/hello.txt" in out, out
        assert out.count("worker  storage") == 2 and "worker  cache" in out, out
        # Her key is her identity, not an admin's: outside her folder she is refused.
        with fms.Client(f"tcp://{r.addr['broker']}:5555", curve=curve, timeout=10) as c:
            assert c.whoami()["identity"] == "alice"
            with pytest.raises(fms.Forbidden):
                c.put_bytes(b"x", "notes/x")
        logs = r.tail()
        assert "Traceback" not in logs and "botocore" not in logs, logs  # no S3 INFO lines
    finally:
        r.nets.close()  # every server of the recipe stops before its database goes
        subprocess.run(
            ["psql", "-c", "DROP DATABASE IF EXISTS fmsmeta", "-c", "DROP USER IF EXISTS fmsmeta"],
            env={**os.environ, **superuser},
            capture_output=True,
            timeout=60,
        )
