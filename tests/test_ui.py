"""What users and operators see: the shell, progress bars, stats, metrics, logs, the API, help."""

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import urllib.request

import pytest
from conftest import ROOT, random_bytes
from terminal import run_on_a_terminal
from test_up import free_port

import fms
from fms import wire as p

MiB = p.MiB


# --- the interactive shell (more in test_shell.py) ---


def test_shell_leaves_on_end_of_input(untouched_cluster):
    run = untouched_cluster.cli(stdin=b"ls\n")  # Ctrl-D is end of input
    assert run.returncode == 0


# --- progress bars ---


def test_progress_bar_on_a_terminal_only_and_not_with_quiet(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    src = tmp_path / "big.bin"
    src.write_bytes(random_bytes(6 * MiB, 6))
    drawn = run_on_a_terminal(
        ["--broker", cluster.frontend, "put", str(src), f"{prefix}big"], tmp_path
    )
    assert "100%" in drawn and "B/s" in drawn and "big" in drawn
    drawn = run_on_a_terminal(
        ["--broker", cluster.frontend, "get", f"{prefix}big", str(tmp_path / "o")], tmp_path
    )
    assert "100%" in drawn and "B/s" in drawn
    quiet = run_on_a_terminal(
        ["--broker", cluster.frontend, "--quiet", "get", f"{prefix}big", str(tmp_path / "o2")],
        tmp_path,
    )
    assert "%" not in quiet and quiet.strip() == ""
    piped = cluster.cli("get", f"{prefix}big", str(tmp_path / "o3"))
    assert b"%" not in piped.stderr  # not a terminal: no bar
    small = run_on_a_terminal(["--broker", cluster.frontend, "get", f"{prefix}big", "-"], tmp_path)
    assert "100%" in small  # stdout is data, the bar on stderr


def test_a_get_r_refused_by_its_destination_s_checks_draws_no_bar_only_the_error(
    shared_cluster, prefix, tmp_path
):
    """The checks of get -r's destination run while its first batches are on their way, but
    a tree they refuse shows what it showed when they ran first: the error, no bar at 0 %."""
    cluster = shared_cluster
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "big").write_bytes(random_bytes(2 * MiB, 7))
    (tree / "sub" / "b").write_bytes(b"b")
    assert cluster.cli("put", "-r", str(tree), f"{prefix}checked").returncode == 0
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").write_bytes(b"a file where a folder is to go")
    drawn = run_on_a_terminal(
        ["--broker", cluster.frontend, "get", "-r", f"{prefix}checked", str(dest)], tmp_path, 1
    )
    assert "is a file" in drawn and "nothing was downloaded" in drawn
    assert "%" not in drawn and drawn.lstrip("\r\n").startswith("client.py: error:"), drawn
    assert sorted(os.listdir(dest)) == ["sub"]  # nothing written


def test_an_upload_s_bar_moves_while_it_uploads_and_its_rate_is_real(make_cluster, tmp_path):
    """Issue 26: the bar sat at 0 % through a whole upload, then showed 7.79 TB/s."""
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_storage(wid="slow", delay=0.05)  # each chunk takes a moment: frames to see
    cluster.wait_workers(storage=1, cache=0)
    src = tmp_path / "big.bin"
    src.write_bytes(random_bytes(16 * MiB, 16))
    drawn = run_on_a_terminal(["--broker", cluster.frontend, "put", str(src), "big"], tmp_path)
    frames = [f for f in drawn.split("\r") if f.startswith("big: ")]
    shown = {int(f[len("big: ") :].split("%")[0]) for f in frames}
    assert shown & set(range(1, 100)), frames  # it moved between 0 and 100
    assert 100 in shown and not any(unit in drawn for unit in ("TB/s", "PB/s", "EB/s"))


