"""The S3 gateway and the store's identities: each access key is an identity's (``fms id add
NAME --s3``), each request acts for it, and storage decides it by its grants.

One CURVE cluster serves the module, with a gateway that holds only the key of identity
``s3gw`` (the gateway flag, and write on the gateway's own folder ``.fms-s3``): no static key,
and a key cache of :data:`KEY_CACHE` seconds.  The users, through boto3:

- ``boss``: admin on the whole store;
- ``alice``: write on bucket ``photos`` and on ``alice-new`` (a bucket she may create);
- ``bob``: read on ``photos``;
- ``carol``: read on ``photos/public`` only (a folder inside the bucket).
"""

import hashlib
import os

import pytest
from harness import Cluster, wait_for
from s3gw import Gateway

botocore = pytest.importorskip("botocore")
pytest.importorskip("aiohttp")
from botocore.exceptions import ClientError  # noqa: E402

import fms  # noqa: E402
from fms.security import keygen, load_public  # noqa: E402

KEY_CACHE = 1.0  # seconds the gateway keeps a key's look-up in this module
MiB = 1 << 20
FILES = {
    "photos/a.txt": b"alpha",
    "photos/public/p.txt": b"public picture",
    "photos/private/q.txt": b"private picture",
    "secret/s.txt": b"the secret",
}


class Site:
    """The module's cluster, gateway, admin client and users' S3 clients."""

    def __init__(self, cluster: Cluster, gateway: Gateway, admin: fms.Client) -> None:
        self.cluster, self.gateway, self.admin = cluster, gateway, admin
        self.keys: dict[str, tuple[str, str]] = {}

    def user(self, name: str, *grants: tuple[str, str]):
        """Make identity ``name`` with an S3 key and ``grants``: :return: its boto3 client."""
        made = self.admin.id_add(name, s3=True)
        for role, prefix in grants:
            self.admin.grant(name, role, prefix)
        key = made["s3"]["access_key"], made["s3"]["secret"]
        self.keys[name] = key
        return self.gateway.boto3(*key)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3ids")
    cluster = Cluster(folder, curve=True)
    try:
        cluster.start_broker()
        cluster.start_cache()
        cluster.start_storage(wid="storage-1", extra=["--keep-versions", "3"])
        cluster.wait_workers(storage=1, cache=1)
        admin = cluster.client()  # its key is in the broker's --allow folder: may do everything
        public, secret = keygen(str(folder / "gw-keys"), "s3gw")
        admin.id_add("s3gw", keys=[load_public(public)], gateway=True)
        admin.grant("s3gw", "write", ".fms-s3")
        curve = ["--curve-secret", secret, "--server-key", str(folder / "keys" / "broker.key")]
        extra = ("--key-cache", str(KEY_CACHE), *curve)
        yield Site(cluster, Gateway(cluster, str(folder), static=False, extra=extra), admin)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def users(site):
    boss = site.user("boss", ("admin", ""))
    for bucket in ("photos", "secret"):
        boss.create_bucket(Bucket=bucket)
    for name, data in FILES.items():
        bucket, _, key = name.partition("/")
        boss.put_object(Bucket=bucket, Key=key, Body=data)
    return {
        "boss": boss,
        "alice": site.user("alice", ("write", "photos"), ("write", "alice-new")),
        "bob": site.user("bob", ("read", "photos")),
        "carol": site.user("carol", ("read", "photos/public")),
    }


def denied(call, code: str = "AccessDenied", status: int = 403) -> ClientError:
    """``call()`` fails with the S3 error ``code`` and ``status``."""
    with pytest.raises(ClientError) as info:
        call()
    error = info.value.response["Error"]
    assert error["Code"] == code, error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    return info.value


def body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_a_reader_reads_and_lists_its_bucket(users):
    bob = users["bob"]
    assert keys(bob, "photos") == ["a.txt", "private/q.txt", "public/p.txt"]
    assert body(bob, "photos", "a.txt") == b"alpha"
    assert bob.head_object(Bucket="photos", Key="public/p.txt")["ContentLength"] == 14
    bob.head_bucket(Bucket="photos")


def test_a_readers_writes_are_denied_and_change_nothing(users):
    bob, boss = users["bob"], users["boss"]
    error = denied(lambda: bob.put_object(Bucket="photos", Key="new.txt", Body=b"x"))
    assert "'bob'" in error.response["Error"]["Message"]
    denied(lambda: boss.head_object(Bucket="photos", Key="new.txt"), "404", 404)
    denied(lambda: bob.delete_object(Bucket="photos", Key="a.txt"))
    denied(
        lambda: bob.copy_object(
            Bucket="photos", Key="copy.txt", CopySource={"Bucket": "photos", "Key": "a.txt"}
        )
    )
    denied(lambda: bob.create_multipart_upload(Bucket="photos", Key="big.bin"))
    denied(lambda: bob.create_bucket(Bucket="bobs-bucket"))
    denied(lambda: bob.delete_bucket(Bucket="photos"))
    result = bob.delete_objects(Bucket="photos", Delete={"Objects": [{"Key": "a.txt"}]})
    assert [e["Code"] for e in result.get("Errors", [])] == ["AccessDenied"]
    assert body(boss, "photos", "a.txt") == b"alpha"
    assert keys(boss, "photos") == ["a.txt", "private/q.txt", "public/p.txt"]
    assert "bobs-bucket" not in [b["Name"] for b in boss.list_buckets()["Buckets"]]


