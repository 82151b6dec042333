"""Users and permissions end to end: real processes with CURVE, identities made by an admin,
each user's client holding only its own key."""

import json
import os

import pytest
from conftest import random_bytes, wait_for
from harness import Cluster

import fms
from fms import wire as p
from fms.security import CurveClient, keygen

KEEP = ["--keep-versions", "3"]


@pytest.fixture
def curve_cluster(tmp_path, request):
    """A CURVE cluster (broker, cache, two storage workers keeping 3 versions); its own client
    key is in the broker's --allow folder, so ``cluster.client()`` may do everything."""
    clusters = []

    def make(folder="c", storage_args=KEEP, backends=()):
        cluster = Cluster(tmp_path / folder, curve=True)
        clusters.append(cluster)
        cluster.start_broker()
        cluster.start_cache()
        for wid in ("storage-a", "storage-b"):
            data = str(tmp_path / folder / f"scratch-{wid}") if backends else None
            cluster.start_storage(data=data, wid=wid, extra=[*storage_args, *backends])
        cluster.wait_workers(storage=2, cache=1)
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None)
    for cluster in clusters:
        if failed is not None and failed.failed:
            print(cluster.logs())
        cluster.stop()


def user(cluster, name: str, *grants, admin=None) -> fms.Client:
    """Make identity ``name`` with a key of its own and ``grants`` ((role, prefix) pairs),
    through ``admin`` (default: the cluster's own client); :return: a client holding that key."""
    keys = cluster.tmp / "user-keys"
    public, secret = keygen(str(keys), f"{name}-{os.urandom(3).hex()}")
    with admin or cluster.client() as boss:
        boss.id_add(name, keys=[fms.security.load_public(public)])
        for role, prefix in grants:
            boss.grant(name, role, prefix)
    return as_key(cluster, secret)


def as_key(cluster, secret: str) -> fms.Client:
    broker_key = str(cluster.tmp / "keys" / "broker.key")
    return cluster.client(curve=CurveClient(secret, broker_key), retries=0)


def test_the_wipe_of_the_issue_fails_for_bob_at_the_first_step(curve_cluster):
    """Alice and Bob share a store that keeps 3 versions.  Bob's wipe (rm_prefix of each first
    letter, garbage commits to push retained versions out, rm, gc --grace 0) is refused at its
    first step, and at every later one; Alice's files and versions are whole."""
    cluster = curve_cluster()
    alice = user(cluster, "alice", ("write", "alice"))
    bob = user(cluster, "bob", ("write", "bob"))
    contents = {}
    for i in range(5):
        for v in range(3):
            contents[f"alice/f{i}"] = random_bytes(2000 + v, seed=10 * i + v)
            alice.put_bytes(contents[f"alice/f{i}"], f"alice/f{i}")
    with pytest.raises(fms.Forbidden, match="'bob' may not rm -r under 'a/'"):
        list(bob.rm_prefix("a"))
    with pytest.raises(fms.Forbidden, match="may not rm -r under 'alice/'"):
        list(bob.rm_prefix("alice/"))
    for step in (
        lambda: bob.put_bytes(b"garbage", "alice/f0"),
        lambda: bob.rm("alice/f0"),
        lambda: bob.mv("alice/f1", "bob/stolen"),
        lambda: bob.restore("alice/f2", 1),
        lambda: bob.purge("alice/f3", all_versions=True),
        lambda: bob.gc(grace=0),
        lambda: bob.get_bytes("alice/f4"),
        lambda: bob.versions("alice/f4"),
    ):
        with pytest.raises(fms.Forbidden):
            step()
    assert bob.ls("") == [] and bob.du("alice/")["files"] == 0  # he sees none of hers
    assert bob.usage() == {"files": 0, "bytes": 0}
    with alice:
        for name, content in contents.items():
            assert alice.get_bytes(name) == content
            assert [v["version"] for v in alice.versions(name)] == [3, 2, 1]
    log = list(cluster.client().audit())
    refused = [e for e in log if e["identity"] == "bob" and e["result"] == "forbidden"]
    assert {e["op"] for e in refused} >= {"rm -r", "put", "rm", "mv", "restore", "purge", "gc"}
    bob.close()


