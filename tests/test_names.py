"""Names people can trust, end to end through the command line: one name for one text however
its accents were typed, no name that shows as another, and one meaning of "under a folder"."""

import json
import re

import pytest

from fms.errors import BadRequest

NFD, NFC = "cafe\u0301/menu.txt", "caf\u00e9/menu.txt"


def write(path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def test_a_name_typed_with_a_combining_accent_is_the_same_file(cluster, tmp_path):
    src = write(tmp_path / "menu", b"soup")
    assert cluster.cli("put", src, NFD).returncode == 0
    assert cluster.cli("put", write(tmp_path / "menu2", b"salad"), NFC).returncode == 0
    listed = json.loads(cluster.cli("ls", "-r", "--json").stdout)
    assert [e["name"] for e in listed] == [NFC]  # one file, in NFC, with two versions
    assert listed[0]["version"] == 2
    got = cluster.cli("get", NFD, "-")
    assert got.returncode == 0 and got.stdout == b"salad"
    with cluster.client() as c:
        # Storage normalises too: a client that sends the decomposed text reaches the same file.
        header, _ = c.call("stat", name=NFD)
        assert header["stat"]["name"] == NFC
        assert [e["name"] for e in c.iter_ls("cafe\u0301/")] == [NFC]


@pytest.mark.parametrize(
    "name,char",
    [
        ("invoice\u202efdp.exe", "U+202E RIGHT-TO-LEFT OVERRIDE at character 8"),
        ("pay\u200bpal", "U+200B ZERO WIDTH SPACE at character 4"),
    ],
)
def test_a_name_that_would_show_as_another_is_refused_and_nothing_is_written(
    untouched_cluster, tmp_path, name, char
):
    cluster = untouched_cluster  # still empty after it
    got = cluster.cli("put", write(tmp_path / "f", b"payload"), name)
    assert got.returncode == 1 and char.encode() in got.stderr
    assert b"Traceback" not in got.stderr
    assert json.loads(cluster.cli("ls", "-r", "--json").stdout) == []
    with cluster.client() as c, pytest.raises(BadRequest, match=re.escape(char)):
        c.call("stat", name=name)  # storage refuses it too, from a client that skips the check


def test_the_command_line_shows_a_non_printable_character_escaped(cluster, tmp_path):
    name = "notes\u2028rm -rf.txt"  # a line separator: would start a new line on screen
    assert cluster.cli("put", write(tmp_path / "f", b"x"), name).returncode == 0
    for args in (("ls",), ("ls", "-r"), ("find",)):
        out = cluster.cli(*args).stdout.decode()
        assert "notes\\u2028rm -rf.txt" in out and "\u2028" not in out, args
    assert json.loads(cluster.cli("ls", "-r", "--json").stdout)[0]["name"] == name  # data: as is
    moved = cluster.cli("mv", name, "kept/" + name)
    assert moved.returncode == 0, moved.stderr
    said = moved.stderr.decode()  # what it did, on stderr as every command says it
    assert "\u2028" not in said
    assert "moved notes\\u2028rm -rf.txt to kept/notes\\u2028rm -rf.txt" in said
    removed = cluster.cli("rm", "kept/" + name)
    assert removed.returncode == 0 and "\u2028" not in removed.stderr.decode()
    assert "removed kept/notes\\u2028rm -rf.txt" in removed.stderr.decode()


def test_rm_r_du_ls_r_and_find_agree_on_what_is_under_a_folder(cluster, tmp_path):
    names = ["album/a.jpg", "album/2024/b.jpg", "albumX/c.jpg", "albu/d.jpg", "other/album/e"]
    for i, name in enumerate(names):
        assert cluster.cli("put", write(tmp_path / f"f{i}", b"%d" % i), name).returncode == 0
    under = ["album/2024/b.jpg", "album/a.jpg"]
    for folder in ("album", "album/"):
        ls = json.loads(cluster.cli("ls", "-r", folder, "--json").stdout)
        assert [e["name"] for e in ls] == under, folder
        found = json.loads(cluster.cli("find", folder, "--json").stdout)
        assert [e["name"] for e in found] == under, folder
        du = json.loads(cluster.cli("du", folder, "--json").stdout)
        assert (du["files"], du["bytes"]) == (2, 2), folder
    dry = cluster.cli("rm", "-r", "-n", "album", "--json")
    assert dry.returncode == 0, dry.stderr
    assert cluster.cli("rm", "-r", "album").returncode == 0
    left = json.loads(cluster.cli("ls", "-r", "--json").stdout)
    assert [e["name"] for e in left] == ["albu/d.jpg", "albumX/c.jpg", "other/album/e"]