def test_other_buckets_are_out_of_reach(users):
    bob = users["bob"]
    denied(lambda: bob.get_object(Bucket="secret", Key="s.txt"))
    denied(lambda: bob.list_objects_v2(Bucket="secret"))
    denied(lambda: bob.put_object(Bucket="secret", Key="x", Body=b"x"))
    denied(lambda: bob.head_bucket(Bucket="secret"), "403")
    # A bucket that does not exist answers the same: a refusal tells nothing.
    denied(lambda: bob.list_objects_v2(Bucket="no-such-bucket"))
    assert body(users["boss"], "secret", "s.txt") == b"the secret"


def test_list_buckets_shows_the_buckets_an_identity_has_grants_in(users):
    def names(s3):
        return sorted(b["Name"] for b in s3.list_buckets()["Buckets"])

    assert names(users["bob"]) == ["photos"]
    assert names(users["carol"]) == ["photos"]
    assert {"photos", "secret"} <= set(names(users["boss"]))
    assert "secret" not in names(users["alice"])


def test_storage_decides_each_name_inside_a_bucket(users):
    """Carol may read only photos/public: the gateway lets her reach the bucket, and storage
    (deciding for her identity, not the gateway's) refuses the rest."""
    carol = users["carol"]
    assert body(carol, "photos", "public/p.txt") == b"public picture"
    denied(lambda: carol.get_object(Bucket="photos", Key="a.txt"))
    denied(lambda: carol.get_object(Bucket="photos", Key="private/q.txt"))
    assert keys(carol, "photos") == ["public/p.txt"]


def test_a_writer_writes_in_its_bucket_only(site, users, tmp_path):
    alice, boss = users["alice"], users["boss"]
    alice.put_object(Bucket="photos", Key="alice/one.txt", Body=b"one")
    assert body(boss, "photos", "alice/one.txt") == b"one"
    alice.delete_object(Bucket="photos", Key="alice/one.txt")
    denied(lambda: boss.head_object(Bucket="photos", Key="alice/one.txt"), "404", 404)
    # Multipart: the parts' chunks are hers, so Complete commits them by reference.
    data = os.urandom(9 * MiB + 123)
    source, back = tmp_path / "big.bin", tmp_path / "back.bin"
    source.write_bytes(data)
    alice.upload_file(str(source), "photos", "alice/big.bin")
    boss.download_file("photos", "alice/big.bin", str(back))
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data).digest()
    # A copy with new metadata of a file someone else stored.
    alice.copy_object(
        Bucket="photos",
        Key="alice/a-copy.txt",
        CopySource={"Bucket": "photos", "Key": "a.txt"},
        MetadataDirective="REPLACE",
        ContentType="text/plain",
    )
    head = boss.head_object(Bucket="photos", Key="alice/a-copy.txt")
    assert head["ContentType"] == "text/plain"
    assert body(boss, "photos", "alice/a-copy.txt") == b"alpha"
    # Reading the source needs read on it: storage refuses secret/ to her.
    denied(
        lambda: alice.copy_object(
            Bucket="photos", Key="stolen.txt", CopySource={"Bucket": "secret", "Key": "s.txt"}
        )
    )
    denied(lambda: boss.head_object(Bucket="photos", Key="stolen.txt"), "404", 404)
    # A bucket: with a grant on its name, not without.
    alice.create_bucket(Bucket="alice-new")
    denied(lambda: alice.create_bucket(Bucket="alice-other"))
    assert "alice-new" in [b["Name"] for b in alice.list_buckets()["Buckets"]]
    # The store's audit log names her, not the gateway.
    puts = [
        e
        for e in site.admin.audit()
        if e["op"] == "put" and "photos/alice/big.bin" in e.get("names", [])
    ]
    assert puts and {e["identity"] for e in puts} == {"alice"}


def test_an_unknown_key_is_refused(site):
    stranger = site.gateway.boto3("FMSNOSUCHKEY00000000", "no-such-secret-0123456789")
    denied(lambda: stranger.list_buckets(), "InvalidAccessKeyId")
    denied(lambda: stranger.get_object(Bucket="photos", Key="a.txt"), "InvalidAccessKeyId")


def test_a_removed_key_stops_working_within_the_cache_time(site, users):
    dave = site.user("dave", ("read", "photos"))
    assert body(dave, "photos", "a.txt") == b"alpha"  # looked up and kept
    site.admin.id_key("dave", remove=site.keys["dave"][0])

    def refused() -> bool:
        try:
            dave.list_objects_v2(Bucket="photos")
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "InvalidAccessKeyId", exc.response
            return True
        return False

    wait_for(refused, 10 * KEY_CACHE + 5, "the removed key to be refused")


def test_a_gateway_without_the_gateway_flag_says_so_and_static_keys_still_work(
    site, users, tmp_path
):
    """A gateway whose identity may not look keys up refuses the store's keys with a message
    saying what it lacks; a static key (--access-key) acts as that gateway's own identity."""
    public, secret = keygen(str(tmp_path), "plain")
    site.admin.id_add("plain", keys=[load_public(public)])
    site.admin.grant("plain", "read", "photos")
    broker_key = str(site.cluster.tmp / "keys" / "broker.key")
    plain = Gateway(
        site.cluster,
        str(tmp_path),
        name="s3plain",
        extra=("--curve-secret", secret, "--server-key", broker_key),
    )
    boss = plain.boto3(*site.keys["boss"])
    error = denied(lambda: boss.list_buckets())
    assert "gateway flag" in error.response["Error"]["Message"]
    static = plain.boto3()  # the test key: acts as identity 'plain', read on photos
    assert body(static, "photos", "a.txt") == b"alpha"
    denied(lambda: static.put_object(Bucket="photos", Key="plain.txt", Body=b"x"))
    denied(lambda: static.get_object(Bucket="secret", Key="s.txt"))
