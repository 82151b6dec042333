"""The verbs users of mc and rclone reached for (issue 26, point 3): cat, rm of several names or
a pattern, cp -r and mv -r, --include / --exclude, sync from one prefix to another, a suffix
range, get --no-clobber and rm -r --dry-run; each prints JSON with --json."""

import json

import pytest
from test_cli_habits import cli_json, one_line_error

from fms.errors import NotFound


def names(cluster, prefix: str = "") -> list:
    with cluster.client() as c:
        return [e["name"] for e in c.ls(prefix)]


def test_cat_writes_files_one_after_another_and_reads_a_range(shared_cluster, prefix):
    cluster = shared_cluster
    with cluster.client() as c:
        c.put_bytes(b"first\n", f"{prefix}a.txt")
        c.put_bytes(b"second\n", f"{prefix}b.txt")
        c.put_bytes(bytes(range(256)) * 8192, f"{prefix}big.bin")  # 2 MiB: chunks
    assert cluster.cli("cat", f"{prefix}a.txt", f"{prefix}b.txt").stdout == b"first\nsecond\n"
    assert (
        cluster.cli("cat", f"{prefix}big.bin", "--range", "-100").stdout
        == (bytes(range(256)) * 8192)[-100:]
    )
    assert (
        cluster.cli("cat", f"{prefix}big.bin", "--range", "1048570-1048580").stdout
        == (bytes(range(256)) * 8192)[1048570:1048581]
    )
    err = one_line_error(cluster.cli("cat", f"{prefix}a.txt", f"{prefix}b.txt", "--range", "0-1"))
    assert "one NAME" in err
    err = one_line_error(cluster.cli("cat", f"{prefix}a.txt", f"{prefix}nope"))
    assert "not found" in err


