"""The S3 gateway (`fms s3`) against boto3 and raw HTTP: buckets, objects, ranges and
conditions, listing v1 and v2, copy, DeleteObjects, multipart, SigV4 (headers, presigned URLs,
every x-amz-content-sha256 mode, aws-chunked with trailers and checksums), TLS and S3's XML
errors.  One cluster and two gateways (HTTP and HTTPS) serve the whole module."""

import base64
import hashlib
import hmac
import http.client
import os
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from s3gw import Gateway

botocore = pytest.importorskip("botocore")
pytest.importorskip("aiohttp")
from botocore.exceptions import ClientError  # noqa: E402

from fms.gateway import sigv4  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def gw(s3_site):
    gateway = s3_site["http"]
    gateway.tls = s3_site["https"]
    return gateway


@pytest.fixture(scope="module")
def s3(gw):
    return gw.boto3()


_seq = [0]


@pytest.fixture
def bucket(s3):
    _seq[0] += 1
    name = f"api-{os.getpid()}-{_seq[0]}"
    s3.create_bucket(Bucket=name)
    return name


def code(exc: ClientError) -> str:
    return exc.response["Error"]["Code"]


# --- buckets ---


def test_buckets_create_list_head_location_delete(s3):
    s3.create_bucket(Bucket="life-cycle")
    assert "life-cycle" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket="life-cycle")
    assert s3.get_bucket_location(Bucket="life-cycle")["LocationConstraint"] is None
    with pytest.raises(ClientError) as err:
        s3.create_bucket(Bucket="life-cycle")
    assert code(err.value) == "BucketAlreadyOwnedByYou"
    s3.put_object(Bucket="life-cycle", Key="f", Body=b"1")
    with pytest.raises(ClientError) as err:
        s3.delete_bucket(Bucket="life-cycle")
    assert code(err.value) == "BucketNotEmpty"
    s3.delete_object(Bucket="life-cycle", Key="f")
    s3.delete_bucket(Bucket="life-cycle")
    with pytest.raises(ClientError) as err:
        s3.head_bucket(Bucket="life-cycle")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as err:
        s3.create_bucket(Bucket="No_Such")
    assert code(err.value) == "InvalidBucketName"
    with pytest.raises(ClientError) as err:
        s3.list_objects_v2(Bucket="never-made")
    assert code(err.value) == "NoSuchBucket"


def test_gateway_state_is_hidden(s3, bucket):
    s3.create_multipart_upload(Bucket=bucket, Key="pending")
    assert ".fms-s3" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    with pytest.raises(ClientError) as err:
        s3.list_objects_v2(Bucket=".fms-s3")
    assert code(err.value) in ("NoSuchBucket", "AccessDenied")


# --- objects ---


def test_put_get_head_delete_and_metadata(s3, bucket):
    body = os.urandom(3 * MiB + 17)
    put = s3.put_object(
        Bucket=bucket,
        Key="dir/data.bin",
        Body=body,
        ContentType="image/x-test",
        CacheControl="max-age=60",
        ContentDisposition='attachment; filename="d.bin"',
        Metadata={"colour": "blue"},
    )
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    head = s3.head_object(Bucket=bucket, Key="dir/data.bin")
    assert head["ContentLength"] == len(body)
    assert head["AcceptRanges"] == "bytes"
    # the metadata and the MD5 ETag are stored with the version and returned
    assert head["ETag"] == put["ETag"]
    assert head["ContentType"] == "image/x-test"
    assert head["CacheControl"] == "max-age=60"
    assert head["ContentDisposition"] == 'attachment; filename="d.bin"'
    assert head["Metadata"] == {"colour": "blue"}
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="dir/")["Contents"]
    assert listed[0]["ETag"] == put["ETag"]
    s3.put_object(Bucket=bucket, Key="dir/plain", Body=b"x")
    assert s3.head_object(Bucket=bucket, Key="dir/plain")["ContentType"] == (
        "application/octet-stream"
    )
    got = s3.get_object(Bucket=bucket, Key="dir/data.bin")
    assert got["Body"].read() == body
    assert got["ETag"] == head["ETag"]
    s3.delete_object(Bucket=bucket, Key="dir/data.bin")
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=bucket, Key="dir/data.bin")
    assert code(err.value) == "NoSuchKey"
    s3.delete_object(Bucket=bucket, Key="dir/data.bin")  # absent: still 204, as S3


def test_empty_and_small_objects(s3, bucket):
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    assert s3.head_object(Bucket=bucket, Key="empty")["ContentLength"] == 0
    s3.put_object(Bucket=bucket, Key="one", Body=b"x")
    assert s3.get_object(Bucket=bucket, Key="one", Range="bytes=0-0")["Body"].read() == b"x"


