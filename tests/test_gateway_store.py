"""The gateway's store side (:mod:`fms.gateway.store`), in process: what it sends to the broker
for a small body is what the client's upload code would send for the same bytes."""

import os

import pytest

from fms import wire as p
from fms.client import upload
from fms.gateway import store


@pytest.mark.parametrize("digest_fn", p.DIGEST_FUNCTIONS)
@pytest.mark.parametrize("size", [1, 4096, p.INLINE_MAX])
@pytest.mark.parametrize("meta", [None, {"etag": '"0123"', "content-type": "text/plain"}])
def test_inline_commit_fields_are_the_plans(digest_fn, size, meta):
    """A body of one chunk is committed by the gateway with the fields, file digest included,
    that plan_bytes and _commit_fields make for it (only the commit id and mtime differ)."""
    data = os.urandom(size)
    hash_fn = p.hasher(digest_fn)
    plan = upload.plan_bytes(data, store.CHUNK_SIZE, None, hash_fn)
    assert plan.inline is not None  # it travels with its commit
    plan.meta = meta
    want = upload._commit_fields("b/k", plan)
    got = store._inline_commit("b/k", data, hash_fn, meta)
    for fields in (want, got):
        assert len(fields.pop("commit")) == 32
        assert isinstance(fields.pop("mtime"), float)
    assert got == want


def test_metadata_and_checksum_headers_are_read_as_the_rules_say():
    """The metadata a PUT stores, and the x-amz-checksum-* headers it echoes and checks, as the
    rules say, written out here over every header: the stored headers by their first value,
    Content-Type's default, each x-amz-meta-* name lowered (its last value), in that order;
    names that only look like x-amz-meta- (or lower to it from other characters) are not."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from fms.gateway import app, sigv4

    items = [
        ("Cache-Control", "no-cache"),
        ("cache-control", "second"),
        ("X-Amz-Meta-Colour", "blue"),
        ("x-amz-meta-colour", "red"),
        ("x-AMZ-meta-Size", "3"),
        ("x-amz-metadata", "no"),
        ("x-amz-meta", "no"),
        ("\u0130-amz-meta-dot", "no"),  # lowers to two characters
        ("x-amz-meta-\u0130", "yes"),
        ("X-Amz-Date", "20261205T000000Z"),
        ("x-amz-checksum-crc32", "AAAAAA=="),
        ("x-amz-checksum-sha256", "BBBB"),
        ("Content-Disposition", "inline"),
    ]
    headers = CIMultiDictProxy(CIMultiDict(items))
    want: dict[str, str] = {}
    for name in app.STORED_HEADERS:
        values = [v for k, v in items if k.lower() == name]
        if values:
            want[name] = values[0]
    want.setdefault("content-type", "application/octet-stream")
    for name, value in items:
        if name.lower().startswith("x-amz-meta-"):
            want[name.lower()] = value
    got = app._meta_from_headers(headers, "key")
    assert list(got.items()) == list(want.items())
    echo = {
        f"x-amz-checksum-{a}": headers[f"x-amz-checksum-{a}"]
        for a in sigv4.CHECKSUM_ALGORITHMS
        if f"x-amz-checksum-{a}" in headers
    }
    assert list(app._checksum_echo(headers).items()) == list(echo.items())
    assert list(app._header_checksums(headers)) == ["crc32", "sha256"]