def test_a_suffix_range_reads_the_last_bytes_as_http_does(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    data = bytes(range(256)) * 8192
    with cluster.client() as c:
        c.put_bytes(data, f"{prefix}big.bin")
        c.put_bytes(b"short", f"{prefix}short")
    assert cluster.cli("get", f"{prefix}big.bin", "-", "--range", "-100").stdout == data[-100:]
    assert (
        cluster.cli("get", f"{prefix}short", "-", "--range", "-100").stdout == b"short"
    )  # all of it
    out = tmp_path / "tail"
    assert cluster.cli("get", f"{prefix}big.bin", str(out), "--range", "-1048577").returncode == 0
    assert out.read_bytes() == data[-1048577:]
    got = cluster.cli("get", f"{prefix}big.bin", "-", "--range", "-0")
    assert got.returncode == 2 and b"no bytes" in got.stderr


def test_rm_removes_several_names_and_patterns_and_goes_on_past_a_missing_one(
    shared_cluster, prefix
):
    cluster = shared_cluster
    with cluster.client() as c:
        for name in ("a", "b", "c", "logs/1.tmp", "logs/2.tmp", "logs/keep.txt", "logs/d/3.tmp"):
            c.put_bytes(b"x", prefix + name)
    got = cluster.cli("rm", *(prefix + n for n in ("a", "nope", "b", "logs/*.tmp")))
    assert got.returncode == 1  # one was missing ...
    err = got.stderr.decode()
    assert "nope" in err and "not found" in err and "Traceback" not in err
    assert "removed 4 files" in err  # ... and the others were removed
    assert names(cluster, prefix) == [
        prefix + n for n in ("c", "logs/d/3.tmp", "logs/keep.txt")
    ]  # * stops at '/'
    removed = cli_json(cluster, "rm", f"{prefix}logs/**.tmp")
    assert [r["name"] for r in removed] == [f"{prefix}logs/d/3.tmp"] and removed[0][
        "deleted"
    ] is True
    err = one_line_error(cluster.cli("rm", f"{prefix}zz*"))
    assert f"no stored name matches '{prefix}zz*'" in err


def test_rm_r_dry_run_lists_what_would_go_and_removes_nothing(shared_cluster, prefix):
    cluster = shared_cluster
    with cluster.client() as c:
        for name in ("p/1", "p/2", "p/q/3", "pp/4"):
            c.put_bytes(b"x", prefix + name)
    got = cluster.cli("rm", "-r", f"{prefix}p", "--dry-run")
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode().splitlines() == [
        f"would remove {prefix}p/1",
        f"would remove {prefix}p/2",
        f"would remove {prefix}p/q/3",
    ]
    got = cluster.cli("rm", "-r", f"{prefix}p/", f"{prefix}nothere/", "--dry-run", "--json")
    assert got.returncode == 1 and f"not found: '{prefix}nothere/'".encode() in got.stderr
    planned = json.loads(got.stdout)
    assert planned == {
        "dry_run": True,
        "remove": [f"{prefix}p/1", f"{prefix}p/2", f"{prefix}p/q/3"],
        "missing": [f"{prefix}nothere/"],
    }
    assert cli_json(cluster, "rm", f"{prefix}p/*", "-n")["remove"] == [
        f"{prefix}p/1",
        f"{prefix}p/2",
    ]
    assert len(names(cluster, prefix)) == 4  # nothing removed
    assert cli_json(cluster, "rm", "-r", f"{prefix}p/q", f"{prefix}pp") == [
        {"prefix": f"{prefix}p/q/", "removed": 1},
        {"prefix": f"{prefix}pp/", "removed": 1},
    ]
    assert names(cluster, prefix) == [f"{prefix}p/1", f"{prefix}p/2"]


def test_cp_r_and_mv_r_copy_and_move_a_folder_on_the_server(cluster):
    big = bytes(range(256)) * 16384  # 4 MiB
    with cluster.client() as c:
        c.put_bytes(big, "photos/big.bin")
        c.put_bytes(b"a", "photos/2024/a.jpg")
        c.put_bytes(b"other", "photosx")
        before = c.usage()
    copied = cli_json(cluster, "cp", "-r", "photos", "backup/")
    assert sorted(r["name"] for r in copied) == [
        "backup/photos/2024/a.jpg",
        "backup/photos/big.bin",
    ]
    assert cluster.cli("cp", "-r", "photos/", "copy").returncode == 0  # copy/<rest>
    with cluster.client() as c:
        after = c.usage()
        assert c.get_bytes("copy/big.bin") == big
    assert after["chunk_bytes"] == before["chunk_bytes"]  # metadata only: no chunk written
    assert after["files"] == before["files"] + 4
    assert cluster.cli("mv", "-r", "copy", "moved").returncode == 0
    assert names(cluster, "moved/") == ["moved/2024/a.jpg", "moved/big.bin"]
    assert names(cluster, "copy/") == []
    err = one_line_error(cluster.cli("cp", "-r", "photos", "photos/inner"))
    assert "into itself" in err
    err = one_line_error(cluster.cli("mv", "-r", "nothere", "x"))
    assert "no files under 'nothere/'" in err
    err = one_line_error(cluster.cli("cp", "photos", "x"))  # a folder without -r
    assert "cp -r photos/ DST" in err


def test_filters_choose_files_of_put_r_get_r_and_sync_as_rclone_does(
    shared_cluster, prefix, tmp_path
):
    cluster = shared_cluster
    src = tmp_path / "src"
    for rel in ("a.jpg", "a.tmp", "sub/b.jpg", "sub/c.txt", "cache/d.jpg", "cache/e/f.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    got = cluster.cli(
        "put", "-r", str(src), f"{prefix}up", "--exclude", "*.tmp", "--exclude", "cache/**"
    )
    assert got.returncode == 0, got.stderr
    assert names(cluster, f"{prefix}up/") == [
        f"{prefix}up/a.jpg",
        f"{prefix}up/sub/b.jpg",
        f"{prefix}up/sub/c.txt",
    ]
    # Includes: only what they name; the first rule that matches decides.
    got = cluster.cli(
        "put", "-r", str(src), f"{prefix}inc", "--exclude", "cache/e/**", "--include", "*.jpg"
    )
    assert got.returncode == 0, got.stderr
    assert names(cluster, f"{prefix}inc/") == [
        f"{prefix}inc/a.jpg",
        f"{prefix}inc/cache/d.jpg",
        f"{prefix}inc/sub/b.jpg",
    ]
    out = tmp_path / "out"
    assert (
        cluster.cli("get", "-r", f"{prefix}inc", str(out), "--include", "/cache/**").returncode == 0
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "cache/d.jpg"
    ]
    # sync: what the filters leave out is neither sent nor deleted.
    with cluster.client() as c:
        c.put_bytes(b"remote only", f"{prefix}mirror/keep.tmp")
        c.put_bytes(b"remote only", f"{prefix}mirror/gone.jpg")
    plan = cli_json(
        cluster, "sync", str(src), f"fms:{prefix}mirror", "--delete", "--exclude", "*.tmp"
    )
    assert sorted(s["to"] for s in plan["send"]) == [
        f"{prefix}mirror/a.jpg",
        f"{prefix}mirror/cache/d.jpg",
        f"{prefix}mirror/cache/e/f.jpg",
        f"{prefix}mirror/sub/b.jpg",
        f"{prefix}mirror/sub/c.txt",
    ]
    assert plan["delete"] == [f"{prefix}mirror/gone.jpg"]
    assert f"{prefix}mirror/keep.tmp" in names(cluster, f"{prefix}mirror/")


def test_sync_from_one_prefix_to_another_copies_on_the_server(cluster):
    big = bytes(range(256)) * 8192
    with cluster.client() as c:
        c.put_bytes(big, "photos/big.bin")
        c.put_bytes(b"a", "photos/a.jpg")
        c.put_bytes(b"stale", "backup/a.jpg")
        c.put_bytes(b"extra", "backup/extra.jpg")
        before = c.usage()["chunk_bytes"]
    plan = cli_json(cluster, "sync", "fms:photos/", "fms:backup/", "--delete")
    assert sorted(s["to"] for s in plan["send"]) == ["backup/a.jpg", "backup/big.bin"]
    assert plan["delete"] == ["backup/extra.jpg"]
    with cluster.client() as c:
        assert c.get_bytes("backup/big.bin") == big and c.get_bytes("backup/a.jpg") == b"a"
        with pytest.raises(NotFound):
            c.stat("backup/extra.jpg")
        assert c.usage()["chunk_bytes"] == before  # nothing was uploaded
    again = cli_json(cluster, "sync", "fms:photos", "fms:backup")
    assert again["send"] == [] and again["unchanged"] == 2
    err = one_line_error(cluster.cli("sync", "fms:photos/", "fms:photos/old/"))
    assert "overlap" in err


def test_get_no_clobber_keeps_what_is_there_and_says_so(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    with cluster.client() as c:
        c.put_bytes(b"new a", f"{prefix}t/a")
        c.put_bytes(b"new b", f"{prefix}t/b")
    mine = tmp_path / "a"
    mine.write_bytes(b"mine")
    got = cluster.cli("get", f"{prefix}t/a", str(mine), "--no-clobber")
    assert got.returncode == 0 and f"skipped {prefix}t/a".encode() in got.stderr
    assert mine.read_bytes() == b"mine"
    assert cli_json(cluster, "get", f"{prefix}t/a", str(mine), "-n")["skipped"] is True
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_bytes(b"mine too")
    result = cli_json(cluster, "get", "-r", f"{prefix}t", str(out), "--no-clobber")
    assert [r.get("name") for r in result if not r.get("skipped")] == [f"{prefix}t/b"]
    assert [r["dest"] for r in result if r.get("skipped")] == [str(out / "a")]
    assert (out / "a").read_bytes() == b"mine too" and (out / "b").read_bytes() == b"new b"
    assert cluster.cli("get", f"{prefix}t/a", str(mine)).returncode == 0  # without it: replaced
    assert mine.read_bytes() == b"new a"


@pytest.mark.parametrize(
    "pattern,path,matches",
    [
        ("*.jpg", "a.jpg", True),
        ("*.jpg", "x/y/a.jpg", True),  # no '/': the last part, at any depth
        ("*.jpg", "a.jpg/b", False),
        ("cache/**", "cache/a", True),
        ("cache/**", "x/cache/a/b", True),
        ("/cache/**", "x/cache/a", False),  # anchored at the top
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("[!a]b", "cb", True),
        ("[!a]b", "ab", False),
    ],
)
def test_a_filter_pattern_matches_as_rclone_s_do(pattern, path, matches):
    from fms.cli.filters import path_matcher

    assert path_matcher(pattern)(path) is matches


def test_the_first_rule_decides_and_an_include_leaves_out_the_rest():
    from fms.cli.filters import name_matcher, selector

    wanted = selector([("-", "*.tmp"), ("+", "*.jpg"), ("+", "docs/**")])
    assert wanted("a.jpg") and wanted("docs/x.tmp") is False and wanted("docs/y.txt")
    assert wanted("b.txt") is False  # no rule matched, and there are includes
    assert selector([("-", "*.tmp")])("b.txt")  # only excludes: the rest is in
    assert selector([]) is None
    assert name_matcher("logs/*.tmp")("logs/1.tmp") and not name_matcher("logs/*")("logs/d/3")


def test_every_verb_that_prints_takes_json(shared_cluster, prefix, tmp_path):
    cluster = shared_cluster
    with cluster.client() as c:
        c.put_bytes(b"x", f"{prefix}j/a")
    for argv in (
        ["cp", "-r", f"{prefix}j", f"{prefix}k"],
        ["rm", "-r", f"{prefix}k", "--dry-run"],
        ["sync", f"fms:{prefix}j/", f"fms:{prefix}l/"],
        ["get", "-r", f"{prefix}j", str(tmp_path / "o")],
        ["rm", f"{prefix}j/a", f"{prefix}nothing*"],
        ["du", "-h"],
    ):
        got = cluster.cli(*argv, "--json")
        json.loads(got.stdout)  # whatever the exit status, stdout is JSON