def test_small_puts_made_at_once_read_back_at_once_with_their_own_metadata(gw, bucket):
    """Small PUTs made at once: their commits wait together in the gateway and go as one
    commit_many (one transaction, each file its own ETag and Content-Type, a fill of the cache
    for each).  Each object read right after its PUT has its own body, ETag, Content-Type and
    metadata, and so after it is overwritten (the cache held the first content, read before)."""
    threads = 16
    s3 = gw.boto3(max_pool_connections=threads)
    keys = [f"at-once/{i:03d}" for i in range(4 * threads)]
    start = threading.Barrier(threads)

    def put_then_get(key: str, body: bytes, kind: str) -> None:
        etag = f'"{hashlib.md5(body).hexdigest()}"'
        put = s3.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType=kind, Metadata={"key": key}
        )
        assert put["ETag"] == etag
        got = s3.get_object(Bucket=bucket, Key=key)
        assert (got["Body"].read(), got["ETag"]) == (body, etag)
        assert (got["ContentType"], got["Metadata"]) == (kind, {"key": key})

    def worker(mine: list[str], round_: int) -> None:
        start.wait(30)
        for key in mine:
            body = os.urandom(1 + (61 * int(key[-3:]) + 997 * round_) % 6000)
            put_then_get(key, body, f"application/x-{round_}-{key[-3:]}")

    for round_ in range(2):  # the second overwrites what the first wrote and read
        with ThreadPoolExecutor(threads) as pool:
            jobs = [pool.submit(worker, keys[i::threads], round_) for i in range(threads)]
            for job in jobs:
                job.result(timeout=60)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="at-once/")["Contents"]
    assert [o["Key"] for o in listed] == keys
    for entry in listed:
        assert entry["ETag"] == s3.head_object(Bucket=bucket, Key=entry["Key"])["ETag"]


@pytest.mark.parametrize("size", [MiB - 1, MiB, MiB + 1, 2 * MiB + 5])
def test_bodies_around_the_chunk_size(gw, s3, bucket, size):
    """A body shorter than a chunk is stored whole, a longer one streamed chunk by chunk: either
    way the bytes and the MD5 ETag are the body's, and a wrong sha256 stores nothing."""
    body = os.urandom(size)
    etag = f'"{hashlib.md5(body).hexdigest()}"'
    assert s3.put_object(Bucket=bucket, Key="k", Body=body)["ETag"] == etag
    got = s3.get_object(Bucket=bucket, Key="k")
    assert got["ETag"] == etag and got["Body"].read() == body
    assert s3.get_object(Bucket=bucket, Key="k", Range="bytes=3-")["Body"].read() == body[3:]
    status, _, reply = raw(
        gw, "PUT", f"/{bucket}/bad", body, payload_hash=hashlib.sha256(b"x").hexdigest()
    )
    assert status == 400 and b"XAmzContentSHA256Mismatch" in reply
    assert raw(gw, "HEAD", f"/{bucket}/bad")[0] == 404


