"""benchmarks/s3floor.py's floors do the work they claim: the worker's framing, and floor B
(gateway, proxy, worker) storing and answering through boto3 while refusing a wrong signature.
How fast is measured by ``python -m benchmarks.s3floor``, not here."""

import os

import msgpack
import pytest

from benchmarks import s3floor
from benchmarks.s3gw import Target


def test_the_worker_keeps_a_put_and_answers_a_get_with_its_fields_and_data():
    objects: dict = {}
    put = {"op": "put", "id": 7, "name": "b/k", "etag": '"e"', "type": "text/plain"}
    (reply,) = s3floor.answer(objects, put, b"data")
    assert msgpack.unpackb(reply) == {"ok": True, "id": 7, "version": 1}
    header, data = s3floor.answer(objects, {"op": "get", "id": 8, "name": "b/k"}, None)
    fields = msgpack.unpackb(header)
    assert data == b"data"
    assert (fields["ok"], fields["id"], fields["etag"], fields["type"]) == (
        True,
        8,
        '"e"',
        "text/plain",
    )
    (missing,) = s3floor.answer(objects, {"op": "get", "id": 9, "name": "b/x"}, None)
    assert msgpack.unpackb(missing) == {"ok": False, "id": 9, "error": "not_found"}


def test_floor_b_stores_and_serves_through_the_proxy_and_checks_signatures():
    from botocore.exceptions import ClientError

    target, procs = s3floor.start_floor(hop=True)
    try:
        s3 = target.client()
        s3.create_bucket(Bucket="floor")
        body = os.urandom(4096)
        etag = s3.put_object(Bucket="floor", Key="a/b", Body=body)["ETag"]
        got = s3.get_object(Bucket="floor", Key="a/b")
        assert got["Body"].read() == body and got["ETag"] == etag
        wrong = Target(target.name, target.url, target.key_id, "not-the-secret").client()
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            wrong.get_object(Bucket="floor", Key="a/b")
        with pytest.raises(ClientError, match="NoSuchKey"):
            s3.get_object(Bucket="floor", Key="nothing")
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(5)
