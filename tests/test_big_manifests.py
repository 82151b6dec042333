"""Files with long chunk lists, end to end (issue 21): a commit costs its distinct chunks, every
reply is bounded whatever the files it names, ordinary commands never load a chunk list, and a
copy stores nothing but a reference.  Every process is measured (peak RSS), the CLI's too.

Big files are cheap to build with dedup: one chunk uploaded, a manifest naming it many times
committed (its pages sent once each), then ``cp``.
"""

import json
import os
import time

import pytest
from conftest import DIGESTS
from harness import cli_with_rss
from storage_helpers import h

from fms import wire as p
from fms.client.upload import Plan, commit_plan

MiB = p.MiB
RSS_LIMIT = 200 * MiB  # every process, whatever the files it handles


def commit_repeated(client, name: str, chunk: bytes, count: int, tail: bytes = b"") -> dict:
    """A file of ``count`` times ``chunk`` (then ``tail``, one chunk), sent as a client does:
    each distinct chunk once, each distinct page once, then the commit."""
    for piece in {chunk, tail} - {b""}:
        client.call("put_chunk", data=p.pack_data(piece), hash=h(piece))
    digests = h(chunk) * count + (h(tail) if tail else b"")
    plan = Plan(len(chunk) * count + len(tail), len(chunk), digests, time.time(), None, h)
    return commit_plan(client.session, name, plan)