def test_content_md5_is_verified(gw, bucket):
    body = b"content that is not what the digest says"
    status, headers, reply = raw(
        gw, "PUT", f"/{bucket}/md5", body, {"Content-MD5": base64.b64encode(b"0" * 16).decode()}
    )
    assert status == 400 and b"<Code>BadDigest</Code>" in reply
    status, *_ = raw(gw, "GET", f"/{bucket}/md5")
    assert status == 404  # nothing was stored
    good = base64.b64encode(hashlib.md5(body).digest()).decode()
    status, headers, _ = raw(gw, "PUT", f"/{bucket}/md5", body, {"Content-MD5": good})
    assert status == 200 and headers["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'


def test_ranges(s3, gw, bucket):
    body = os.urandom(2 * MiB + 100)
    s3.put_object(Bucket=bucket, Key="r", Body=body)
    cases = {
        "bytes=0-9": body[:10],
        "bytes=1048570-1048590": body[1048570:1048591],  # across a chunk boundary
        "bytes=2097000-": body[2097000:],
        "bytes=-5": body[-5:],
        "bytes=10-99999999": body[10:],
    }
    for rng, want in cases.items():
        got = s3.get_object(Bucket=bucket, Key="r", Range=rng)
        assert got["Body"].read() == want, rng
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert got["ContentRange"].endswith(f"/{len(body)}")
    status, headers, reply = raw(gw, "GET", f"/{bucket}/r", headers={"Range": "bytes=9999999-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(body)}"
    assert b"<Code>InvalidRange</Code>" in reply


def test_conditional_requests(s3, gw, bucket):
    s3.put_object(Bucket=bucket, Key="c", Body=b"conditional")
    etag = s3.head_object(Bucket=bucket, Key="c")["ETag"]
    assert s3.get_object(Bucket=bucket, Key="c", IfMatch=etag)["Body"].read() == b"conditional"
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=bucket, Key="c", IfMatch='"0000"')
    assert code(err.value) == "PreconditionFailed"
    status, *_ = raw(gw, "GET", f"/{bucket}/c", headers={"If-None-Match": etag})
    assert status == 304
    later = "Fri, 01 Jan 2100 00:00:00 GMT"
    earlier = "Sat, 01 Jan 2000 00:00:00 GMT"
    assert raw(gw, "GET", f"/{bucket}/c", headers={"If-Modified-Since": later})[0] == 304
    assert raw(gw, "GET", f"/{bucket}/c", headers={"If-Modified-Since": earlier})[0] == 200
    assert raw(gw, "GET", f"/{bucket}/c", headers={"If-Unmodified-Since": earlier})[0] == 412
    assert raw(gw, "HEAD", f"/{bucket}/c", headers={"If-Unmodified-Since": later})[0] == 200


def test_response_overrides(s3, bucket):
    s3.put_object(Bucket=bucket, Key="o.txt", Body=b"text")
    got = s3.get_object(
        Bucket=bucket,
        Key="o.txt",
        ResponseContentType="application/x-over",
        ResponseContentDisposition="inline",
        ResponseCacheControl="no-store",
    )
    assert got["ContentType"] == "application/x-over"
    assert got["ContentDisposition"] == "inline"
    assert got["CacheControl"] == "no-store"


def test_copy_object(s3, bucket):
    s3.put_object(Bucket=bucket, Key="src", Body=b"copy me", Metadata={"a": "1"})
    copied = s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    assert copied["CopyObjectResult"]["ETag"] == s3.head_object(Bucket=bucket, Key="src")["ETag"]
    assert s3.get_object(Bucket=bucket, Key="dst")["Body"].read() == b"copy me"
    s3.copy_object(
        Bucket=bucket,
        Key="dst2",
        CopySource=f"{bucket}/src",
        MetadataDirective="REPLACE",
        ContentType="text/x-replaced",
    )
    assert s3.get_object(Bucket=bucket, Key="dst2")["Body"].read() == b"copy me"
    assert s3.head_object(Bucket=bucket, Key="dst2")["ContentType"] == "text/x-replaced"
    assert s3.head_object(Bucket=bucket, Key="dst")["Metadata"] == {"a": "1"}
    with pytest.raises(ClientError) as err:
        s3.copy_object(Bucket=bucket, Key="src", CopySource=f"{bucket}/src")
    assert code(err.value) == "InvalidRequest"
    before = s3.head_object(Bucket=bucket, Key="src")
    s3.copy_object(  # onto itself with new metadata: a new version, the same content
        Bucket=bucket,
        Key="src",
        CopySource=f"{bucket}/src",
        MetadataDirective="REPLACE",
        ContentType="text/x-new",
    )
    after = s3.head_object(Bucket=bucket, Key="src")
    assert int(after["VersionId"]) == int(before["VersionId"]) + 1
    assert s3.get_object(Bucket=bucket, Key="src")["Body"].read() == b"copy me"
    with pytest.raises(ClientError) as err:
        s3.copy_object(Bucket=bucket, Key="x", CopySource=f"{bucket}/absent")
    assert code(err.value) == "NoSuchKey"


def test_delete_objects_with_crc32_instead_of_md5(s3, gw, bucket):
    for k in ("d/1", "d/2", "d/3"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    reply = s3.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": "d/1"}, {"Key": "d/2"}, {"Key": "d/none"}]}
    )
    assert sorted(d["Key"] for d in reply["Deleted"]) == ["d/1", "d/2", "d/none"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["d/3"]
    body = b"<Delete><Object><Key>d/3</Key></Object><Quiet>true</Quiet></Delete>"
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    status, _, reply = raw(gw, "POST", f"/{bucket}?delete", body, {"x-amz-checksum-crc32": crc})
    assert status == 200 and b"<Deleted>" not in reply
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    status, _, reply = raw(
        gw, "POST", f"/{bucket}?delete", body, {"x-amz-checksum-crc32": "AAAAAA=="}
    )
    assert status == 400 and b"BadDigest" in reply
    status, _, reply = raw(gw, "POST", f"/{bucket}?delete", body)
    assert status == 400 and b"Content-MD5" in reply


# --- listing ---


def test_listing_v2_and_v1(s3, bucket):
    keys = ["a.txt", "b/1", "b/2", "b/c/3", "c/4", "d e+f", "z"]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    got = s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in got["Contents"]] == keys
    top = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [o["Key"] for o in top["Contents"]] == ["a.txt", "d e+f", "z"]
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["b/", "c/"]
    sub = s3.list_objects_v2(Bucket=bucket, Prefix="b/", Delimiter="/")
    assert [o["Key"] for o in sub["Contents"]] == ["b/1", "b/2"]
    assert [p["Prefix"] for p in sub["CommonPrefixes"]] == ["b/c/"]
    # paged by continuation token, two at a time, with folders
    seen, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=bucket, Delimiter="/", MaxKeys=2, **kw)
        seen += [o["Key"] for o in page.get("Contents", [])]
        seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert page["KeyCount"] <= 2
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert sorted(seen) == ["a.txt", "b/", "c/", "d e+f", "z"]
    after = s3.list_objects_v2(Bucket=bucket, StartAfter="b/2")
    assert [o["Key"] for o in after["Contents"]] == ["b/c/3", "c/4", "d e+f", "z"]
    # v1: marker paging
    seen, marker = [], ""
    while True:
        page = s3.list_objects(Bucket=bucket, MaxKeys=3, Marker=marker)
        seen += [o["Key"] for o in page["Contents"]]
        if not page["IsTruncated"]:
            break
        marker = page["Contents"][-1]["Key"]
    assert seen == keys
    v1 = s3.list_objects(Bucket=bucket, Delimiter="/", MaxKeys=2)
    assert v1["IsTruncated"] and v1["NextMarker"] == "b/"
    rest = s3.list_objects(Bucket=bucket, Delimiter="/", Marker=v1["NextMarker"])
    assert [p["Prefix"] for p in rest["CommonPrefixes"]] == ["c/"]


def test_listing_url_encoding_is_echoed(gw, bucket, s3):
    s3.put_object(Bucket=bucket, Key="sp ace/é", Body=b"x")
    status, _, reply = raw(gw, "GET", f"/{bucket}?list-type=2&encoding-type=url")
    assert status == 200
    assert b"<EncodingType>url</EncodingType>" in reply
    assert b"<Key>sp%20ace/%C3%A9</Key>" in reply


def test_max_keys_is_capped_at_1000(s3, bucket):
    reply = s3.list_objects_v2(Bucket=bucket, MaxKeys=5000)
    assert reply["MaxKeys"] == 1000


# --- multipart ---


def test_multipart_upload(s3, bucket):
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(1234)]
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp.bin", ContentType="video/x-test")
    uid = up["UploadId"]
    etags = []
    for i, data in enumerate(parts, 1):
        etags.append(
            s3.upload_part(Bucket=bucket, Key="mp.bin", UploadId=uid, PartNumber=i, Body=data)[
                "ETag"
            ]
        )
    assert etags[0] == f'"{hashlib.md5(parts[0]).hexdigest()}"'
    listed = s3.list_parts(Bucket=bucket, Key="mp.bin", UploadId=uid)
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2, 3]
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [uid]
    with pytest.raises(ClientError) as err:  # out of order
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="mp.bin",
            UploadId=uid,
            MultipartUpload={
                "Parts": [{"PartNumber": 2, "ETag": etags[1]}, {"PartNumber": 1, "ETag": etags[0]}]
            },
        )
    assert code(err.value) == "InvalidPartOrder"
    with pytest.raises(ClientError) as err:  # wrong ETag
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="mp.bin",
            UploadId=uid,
            MultipartUpload={
                "Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]
            },
        )
    assert code(err.value) == "InvalidPart"
    done = s3.complete_multipart_upload(
        Bucket=bucket,
        Key="mp.bin",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]},
    )
    want = hashlib.md5(b"".join(hashlib.md5(d).digest() for d in parts)).hexdigest() + "-3"
    assert done["ETag"] == f'"{want}"'
    again = s3.complete_multipart_upload(  # a client that lost the reply asks again
        Bucket=bucket,
        Key="mp.bin",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]},
    )
    assert again["ETag"] == done["ETag"]
    assert s3.get_object(Bucket=bucket, Key="mp.bin")["Body"].read() == b"".join(parts)
    head = s3.head_object(Bucket=bucket, Key="mp.bin")
    assert head["ETag"] == done["ETag"] and head["ContentType"] == "video/x-test"
    part2 = s3.get_object(Bucket=bucket, Key="mp.bin", PartNumber=2)
    assert part2["Body"].read() == parts[1] and part2["PartsCount"] == 3
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_multipart_small_part_and_abort(s3, bucket):
    uid = s3.create_multipart_upload(Bucket=bucket, Key="small")["UploadId"]
    e1 = s3.upload_part(Bucket=bucket, Key="small", UploadId=uid, PartNumber=1, Body=b"a" * 100)[
        "ETag"
    ]
    e2 = s3.upload_part(Bucket=bucket, Key="small", UploadId=uid, PartNumber=2, Body=b"b")["ETag"]
    with pytest.raises(ClientError) as err:
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="small",
            UploadId=uid,
            MultipartUpload={
                "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]
            },
        )
    assert code(err.value) == "EntityTooSmall"
    s3.abort_multipart_upload(Bucket=bucket, Key="small", UploadId=uid)
    with pytest.raises(ClientError) as err:
        s3.list_parts(Bucket=bucket, Key="small", UploadId=uid)
    assert code(err.value) == "NoSuchUpload"


