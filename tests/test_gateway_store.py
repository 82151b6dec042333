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