def assert_small(cluster, *clients):
    rss = {**cluster.peak_rss(), **{f"cli {i}": r for i, r in enumerate(clients)}}
    assert max(rss.values()) < RSS_LIMIT, {k: v // MiB for k, v in rss.items()}


def test_a_million_times_one_chunk_commits_and_reads_back_in_bounded_memory(cluster, tmp_path):
    """A sparse disk image: 1,000,000 x a chunk of zeros (16 pages, two distinct) commits in
    proportion to those, and reads back as a sparse file without fetching a zero chunk."""
    with cluster.client() as c:
        stat = commit_repeated(c, "disk.img", bytes(4096), 1_000_000, tail=b"end")
        assert (stat["count"], stat["size"]) == (1_000_001, 4_096_000_003)
        dest = tmp_path / "disk.img"
        c.get("disk.img", str(dest))
        assert dest.stat().st_size == 4_096_000_003
        assert dest.stat().st_blocks * 512 < 16 * MiB  # holes, not 4 GB of zeros
        with open(dest, "rb") as f:
            f.seek(4_096_000_000 - 2)
            assert f.read() == b"\0\0end"
        with c.open("disk.img") as remote:  # a ranged read finds its page
            remote.seek(4096 * 765_432 + 5)
            assert remote.read(4) == bytes(4)
        [report] = list(c.fsck())
        assert (report["damaged"], report["refcount_errors"]) == ([], 0)
    assert_small(cluster)


def test_get_r_of_128_files_of_8_gib_each(cluster, tmp_path):
    """One get_many reply of 128 such manifests was 35.6 MB (over the 32 MiB frame limit, so
    storage dropped out again and again); now each manifest is a few hundred bytes and the
    client reads each file's page itself."""
    tail = os.urandom(MiB - 1)
    with cluster.client() as c:
        commit_repeated(c, "big/000", bytes(MiB), 8191, tail=tail)  # 8 GiB, 8192 chunks
        for i in range(1, 128):
            c.cp("big/000", f"big/{i:03d}")
        header, _ = c.call("get_many", names=[f"big/{i:03d}" for i in range(128)])
        assert len(p.encode(header)) < 128 * p.MANIFEST_MAX
    run, rss = cli_with_rss(cluster, "get", "-r", "big", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == [f"{i:03d}" for i in range(128)]
    for name in ("000", "077", "127"):
        path = tmp_path / "out" / name
        assert path.stat().st_size == 8 * 1024 * MiB - 1
        with open(path, "rb") as f:
            f.seek(8191 * MiB)
            assert f.read() == tail
    assert_small(cluster, rss)


def test_ls_find_du_rm_r_and_fsck_of_200_files_of_65536_chunks(cluster):
    """`ls` of such a folder took storage to 5.5-6 GB (every entry's chunk list loaded to print
    its count); ls, find, du, fsck and rm -r never load a chunk list now."""
    with cluster.client() as c:
        commit_repeated(c, "big/000", b"x" * 4096, 65_536)
        for i in range(1, 200):
            c.cp("big/000", f"big/{i:03d}")
    peaks = []
    for args in (
        ("ls", "big/", "--json"),
        ("ls", "-r", "--json"),
        ("find", "big/", "--json"),
        ("du", "big/", "--json"),
        ("fsck", "--json"),
    ):
        run, rss = cli_with_rss(cluster, *args)
        assert run.returncode == 0, (args, run.stderr.decode()[-2000:])
        peaks.append(rss)
        if args[0] == "ls":
            entries = json.loads(run.stdout)
            assert len(entries) == 200 and {e["chunks"] for e in entries} == {65_536}
        if args[0] == "fsck":
            report = json.loads(run.stdout)
            assert report["ok"] and report["names"] == 200
    run, rss = cli_with_rss(cluster, "rm", "-r", "big/")
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    with cluster.client() as c:
        assert c.ls("big/") == []
    assert_small(cluster, *peaks, rss)


@DIGESTS
def test_a_long_file_reads_its_pages_through_the_cache(cluster):
    data = os.urandom(40 * 4096 + 9)  # 41 chunks: a page and a body
    with cluster.client(chunk_size=4096) as c:
        stat = c.put_bytes(data, "forty", meta={"content-type": "application/x-test"})
        assert stat["meta"] == {"content-type": "application/x-test"}
        manifest = c.call("get", name="forty")[0]["manifest"]
        assert "chunks" not in manifest and len(manifest["pages"]) == 1
        assert c.get_bytes("forty") == data
        hits = c.cache_stats()["hits"]
        assert c.get_bytes("forty") == data  # its page too, from the cache
        assert c.cache_stats()["hits"] >= hits + 42
        assert c.cp("forty", "copy")["meta"] == stat["meta"]
        assert c.stat("copy")["digest"] == stat["digest"]


@pytest.mark.parametrize("count", [p.INLINE_CHUNKS, p.INLINE_CHUNKS + 1])
def test_files_at_the_edge_of_the_inline_list_read_back_whole(shared_cluster, prefix, count):
    chunk = os.urandom(4096)
    with shared_cluster.client(chunk_size=4096) as c:
        stat = commit_repeated(c, f"{prefix}edge", chunk, count - 1, tail=b"tail")
        assert stat["count"] == count
        assert c.get_bytes(f"{prefix}edge") == chunk * (count - 1) + b"tail"


@DIGESTS
def test_a_file_over_two_pages_reads_back_whole_across_the_page_boundary(
    shared_cluster, prefix, tmp_path
):
    """65,537 chunks: zeros (holes, not fetched) but for the last chunk of the first page and
    the one chunk of the second, which are fetched and checked against their pages."""
    last, tail = os.urandom(4096), b"second page"
    name = f"{prefix}two"
    with shared_cluster.client(chunk_size=4096) as c:
        for piece in (bytes(4096), last, tail):
            c.call("put_chunk", data=p.pack_data(piece), hash=h(piece))
        digests = h(bytes(4096)) * (p.PAGE_CHUNKS - 1) + h(last) + h(tail)
        size = 4096 * p.PAGE_CHUNKS + len(tail)
        stat = commit_plan(c.session, name, Plan(size, 4096, digests, time.time(), None, h))
        assert stat["count"] == p.PAGE_CHUNKS + 1
        c.get(name, str(tmp_path / "two"))
        with open(tmp_path / "two", "rb") as f:
            f.seek(4096 * (p.PAGE_CHUNKS - 2))
            assert f.read() == bytes(4096) + last + tail
        with c.open(name) as remote:  # read through the boundary, streaming
            remote.seek(4096 * (p.PAGE_CHUNKS - 3))
            assert remote.read() == bytes(2 * 4096) + last + tail


def test_compose_joins_stored_files_by_reference_with_their_own_chunk_sizes(cluster):
    """Extents: parts of any size and chunk size, each with its short last chunk, joined with no
    chunk read or written (an S3 multipart upload's completion), then read back whole."""
    parts = {
        "p/1": (os.urandom(3 * 4096 + 100), 4096),  # short list, short last chunk
        "p/2": (os.urandom(40 * 8192 + 1), 8192),  # paged, another chunk size
        "p/3": (b"tail", 4096),
    }
    with cluster.client() as c:
        for name, (data, chunk_size) in parts.items():
            with cluster.client(chunk_size=chunk_size) as part_client:
                part_client.put_bytes(data, name)
        before = c.usage()["chunk_bytes"]
        stat = c.compose("joined", list(parts), meta={"content-type": "text/plain"})
        whole = b"".join(data for data, _ in parts.values())
        assert (stat["size"], stat["chunks"]) == (len(whole), 4 + 41 + 1)
        assert stat["meta"] == {"content-type": "text/plain"}
        assert c.usage()["chunk_bytes"] == before  # no chunk written
        assert c.get_bytes("joined") == whole
        manifest = c.call("get", name="joined")[0]["manifest"]
        assert len(p.unpack_extents(manifest["extents"])) == 3
        with c.open("joined") as f:  # a ranged read across two extents
            f.seek(3 * 4096 + 90)
            assert f.read(20) == whole[3 * 4096 + 90 : 3 * 4096 + 110]
        c.rm("p/2")  # the parts go; the joined file keeps what it lists
        assert c.get_bytes("joined") == whole
        assert c.gc(grace=0)["chunks"] == 0
        assert c.get_bytes("joined") == whole


@pytest.mark.parametrize("store_digest", [p.OLD_STORE_DIGEST])  # as every store was then
def test_files_stored_before_protocol_2_are_read_and_checked_by_their_own_digest(make_cluster):
    """A store written by an older fms (here its first layout, migrated and upgraded on open):
    its files keep the sha256 of their content (kind `content`) and read back whole, in full and
    in ranges; a write then makes a `tree` version, and a copy keeps the kind it copies."""
    from storage_helpers import write_format1

    cluster = make_cluster()
    files = {"old/small": b"small and old", "old/big": os.urandom(45 * 4096 + 3)}
    write_format1(cluster.storage_dir, files, store_id="5eed")
    cluster.start_broker()
    cluster.start_cache()
    cluster.start_storage(wid="storage-a")
    cluster.wait_workers(storage=1, cache=1)
    with cluster.client() as c:
        for name, data in files.items():
            stat = c.stat(name)
            assert (stat["digest_kind"], stat["digest"]) == ("content", h(data).hex())
            assert c.get_bytes(name) == data
        with c.open("old/big") as f:
            assert f.read() == files["old/big"]  # read through: its content's sha256 checked
            f.seek(40 * 4096 + 1)
            assert f.read(10) == files["old/big"][40 * 4096 + 1 : 40 * 4096 + 11]
        assert c.cp("old/big", "copy")["digest_kind"] == "content"
        assert c.get_bytes("copy") == files["old/big"]
        assert c.put_bytes(b"new", "old/small")["digest_kind"] == "tree"
        [report] = list(c.fsck())
        assert (report["damaged"], report["refcount_errors"]) == ([], 0)


def test_an_ls_page_stays_within_its_bound_whatever_metadata_its_entries_hold(cluster):
    """The broker reserves `limit` x 1,280 bytes for an ls reply; entries carry their metadata
    (up to 2 KiB each, what S3 listings need: an ETag), so such a page holds fewer entries and
    says there are more."""
    meta = {f"k{i:02d}": "v" * 60 for i in range(30)}
    names = [f"d/{i:02d}/" + "n" * 1000 for i in range(10)]
    with cluster.client() as c:
        for name in names:
            c.put_bytes(b"x", name, meta=meta)
        for folders in (False, True):
            header, _ = c.call("ls", prefix="d/", limit=5, folders=folders)
            assert len(p.encode(header)) <= 5 * p.LS_ENTRY_MAX + 4096
        header, _ = c.call("ls", prefix="d/", limit=5)
        assert 1 <= len(header["entries"]) < 5 and header["more"]
        listed = c.ls("d/")  # paged through, a page at a time
        assert [e["name"] for e in listed] == names and listed[0]["meta"] == meta
        inside = list(c.iter_folder("d/00/", page=1))
        assert [e["name"] for e in inside] == [names[0]] and inside[0]["meta"] == meta