def test_upload_part_copy(s3, bucket):
    src = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="src.bin", Body=src)
    uid = s3.create_multipart_upload(Bucket=bucket, Key="joined")["UploadId"]
    p1 = s3.upload_part_copy(
        Bucket=bucket,
        Key="joined",
        UploadId=uid,
        PartNumber=1,
        CopySource={"Bucket": bucket, "Key": "src.bin"},
        CopySourceRange=f"bytes=0-{5 * MiB - 1}",
    )["CopyPartResult"]["ETag"]
    p2 = s3.upload_part(Bucket=bucket, Key="joined", UploadId=uid, PartNumber=2, Body=b"tail")[
        "ETag"
    ]
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="joined",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": p1}, {"PartNumber": 2, "ETag": p2}]},
    )
    assert s3.get_object(Bucket=bucket, Key="joined")["Body"].read() == src[: 5 * MiB] + b"tail"


def test_expect_100_continue_is_answered_before_the_body(gw, s3, bucket):
    """The gateway runs on aiohttp's low-level server, without the router that used to answer
    ``Expect: 100-continue``: it answers it itself, before reading the body, and refuses an
    expectation it does not know (417)."""
    import socket

    body = b"sent after 100 Continue"
    path = f"/{bucket}/continued"
    stamp = datetime.now(UTC)
    amz_date, date = stamp.strftime("%Y%m%dT%H%M%SZ"), stamp.strftime("%Y%m%d")
    host = gw.url.split("//")[1]
    headers = {
        "host": host,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": hashlib.sha256(body).hexdigest(),
        "content-length": str(len(body)),
        "expect": "100-continue",
    }
    sign(headers, "PUT", path, "", gw, date, amz_date)
    hostname, port = host.rsplit(":", 1)
    with socket.create_connection((hostname, int(port)), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"PUT {path} HTTP/1.1\r\n{head}\r\n".encode())
        interim = b""
        while b"\r\n\r\n" not in interim:  # nothing of the body has been sent yet
            interim += sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        final = b""
        while b"\r\n\r\n" not in final:
            final += sock.recv(4096)
        assert final.startswith(b"HTTP/1.1 200 "), final
    assert s3.get_object(Bucket=bucket, Key="continued")["Body"].read() == body
    status, _, _ = raw(gw, "PUT", f"/{bucket}/odd", b"x", headers={"Expect": "something-else"})
    assert status == 417