def test_bob_cannot_tell_what_alice_stores_nor_fetch_it_by_its_digest(curve_cluster):
    cluster = curve_cluster()
    alice = user(cluster, "alice", ("write", "alice"))
    bob = user(cluster, "bob", ("write", "bob"))
    secret = random_bytes(3 * p.MiB, seed=7)  # several chunks, through the cache
    alice.put_bytes(secret, "alice/secret.bin")
    assert alice.get_bytes("alice/secret.bin") == secret  # now in the cache too
    hash_fn = alice.session.hasher()  # the store's digest function
    digests = [hash_fn(secret[i : i + p.MiB]) for i in range(0, len(secret), p.MiB)]
    header, _ = bob.call("have", hashes=digests)
    assert header["missing"] == digests  # as if the store had none of them
    with pytest.raises(fms.Forbidden, match="through a file it belongs to"):
        bob.call("chunk", hash=digests[0], len=p.MiB)
    with pytest.raises(fms.Forbidden):
        bob.call("chunk", hash=digests[0], len=p.MiB, name="alice/secret.bin")
    with pytest.raises(fms.NotFound):  # a file of his own that does not list it
        bob.put_bytes(b"mine", "bob/mine")
        bob.call("chunk", hash=digests[0], len=p.MiB, name="bob/mine")
    # Uploading the same content himself works, and stores its bytes once.
    before = cluster.client().usage()["chunk_bytes"]
    bob.put_bytes(secret, "bob/copy.bin")
    assert bob.get_bytes("bob/copy.bin") == secret
    assert cluster.client().usage()["chunk_bytes"] == before
    bob.close()
    alice.close()


def test_readers_listings_and_the_cache_show_only_what_they_may_read(curve_cluster):
    cluster = curve_cluster()
    with cluster.client() as admin:
        for name in ("shared/a", "shared/b", "sharedX/c", "private/d"):
            admin.put_bytes(name.encode(), name)
            assert admin.get_bytes(name) == name.encode()  # cached
    long_file = random_bytes(40 * 4096, seed=3)  # 40 chunks of 4 KiB: a paged chunk list
    with cluster.client(chunk_size=4096) as admin:
        admin.put_bytes(long_file, "shared/long")
    carol = user(cluster, "carol", ("read", "shared"))
    assert carol.get_bytes("shared/long") == long_file  # its pages and chunks by their place
    assert carol.get_bytes("shared/long") == long_file  # again: from the cache, checked there
    assert [e["name"] for e in carol.ls("") if e["name"] != "shared/long"] == [
        "shared/a",
        "shared/b",
    ]
    assert [e["name"] for e in carol.iter_folder("")] == ["shared/"]
    assert carol.du("")["files"] == 3
    assert carol.get_bytes("shared/a") == b"shared/a"  # a cache hit
    with pytest.raises(fms.Forbidden, match="'carol' may not get 'private/d'"):
        carol.get_bytes("private/d")  # a cache hit for the admin: refused by the cache
    with pytest.raises(fms.Forbidden, match="write role"):
        carol.put_bytes(b"x", "shared/new")
    # Revoked: refused at once (the same broker told the cache before the ack).
    with cluster.client() as admin:
        admin.revoke("carol", "shared")
    with pytest.raises(fms.Forbidden):
        carol.get_bytes("shared/a")
    # Removed: its key is shut out by the broker.
    with cluster.client() as admin:
        admin.id_rm("carol")
    with pytest.raises(fms.Refused):
        carol.ls("")
    carol.close()


def test_a_key_of_the_allow_folder_may_do_everything_and_the_log_says_so(curve_cluster):
    cluster = curve_cluster()
    with cluster.client() as old:
        assert old.whoami()["identity"] == "allow-dir"
        old.put_bytes(b"x", "anything/at/all")
        assert old.gc(grace=3600)["dry_run"] is False
    assert "event=allow_dir_keys_are_admin" in cluster.proc("broker").log()