def test_an_interrupted_put_r_counts_the_files_it_committed(make_cluster, tmp_path):
    """Issue 26: after a Ctrl-C of put -r the bar said files 0/300, with 66 committed."""
    cluster = make_cluster()
    cluster.start_broker()
    cluster.start_storage(wid="slow", delay=0.5)  # each batch of 128 files takes 0.5 s
    cluster.wait_workers(storage=1, cache=0)
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(1280):  # ten batches of 128, 0.5 s each: time to interrupt it
        (tree / f"f{i:03d}").write_bytes(b"x" * 100)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "client.py"), "--broker", cluster.frontend]
        + ["--timeout", "30", "put", "-r", str(tree), "t"],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        # As from a terminal: a suite started in the background (or its xdist workers) hands
        # its children SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(slave)
    drawn = b""
    try:
        while b"files 128/1,280" not in drawn:
            assert select.select([master], [], [], 60)[0], drawn
            try:
                drawn += os.read(master, 65536)
            except OSError:  # EIO: it ended
                raise AssertionError(drawn) from None
        proc.send_signal(signal.SIGINT)
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            drawn += data
    finally:
        proc.wait(30)
        os.close(master)
    text = drawn.decode("utf-8", "replace")
    assert proc.returncode == 130, text
    said = re.search(r"put: interrupted after ([\d,]+) of 1,280 files were done", text)
    assert said, text
    done = int(said.group(1).replace(",", ""))
    assert done >= 128 and f"files {done:,}/1,280]" in text  # the bar's last count is the same
    with cluster.client() as c:
        assert len(c.ls("t/")) >= done  # what it counted was committed


# --- stats and metrics ---


def _put_unfilled(c, data: bytes, name: str) -> None:
    """Store ``data`` as ``name`` without handing it to the cache (a small file's commit
    would: fills on commit) so that its first read is a miss: written elsewhere, then moved."""
    c.put_bytes(data, name + ".tmp")
    c.mv(name + ".tmp", name)


def test_stats_json_shows_workers_cache_and_store(cluster, tmp_path):
    with cluster.client() as c:
        _put_unfilled(c, b"a" * 1000, "a")
        c.get_bytes("a")
        c.get_bytes("a")
    out = json.loads(cluster.cli("stats", "--json").stdout)
    assert sorted((w["service"], w["id"]) for w in out["workers"]) == [
        ("cache", "cache-1"),
        ("storage", "storage-a"),
        ("storage", "storage-b"),
    ]
    assert all({"state", "inflight", "served"} <= set(w) for w in out["workers"])
    assert out["cache"]["hits"] == 1 and out["cache"]["misses"] == 1, out["cache"]  # lookups
    assert out["cache"]["bytes"] == 1000
    assert (out["cache"]["get_hits"], out["cache"]["get_misses"]) == (1, 1)  # per GET
    assert (out["cache"]["bytes_hit"], out["cache"]["bytes_missed"]) == (1000, 1000)
    assert {"evictions", "admissions_refused"} <= set(out["cache"])
    assert out["store"] == {"files": 1, "bytes": 1000, "chunks": 1, "chunk_bytes": 1000}
    text = cluster.cli("stats").stdout.decode()
    assert "get_hits=1" in text and "storage-a" in text and "files=1" in text


def test_broker_serves_prometheus_metrics(make_cluster, tmp_path):
    cluster = make_cluster()
    port = free_port()
    cluster.start_broker(extra=["--metrics-port", str(port)])
    cluster.start_cache()
    cluster.start_storage(wid="storage-a")
    cluster.start_storage(wid="storage-b")
    cluster.wait_workers(storage=2, cache=1)
    with cluster.client() as c:
        _put_unfilled(c, b"m" * 100, "m")
        c.get_bytes("m")
        c.get_bytes("m")
        with pytest.raises(fms.NotFound):
            c.stat("missing")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['fms_requests_total{op="get",outcome="ok"}'] == 2
    assert samples['fms_requests_total{op="stat",outcome="not_found"}'] == 1
    assert samples['fms_request_duration_seconds_count{op="commit",outcome="ok"}'] == 1
    assert samples["fms_cache_hits_total"] == 1 and samples["fms_cache_misses_total"] == 1
    assert samples["fms_cache_get_hits_total"] == 1 and samples["fms_cache_get_misses_total"] == 1
    assert samples["fms_cache_bytes_hit_total"] == 100
    assert samples["fms_cache_bytes_missed_total"] == 100
    assert {"fms_cache_evictions_total", "fms_cache_admissions_refused_total"} <= set(samples)
    assert samples['fms_workers{service="storage"}'] == 2
    assert samples['fms_workers{service="cache"}'] == 1
    assert all(name.startswith("fms_") for name in samples)