# --- authentication ---


def test_anonymous_and_wrong_signatures_are_refused(gw, s3, bucket):
    s3.put_object(Bucket=bucket, Key="secret", Body=b"s")
    conn = http.client.HTTPConnection(gw.url.split("//")[1], timeout=10)
    conn.request("GET", f"/{bucket}/secret")
    reply = conn.getresponse()
    assert reply.status == 403 and b"<Code>AccessDenied</Code>" in reply.read()
    bad = Gateway.__new__(Gateway)
    bad.__dict__.update(gw.__dict__, secret="not-the-secret")
    with pytest.raises(ClientError) as err:
        bad.boto3().get_object(Bucket=bucket, Key="secret")
    assert code(err.value) == "SignatureDoesNotMatch"
    unknown = Gateway.__new__(Gateway)
    unknown.__dict__.update(gw.__dict__, key_id="NOSUCHKEY")
    with pytest.raises(ClientError) as err:
        unknown.boto3().get_object(Bucket=bucket, Key="secret")
    assert code(err.value) == "InvalidAccessKeyId"


def test_clock_skew_is_at_most_15_minutes(gw, bucket):
    skewed = time.time() - 16 * 60
    status, _, reply = raw(gw, "GET", f"/{bucket}?list-type=2", now=skewed)
    assert status == 403 and b"RequestTimeTooSkewed" in reply
    assert raw(gw, "GET", f"/{bucket}?list-type=2", now=time.time() - 14 * 60)[0] == 200


def test_presigned_urls(gw, s3, bucket):
    s3.put_object(Bucket=bucket, Key="share me.txt", Body=b"shared")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "share me.txt"}, ExpiresIn=60
    )
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.read() == b"shared"
    tampered = url.replace("share%20me.txt", "other.txt")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(tampered, timeout=10)
    assert err.value.code == 403
    week = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "share me.txt"}, ExpiresIn=8 * 86400
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(week, timeout=10)
    assert err.value.code == 400
    # an expired one: signed as if made two hours ago for one hour
    host = gw.url.split("//")[1]
    path = sigv4.presign(
        "GET", host, f"/{bucket}/share%20me.txt", gw.key_id, gw.secret, 3600, now=time.time() - 7200
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(gw.url + path, timeout=10)
    assert err.value.code == 403 and b"Request has expired" in err.value.read()
    put = s3.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "uploaded"}, ExpiresIn=60
    )
    request = urllib.request.Request(put, data=b"via presigned PUT", method="PUT")
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    assert s3.get_object(Bucket=bucket, Key="uploaded")["Body"].read() == b"via presigned PUT"