def test_held_versions_outlive_a_write_key_and_only_an_admin_purges(curve_cluster):
    """With --keep-for, a write key's garbage commits do not push retained versions out; the
    mistaken upload of a secret is purged in one command and gone after gc."""
    cluster = curve_cluster(storage_args=["--keep-versions", "1", "--keep-for", "1h"])
    bob = user(cluster, "bob", ("write", "bob"))
    for i in range(5):
        bob.put_bytes(b"version %d" % i, "bob/x")
    assert [v["version"] for v in bob.versions("bob/x")] == [5, 4, 3, 2, 1]  # all held
    bob.put_bytes(b"root:secret-hash\n" * 1000, "bob/shadow")
    bob.rm("bob/shadow")
    with pytest.raises(fms.Forbidden, match="admin role"):
        bob.purge("bob/shadow", all_versions=True)
    cli = cluster.cli(
        "--curve-secret",
        str(cluster.tmp / "keys" / "client.key_secret"),
        "--server-key",
        str(cluster.tmp / "keys" / "broker.key"),
        "purge",
        "bob/shadow",
        "--all-versions",
        "--json",
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == {"name": "bob/shadow", "purged": [1]}
    with pytest.raises(fms.NotFound):
        bob.get_bytes("bob/shadow")
    with pytest.raises(fms.NotFound):
        bob.versions("bob/shadow")
    with cluster.client() as admin:
        freed = admin.gc(grace=0)
        assert freed["chunks"] >= 1
        assert not list(f for page in admin.fsck() for f in page["damaged"])
    bob.close()


def test_the_admin_commands_with_json(curve_cluster, tmp_path):
    cluster = curve_cluster()
    keys = ["--curve-secret", str(cluster.tmp / "keys" / "client.key_secret")]
    keys += ["--server-key", str(cluster.tmp / "keys" / "broker.key")]
    public, _secret = keygen(str(tmp_path / "k"), "dave")

    def run(*args):
        out = cluster.cli(*keys, *args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    made = run("id", "add", "dave", "--key", public, "--s3")
    assert made["identity"]["name"] == "dave" and made["s3"]["access_key"].startswith("FMS")
    assert run("grant", "dave", "write", "dave/")["grants"] == [{"role": "write", "prefix": "dave"}]
    assert [i["name"] for i in run("id", "ls")] == ["admin", "dave"]  # the store's first, too
    assert run("whoami")["identity"] == "allow-dir"
    assert run("revoke", "dave", "dave")["grants"] == []
    assert run("id", "key", "dave", "--remove", made["s3"]["access_key"])["identity"]["keys"] == [
        {"kind": "curve", "key": fms.security.load_public(public).decode()}
    ]
    assert run("id", "rm", "dave") == {"removed": "dave"}
    ops = [(e["identity"], e["op"]) for e in run("audit")]
    assert ops == [
        ("system", "id add"),  # the first admin
        *(("allow-dir", op) for op in ("id add", "grant", "revoke", "id key rm", "id rm")),
    ]
    assert [(e["identity"], e["op"]) for e in run("audit", "--since", "1h")] == ops
    bad = cluster.cli(*keys, "grant", "nobody", "read", "x")
    assert bad.returncode == 1 and b"no identity 'nobody'" in bad.stderr
    assert b"Traceback" not in bad.stderr


def test_two_brokers_on_one_postgresql_agree(curve_cluster, request, monkeypatch, pg_database_url):
    """Identities live in the metadata engine: made behind one broker, they are let in and
    decided alike behind another broker on the same store within a second or so."""
    s3 = request.getfixturevalue("s3")
    bucket = request.getfixturevalue("s3_bucket")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    backends = ["--meta", pg_database_url, "--chunks", f"s3://{bucket}/fms"]
    one = curve_cluster("one", storage_args=[], backends=backends)
    two = curve_cluster("two", storage_args=[], backends=backends)
    public, secret = keygen(str(one.tmp / "erin-keys"), "erin")
    with one.client() as admin:
        admin.id_add("erin", keys=[fms.security.load_public(public)])
        admin.grant("erin", "write", "erin")
    broker_two = str(two.tmp / "keys" / "broker.key")

    def erin_two():
        try:
            with two.client(curve=CurveClient(secret, broker_two), timeout=1.0, retries=0) as c:
                return c.whoami()
        except fms.FmsError:
            return None

    seen = wait_for(erin_two, 10, "broker two to let erin in")
    assert seen["grants"] == [{"role": "write", "prefix": "erin"}]
    erin = two.client(curve=CurveClient(secret, broker_two))
    erin.put_bytes(b"from two", "erin/x")
    with two.client() as admin_two:
        admin_two.revoke("erin", "erin")  # behind broker two

    def refused_on_one():
        c = one.client(curve=CurveClient(secret, str(one.tmp / "keys" / "broker.key")))
        try:
            c.get_bytes("erin/x")
            return False
        except fms.Forbidden:
            return True

    wait_for(refused_on_one, 10, "broker one's side to refuse erin after the revoke")
    with pytest.raises(fms.Forbidden):
        erin.get_bytes("erin/x")
    erin.close()