# --- logs ---


def test_logs_are_key_value_lines_without_tracebacks_for_expected_errors(cluster, tmp_path):
    cluster.cli("get", "missing", str(tmp_path / "x"))
    cluster.cli("put", "/no/such/file", "x")
    with cluster.client() as c:
        c.put_bytes(b"x", "x")
    for proc in cluster.procs:
        log = proc.log()
        assert "Traceback" not in log
        for line in log.splitlines():
            assert " level=" in line and " proc=fms." in line and "event=" in line, line


# --- the Python API ---


def test_client_api_round_trip_and_open_streams_with_seek(shared_cluster, prefix, tmp_path):
    data = random_bytes(3 * MiB + 77, 77)
    src = tmp_path / "d.bin"
    src.write_bytes(data)
    d, t = f"{prefix}d.bin", f"{prefix}t"
    with fms.Client(shared_cluster.frontend, window=4) as c:
        assert c.put(str(src), d)["size"] == len(data)
        with c.open(d) as f:
            assert f.read(10) == data[:10]
            assert f.read(MiB) == data[10 : MiB + 10]
            f.seek(2 * MiB + 5)
            assert f.read(100) == data[2 * MiB + 5 : 2 * MiB + 105]
            f.seek(-7, io.SEEK_END)
            assert f.read() == data[-7:]
            f.seek(0)
            assert f.read() == data
        with c.open(d) as f:
            assert io.BufferedReader(f).read() == data
        c.put_bytes(b"tiny", t)
        with c.open(t) as f:
            assert f.read() == b"tiny"
        assert [e["name"] for e in c.ls(prefix)] == [d, t]
        c.rm(t)
        with pytest.raises(fms.NotFound):
            c.open(t)
        with pytest.raises(fms.BadRequest):
            c.stat("../x")
    assert issubclass(fms.NotFound, fms.FmsError)


def test_unreachable_broker_raises_transport_error_from_the_api():
    with fms.Client(f"tcp://127.0.0.1:{free_port()}") as c:
        with pytest.raises(fms.TransportError, match="cannot reach"):
            c.ls()


# --- --version and --help ---


@pytest.mark.parametrize(
    "script", ["client.py", "broker.py", "storage_worker.py", "cache_worker.py"]
)
def test_every_entry_point_has_version_and_help_with_an_example(script):
    run = [sys.executable, os.path.join(ROOT, script)]
    version = subprocess.run(run + ["--version"], capture_output=True, timeout=30)
    assert version.stdout.decode().strip() == f"fms {fms.__version__}"
    helped = subprocess.run(run + ["--help"], capture_output=True, timeout=30)
    assert helped.returncode == 0 and b"example" in helped.stdout


@pytest.mark.parametrize(
    "command", ["put", "get", "ls", "stat", "rm", "stats", "broker", "storage", "cache", "up"]
)
def test_every_command_has_help_with_an_example(command):
    helped = subprocess.run(
        [sys.executable, "-m", "fms", command, "--help"], cwd=ROOT, capture_output=True, timeout=30
    )
    assert helped.returncode == 0 and b"examples:" in helped.stdout


def test_put_stream_without_a_progress_callback(shared_cluster, prefix):
    """``upload.put_stream`` takes ``report=None``: a stream of one chunk that is too large to
    travel with its commit goes in chunks, and nothing calls the missing callback."""
    from fms.client import upload

    data = random_bytes(p.INLINE_MAX + 1)
    with shared_cluster.client() as c:
        name = f"{prefix}stream/one"
        stat = upload.put_stream(c.session, io.BytesIO(data), name, c.chunk_size)
        assert stat["size"] == len(data)
        assert c.get_bytes(name) == data