def test_signature_over_the_raw_path(gw, s3, bucket):
    """Keys whose encoding matters (spaces, '+', '%', unicode) are signed over the raw path."""
    for key in ("a+b", "100%", "caf\u00e9 / x", "q?uery=1&x", "tilde~"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode()


def test_payload_hash_is_verified(gw, bucket):
    body = b"the payload"
    status, _, reply = raw(
        gw, "PUT", f"/{bucket}/h", body, payload_hash=hashlib.sha256(b"x").hexdigest()
    )
    assert status == 400 and b"XAmzContentSHA256Mismatch" in reply
    assert raw(gw, "GET", f"/{bucket}/h")[0] == 404
    assert raw(gw, "PUT", f"/{bucket}/h", body)[0] == 200
    assert raw(gw, "PUT", f"/{bucket}/u", body, payload_hash="UNSIGNED-PAYLOAD")[0] == 200
    assert raw(gw, "GET", f"/{bucket}/u")[2] == body


AWS_SPEC = {  # the example of AWS's "Signature Calculations for the Authorization Header:
    # Transferring Payload in Multiple Chunks" (streaming SigV4), with its published signatures
    "key": "AKIAIOSFODNN7EXAMPLE",
    "secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "seed": "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
    "chunks": [
        "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
        "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
        "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
    ],
}


def test_streaming_signatures_match_aws_published_example():
    """The decoder accepts AWS's own example body (65 KiB of 'a' in 64 KiB chunks) with the
    signatures AWS published, and refuses it when one byte changes."""
    from multidict import CIMultiDict

    headers = CIMultiDict(
        {
            "Host": "s3.amazonaws.com",
            "x-amz-date": "20130524T000000Z",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={AWS_SPEC['key']}/20130524/us-east-1/s3/"
                "aws4_request,SignedHeaders=content-encoding;content-length;host;x-amz-content-"
                f"sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,Signature="
                f"{AWS_SPEC['seed']}"
            ),
            "x-amz-content-sha256": sigv4.STREAMING_SIGNED,
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
            "Content-Length": "66824",
        }
    )
    now = datetime(2013, 5, 24, tzinfo=UTC).timestamp()
    signed = sigv4.verify(
        "PUT",
        "/examplebucket/chunkObject.txt",
        "",
        headers,
        lambda key: (AWS_SPEC["secret"], "example"),
        now=now,
    )
    sizes = [65536, 1024, 0]
    body = b"".join(
        f"{n:x};chunk-signature={sig}\r\n".encode() + b"a" * n + b"\r\n"
        for n, sig in zip(sizes, AWS_SPEC["chunks"], strict=True)
    )
    assert len(body) == 66824
    decoder = sigv4.ChunkedDecoder(signed, [])
    out = b"".join(b"".join(decoder.feed(body[i : i + 1000])) for i in range(0, len(body), 1000))
    decoder.finish()
    assert out == b"a" * 66560
    bad = body.replace(b"a" * 10, b"a" * 9 + b"b", 1)
    decoder = sigv4.ChunkedDecoder(
        sigv4.verify(
            "PUT",
            "/examplebucket/chunkObject.txt",
            "",
            headers,
            lambda k: (AWS_SPEC["secret"], "x"),
            now=now,
        ),
        [],
    )
    with pytest.raises(sigv4.S3Error) as err:
        decoder.feed(bad)
    assert err.value.code == "SignatureDoesNotMatch"


@pytest.mark.parametrize(
    ("mode", "algorithm"),
    [(sigv4.STREAMING_SIGNED, None)]
    + [
        (mode, algorithm)
        for mode in (sigv4.STREAMING_UNSIGNED_TRAILER, sigv4.STREAMING_SIGNED_TRAILER)
        for algorithm in sigv4.CHECKSUM_ALGORITHMS
    ],
)
def test_aws_chunked_bodies(gw, bucket, mode, algorithm):
    """Every STREAMING-* mode with each trailing checksum: the decoded bytes are stored, a
    wrong checksum or chunk signature is refused and stores nothing."""
    body = os.urandom(200 * 1024 + 7)
    key = f"chunked-{mode}-{algorithm}"
    status, _, reply = chunked_put(gw, bucket, key, body, mode, algorithm)
    assert status == 200, reply
    assert raw(gw, "GET", f"/{bucket}/{key}")[2] == body
    status, _, reply = chunked_put(gw, bucket, key + "-bad", body, mode, algorithm, corrupt=True)
    assert status in (400, 403), reply
    assert (b"BadDigest" if mode != sigv4.STREAMING_SIGNED else b"SignatureDoesNotMatch") in reply
    assert raw(gw, "GET", f"/{bucket}/{key}-bad")[0] == 404


def test_an_aws_chunked_body_longer_than_announced_is_refused_at_its_first_extra_byte(gw, bucket):
    """x-amz-decoded-content-length says 10 and the first chunk holds 20 bytes: the PUT is
    refused then (IncompleteBody), not once the client has sent all it means to (it has not
    here: the connection stays open), and nothing is stored.  Such a PUT, announced small,
    counted as one on its way to the commit batcher for as long as it was read."""
    import socket

    host = gw.url.split("//")[1]
    path = f"/{bucket}/longer"
    stamp = datetime.now(UTC)
    amz_date, date = stamp.strftime("%Y%m%dT%H%M%SZ"), stamp.strftime("%Y%m%d")
    headers = {
        "host": host,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": sigv4.STREAMING_UNSIGNED_TRAILER,
        "content-encoding": "aws-chunked",
        "x-amz-decoded-content-length": "10",
        "x-amz-trailer": "x-amz-checksum-crc32",
    }
    sign(headers, "PUT", path, "", gw, date, amz_date)
    headers["content-length"] = str(1 << 20)  # far more than is sent
    hostname, port = host.rsplit(":", 1)
    with socket.create_connection((hostname, int(port)), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"PUT {path} HTTP/1.1\r\n{head}\r\n".encode() + b"14\r\n" + b"x" * 20)
        reply = b""
        while b"</Error>" not in reply:  # a timeout here: the gateway waited for the rest
            got = sock.recv(4096)
            assert got, reply
            reply += got
    assert reply.startswith(b"HTTP/1.1 400 ") and b"IncompleteBody" in reply, reply
    assert raw(gw, "GET", path)[0] == 404


def test_tls_with_default_checksums(gw, bucket, tmp_path):
    """boto3 over HTTPS sends aws-chunked bodies with a CRC32 trailer by default."""
    s3tls = gw.tls.boto3()
    data = os.urandom(9 * MiB + 3)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    s3tls.upload_file(str(src), bucket, "tls/up.bin")
    s3tls.download_file(bucket, "tls/up.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == data
    s3tls.put_object(Bucket=bucket, Key="tls/small", Body=b"small over tls")
    assert s3tls.get_object(Bucket=bucket, Key="tls/small")["Body"].read() == b"small over tls"


def test_errors_are_s3_xml_and_head_has_no_body(gw, bucket):
    status, headers, reply = raw(gw, "GET", f"/{bucket}/missing/key")
    assert status == 404
    for field in (
        b"<Code>NoSuchKey</Code>",
        b"<Message>",
        b"<Key>missing/key</Key>",
        b"<RequestId>",
    ):
        assert field in reply
    assert f"<Resource>/{bucket}/missing/key</Resource>".encode() in reply
    assert headers["Content-Type"] == "application/xml"
    status, headers, reply = raw(gw, "HEAD", f"/{bucket}/missing/key")
    assert status == 404 and reply == b""
    status, _, reply = raw(gw, "GET", "/no-such-bucket-here/k")
    assert status == 404 and b"<Code>NoSuchBucket</Code>" in reply
    status, _, reply = raw(gw, "GET", f"/{bucket}?acl")
    assert status == 501 and b"<Code>NotImplemented</Code>" in reply


def test_bad_keys_get_a_clear_error(s3, bucket):
    for key in ("a//b", "dir/", "./x"):
        with pytest.raises(ClientError) as err:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        assert code(err.value) == "InvalidArgument", key


# --- helpers: requests signed here, so the tests control every header ---


def raw(gw, method, path, body=b"", headers=None, payload_hash=None, now=None):
    """A request signed with SigV4 in its header; ``(status, headers, body)``."""
    host = gw.url.split("//")[1]
    path, _, query = path.partition("?")
    path = quote(path, safe="/~")
    headers = dict(headers or {})
    now = time.time() if now is None else now
    stamp = datetime.fromtimestamp(now, UTC)
    amz_date, date = stamp.strftime("%Y%m%dT%H%M%SZ"), stamp.strftime("%Y%m%d")
    headers["x-amz-date"] = amz_date
    headers["x-amz-content-sha256"] = payload_hash or hashlib.sha256(body).hexdigest()
    headers["host"] = host
    sign(headers, method, path, query, gw, date, amz_date)
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request(method, path + ("?" + query if query else ""), body=body, headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, reply.headers, data


def sign(headers, method, path, query, gw, date, amz_date):
    names = sorted(k.lower() for k in headers)
    lower = {k.lower(): v for k, v in headers.items()}
    canonical = "\n".join(
        [
            method,
            path,
            sigv4.canonical_query(query),
            "".join(f"{n}:{str(lower[n]).strip()}\n" for n in names),
            ";".join(names),
            lower["x-amz-content-sha256"],
        ]
    )
    scope = f"{date}/us-east-1/s3/aws4_request"
    to_sign = (
        f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    )
    key = sigv4.signing_key(gw.secret, date, "us-east-1", "s3")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={gw.key_id}/{scope},SignedHeaders={';'.join(names)},"
        f"Signature={signature}"
    )
    return key, signature, scope


def chunked_put(gw, bucket, key, body, mode, algorithm, corrupt=False, chunk=64 * 1024):
    """PUT ``body`` as an aws-chunked body in ``mode`` with an x-amz-checksum-``algorithm``
    trailer (signed chunks and trailer where the mode says)."""
    host = gw.url.split("//")[1]
    path = f"/{bucket}/{quote(key)}"
    stamp = datetime.now(UTC)
    amz_date, date = stamp.strftime("%Y%m%dT%H%M%SZ"), stamp.strftime("%Y%m%d")
    trailer = mode != sigv4.STREAMING_SIGNED
    headers = {
        "host": host,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": mode,
        "content-encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(body)),
    }
    if trailer:
        headers["x-amz-trailer"] = f"x-amz-checksum-{algorithm}"
    key_bytes, prev, scope = sign(headers, "PUT", path, "", gw, date, amz_date)
    signed = mode != sigv4.STREAMING_UNSIGNED_TRAILER
    hasher = sigv4.new_checksum(algorithm or "crc32")
    hasher.update(body)
    out = bytearray()
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] + [b""]
    for n, piece in enumerate(pieces):
        # corrupt: a byte of the second chunk changes after it was signed
        piece_sent = b"X" + piece[1:] if corrupt and not trailer and n == 1 else piece
        if signed:
            to_sign = "\n".join(
                [
                    "AWS4-HMAC-SHA256-PAYLOAD",
                    amz_date,
                    scope,
                    prev,
                    sigv4.EMPTY_SHA256,
                    hashlib.sha256(piece).hexdigest(),
                ]
            )
            prev = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
            out += f"{len(piece):x};chunk-signature={prev}\r\n".encode()
        else:
            out += f"{len(piece):x}\r\n".encode()
        if piece:
            out += piece_sent + b"\r\n"
    if trailer:
        digest = hasher.digest()
        if corrupt:
            digest = bytes(len(digest))
        value = base64.b64encode(digest).decode()
        line = f"x-amz-checksum-{algorithm}:{value}"
        out += line.encode() + b"\r\n"
        if signed:
            to_sign = "\n".join(
                [
                    "AWS4-HMAC-SHA256-TRAILER",
                    amz_date,
                    scope,
                    prev,
                    hashlib.sha256((line + "\n").encode()).hexdigest(),
                ]
            )
            sig = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
            out += f"x-amz-trailer-signature:{sig}\r\n".encode()
    out += b"\r\n"
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("PUT", path, body=bytes(out), headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, reply.headers, data


def test_fms_s3_refuses_bad_options_clearly(tmp_path):
    import subprocess
    import sys

    def s3(*args):
        done = subprocess.run(
            [sys.executable, "-m", "fms", "s3", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "FMS_S3_ACCESS_KEY": "", "FMS_S3_SECRET_KEY": ""},
        )
        return done.returncode, done.stderr

    status, err = s3("--port", "0", "--access-key", "k")
    assert status == 1 and "--secret-key" in err and "Traceback" not in err
    status, err = s3("--port", "0", "--key-cache", "-1")
    assert status == 1 and "--key-cache" in err and "Traceback" not in err
    status, err = s3("--host", "0.0.0.0", "--access-key", "k", "--secret-key", "s")
    assert status == 1 and "--tls-cert" in err and "Traceback" not in err
    status, err = s3("--access-key", "k", "--secret-key", "s", "--tls-cert", "/nonexistent")
    assert status == 1 and "--tls-key" in err
    bad = tmp_path / "keys.json"
    bad.write_text('[{"access_key": "x"}]')
    status, err = s3("--keys", str(bad))
    assert status == 1 and "secret_key" in err and "Traceback" not in err


def test_signature_over_the_raw_path_or_the_path_sigv4_encodes():
    """A signature holds over the raw path as sent, or over that path encoded as SigV4
    prescribes (a client that sends '~' as %7E but signs it as '~'); over any other path, or
    with another key, it is refused."""
    stamp = datetime(2026, 12, 4, 12, tzinfo=UTC)
    amz_date, date = stamp.strftime("%Y%m%dT%H%M%SZ"), stamp.strftime("%Y%m%d")
    secret = "fms-unit-secret-0123456789abcdefghijklmn"

    def headers_for(signed_path, secret=secret):
        headers = {"x-amz-date": amz_date, "x-amz-content-sha256": sigv4.UNSIGNED}
        headers["host"] = "127.0.0.1:9000"
        gw = type("G", (), {"secret": secret, "key_id": "FMSUNITKEY0000000001"})
        sign(headers, "GET", signed_path, "", gw, date, amz_date)
        return {k.lower(): v for k, v in headers.items()}

    def verify(raw_path, headers):
        return sigv4.verify(
            "GET", raw_path, "", headers, lambda key: (secret, "unit"), now=stamp.timestamp()
        )

    verify("/b/tilde%7E", headers_for("/b/tilde%7E"))  # the raw path, as sent
    verify("/b/tilde%7E", headers_for("/b/tilde~"))  # the path as SigV4 encodes it
    verify("/b/tilde~", headers_for("/b/tilde~"))
    for raw_path, headers in (
        ("/b/tilde%7E", headers_for("/b/tilde%7e%7E")),  # neither
        ("/b/tilde~", headers_for("/b/tilde%7E")),  # the raw path is the encoded one
        ("/b/tilde~", headers_for("/b/tilde~", secret + "x")),  # another key
    ):
        with pytest.raises(sigv4.S3Error) as err:
            verify(raw_path, headers)
        assert err.value.code == "SignatureDoesNotMatch"
